"""The ``[collector]`` table of agent/config.py, the credential file (agent/ship_http.py), the
documentation of both, and ``sshaudit-agent spool list``'s shipping column."""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import KeySet, config_doc, make_keys, toml_text
from shipper_helpers import cast_pieces, make_spool, start_recording, write_recording

from sshaudit.agent import cli
from sshaudit.agent.config import MIN_UPLOAD_CHUNK, CollectorConfig, load_config, parse_config
from sshaudit.agent.ship_files import write_atomic
from sshaudit.agent.ship_http import load_credential
from sshaudit.agent.shipper import ShipState
from sshaudit.errors import ConfigError

DOCS = Path(__file__).resolve().parent.parent / "docs"
PIN = "SHA256:" + "ab" * 32
CREDENTIAL = "sa_host_" + "A" * 43


@pytest.fixture
def keys(tmp_path: Path) -> KeySet:
    return make_keys(tmp_path / "keys")


def with_collector(tmp: Path, keys: KeySet, **table: Any) -> dict[str, Any]:
    doc = config_doc(tmp, keys)
    doc["collector"] = {"url": "https://audit.example.com:8443", "fingerprint": PIN, **table}
    return doc


def test_no_collector_table_means_no_shipping(tmp_path: Path, keys: KeySet) -> None:
    assert parse_config(config_doc(tmp_path, keys)).collector is None


def test_collector_table_defaults_and_normalisation(tmp_path: Path, keys: KeySet) -> None:
    colon = ":".join(["AB"] * 32)  # openssl's form
    doc = with_collector(tmp_path, keys, url="https://10.0.0.5/audit/", fingerprint=colon)
    c = parse_config(doc).collector
    assert c is not None
    assert c.url == "https://10.0.0.5/audit" and c.fingerprint == PIN
    assert c.credential_file == Path("/etc/sshaudit/collector.token")
    assert c.upload_chunk_bytes == 2 << 20 and c.retry_max_seconds == 300.0


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"url": "http://audit.example.com"}, "collector.url: must be an https:// URL"),
        ({"url": "https://u:pw@audit.example.com"}, "must not hold a user name or password"),
        ({"url": "https://audit.example.com/?x=1"}, "no query or fragment"),
        ({"url": "https://audit.example.com:99999"}, "collector.url: must be a URL like"),
        ({"url": "https://bad_host!"}, "is not a host name or IP address"),
        ({"fingerprint": "SHA256:1234"}, "collector.fingerprint: a certificate fingerprint"),
        ({"credential_file": "token"}, "collector.credential_file: must be an absolute path"),
        ({"upload_chunk_bytes": 65536}, "collector.upload_chunk_bytes: Input should be greater"),
        ({"upload_chunk_bytes": 1 << 40}, "collector.upload_chunk_bytes: Input should be less"),
        ({"retry_max_seconds": 0}, "collector.retry_max_seconds: Input should be greater"),
        ({"retry_max_seconds": "5"}, "collector.retry_max_seconds"),
        ({"urll": "https://x"}, "collector.urll: unknown key"),
    ],
)
def test_collector_table_errors_name_the_key(
    tmp_path: Path, keys: KeySet, table: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(with_collector(tmp_path, keys, **table))


def test_url_and_fingerprint_are_required(tmp_path: Path, keys: KeySet) -> None:
    doc = config_doc(tmp_path, keys)
    doc["collector"] = {}
    with pytest.raises(ConfigError, match=r"collector\.url: required key is missing") as err:
        parse_config(doc)
    assert "collector.fingerprint: required key is missing" in str(err.value)


def test_the_smallest_chunk_holds_the_largest_frame() -> None:
    assert MIN_UPLOAD_CHUNK == 4 + (1 << 20) + 16  # FORMAT.md: u32 + 1 MiB + the tag


def test_the_documented_collector_example_is_valid(tmp_path: Path) -> None:
    """The commented-out [collector] table of the example, uncommented, is a valid config
    with the documented defaults; and every key is in docs/agent-config.md."""
    text = (DOCS / "agent.example.toml").read_text()
    start = text.index("# [collector]")
    block = [line.removeprefix("# ") for line in text[start:].splitlines() if line.startswith("# ")]
    table = tomllib.loads("\n".join(line for line in block if re.match(r"\[|\w+ = ", line)))
    c = CollectorConfig.model_validate(table["collector"])
    assert set(table["collector"]) == set(CollectorConfig.model_fields)
    default = CollectorConfig(url=c.url, fingerprint=c.fingerprint)
    assert c.credential_file == default.credential_file
    assert c.upload_chunk_bytes == default.upload_chunk_bytes
    assert c.retry_max_seconds == default.retry_max_seconds
    assert tomllib.loads(text).get("collector") is None  # commented out: no shipping
    manual = (DOCS / "agent-config.md").read_text()
    assert "## `[collector]`" in manual
    for name in CollectorConfig.model_fields:
        assert f"| `{name}` |" in manual, name


def test_credential_file_checks(tmp_path: Path) -> None:
    path = tmp_path / "collector.token"
    path.write_text(CREDENTIAL + "\n")
    path.chmod(0o600)
    assert load_credential(path) == CREDENTIAL
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="mode 0640 lets others read it") as err:
        load_credential(path)
    assert CREDENTIAL not in str(err.value)
    path.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(ConfigError, match="credential_file"):
        load_credential(link)
    with pytest.raises(ConfigError, match="No such file"):
        load_credential(tmp_path / "none")
    path.write_text("sa_auditor_" + "A" * 43)
    with pytest.raises(ConfigError, match="not a host credential") as err:
        load_credential(path)
    assert "sa_auditor_" not in str(err.value)
    if os.geteuid() == 0:
        path.write_text(CREDENTIAL)
        os.chown(path, 65534, 65534)
        with pytest.raises(ConfigError, match="owned by uid 65534"):
            load_credential(path)


def test_spool_list_shows_what_the_collector_confirmed(
    tmp_path: Path, keys: KeySet, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = with_collector(tmp_path, keys)
    config = tmp_path / "agent.toml"
    config.write_text(toml_text(doc))
    spool = make_spool(load_config(config).spool_dir)
    done = write_recording(spool, cast_pieces(3))
    live = start_recording(spool, session_start="2026-11-22T10:00:00Z")
    state = ShipState(live.session_id, acked=100, error="HTTP 403 foreign_session")
    write_atomic(spool.directory, f"{live.session_id}.ship", json.dumps(state.to_json()).encode())
    assert cli.main(["spool", "list", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-1] == "SHIPPED"
    rows = {line.split()[0]: line.split() for line in lines[1:3]}
    assert rows[done.session_id][-1] == "0" and rows[live.session_id][-1] == "100"
    backlog = len(done.data) + len(live.data) - 100
    assert lines[3] == (
        f"backlog: 2 sessions, {backlog} bytes not yet confirmed by https://audit.example.com:8443"
    )
    assert cli.main(["spool", "list", "--config", str(config), "--json"]) == 0
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_id = {d["session_id"]: d for d in docs}
    assert by_id[live.session_id]["shipped_bytes"] == 100
    assert by_id[live.session_id]["ship_error"] == "HTTP 403 foreign_session"
    assert by_id[done.session_id]["shipped_bytes"] == 0
