"""agent/sshcert.py against real certificates made by ssh-keygen (its -L and -l output is
the reference), plus fuzzing: malformed input gives FormatError, never another exception."""

from __future__ import annotations

import base64
import contextlib
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sshaudit.agent.sshcert import (
    AuthInfo,
    fingerprint,
    parse_certificate,
    parse_user_auth,
)
from sshaudit.errors import FormatError

KEYGEN = shutil.which("ssh-keygen")
pytestmark = pytest.mark.skipif(KEYGEN is None, reason="ssh-keygen (openssh-client) missing")


def keygen(*args: str) -> str:
    assert KEYGEN is not None
    return subprocess.run(
        [KEYGEN, *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout


def make_cert(tmp: Path, key_type: str, key_id: str, principals: str, serial: int) -> Path:
    ca, user = tmp / "ca", tmp / f"user-{key_type}"
    if not ca.exists():
        keygen("-q", "-t", "ed25519", "-N", "", "-f", str(ca))
    bits = ["-b", "2048"] if key_type == "rsa" else []
    keygen("-q", "-t", key_type, *bits, "-N", "", "-f", str(user))
    keygen(
        "-q",
        "-s", str(ca),
        "-I", key_id,
        "-n", principals,
        "-z", str(serial),
        "-V", "+52w",
        str(user) + ".pub",
    )  # fmt: skip
    return Path(str(user) + "-cert.pub")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("certs")
    return {
        "ed25519": make_cert(tmp, "ed25519", "jdoe@example.com", "jdoe,ops", 42),
        "ecdsa": make_cert(tmp, "ecdsa", "ann@example.com", "ann", 7),
        "rsa": make_cert(tmp, "rsa", "root-break-glass", "root", 2**63 + 5),
        "ca": tmp / "ca.pub",
    }


def blob(path: Path) -> tuple[str, bytes]:
    key_type, b64 = path.read_text().split()[:2]
    return key_type, base64.b64decode(b64)


@pytest.mark.parametrize("name", ["ed25519", "ecdsa", "rsa"])
def test_certificates_match_ssh_keygen(certs: dict[str, Path], name: str) -> None:
    path = certs[name]
    key_type, data = blob(path)
    cert = parse_certificate(data)
    listing = keygen("-L", "-f", str(path))
    assert cert.key_type == key_type
    assert f'Key ID: "{cert.key_id}"' in listing
    assert f"Serial: {cert.serial}" in listing
    assert re.search(r"Type: \S+ user certificate", listing) and cert.cert_type == 1
    listed = re.search(r"Principals: \n((?:\s+\S+\n)+)", listing)
    assert listed is not None
    assert cert.principals == tuple(listed.group(1).split())
    # "Public key: ED25519-CERT SHA256:..." and "Signing CA: ED25519 SHA256:..."
    assert re.search(rf"Public key: \S+ {re.escape(cert.fingerprint)}\n", listing)
    assert re.search(rf"Signing CA: \S+ {re.escape(cert.ca_fingerprint)} ", listing)
    ca_fp = keygen("-l", "-E", "sha256", "-f", str(certs["ca"])).split()[1]
    assert cert.ca_fingerprint == ca_fp
    assert cert.valid_before > cert.valid_after > 0


def test_ssh_user_auth_file(certs: dict[str, Path]) -> None:
    key_type, data = blob(certs["ed25519"])
    text = f"keyboard-interactive\npublickey {key_type} {base64.b64encode(data).decode()}\n"
    info = parse_user_auth(text)
    assert info is not None and info.certificate is not None
    assert info.user_email == "jdoe@example.com"
    assert info.key_fingerprint == info.certificate.fingerprint
    assert info.principal_for("jdoe") == "jdoe"
    assert info.principal_for("ops") == "ops"
    assert info.principal_for("nobody") == "jdoe"


def test_plain_public_key_has_no_identity(tmp_path: Path) -> None:
    keygen("-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k"))
    key_type, data = blob(tmp_path / "k.pub")
    info = parse_user_auth(f"publickey {key_type} {base64.b64encode(data).decode()}\n")
    assert info == AuthInfo(key_type, fingerprint(data), None)
    assert info.user_email == "" and info.principal_for("x") == ""
    expected = keygen("-l", "-E", "sha256", "-f", str(tmp_path / "k.pub")).split()[1]
    assert info.key_fingerprint == expected


def test_no_publickey_line() -> None:
    assert parse_user_auth("") is None
    assert parse_user_auth("password\n") is None


def test_email_prefix_principal() -> None:
    from sshaudit.agent.sshcert import Certificate

    cert = Certificate("t", 1, 1, "id", ("ops", "jdoe@example.com"), 0, 1, "f", "c")
    assert AuthInfo("t", "f", cert).principal_for("jdoe") == "jdoe@example.com"


def test_mismatched_key_type_and_bad_base64(certs: dict[str, Path]) -> None:
    _, data = blob(certs["ed25519"])
    line = f"publickey ssh-rsa-cert-v01@openssh.com {base64.b64encode(data).decode()}"
    with pytest.raises(FormatError, match="does not match"):
        parse_user_auth(line)
    with pytest.raises(FormatError, match="base64"):
        parse_user_auth("publickey ssh-ed25519-cert-v01@openssh.com !!!!")
    with pytest.raises(FormatError, match="64 KiB"):
        parse_user_auth("x" * 70_000)


def test_every_truncation_is_a_format_error(certs: dict[str, Path]) -> None:
    _, data = blob(certs["ed25519"])
    for n in range(len(data)):
        with pytest.raises(FormatError):
            parse_certificate(data[:n])
    with pytest.raises(FormatError, match="after the signature"):
        parse_certificate(data + b"\0")


def test_huge_lengths_are_refused_before_use(certs: dict[str, Path]) -> None:
    _, data = blob(certs["ed25519"])
    # the nonce length (after the 4+32 byte type string) claims 4 GiB
    head = struct.calcsize(">I") + len(b"ssh-ed25519-cert-v01@openssh.com")
    bad = data[:head] + b"\xff\xff\xff\xff" + data[head + 4 :]
    with pytest.raises(FormatError, match="runs past the end"):
        parse_certificate(bad)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_random_blobs(data: bytes) -> None:
    with contextlib.suppress(FormatError):
        parse_certificate(data)
    prefixed = struct.pack(">I", 32) + b"ssh-ed25519-cert-v01@openssh.com" + data
    with contextlib.suppress(FormatError):
        parse_certificate(prefixed)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_real_certificate(certs: dict[str, Path], data: st.DataObject) -> None:
    _, blob_bytes = blob(certs["ed25519"])
    raw = bytearray(blob_bytes)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    try:
        cert = parse_certificate(bytes(raw))
    except FormatError:
        return
    assert isinstance(cert.key_id, str) and all(isinstance(p, str) for p in cert.principals)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_user_auth_text(text: str) -> None:
    with contextlib.suppress(FormatError):
        parse_user_auth(text)
