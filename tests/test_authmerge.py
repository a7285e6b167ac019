"""agent/authmerge.py: observations -> the collector's AuthEvent dicts.

The golden sshd logs (tests/golden/authlog) go through the real parser; the principals
command and PAM observations are built by hand, as their producers will send them.
Every event is checked against the collector's own pydantic model.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sshaudit.agent.authlog import Kind, Observation, Source, parse_line
from sshaudit.agent.authmerge import CLOSED_EARLY, AuthMerger
from sshaudit.collector.models import AuthEvent
from sshaudit.errors import UsageError

GOLDEN = Path(__file__).parent / "golden" / "authlog"
T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
FP = "SHA256:" + "A" * 43
FP2 = "SHA256:" + "C" * 43
CAFP = "SHA256:" + "B" * 43
SESSION = "0b6f1c2e-9d4a-4c1b-8f3e-2a5d7c9e1f00"
FIELDS = {
    "event_id", "created_at", "user_email", "unix_user", "ip_address", "target_id", "method",
    "allowed", "reason", "cert_serial", "cert_fingerprint", "session_id",
}  # fmt: skip


def merger(**kwargs: Any) -> AuthMerger:
    counter = itertools.count(1)
    return AuthMerger("host-1.example", new_id=lambda: f"ev{next(counter)}", **kwargs)


def check(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for event in events:
        assert set(event) == FIELDS
        AuthEvent.model_validate(event)  # the collector accepts it as is
    return events


def replay(name: str, m: AuthMerger | None = None) -> list[dict[str, Any]]:
    m = m or merger()
    events: list[dict[str, Any]] = []
    for i, line in enumerate((GOLDEN / f"{name}.log").read_text().splitlines()):
        obs = parse_line(line, T0 + timedelta(milliseconds=i))
        if obs is not None:
            events += m.add(obs)
    assert m.pending == 0, "every golden connection ends with a close line"
    return check(events + m.flush())


def sshd(line: str, at: float = 0.0, pid: int | None = None) -> Observation:
    obs = parse_line(line, T0 + timedelta(seconds=at), pid=pid)
    assert obs is not None, line
    return obs


def closed(user: str, address: str, port: int, pid: int | None = None) -> Observation:
    line = f"Connection closed by authenticating user {user} {address} port {port} [preauth]"
    return sshd(line, pid=pid)


def summary(event: dict[str, Any]) -> tuple[object, ...]:
    return (event["unix_user"], event["method"], event["allowed"], event["reason"])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("accepted-key", ("sshaudit-alice", "publickey", True, "")),
        ("accepted-key-info", ("sshaudit-alice", "publickey", True, "")),
        ("accepted-cert", ("sshaudit-alice", "certificate", True, "")),
        ("expired-cert", ("sshaudit-alice", "certificate", False, "certificate invalid: expired")),
        ("expired-cert-info", ("sshaudit-alice", "", False, "certificate invalid: expired")),
        (
            "future-cert",
            ("sshaudit-alice", "certificate", False, "certificate invalid: not yet valid"),
        ),
        (
            "principal-mismatch",
            (
                "sshaudit-alice",
                "certificate",
                False,
                "certificate invalid: name is not a listed principal",
            ),
        ),
        ("unknown-ca", ("sshaudit-alice", "certificate", False, "certificate not accepted")),
        ("unauthorized-key", ("sshaudit-bob", "publickey", False, "public key not authorized")),
        ("invalid-user", ("nosuchuser", "", False, "unknown user")),
        (
            "not-allowed-user",
            ("daemon", "", False, "user not allowed because not listed in AllowUsers"),
        ),
        (
            "denied-user",
            ("sshaudit-bob", "", False, "user not allowed because listed in DenyUsers"),
        ),
        (
            "max-tries",
            ("sshaudit-bob", "publickey", False, "maximum authentication attempts exceeded"),
        ),
        ("password-off", ("sshaudit-alice", "", False, CLOSED_EARLY)),
        ("password-accepted", ("sshaudit-alice", "password", True, "")),
    ],
)
def test_golden_logs_give_one_event_per_connection(name: str, expected: tuple[object]) -> None:
    (event,) = replay(name)
    assert summary(event) == expected
    assert event["ip_address"] == "127.0.0.1" and event["target_id"] == "host-1.example"
    assert event["event_id"] == "ev1" and event["created_at"].endswith("Z")


def test_certificate_fields_come_with_the_event() -> None:
    (ok,) = replay("accepted-cert")
    assert (ok["user_email"], ok["cert_serial"]) == ("alice@example.com", 4242)
    assert ok["cert_fingerprint"].startswith("SHA256:")
    (expired,) = replay("expired-cert")
    assert (expired["user_email"], expired["cert_serial"]) == ("alice@example.com", 17)


def test_refused_modes_reason_beats_the_failed_line() -> None:
    (event,) = replay("refused-modes")
    assert event["reason"].startswith("authentication refused: bad ownership or modes")


def test_unknown_ca_with_the_trusted_fingerprints_known() -> None:
    lines = (GOLDEN / "unknown-ca.log").read_text()
    (event,) = replay("unknown-ca", merger(trusted_cas=[CAFP]))
    assert event["reason"].startswith("certificate signed by an untrusted CA (SHA256:")
    assert event["reason"][len("certificate signed by an untrusted CA (") : -1] in lines
    # The CA that did sign it is trusted: the generic reason stays.
    ca = event["reason"][len("certificate signed by an untrusted CA (") : -1]
    (trusted,) = replay("unknown-ca", merger(trusted_cas=[ca]))
    assert trusted["reason"] == "certificate not accepted"


def test_two_passwords_connections() -> None:
    events = replay("password-failed")
    assert [summary(e) for e in events] == [
        ("sshaudit-alice", "password", False, "wrong password"),
        ("nosuchuser", "password", False, "unknown user"),
    ]


def test_forwarding_refusals_are_their_own_events() -> None:
    events = replay("forwarding-not-permitted")
    assert [e["method"] for e in events] == ["publickey", "forwarding"] * 2
    for fwd in events[1::2]:
        assert fwd["allowed"] is False and fwd["unix_user"] == "sshaudit-alice"
        assert "but the request was denied" in fwd["reason"]
    local = [e for e in replay("forwarding-refused") if e["method"] == "forwarding"]
    assert len(local) == 1 and local[0]["reason"].startswith("refused local port forward")


def test_principals_and_sshd_merge_denial_wins_and_sshd_reason_wins() -> None:
    m = merger()
    assert m.add(sshd('Connection from 192.0.2.5 port 4000 on 10.0.0.1 port 22 rdomain ""')) == []
    decision = Observation(
        Source.PRINCIPALS, T0, Kind.DECISION, client_address="192.0.2.5", client_port=4000,
        unix_user="alice", allowed=True, reason="", user_email="alice@example.com",
        cert_serial=9, cert_fingerprint=FP, rule="email_prefix",
    )  # fmt: skip
    assert m.add(decision) == []
    assert m.add(sshd("Certificate invalid: expired")) == []
    failed = sshd(
        f"Failed publickey for alice from 192.0.2.5 port 4000 ssh2: ED25519-CERT {FP}"
        f" ID alice@example.com (serial 9) CA ED25519 {CAFP}"
    )
    assert m.add(failed) == []
    (event,) = check(m.add(closed("alice", "192.0.2.5", 4000)))
    assert summary(event) == ("alice", "certificate", False, "certificate invalid: expired")
    assert (event["user_email"], event["cert_serial"], event["cert_fingerprint"]) == (
        "alice@example.com",
        9,
        FP,
    )


def test_principals_reason_beats_a_generic_failure() -> None:
    m = merger()
    deny = Observation(
        Source.PRINCIPALS, T0, Kind.DECISION, client_address="192.0.2.5", client_port=4001,
        unix_user="root", allowed=False, reason="no principal of the certificate maps to root",
        user_email="eve@example.com", cert_fingerprint=FP,
    )  # fmt: skip
    m.add(deny)
    m.add(sshd(f"Failed publickey for root from 192.0.2.5 port 4001 ssh2: ED25519 {FP}"))
    (event,) = check(m.add(closed("root", "192.0.2.5", 4001)))
    assert event["reason"] == "no principal of the certificate maps to root"
    assert event["user_email"] == "eve@example.com"


def test_accepted_wins_and_no_key_id_leaks_from_another_key() -> None:
    m = merger()
    m.add(
        sshd(
            f"Failed publickey for bob from 192.0.2.5 port 4002 ssh2: ED25519-CERT {FP}"
            f" ID eve@example.com (serial 3) CA ED25519 {CAFP}"
        )
    )
    (event,) = check(
        m.add(sshd(f"Accepted publickey for bob from 192.0.2.5 port 4002 ssh2: ED25519 {FP2}"))
    )
    assert summary(event) == ("bob", "publickey", True, "")
    assert (event["user_email"], event["cert_serial"], event["cert_fingerprint"]) == ("", None, FP2)


def test_journald_pids_keep_interleaved_connections_apart() -> None:
    m = merger()
    a = "Failed publickey for alice from 192.0.2.1 port 1000 ssh2: ED25519-CERT {fp} ID a (serial 1) CA ED25519 {ca}"  # noqa: E501
    m.add(sshd('Connection from 192.0.2.1 port 1000 on 10.0.0.1 port 22 rdomain ""', pid=11))
    m.add(sshd('Connection from 192.0.2.2 port 2000 on 10.0.0.1 port 22 rdomain ""', pid=22))
    m.add(sshd("error: Certificate invalid: expired", pid=22))
    m.add(sshd("error: Certificate invalid: name is not a listed principal", pid=11))
    m.add(sshd(a.format(fp=FP, ca=CAFP), pid=11))
    out = m.add(closed("bob", "192.0.2.2", 2000, pid=22))
    out += m.add(closed("alice", "192.0.2.1", 1000, pid=11))
    check(out)
    assert [(e["unix_user"], e["reason"]) for e in out] == [
        ("bob", "certificate invalid: expired"),
        ("alice", "certificate invalid: name is not a listed principal"),
    ]


def test_pam_session_gives_the_session_id_when_waiting_for_it() -> None:
    m = merger(wait_for_session=True)
    acc = sshd(f"Accepted publickey for bob from 192.0.2.5 port 4003 ssh2: ED25519 {FP}", pid=77)
    assert m.add(acc) == []
    m.add(sshd("User child is on pid 78", pid=77))
    session = Observation(
        Source.PAM, T0, Kind.SESSION_OPEN, client_address="192.0.2.5", unix_user="bob",
        allowed=True, pid=77, session_id=SESSION,
    )  # fmt: skip
    (event,) = check(m.add(session))
    assert summary(event) == ("bob", "publickey", True, "") and event["session_id"] == SESSION
    # A forwarding refusal logged later by the session child (pid 78) finds its user.
    fwd = sshd(
        "refused local port forward: originator 127.0.0.1 port 65535, target h port 9", pid=78
    )
    (refusal,) = check(m.add(fwd))
    assert (refusal["unix_user"], refusal["ip_address"], refusal["session_id"]) == (
        "bob",
        "192.0.2.5",
        SESSION,
    )
    # A late disconnect of the reported connection does not make a second event.
    assert m.add(sshd("Disconnected from user bob 192.0.2.5 port 4003", pid=77)) == []


def test_pam_without_pid_joins_by_address() -> None:
    m = merger(wait_for_session=True)
    m.add(sshd(f"Accepted publickey for bob from 192.0.2.5 port 4004 ssh2: ED25519 {FP}"))
    pam = Observation(
        Source.PAM, T0, Kind.SESSION_OPEN, client_address="192.0.2.5", unix_user="bob",
        session_id="not-a-uuid",
    )  # fmt: skip
    (event,) = check(m.add(pam))
    assert event["allowed"] is True and event["session_id"] is None  # a bad id is dropped


def test_settle_window() -> None:
    m = merger(settle=5)
    m.add(sshd("Invalid user x from 192.0.2.9 port 5 [preauth]", at=0))
    m.add(sshd("Failed password for invalid user x from 192.0.2.9 port 5 ssh2", at=2))
    assert m.tick(T0 + timedelta(seconds=6.9)) == []
    (event,) = check(m.tick(T0 + timedelta(seconds=7)))
    assert summary(event) == ("x", "password", False, "unknown user")
    assert event["created_at"] == "2026-11-22T12:00:00.000000Z"
    assert m.pending == 0 and m.tick(T0 + timedelta(hours=1)) == []


def test_a_scan_without_a_user_makes_no_event() -> None:
    m = merger()
    m.add(sshd('Connection from 192.0.2.9 port 6 on 10.0.0.1 port 22 rdomain ""'))
    assert m.add(sshd("Connection closed by 192.0.2.9 port 6 [preauth]")) == []
    assert m.tick(T0 + timedelta(minutes=1)) == [] and m.pending == 0


def test_an_unattached_reason_is_reported_alone_after_settle() -> None:
    m = merger(settle=1)
    assert m.add(sshd("Certificate invalid: expired")) == []
    (event,) = check(m.tick(T0 + timedelta(seconds=1)))
    assert (event["allowed"], event["reason"], event["ip_address"]) == (
        False,
        "certificate invalid: expired",
        "",
    )


def test_pending_attempts_are_bounded() -> None:
    m = merger(max_pending=3)
    out: list[dict[str, Any]] = []
    for port in range(1, 6):
        out += m.add(sshd(f"Invalid user u{port} from 192.0.2.1 port {port}"))
    assert m.pending == 3
    assert [e["unix_user"] for e in check(out)] == ["u1", "u2"]  # the oldest, emitted early
    assert [e["unix_user"] for e in check(m.flush())] == ["u3", "u4", "u5"]


def test_observations_per_attempt_are_bounded() -> None:
    m = merger()
    for i in range(500):
        m.add(sshd(f"Failed publickey for bob from 192.0.2.1 port 9 ssh2: ED25519 {FP}", at=i))
    (event,) = check(m.flush())
    assert event["reason"] == "public key not authorized"


def test_bad_arguments() -> None:
    with pytest.raises(UsageError):
        AuthMerger("bad host/id")
    with pytest.raises(UsageError):
        AuthMerger("h", settle=0)
    assert len(AuthMerger("h").flush()) == 0
    m = AuthMerger("h")
    m.add(sshd("Invalid user z from 192.0.2.1 port 9"))
    (event,) = m.flush()
    assert len(event["event_id"]) == 32 and int(event["event_id"], 16) >= 0  # uuid4 hex


def _login_sources(pid: int) -> list[Observation]:
    """One certificate login as an enrolled host sees it: the principals command and the
    PAM hook report first (with the monitor's pid), sshd's log line is read later."""

    def source(src: Source, kind: Kind, at: float) -> Observation:
        return Observation(
            src, T0 + timedelta(seconds=at), kind, "127.0.0.1", 40022, "bob",
            "certificate", True, "", "bob@example.com", 7, FP, pid=pid,
        )  # fmt: skip

    accepted = sshd(
        f"Accepted publickey for bob from 127.0.0.1 port 40022 ssh2: ED25519-CERT {FP} "
        f"ID bob@example.com (serial 7) CA ED25519 {CAFP}",
        at=0.3,
    )
    return [
        source(Source.PRINCIPALS, Kind.DECISION, 0.0),
        source(Source.PAM, Kind.ACCOUNT, 0.1),
        source(Source.PAM, Kind.SESSION_OPEN, 0.2),
        accepted,
    ]


@pytest.mark.parametrize("wait_for_log", [True, False])
def test_a_login_seen_by_pam_before_the_log_line_is_one_event(wait_for_log: bool) -> None:
    m = merger(wait_for_session=True, wait_for_log=wait_for_log)
    events = [e for obs in _login_sources(4321) for e in m.add(obs)]
    events += m.tick(T0 + timedelta(seconds=30)) + m.flush()
    allowed = [e for e in check(events) if e["allowed"]]
    # without wait_for_log, the late Accepted line makes a second event: the bug it fixes
    assert len(allowed) == (1 if wait_for_log else 2), events
    assert allowed[0]["user_email"] == "bob@example.com"
