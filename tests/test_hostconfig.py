"""agent/hostconfig.py: the collector's HostConfig checked (good documents in, every kind of
bad CA line, auditor key and policy refused with ConfigError) and the files rendered from it
deterministic; CA fingerprints agree with ``ssh-keygen -lf`` on real keys."""

from __future__ import annotations

import base64
import json
import shutil
import struct
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sshaudit.agent.hostconfig import (
    MAX_AUDITOR_KEYS,
    MAX_CA_KEYS,
    auditor_files,
    ca_fingerprints,
    ca_keys_text,
    parse_host_config,
    policy_text,
)
from sshaudit.errors import ConfigError
from sshaudit.keys import AuditorPrivateKey, AuditorPublicKey, encode_key_text

KEYGEN = shutil.which("ssh-keygen")
pytestmark = pytest.mark.skipif(
    KEYGEN is None, reason="ssh-keygen missing: apt-get install openssh-client"
)


def keygen(*args: str) -> str:
    assert KEYGEN is not None
    done = subprocess.run([KEYGEN, *args], check=True, capture_output=True, text=True, timeout=60)
    return done.stdout


@pytest.fixture(scope="module")
def ca_pubs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real OpenSSH public key files: two ed25519 CAs and one ecdsa."""
    tmp = tmp_path_factory.mktemp("cas")
    out = {}
    for name, kind in (("ed1", "ed25519"), ("ed2", "ed25519"), ("ec", "ecdsa")):
        keygen("-q", "-t", kind, "-N", "", "-C", f"ca {name}", "-f", str(tmp / name))
        out[name] = tmp / f"{name}.pub"
    return out


def line(path: Path) -> str:
    return path.read_text().strip()


def auditor_text() -> str:
    return encode_key_text(AuditorPrivateKey.generate().public.raw).decode()


def doc(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "host_id": "web-1",
        "auditor_keys": [{"public_key": auditor_text(), "kid": "ignored"}],
        "ca_keys": [],
        "policy": {"principals": {"any": False}, "refresh_seconds": 60},
        "policy_version": 3,
    }
    base.update(over)
    return base


def test_good_document(ca_pubs: dict[str, Path]) -> None:
    key = auditor_text()
    s = parse_host_config(doc(auditor_keys=[{"public_key": key}], ca_keys=[line(ca_pubs["ed1"])]))
    assert s.host_id == "web-1" and s.policy_version == 3
    assert s.auditor_keys == (AuditorPublicKey.from_text(key.encode()),)
    kind, b64, *_comment = line(ca_pubs["ed1"]).split()
    assert s.ca_keys == (f"{kind} {b64}",)  # the comment is not carried into sshd's file
    assert s.policy == {"principals": {"any": False}, "refresh_seconds": 60}


def test_defaults_for_policy_and_version() -> None:
    d = doc()
    del d["policy"], d["policy_version"]
    s = parse_host_config(d)
    assert s.policy == {} and s.policy_version == 0


@pytest.mark.parametrize("keys", [[], None, "x"])
def test_no_auditor_key_is_refused(keys: Any) -> None:
    with pytest.raises(ConfigError, match="auditor"):
        parse_host_config(doc(auditor_keys=keys))


@pytest.mark.parametrize(
    "entry",
    [{"public_key": "AAAA"}, {"public_key": 5}, {}, "not-a-mapping", {"public_key": "ä" * 44}],
)
def test_bad_auditor_key_is_refused(entry: Any) -> None:
    with pytest.raises(ConfigError, match="auditor_keys"):
        parse_host_config(doc(auditor_keys=[entry]))


@pytest.mark.parametrize("host_id", [None, "", 7])
def test_missing_host_id_is_refused(host_id: Any) -> None:
    with pytest.raises(ConfigError, match="host_id"):
        parse_host_config(doc(host_id=host_id))


def _blob_line(kind: str, blob: bytes) -> str:
    return f"{kind} {base64.b64encode(blob).decode()}"


def _ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("ssh-dss " + base64.b64encode(_ssh_string(b"ssh-dss")).decode(), "not a supported"),
        ("ssh-ed25519", "not a supported"),
        ("", "not a supported"),
        ("ssh-ed25519 !!!not-base64!!!", "not valid base64"),
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI", "not valid base64"),  # bad padding
        (_blob_line("ssh-ed25519", b"\x00\x00"), "truncated"),
        (_blob_line("ssh-ed25519", b"\x00"), "truncated"),
        (_blob_line("ssh-ed25519", _ssh_string(b"ssh-rsa") + b"\x00" * 8), "another key type"),
        (_blob_line("ssh-ed25519", struct.pack(">I", 1 << 30) + b"ssh-ed25519"), "truncated"),
        (7, "every entry"),
        ("ssh-ed25519 " + "A" * 20000, "every entry"),
    ],
)
def test_bad_ca_lines_are_refused(bad: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_host_config(doc(ca_keys=[bad]))


def test_ca_blob_naming_another_real_type_is_refused(ca_pubs: dict[str, Path]) -> None:
    _, ec_b64, *_ = line(ca_pubs["ec"]).split()
    with pytest.raises(ConfigError, match="another key type"):
        parse_host_config(doc(ca_keys=[f"ssh-ed25519 {ec_b64}"]))


@pytest.mark.parametrize("name", ["ed1", "ec"])
def test_truncated_or_padded_real_ca_key_is_refused(ca_pubs: dict[str, Path], name: str) -> None:
    kind, b64, *_ = line(ca_pubs[name]).split()
    blob = base64.b64decode(b64)
    parse_host_config(doc(ca_keys=[_blob_line(kind, blob)]))  # the whole key is fine
    for cut in (blob[:-1], blob[:-10], _ssh_string(kind.encode()), blob + b"\x00"):
        with pytest.raises(ConfigError, match="truncated or has extra bytes"):
            parse_host_config(doc(ca_keys=[_blob_line(kind, cut)]))


def test_too_many_keys(ca_pubs: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="too many keys"):
        parse_host_config(doc(ca_keys=[line(ca_pubs["ed1"])] * (MAX_CA_KEYS + 1)))
    one = {"public_key": auditor_text()}
    with pytest.raises(ConfigError, match="too many keys"):
        parse_host_config(doc(auditor_keys=[one] * (MAX_AUDITOR_KEYS + 1)))
    # exactly at the limits is fine (and duplicates collapse)
    s = parse_host_config(
        doc(ca_keys=[line(ca_pubs["ed1"])] * MAX_CA_KEYS, auditor_keys=[one] * MAX_AUDITOR_KEYS)
    )
    assert len(s.ca_keys) == 1 and len(s.auditor_keys) == 1


@pytest.mark.parametrize(
    "over",
    [{"policy": []}, {"policy": "x"}, {"policy": None}, {"policy_version": "3"}],
)
def test_bad_policy_is_refused(over: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="policy"):
        parse_host_config(doc(**over))


def test_lists_must_be_lists() -> None:
    with pytest.raises(ConfigError, match="must be lists"):
        parse_host_config(doc(ca_keys="ssh-ed25519 AAAA"))


def test_ca_keys_sorted_and_deduplicated(ca_pubs: dict[str, Path]) -> None:
    lines = [line(ca_pubs[n]) for n in ("ed2", "ec", "ed1")]
    twice = [*lines, lines[0].rsplit(" ", 2)[0] + " other-comment", lines[1]]
    s = parse_host_config(doc(ca_keys=twice))
    expected = sorted({" ".join(x.split()[:2]) for x in lines})
    assert list(s.ca_keys) == expected and len(expected) == 3


def test_rendered_files_are_deterministic(ca_pubs: dict[str, Path]) -> None:
    keys = [{"public_key": auditor_text()} for _ in range(3)]
    cas = [line(ca_pubs[n]) for n in ("ed1", "ed2", "ec")]
    policy_a = {"b": 1, "a": {"y": [1, 2], "x": "é"}}
    policy_b = {"a": {"x": "é", "y": [1, 2]}, "b": 1}
    one = parse_host_config(doc(auditor_keys=keys, ca_keys=cas, policy=policy_a))
    two = parse_host_config(
        doc(auditor_keys=keys[::-1], ca_keys=cas[::-1] + cas[:1], policy=policy_b)
    )
    at = datetime(2026, 11, 22, 5, 0, 0, tzinfo=UTC)
    assert ca_keys_text(one) == ca_keys_text(two)
    assert auditor_files(one) == auditor_files(two)
    assert policy_text(one, at) == policy_text(two, at)

    text = ca_keys_text(one)
    assert text.endswith("\n") and text.startswith("#")
    assert text.splitlines()[1:] == list(one.ca_keys)
    files = auditor_files(one)
    assert sorted(files) == sorted(
        f"{AuditorPublicKey.from_text(k['public_key'].encode()).kid}.pub" for k in keys
    )
    for name, data in files.items():
        assert AuditorPublicKey.from_text(data).kid + ".pub" == name

    cache = json.loads(policy_text(one, at))
    assert cache == {
        "version": 3,
        "host_id": "web-1",
        "fetched_at": "2026-11-22T05:00:00Z",
        "policy": policy_a,
    }
    assert policy_text(one, at).isascii()


def test_no_ca_key_renders_a_comment_only() -> None:
    text = ca_keys_text(parse_host_config(doc()))
    assert all(x.startswith("#") for x in text.splitlines()) and text.endswith("\n")


def test_ca_fingerprints_match_ssh_keygen(ca_pubs: dict[str, Path]) -> None:
    names = ("ed1", "ec", "ed2")
    mine = ca_fingerprints(
        ["# a comment", "garbage", "ssh-ed25519 !!!"] + [line(ca_pubs[n]) for n in names]
    )
    theirs = [keygen("-l", "-E", "sha256", "-f", str(ca_pubs[n])).split()[1] for n in names]
    assert mine == theirs and all(f.startswith("SHA256:") for f in theirs)
