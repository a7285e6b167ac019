"""The auditor CLI end to end, as a user runs it (a subprocess of the installed entry point).

Every vector of FORMAT.md gives exactly its listed result through `sshaudit decrypt`;
keygen/seal/info/export behave as documented; errors are one line, never a traceback,
never key material; a refused file leaves no output file behind.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

VECTORS = Path(__file__).parent / "vectors"
SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "vectors"
SSHAUDIT = str(Path(sys.executable).parent / "sshaudit")
CAST = (VECTORS / "session.cast").read_bytes()


def run(*args: str | Path, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [SSHAUDIT, *map(str, args)], input=input, capture_output=True, timeout=60, check=False
    )


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """The vector keys, copied with private-key modes (so no permission warning)."""
    out = {}
    for name in ("auditor1.key", "auditor2.key", "auditor1.key.pub", "host.ed25519.pub"):
        shutil.copy(VECTORS / name, tmp_path / name)
        (tmp_path / name).chmod(0o600)
        out[name] = tmp_path / name
    return out


def assert_clean_error(proc: subprocess.CompletedProcess[bytes], status: int, *words: str) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == status, err
    assert "Traceback" not in err
    assert err.startswith("sshaudit: "), err
    for word in words:
        assert word in err, err
    for key in ("auditor1.key", "auditor2.key"):
        secret = (VECTORS / key).read_text().strip()
        assert secret not in err and secret[:20] not in err
    return err


def test_vectors_are_verbatim_copies() -> None:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} absent (a clone outside the workspace): nothing to compare")
    for original in SHARED.iterdir():
        assert (VECTORS / original.name).read_bytes() == original.read_bytes(), original.name


@pytest.mark.parametrize("key", ["auditor1.key", "auditor2.key"])
def test_session_vector_complete_signed(keys: dict[str, Path], tmp_path: Path, key: str) -> None:
    out = tmp_path / "out.cast"
    proc = run(
        "decrypt", "-k", keys[key], "--host-key", keys["host.ed25519.pub"],
        VECTORS / "session.sealed", "-o", out,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""
    assert out.read_bytes() == CAST
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_unsigned_vector(keys: dict[str, Path]) -> None:
    proc = run("decrypt", "-k", keys["auditor1.key"], VECTORS / "unsigned.sealed")
    assert proc.returncode == 0 and proc.stdout == CAST
    required = run(
        "decrypt", "-k", keys["auditor1.key"], "--host-key", keys["host.ed25519.pub"],
        VECTORS / "unsigned.sealed",
    )  # fmt: skip
    assert_clean_error(required, 1, "signature is absent")
    assert required.stdout == b""


def test_unsigned_vector_has_no_entry_for_auditor2(keys: dict[str, Path]) -> None:
    proc = run("decrypt", "-k", keys["auditor2.key"], VECTORS / "unsigned.sealed")
    assert_clean_error(proc, 1, "no recipient entry", "3c665f536749eda7")
    assert proc.stdout == b""


@pytest.mark.parametrize("name", ["truncated", "torn"])
def test_truncated_vectors(keys: dict[str, Path], tmp_path: Path, name: str) -> None:
    out = tmp_path / "out.cast"
    refused = run("decrypt", "-k", keys["auditor1.key"], VECTORS / f"{name}.sealed", "-o", out)
    assert_clean_error(refused, 1, "truncated after 3 frames", "--allow-truncated")
    assert not out.exists()
    allowed = run(
        "decrypt", "-k", keys["auditor1.key"], "--allow-truncated",
        VECTORS / f"{name}.sealed", "-o", out,
    )  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr
    assert b"truncated" in allowed.stderr
    prefix = out.read_bytes()
    assert 0 < len(prefix) < len(CAST) and CAST.startswith(prefix)
    if name == "torn":  # the same prefix as the cleanly truncated file
        clean = run("decrypt", "-k", keys["auditor1.key"], "--allow-truncated",
                    VECTORS / "truncated.sealed")  # fmt: skip
        assert clean.stdout == prefix


@pytest.mark.parametrize(
    ("name", "frame"), [("tampered", 2), ("reordered", 1), ("header-tampered", 0)]
)
def test_tampered_vectors(keys: dict[str, Path], tmp_path: Path, name: str, frame: int) -> None:
    out = tmp_path / "out.cast"
    proc = run("decrypt", "-k", keys["auditor1.key"], VECTORS / f"{name}.sealed", "-o", out)
    assert_clean_error(proc, 1, f"frame {frame} failed authentication")
    assert not out.exists()
    assert list(tmp_path.glob(".out.cast*")) == []  # no temporary file left either
    stdout = run("decrypt", "-k", keys["auditor1.key"], VECTORS / f"{name}.sealed")
    assert stdout.returncode == 1 and stdout.stdout == b""


def test_info_needs_no_key() -> None:
    proc = run("info", "--json", VECTORS / "session.sealed")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["session_id"] == "0b9f8c1e-3a52-4d7e-9c61-2f4d8e7a1b00"
    assert doc["host_id"] == "ref-host"
    assert [r["kid"] for r in doc["recipients"]] == ["3b6121a52a8530b2", "3c665f536749eda7"]
    text = run("info", VECTORS / "session.sealed").stdout.decode()
    assert "ref-host" in text and "3b6121a52a8530b2" in text


def test_keygen_seal_decrypt_round_trip(tmp_path: Path) -> None:
    key = tmp_path / "a.key"
    assert run("keygen", "-o", key).returncode == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    again = run("keygen", "-o", key)
    assert_clean_error(again, 2, "exists", "--force")
    sealed = tmp_path / "s.sealed"
    proc = run("seal", "--to", f"{key}.pub", "--frame-size", "37", VECTORS / "session.cast",
               "-o", sealed)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert b"echo" not in sealed.read_bytes()
    assert run("decrypt", "-k", key, sealed).stdout == CAST
    # The vector's own key cannot open what was sealed to a fresh key.
    other = run("decrypt", "-k", VECTORS / "auditor1.key", sealed)
    assert_clean_error(other, 1, "no recipient entry")


def test_seal_signed_verifies_with_host_key(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from sshaudit.keys import ed25519_private_text, ed25519_public_text

    host = Ed25519PrivateKey.generate()
    (tmp_path / "host.key").write_bytes(ed25519_private_text(host))
    (tmp_path / "host.pub").write_bytes(ed25519_public_text(host.public_key()))
    run("keygen", "-o", tmp_path / "a.key")
    sealed = tmp_path / "s.sealed"
    proc = run("seal", "--to", tmp_path / "a.key.pub", "--sign", tmp_path / "host.key",
               VECTORS / "session.cast", "-o", sealed)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ok = run("decrypt", "-k", tmp_path / "a.key", "--host-key", tmp_path / "host.pub", sealed)
    assert ok.returncode == 0 and ok.stdout == CAST
    wrong = run("decrypt", "-k", tmp_path / "a.key", "--host-key", VECTORS / "host.ed25519.pub",
                sealed)  # fmt: skip
    assert_clean_error(wrong, 1, "different host key")


def test_seal_rejects_invalid_asciicast(tmp_path: Path) -> None:
    bad = tmp_path / "bad.cast"
    bad.write_bytes(CAST.replace(b'[1.3, "i"', b'[1.3 "i"'))
    run("keygen", "-o", tmp_path / "a.key")
    out = tmp_path / "s.sealed"
    proc = run("seal", "--to", tmp_path / "a.key.pub", bad, "-o", out)
    assert_clean_error(proc, 2, "line 5", "not valid JSON")
    assert not out.exists()


@pytest.mark.parametrize(
    "content",
    [b"", b"not base64!\n", b"AAAA\n", os.urandom(32), b"A" * 5000],
    ids=["empty", "garbage", "short", "binary", "huge"],
)
def test_bad_key_files_are_clean_errors(tmp_path: Path, content: bytes) -> None:
    key = tmp_path / "bad.key"
    key.write_bytes(content)
    key.chmod(0o600)
    proc = run("decrypt", "-k", key, VECTORS / "session.sealed")
    assert_clean_error(proc, 2, str(key))


def test_missing_and_non_sealed_inputs(tmp_path: Path, keys: dict[str, Path]) -> None:
    proc = run("decrypt", "-k", keys["auditor1.key"], tmp_path / "nope.sealed")
    assert_clean_error(proc, 2, "cannot read")
    proc = run("decrypt", "-k", keys["auditor1.key"], VECTORS / "session.cast")
    assert_clean_error(proc, 1, "not a sealed recording")
    proc = run("info", VECTORS / "auditor1.key.pub")
    assert_clean_error(proc, 1, "not a sealed recording")


def test_stdin_input(keys: dict[str, Path]) -> None:
    data = (VECTORS / "session.sealed").read_bytes()
    proc = run("decrypt", "-k", keys["auditor1.key"], "-", input=data)
    assert proc.returncode == 0 and proc.stdout == CAST


def test_export_txt_and_cast(keys: dict[str, Path]) -> None:
    txt = run("export", "-k", keys["auditor1.key"], VECTORS / "session.sealed", "--format", "txt")
    assert txt.returncode == 0, txt.stderr
    assert "héllo ☃" in txt.stdout.decode()
    assert b"\x1b" not in txt.stdout and b"\x07" not in txt.stdout
    cast = run("export", "-k", keys["auditor1.key"], VECTORS / "session.sealed", "--format", "cast")
    assert cast.stdout == CAST
    plain = run("export", VECTORS / "session.cast", "--format", "txt")
    assert plain.stdout == txt.stdout
    sealed_needs_key = run("export", VECTORS / "session.sealed", "--format", "txt")
    assert_clean_error(sealed_needs_key, 2, "--key")


def test_help_for_every_command() -> None:
    for command in ("keygen", "seal", "decrypt", "info", "play", "export"):
        proc = run(command, "--help")
        assert proc.returncode == 0
        text = proc.stdout.decode()
        assert "examples:" in text and "exit status:" in text, command
