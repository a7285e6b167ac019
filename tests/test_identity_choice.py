"""Where a recording's identity comes from, sans-IO (agent/connection.py choose_identity,
agent/reconcile.py PamEvent.auth_info): root's copy of sshd's auth info (the PAM hook's
``auth_info``) whenever the PAM open carried one, the recorder's ``SSH_USER_AUTH`` copy
otherwise; a disagreement or a value sshd cannot have written is noted. End to end:
tests/test_e2e_identity.py."""

from __future__ import annotations

import base64
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sshaudit.agent.connection import (
    NOTE_ALTERED,
    NOTE_MISMATCH,
    IdentitySource,
    choose_identity,
)
from sshaudit.agent.protocol import ProtocolError
from sshaudit.agent.reconcile import PamEvent, Reconciler
from sshaudit.agent.sshcert import MAX_AUTH_INFO

NOW = datetime(2026, 11, 22, tzinfo=UTC)
PLAIN = "publickey ssh-ed25519 " + base64.b64encode(b"\0\0\0\x0bssh-ed25519" + b"k" * 36).decode()
OTHER = "publickey ssh-ed25519 " + base64.b64encode(b"\0\0\0\x0bssh-ed25519" + b"o" * 36).decode()


@pytest.fixture(scope="module")
def cert_line(tmp_path_factory: pytest.TempPathFactory) -> str:
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen (openssh-client) is missing: no certificate to test with")
    tmp = tmp_path_factory.mktemp("cert")

    def keygen(*args: str) -> None:
        subprocess.run(["ssh-keygen", "-q", *args], check=True, capture_output=True, timeout=30)

    keygen("-t", "ed25519", "-N", "", "-f", str(tmp / "ca"))
    keygen("-t", "ed25519", "-N", "", "-f", str(tmp / "id"))
    keygen(
        "-s",
        str(tmp / "ca"),
        "-I",
        "jdoe@example.com",
        "-n",
        "jdoe",
        "-z",
        "7",
        str(tmp / "id.pub"),
    )
    key_type, blob = Path(tmp / "id-cert.pub").read_text().split()[:2]
    return f"publickey {key_type} {blob}"


def test_without_root_s_copy_the_recorder_s_is_used(cert_line: str) -> None:
    ident = choose_identity(None, cert_line + "\n")
    assert ident.source is IdentitySource.RECORDER and ident.note is None
    assert ident.auth is not None and ident.auth.user_email == "jdoe@example.com"


def test_root_s_copy_wins_and_agreement_is_silent(cert_line: str) -> None:
    for recorder in (cert_line + "\n", ""):  # "": ExposeAuthInfo no, nothing to compare
        ident = choose_identity(cert_line + "\n", recorder)
        assert ident.source is IdentitySource.PAM and ident.note is None
        assert ident.auth is not None and ident.auth.certificate is not None
        assert (ident.auth.user_email, ident.auth.certificate.serial) == ("jdoe@example.com", 7)


def test_a_different_recorder_copy_is_noted_and_ignored(cert_line: str) -> None:
    ident = choose_identity(PLAIN + "\n", cert_line + "\n")
    assert ident.source is IdentitySource.PAM and ident.note == NOTE_MISMATCH
    assert ident.auth is not None and ident.auth.certificate is None
    assert choose_identity(PLAIN + "\n", OTHER + "\n").note == NOTE_MISMATCH
    # sshd named nobody (empty), the user's file names someone: noted, nobody recorded
    ident = choose_identity("", cert_line + "\n")
    assert ident.auth is None and ident.note == NOTE_MISMATCH


def test_a_value_sshd_cannot_have_written_names_nobody(cert_line: str) -> None:
    # pam_env can rewrite SSH_AUTH_INFO_0 but cannot end it with a newline; a value cut at
    # 64 KiB lost its newline too
    for pam in (cert_line, cert_line + "\n" + "x" * 10):
        ident = choose_identity(pam, cert_line + "\n")
        assert ident.auth is None and ident.note == NOTE_ALTERED
        assert ident.source is IdentitySource.PAM


def test_unreadable_values_are_compared_as_text() -> None:
    bad = "publickey ssh-ed25519 !!notbase64!!\n"
    ident = choose_identity(bad, bad)
    assert ident.auth is None and ident.note is None and ident.problem
    assert choose_identity(bad, PLAIN + "\n").note == NOTE_MISMATCH


def _pam(**over: object) -> dict[str, object]:
    doc: dict[str, object] = {"phase": "open_session", "user": "jdoe", "priv_pid": 4321}
    doc.update(over)
    return doc


def test_pam_event_auth_info() -> None:
    assert PamEvent.from_json(_pam(), NOW).auth_info is None  # an older hook: no field
    assert PamEvent.from_json(_pam(auth_info=PLAIN + "\n"), NOW).auth_info == PLAIN + "\n"
    cut = PamEvent.from_json(_pam(auth_info="a" * (MAX_AUTH_INFO + 5)), NOW).auth_info
    assert cut == "a" * MAX_AUTH_INFO
    with pytest.raises(ProtocolError, match="auth_info"):
        PamEvent.from_json(_pam(auth_info=5), NOW)


def test_reconciler_keeps_the_open_s_auth_info_for_the_connection() -> None:
    rec = Reconciler(5.0, lambda: 0.0, lambda: NOW)
    assert rec.auth_info(4321) is None
    rec.pam_event(PamEvent.from_json(_pam(auth_info=PLAIN + "\n"), NOW))
    assert rec.auth_info(4321) == PLAIN + "\n" and rec.auth_info(1) is None
    assert rec.auth_info(None) is None
    rec.recorder_started(4321, "s1")
    rec.pam_event(PamEvent.from_json(_pam(phase="close_session"), NOW))
    assert rec.auth_info(4321) == PLAIN + "\n"  # a recorder still runs on the connection
    rec.recorder_ended(4321, "s1", clean=True)
    assert rec.auth_info(4321) is None  # forgotten with the connection
