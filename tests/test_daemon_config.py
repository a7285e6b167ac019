"""agent/config.py: the TOML model, its errors (naming the key), the documented example, and
the key files (modes checked, content never quoted)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import KeySet, config_doc, make_keys, toml_text

from sshaudit.agent.config import (
    AgentConfig,
    CollectorConfig,
    IdentityConfig,
    OnDaemonDown,
    OnSpoolFull,
    PolicyConfig,
    load_config,
    load_sealing_keys,
    parse_config,
)
from sshaudit.agent.recorder_config import load as recorder_load
from sshaudit.errors import ConfigError
from sshaudit.keys import encode_key_text

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture
def keys(tmp_path: Path) -> KeySet:
    return make_keys(tmp_path / "keys")


def test_the_documented_example_loads_with_the_documented_defaults() -> None:
    config = load_config(DOCS / "agent.example.toml")
    assert config.host_id == "web-1"
    assert config.socket == Path("/run/sshaudit/agent.sock")
    assert config.recipients == (Path("/etc/sshaudit/auditors/team.pub"),)
    # the example spells out every policy key with its default value
    assert config.policy == PolicyConfig()
    example = tomllib.loads((DOCS / "agent.example.toml").read_text())
    assert set(example["policy"]) == set(PolicyConfig.model_fields)
    # [collector] is optional and commented out in the example (no shipping by default)
    optional = {"policy", "collector", "identity", "recipients_dir"}
    assert set(example) - {"policy"} == set(AgentConfig.model_fields) - optional


def test_every_key_is_documented() -> None:
    text = (DOCS / "agent-config.md").read_text()
    tables = (AgentConfig, PolicyConfig, CollectorConfig, IdentityConfig)
    for name in [f for model in tables for f in model.model_fields]:
        if name not in ("policy", "collector", "identity"):
            assert f"| `{name}` |" in text, name


def test_the_recorder_reads_the_same_example() -> None:
    rc = recorder_load(str(DOCS / "agent.example.toml"))
    assert rc.socket == "/run/sshaudit/agent.sock"
    assert rc.on_daemon_down.value == OnDaemonDown.DENY.value


def test_minimal_config_takes_defaults(tmp_path: Path, keys: KeySet) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('host_id = "h"\nrecipients = ["/k.pub"]\n')
    config = load_config(path)
    assert config.spool_dir == Path("/var/spool/sshaudit")
    assert config.policy.on_daemon_down is OnDaemonDown.DENY
    assert config.policy.on_spool_full is OnSpoolFull.REFUSE
    assert config.policy.frame_interval == 1.0 and config.policy.frame_max_bytes == 65536


def test_policy_values_are_parsed(tmp_path: Path, keys: KeySet) -> None:
    doc = config_doc(
        tmp_path,
        keys,
        on_daemon_down="allow",
        on_spool_full="drop_oldest",
        break_glass_users=["root", "ops-1"],
        frame_interval=2,
        record_input=False,
    )
    config = parse_config(doc)
    assert config.policy.on_daemon_down is OnDaemonDown.ALLOW
    assert config.policy.on_spool_full is OnSpoolFull.DROP_OLDEST
    assert config.policy.break_glass_users == ("root", "ops-1")
    assert config.policy.frame_interval == 2.0 and not config.policy.record_input
    with pytest.raises(ValueError, match="frozen"):
        config.policy.record_input = True


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"host_id": None}, "host_id: required key is missing"),
        ({"recipients": None}, "recipients: at least one auditor public key"),
        ({"host_id": "web 1"}, "host_id: must be"),
        ({"host_id": 5}, "host_id:"),
        ({"recipients": []}, "recipients:"),
        ({"recipients": ["rel/key.pub"]}, "recipients[0]: must be an absolute path"),
        ({"socket": "run/agent.sock"}, "socket: must be an absolute path"),
        ({"spool_dir": 7}, "spool_dir: must be a path"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"policy": 3}, "policy: must be a TOML table"),
        ({"policy": {"on_daemon_down": "maybe"}}, "policy.on_daemon_down:"),
        ({"policy": {"on_spool_full": "refuse!"}}, "policy.on_spool_full:"),
        ({"policy": {"record_input": 1}}, "policy.record_input:"),
        ({"policy": {"record_input": "yes"}}, "policy.record_input:"),
        ({"policy": {"exec_capture_cap": True}}, "policy.exec_capture_cap:"),
        ({"policy": {"exec_capture_cap": -1}}, "policy.exec_capture_cap:"),
        ({"policy": {"spool_max_bytes": 10}}, "policy.spool_max_bytes:"),
        ({"policy": {"frame_interval": 0}}, "policy.frame_interval:"),
        ({"policy": {"frame_interval": 61}}, "policy.frame_interval:"),
        ({"policy": {"frame_max_bytes": 2_000_000}}, "policy.frame_max_bytes:"),
        ({"policy": {"frame_max_bytes": 4096.0}}, "policy.frame_max_bytes:"),
        ({"policy": {"reconcile_grace": -5}}, "policy.reconcile_grace:"),
        ({"policy": {"break_glass_users": ["ok", "not ok"]}}, "policy.break_glass_users:"),
        ({"policy": {"break_glass_users": "root"}}, "policy.break_glass_users:"),
        ({"policy": {"on_daemon_dwon": "allow"}}, "policy.on_daemon_dwon: unknown key"),
    ],
)
def test_bad_values_name_the_key(
    tmp_path: Path, keys: KeySet, change: dict[str, Any], key: str
) -> None:
    doc = config_doc(tmp_path, keys)
    for name, value in change.items():
        if value is None:
            del doc[name]
        else:
            doc[name] = value
    path = tmp_path / "agent.toml"
    path.write_text(toml_text(doc))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"config {path}: ")
    assert key in message
    assert "Traceback" not in message and "pydantic" not in message


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"host_id = ", "not valid TOML"),
        (b"\xff\xfe", "not UTF-8"),
        (b"#" * (1 << 20) + b"x", "larger than"),
    ],
)
def test_unreadable_files(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=needle):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")


def test_sealing_keys_load(tmp_path: Path, keys: KeySet) -> None:
    sealing = load_sealing_keys(parse_config(config_doc(tmp_path, keys)))
    assert sealing.recipients == (keys.auditor.public,)
    assert sealing.host_key.public_key() == keys.host.public_key()
    assert keys.auditor.public.kid in repr(sealing)
    assert "host" not in repr(sealing).lower().replace("sealingkeys", "")


def test_a_host_key_readable_by_others_is_refused(tmp_path: Path, keys: KeySet) -> None:
    keys.host_file.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600") as info:
        load_sealing_keys(parse_config(config_doc(tmp_path, keys)))
    secret = encode_key_text(keys.host.private_bytes_raw()).decode().strip()
    assert secret not in str(info.value)


def test_a_symlinked_host_key_is_refused(tmp_path: Path, keys: KeySet) -> None:
    link = tmp_path / "link.key"
    link.symlink_to(keys.host_file)
    doc = config_doc(tmp_path, keys)
    doc["host_key_file"] = str(link)
    with pytest.raises(ConfigError, match="host_key_file"):
        load_sealing_keys(parse_config(doc))


def test_a_world_writable_recipient_is_refused(tmp_path: Path, keys: KeySet) -> None:
    keys.auditor_pub.chmod(0o666)
    with pytest.raises(ConfigError, match="writable by group or others"):
        load_sealing_keys(parse_config(config_doc(tmp_path, keys)))


def test_bad_key_content_and_duplicates(tmp_path: Path, keys: KeySet) -> None:
    doc = config_doc(tmp_path, keys)
    doc["recipients"] = [str(keys.auditor_pub), str(keys.auditor_pub)]
    with pytest.raises(ConfigError, match="listed twice"):
        load_sealing_keys(parse_config(doc))
    keys.auditor_pub.write_text("not a key\n")
    with pytest.raises(ConfigError, match=re.escape(str(keys.auditor_pub))):
        load_sealing_keys(parse_config(config_doc(tmp_path, keys)))
    doc["recipients"] = [str(tmp_path / "nope.pub")]
    with pytest.raises(ConfigError, match="cannot read"):
        load_sealing_keys(parse_config(doc))
