"""The daemon's identity side on its own: agent/daemon_auth.py (the principals command's AUTH
message and the PAM hook's phases bounded and turned into observations; a real certificate
made by ``ssh-keygen -s`` in SSH_AUTH_INFO_0) and agent/identity_service.py (observations
merged and queued as auth-events files in a real spool directory; flushed on stop; a host
without ``[identity]`` works with PAM alone; an enrolled host trusts the CA keys file)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sshaudit.agent.authlog import Kind, Observation, Source
from sshaudit.agent.config import AgentConfig, parse_config
from sshaudit.agent.daemon_auth import (
    pam_observation,
    principals_observation,
    session_observation,
)
from sshaudit.agent.identity_service import IdentityService
from sshaudit.agent.reconcile import PamEvent, PamPhase
from sshaudit.agent.ship_files import is_events_file

KEYGEN = shutil.which("ssh-keygen")
T0 = datetime(2026, 11, 22, 5, 0, 0, tzinfo=UTC)
SESSION = "0b5c7a1e-3f2d-4c8b-9a6e-1d2f3a4b5c6d"


def keygen(*args: str) -> str:
    if KEYGEN is None:
        pytest.skip("NOT RUN: ssh-keygen missing (apt-get install openssh-client)")
    done = subprocess.run([KEYGEN, *args], check=True, capture_output=True, text=True, timeout=60)
    return done.stdout


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A user certificate from ``ssh-keygen -s`` and what ssh-keygen says about it."""
    tmp = tmp_path_factory.mktemp("cert")
    keygen("-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "ca"))
    keygen("-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "user"))
    keygen(
        "-q",
        "-s",
        str(tmp / "ca"),
        "-I",
        "alice@example.com",
        "-n",
        "alice",
        "-z",
        "4242",
        "-V",
        "+1h",
        str(tmp / "user.pub"),
    )
    cert_type, cert_b64 = (tmp / "user-cert.pub").read_text().split()[:2]
    plain_type, plain_b64 = (tmp / "user.pub").read_text().split()[:2]
    return {
        "auth_info": f"publickey {cert_type} {cert_b64}\n",
        "plain_info": f"publickey {plain_type} {plain_b64}\n",
        "key_fp": keygen("-l", "-E", "sha256", "-f", str(tmp / "user.pub")).split()[1],
        "ca_fp": keygen("-l", "-E", "sha256", "-f", str(tmp / "ca.pub")).split()[1],
        "ca_line": (tmp / "ca.pub").read_text(),
    }


def gone_pid() -> int:
    """The pid of a process that has exited and been reaped: psutil finds nothing there."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


# -- principals_observation -------------------------------------------------------------


def test_principals_observation_keeps_good_fields() -> None:
    doc = {
        "time": T0.timestamp(),
        "client_address": "2001:db8::0:1",
        "client_port": 5022,
        "unix_user": "deploy",
        "allowed": True,
        "reason": "email prefix",
        "user_email": "alice@example.com",
        "cert_serial": 42,
        "cert_fingerprint": "SHA256:x",
        "rule": "email_prefix",
    }
    obs = principals_observation(doc, 1234)
    assert obs.source is Source.PRINCIPALS and obs.kind is Kind.DECISION and obs.pid == 1234
    assert obs.time == T0 and obs.method == "certificate"
    assert (obs.client_address, obs.client_port) == ("2001:db8::1", 5022)  # normalised
    assert (obs.unix_user, obs.allowed, obs.reason, obs.rule) == (
        "deploy",
        True,
        "email prefix",
        "email_prefix",
    )
    assert (obs.user_email, obs.cert_serial, obs.cert_fingerprint) == (
        "alice@example.com",
        42,
        "SHA256:x",
    )


def test_principals_observation_cuts_huge_strings() -> None:
    big = "x" * 100_000
    obs = principals_observation(
        {
            "client_address": "10.0.0.1",
            "client_port": 1,
            "unix_user": big,
            "reason": big,
            "user_email": big,
            "cert_fingerprint": big,
            "rule": big,
        },
        gone_pid(),
    )
    lengths = (
        len(obs.unix_user),
        len(obs.reason),
        len(obs.user_email),
        len(obs.cert_fingerprint),
        len(obs.rule),
    )
    assert lengths == (64, 1024, 320, 128, 64)


@pytest.mark.parametrize(
    "doc",
    [
        {
            "time": "yesterday",
            "allowed": "yes",
            "unix_user": 7,
            "reason": ["a"],
            "user_email": {"a": 1},
            "cert_serial": "42",
            "cert_fingerprint": None,
            "rule": 1.5,
            "client_address": 167772161,
            "client_port": "22",
        },
        {
            "time": -5,
            "allowed": 1,
            "cert_serial": -1,
            "client_port": 70000,
            "client_address": "10.0.0.1",
        },
        {
            "time": 1 << 50,
            "allowed": None,
            "cert_serial": 1 << 64,
            "client_port": True,
            "client_address": "not an address",
        },
        {"client_address": "10.0.0.1; rm -rf /", "client_port": 22},
        {"client_address": "x" * 10_000, "client_port": 22},
        {},
    ],
)
def test_principals_observation_defaults_for_wrong_types(doc: dict[str, Any]) -> None:
    before = datetime.now(UTC)
    obs = principals_observation(doc, gone_pid())
    assert before <= obs.time <= datetime.now(UTC)  # a bad time is "now"
    assert obs.allowed is False  # anything but a JSON boolean is a denial
    assert obs.cert_serial is None
    assert (obs.client_address, obs.client_port) == ("", None)  # and no live monitor to ask
    for text in (obs.unix_user, obs.reason, obs.user_email, obs.cert_fingerprint, obs.rule):
        assert isinstance(text, str)


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    try:
        yield client, accepted
    finally:
        for s in (client, accepted, server):
            s.close()


def test_a_bad_address_falls_back_to_the_monitors_connection(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    """sshd 9.2 gives the principals command no %C: the address comes from the TCP
    connection the monitor process (here: this test process) holds."""
    client, accepted = tcp_pair
    obs = principals_observation({"client_address": "bogus", "client_port": 1}, os.getpid())
    ends = {client.getpeername()[1], accepted.getpeername()[1]}
    assert obs.client_address == "127.0.0.1" and obs.client_port in ends


# -- pam_observation ---------------------------------------------------------------------


def pam(phase: PamPhase, **over: Any) -> PamEvent:
    fields: dict[str, Any] = {
        "phase": phase,
        "user": "alice",
        "rhost": "192.0.2.7",
        "service": "sshd",
        "tty": "ssh",
        "priv_pid": gone_pid(),
        "at": T0,
    }
    fields.update(over)
    return PamEvent(**fields)


def test_pam_phases() -> None:
    account = pam_observation(pam(PamPhase.ACCOUNT))
    opened = pam_observation(pam(PamPhase.OPEN))
    assert account is not None and opened is not None
    # both say "allowed so far": the recorder's start completes the login
    assert (account.kind, opened.kind) == (Kind.ACCOUNT, Kind.ACCOUNT)
    for obs in (account, opened):
        assert obs.source is Source.PAM and obs.allowed is True and obs.time == T0
        assert obs.unix_user == "alice" and obs.client_address == "192.0.2.7"
        assert obs.client_port is None and obs.method == "" and obs.user_email == ""
    assert pam_observation(pam(PamPhase.CLOSE)) is None
    assert pam_observation(pam(PamPhase.OPEN, queued=True)) is None  # replayed, stale


def test_session_observation_completes_a_login() -> None:
    obs = session_observation(321, SESSION, "alice", T0)
    assert (obs.source, obs.kind, obs.pid, obs.session_id) == (
        Source.PAM,
        Kind.SESSION_OPEN,
        321,
        SESSION,
    )
    assert obs.allowed is True and obs.unix_user == "alice" and obs.time == T0


def test_pam_rhost_that_is_not_an_address() -> None:
    obs = pam_observation(pam(PamPhase.OPEN, rhost="evil.example; $(id)"))
    assert obs is not None and obs.client_address == ""


def test_pam_with_a_real_certificate(cert: dict[str, str]) -> None:
    obs = pam_observation(pam(PamPhase.OPEN, auth_info=cert["auth_info"]))
    assert obs is not None
    assert (obs.method, obs.user_email, obs.cert_serial) == (
        "certificate",
        "alice@example.com",
        4242,
    )
    assert obs.cert_fingerprint == cert["key_fp"]


def test_pam_with_a_plain_key_and_with_garbage(cert: dict[str, str]) -> None:
    obs = pam_observation(pam(PamPhase.ACCOUNT, auth_info=cert["plain_info"]))
    assert obs is not None and obs.method == "publickey" and obs.user_email == ""
    assert obs.cert_fingerprint == cert["key_fp"] and obs.cert_serial is None
    for junk in (
        "publickey ssh-ed25519 !!!\n",
        "password\n",
        "x" * 70_000,
        cert["auth_info"][:-20] + "\n",
    ):
        obs = pam_observation(pam(PamPhase.OPEN, auth_info=junk))
        assert obs is not None and obs.method == "" and obs.cert_fingerprint == ""


def test_pam_address_from_the_monitor_beats_rhost(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    obs = pam_observation(pam(PamPhase.OPEN, rhost="192.0.2.7", priv_pid=os.getpid()))
    assert obs is not None and obs.client_address == "127.0.0.1" and obs.client_port


# -- IdentityService ---------------------------------------------------------------------


def config(tmp_path: Path, identity: bool, ca_text: str = "") -> AgentConfig:
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    doc: dict[str, Any] = {
        "host_id": "web-1",
        "spool_dir": str(spool),
        "recipients_dir": str(tmp_path / "auditors"),
    }
    if identity:
        (tmp_path / "ca.pub").write_text(ca_text)
        doc["identity"] = {
            "ca_keys_file": str(tmp_path / "ca.pub"),
            "policy_file": str(tmp_path / "policy.json"),
            "sshd_log": "off",
        }
    return parse_config(doc)


def queued(cfg: AgentConfig) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in sorted(cfg.spool_dir.iterdir()):
        assert is_events_file(p.name), p.name
        assert (p.stat().st_mode & 0o777) == 0o600
        out.extend(json.loads(p.read_text())["events"])
    return out


def obs(kind: Kind, t: float = 0, **over: Any) -> Observation:
    fields: dict[str, Any] = {
        "source": Source.SSHD_LOG,
        "time": T0 + timedelta(seconds=t),
        "kind": kind,
        "client_address": "192.0.2.9",
        "client_port": 40000,
        "unix_user": "alice",
    }
    fields.update(over)
    return Observation(**fields)


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> None:
        self.n += 1


def test_pam_only_host_queues_events(tmp_path: Path) -> None:
    cfg = config(tmp_path, identity=False)
    events = Counter()
    svc = IdentityService(cfg, on_events=events).start()
    try:
        event_ = pam(PamPhase.OPEN)
        opened = pam_observation(event_)
        assert opened is not None
        svc.observe(opened)
        assert queued(cfg) == []  # allowed so far; the recorder's start completes it
        svc.observe(session_observation(event_.priv_pid, SESSION, "alice", T0))
        (event,) = queued(cfg)
        assert event["allowed"] is True and event["unix_user"] == "alice"
        assert event["target_id"] == "web-1" and event["ip_address"] == "192.0.2.7"
        assert event["session_id"] == SESSION
        assert events.n == 1
        # no [identity]: sshd's Accepted finishes an attempt at once (no PAM wait)
        svc.observe(obs(Kind.ACCEPTED, method="publickey", allowed=True))
        assert len(queued(cfg)) == 2 and events.n == 2
    finally:
        svc.stop()
    assert svc.refresher is None


def test_observe_queues_only_after_the_merger_decides(tmp_path: Path) -> None:
    cfg = config(tmp_path, identity=False)
    svc = IdentityService(cfg)
    svc.observe(obs(Kind.CONNECT, unix_user=""))
    svc.observe(
        obs(Kind.INVALID_USER, 1, unix_user="mallory", allowed=False, reason="unknown user")
    )
    assert queued(cfg) == []  # undecided: nothing in the spool yet
    svc.observe(obs(Kind.CLOSED, 2, unix_user="mallory"))
    (event,) = queued(cfg)
    assert event["allowed"] is False and event["unix_user"] == "mallory"
    assert event["reason"] == "unknown user" and event["ip_address"] == "192.0.2.9"


def test_stop_flushes_what_is_pending(tmp_path: Path) -> None:
    cfg = config(tmp_path, identity=False)
    svc = IdentityService(cfg).start()
    svc.observe(obs(Kind.FAILED, unix_user="bob", method="publickey", allowed=False))
    assert queued(cfg) == []
    svc.stop()
    (event,) = queued(cfg)
    assert event["unix_user"] == "bob" and event["allowed"] is False


def test_tick_emits_settled_attempts(tmp_path: Path) -> None:
    """The flusher thread's clock is the injected wall: an attempt quiet for the settle
    window (5 s) is emitted without waiting for stop."""
    cfg = config(tmp_path, identity=False)
    svc = IdentityService(cfg, wall=lambda: T0 + timedelta(seconds=60)).start()
    try:
        svc.observe(obs(Kind.FAILED, unix_user="carol", method="password", allowed=False))
        deadline = datetime.now(UTC) + timedelta(seconds=10)
        while not queued(cfg):
            assert datetime.now(UTC) < deadline, "the flusher never emitted the settled attempt"
            time.sleep(0.05)
    finally:
        svc.stop()
    (event,) = queued(cfg)
    assert event["unix_user"] == "carol"


def test_enrolled_host_trusts_the_ca_file_and_waits_for_pam(
    tmp_path: Path, cert: dict[str, str]
) -> None:
    cfg = config(tmp_path, identity=True, ca_text="# header\n" + cert["ca_line"])
    svc = IdentityService(cfg).start()
    try:
        # an enrolled host has the PAM hook: Accepted alone does not finish the attempt
        svc.observe(obs(Kind.ACCEPTED, method="publickey", allowed=True, pid=500))
        assert queued(cfg) == []
        svc.observe(obs(Kind.SESSION_OPEN, 1, source=Source.PAM, allowed=True, pid=500))
        assert len(queued(cfg)) == 1
        # a failed certificate from the trusted CA vs from another one
        for port, ca in ((40001, cert["ca_fp"]), (40002, "SHA256:" + "A" * 43)):
            svc.observe(
                obs(
                    Kind.FAILED,
                    2,
                    client_port=port,
                    method="publickey",
                    allowed=False,
                    ca_fingerprint=ca,
                )
            )
            svc.observe(obs(Kind.CLOSED, 3, client_port=port))
    finally:
        svc.stop()
    _, trusted, untrusted = queued(cfg)
    assert "untrusted CA" not in trusted["reason"]
    assert untrusted["reason"] == f"certificate signed by an untrusted CA (SHA256:{'A' * 43})"


def test_a_missing_ca_file_is_not_fatal(tmp_path: Path) -> None:
    cfg = config(tmp_path, identity=True)
    (tmp_path / "ca.pub").unlink()
    svc = IdentityService(cfg).start()
    svc.stop()
    assert queued(cfg) == []


def test_a_spool_that_cannot_be_written_loses_no_exception(tmp_path: Path) -> None:
    cfg = config(tmp_path, identity=False)
    cfg.spool_dir.rmdir()
    events = Counter()
    svc = IdentityService(cfg, on_events=events)
    svc.observe(session_observation(1, SESSION, "alice", T0))  # logged, not raised
    assert events.n == 0


def test_enrolled_host_follows_the_sshd_log_file(tmp_path: Path) -> None:
    """``sshd_log`` = a file (sshd -E): lines appended after start become events."""
    log = tmp_path / "sshd.log"
    log.write_text("Invalid user before-start from 192.0.2.1 port 1\n")  # not re-read
    cfg = parse_config(
        {
            "host_id": "web-1",
            "spool_dir": str(tmp_path),
            "recipients_dir": str(tmp_path / "auditors"),
            "identity": {
                "ca_keys_file": str(tmp_path / "none.pub"),
                "policy_file": str(tmp_path / "policy.json"),
                "sshd_log": str(log),
            },
        }
    )
    spool = cfg.spool_dir
    svc = IdentityService(cfg).start()
    try:
        time.sleep(0.3)  # the follower opens the file at its end
        with log.open("a") as f:
            f.write("Invalid user mallory from 192.0.2.9 port 40000\n")
            f.write("Connection closed by invalid user mallory 192.0.2.9 port 40000 [preauth]\n")
        deadline = time.monotonic() + 10
        while not [p for p in spool.iterdir() if is_events_file(p.name)]:
            assert time.monotonic() < deadline, "the log line never became an event"
            time.sleep(0.05)
    finally:
        svc.stop()
    (path,) = [p for p in spool.iterdir() if is_events_file(p.name)]
    (event,) = json.loads(path.read_text())["events"]
    assert event["unix_user"] == "mallory" and event["allowed"] is False
    assert event["ip_address"] == "192.0.2.9"
