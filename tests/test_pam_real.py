"""The PAM hook through the real PAM library (python-pam over libpam): a test PAM service
``/etc/pam.d/sshaudit-test-<pid>-<rand>`` runs the hook with the stock ``pam_exec.so`` on
open_session / close_session, with the daemon up (records appear) and down (the login
goes on at once; the event is queued and recorded when the daemon starts). The service
file is removed afterwards."""

from __future__ import annotations

import ctypes
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import DaemonThread, KeySet, make_config, make_keys, records, wait_for

from sshaudit.pam_module import hook

pam: Any = pytest.importorskip("pam", reason="python-pam missing: run scripts/bootstrap")

PAM_DIR = Path("/etc/pam.d")
PAM_EXEC = [
    Path(d) / "pam_exec.so"
    for d in (
        "/lib/x86_64-linux-gnu/security",
        "/usr/lib/x86_64-linux-gnu/security",
        "/lib/security",
        "/usr/lib64/security",
        "/usr/lib/security",
    )
]


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "they need root (a file in /etc/pam.d, and pam_exec runs the hook as root)"
    if not PAM_DIR.is_dir():
        return "/etc/pam.d does not exist"
    if not any(p.exists() for p in PAM_EXEC):
        return "pam_exec.so is not installed (libpam-modules)"
    return None


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeySet:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Callable[[Path, Path], str]]:
    reason = _unavailable()
    if reason is not None:
        pytest.skip(f"REAL PAM TESTS NOT RUN: {reason}")
    created: list[Path] = []

    def make(sock: Path, spool: Path) -> str:
        name = f"sshaudit-test-{os.getpid()}-{secrets.token_hex(4)}"
        log = tmp_path / "pam_exec.log"
        line = (
            f"session optional pam_exec.so quiet log={log} /usr/bin/python3 -I -S {hook.__file__}"
            f" --socket {sock} --spool-dir {spool}"
        )
        path = PAM_DIR / name
        path.write_text(
            "auth sufficient pam_permit.so\naccount sufficient pam_permit.so\n" + line + "\n"
        )
        created.append(path)
        return name

    yield make
    for path in created:
        path.unlink(missing_ok=True)


class Login:
    """One PAM conversation, as sshd's [priv] process holds it: start, open, close, end."""

    def __init__(self, service: str, user: str = "nobody", rhost: str = "192.0.2.55") -> None:
        self.p = pam.pam()
        assert self.p.authenticate(user, "", service=service, call_end=False), self.p.reason
        rc = self.p.pam_set_item(self.p.handle, pam.PAM_RHOST, ctypes.c_char_p(rhost.encode()))
        assert rc == pam.PAM_SUCCESS

    def open(self) -> float:
        started = time.monotonic()
        assert self.p.open_session() == pam.PAM_SUCCESS, self.p.reason
        return time.monotonic() - started

    def close(self) -> float:
        started = time.monotonic()
        assert self.p.close_session() == pam.PAM_SUCCESS, self.p.reason
        took = time.monotonic() - started
        self.p.end()
        return took


def test_daemon_up_pam_session_is_reconciled(
    tmp_path: Path, keys: KeySet, service: Callable[[Path, Path], str]
) -> None:
    config = make_config(tmp_path, keys, reconcile_grace=0.3)
    d = DaemonThread(config).start()
    try:
        login = Login(service(config.socket, config.spool_dir))
        assert login.open() < 1.5
        (rec,) = wait_for(lambda: records(d))
        assert rec["recording_status"] == "unrecorded"  # no recorder came: PAM alone
        assert rec["unix_user"] == "nobody" and rec["client_address"] == "192.0.2.55"
        assert rec["spool"]["priv_pid"] == os.getpid()  # pam_exec's parent: the PAM caller
        assert rec["details"]["pam_service"].startswith("sshaudit-test-")
        assert rec["session_finish"] is None
        assert login.close() < 1.5
        wait_for(lambda: records(d)[0]["session_finish"])
    finally:
        d.stop()


def test_daemon_down_login_goes_on_and_is_recorded_later(
    tmp_path: Path, keys: KeySet, service: Callable[[Path, Path], str]
) -> None:
    config = make_config(tmp_path, keys)
    config.spool_dir.mkdir(mode=0o700)
    login = Login(service(config.socket, config.spool_dir), rhost="198.51.100.99")
    assert login.open() < 1.0  # nothing listens: connect fails at once
    assert login.close() < 1.0
    queue = config.spool_dir / hook.PAM_QUEUE_NAME
    assert len(queue.read_text().splitlines()) == 2
    d = DaemonThread(config).start()
    try:
        (rec,) = records(d)
        assert rec["recording_status"] == "unrecorded" and rec["unix_user"] == "nobody"
        assert rec["client_address"] == "198.51.100.99"
        assert rec["session_finish"] and "daemon was down" in rec["error"]
    finally:
        d.stop()


def test_hung_daemon_costs_at_most_about_a_second(
    tmp_path: Path, keys: KeySet, service: Callable[[Path, Path], str]
) -> None:
    sock_path = tmp_path / "hung.sock"
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hung.bind(str(sock_path))
    hung.listen(8)  # accepts connections (backlog) and never answers
    try:
        login = Login(service(sock_path, tmp_path / "no-spool"))
        took = login.open()
        assert 0.5 < took < 2.5, took
        login.close()
    finally:
        hung.close()
