"""agent/authlog.py: sshd 9.2 log lines -> observations.

The golden logs in tests/golden/authlog were written by a real sshd (generate.py there);
each test reads what that sshd said about one kind of attempt. Hand-written lines cover
what the sample logs cannot (journald's "error: " prefix, IPv6, hostile user names).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sshaudit.agent.authlog import Kind, Observation, Source, parse_line

GOLDEN = Path(__file__).parent / "golden" / "authlog"
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
FP = "SHA256:" + "A" * 43
CAFP = "SHA256:" + "B" * 43
# Lines of the golden logs that are not about an authentication decision.
IGNORED_PREFIXES = (
    "Server listening on ",
    "Received signal 15",
    "Accepted key ",
    "Accepted certificate ID ",
    "Postponed publickey ",
    "Starting session: ",
    "Close session: ",
    "Received disconnect from ",
    "Transferred: ",
    "Closing connection to ",
)


def golden(name: str) -> list[Observation]:
    lines = (GOLDEN / f"{name}.log").read_text().splitlines()
    return [o for o in (parse_line(line, NOW) for line in lines) if o is not None]


def only(observations: list[Observation], kind: Kind) -> list[Observation]:
    return [o for o in observations if o.kind is kind]


def test_every_golden_line_is_understood_or_known_to_be_irrelevant() -> None:
    files = sorted(GOLDEN.glob("*.log"))
    assert len(files) >= 18
    for path in files:
        for line in path.read_text().splitlines():
            if parse_line(line, NOW) is None:
                assert line.startswith(IGNORED_PREFIXES), f"{path.name}: {line!r}"


def test_accepted_certificate() -> None:
    (acc,) = only(golden("accepted-cert"), Kind.ACCEPTED)
    assert acc.source is Source.SSHD_LOG
    assert (acc.unix_user, acc.method, acc.allowed) == ("sshaudit-alice", "certificate", True)
    assert (acc.user_email, acc.cert_serial) == ("alice@example.com", 4242)
    assert acc.client_address == "127.0.0.1" and acc.client_port is not None
    assert acc.cert_fingerprint.startswith("SHA256:") and acc.ca_fingerprint.startswith("SHA256:")
    assert acc.cert_fingerprint != acc.ca_fingerprint
    assert acc.time == NOW and acc.pid is None
    # The client tried the bare key first: sshd logged that as a failure.
    (failed,) = only(golden("accepted-cert"), Kind.FAILED)
    assert failed.method == "publickey" and failed.user_email == ""
    assert failed.cert_fingerprint == acc.cert_fingerprint


@pytest.mark.parametrize("name", ["accepted-key", "accepted-key-info"])
def test_accepted_plain_key(name: str) -> None:
    (acc,) = only(golden(name), Kind.ACCEPTED)
    assert (acc.unix_user, acc.method, acc.allowed) == ("sshaudit-alice", "publickey", True)
    assert acc.user_email == "" and acc.cert_serial is None and acc.ca_fingerprint == ""
    assert acc.cert_fingerprint.startswith("SHA256:")


@pytest.mark.parametrize(
    ("name", "reason", "serial"),
    [
        ("expired-cert", "certificate invalid: expired", 17),
        ("future-cert", "certificate invalid: not yet valid", 18),
        ("principal-mismatch", "certificate invalid: name is not a listed principal", 7),
    ],
)
def test_certificate_rejections(name: str, reason: str, serial: int) -> None:
    obs = golden(name)
    (invalid,) = only(obs, Kind.CERT_INVALID)
    assert invalid.reason == reason and invalid.allowed is False
    assert invalid.client_address == "" and invalid.client_port is None  # merger attaches it
    failed = [o for o in only(obs, Kind.FAILED) if o.method == "certificate"]
    assert len(failed) == 1 and failed[0].cert_serial == serial
    assert failed[0].allowed is False and failed[0].reason == "certificate not accepted"
    closed = only(obs, Kind.CLOSED)
    assert [c.unix_user for c in closed] == ["sshaudit-alice"]


def test_expired_certificate_at_loglevel_info_has_no_failed_line() -> None:
    obs = golden("expired-cert-info")
    assert [o.kind for o in obs] == [Kind.CERT_INVALID, Kind.CLOSED]


def test_unknown_ca_is_a_plain_failure_in_the_log() -> None:
    # sshd 9.2 says "CA ... is not listed" only at DEBUG2: the CA fingerprint is the clue.
    (cert,) = [o for o in only(golden("unknown-ca"), Kind.FAILED) if o.method == "certificate"]
    assert cert.user_email == "eve@example.com" and cert.cert_serial == 99
    assert cert.ca_fingerprint.startswith("SHA256:")
    assert not only(golden("unknown-ca"), Kind.CERT_INVALID)


def test_invalid_user_and_not_allowed_users() -> None:
    (inv,) = only(golden("invalid-user"), Kind.INVALID_USER)
    assert (inv.unix_user, inv.reason, inv.allowed) == ("nosuchuser", "unknown user", False)
    (na,) = only(golden("not-allowed-user"), Kind.NOT_ALLOWED)
    assert na.unix_user == "daemon" and na.client_port is None
    assert na.reason == "user not allowed because not listed in AllowUsers"
    (deny,) = only(golden("denied-user"), Kind.NOT_ALLOWED)
    assert deny.reason == "user not allowed because listed in DenyUsers"


def test_refused_max_tries_and_unauthorized_key() -> None:
    (ref,) = only(golden("refused-modes"), Kind.REFUSED)
    assert ref.reason.startswith("authentication refused: bad ownership or modes for directory")
    (mx,) = only(golden("max-tries"), Kind.MAX_TRIES)
    assert mx.unix_user == "sshaudit-bob" and mx.client_port is not None
    assert mx.reason == "maximum authentication attempts exceeded"
    assert len(only(golden("max-tries"), Kind.FAILED)) == 2
    (bad,) = only(golden("unauthorized-key"), Kind.FAILED)
    assert bad.reason == "public key not authorized" and bad.unix_user == "sshaudit-bob"


def test_passwords() -> None:
    failed = only(golden("password-failed"), Kind.FAILED)
    assert [(f.unix_user, f.method, f.reason) for f in failed] == [
        ("sshaudit-alice", "password", "wrong password"),
        ("nosuchuser", "password", "unknown user"),
    ]
    (acc,) = only(golden("password-accepted"), Kind.ACCEPTED)
    assert (acc.unix_user, acc.method, acc.cert_fingerprint) == ("sshaudit-alice", "password", "")
    # PasswordAuthentication no: OpenSSH's client never sends the password; sshd logs only
    # the connection closing while "authenticating" (documented in the merger's reason).
    assert [o.kind for o in golden("password-off")] == [Kind.CONNECT, Kind.CLOSED]


def test_forwarding_refusals() -> None:
    (local,) = only(golden("forwarding-refused"), Kind.FORWARDING)
    assert local.reason.startswith("refused local port forward: originator ")
    assert local.client_address == "" and local.method == "forwarding"
    denied = only(golden("forwarding-not-permitted"), Kind.FORWARDING)
    assert len(denied) == 2
    assert all(d.client_address == "127.0.0.1" and d.client_port for d in denied)
    assert "to connect to host 127.0.0.1 port 9" in denied[0].reason
    assert "to remote forward to host 127.0.0.1 port 7" in denied[1].reason


def test_child_pid_line() -> None:
    obs = parse_line("User child is on pid 4321", NOW, pid=99)
    assert obs is not None and (obs.kind, obs.child_pid, obs.pid) == (Kind.CHILD, 4321, 99)


@pytest.mark.parametrize(
    ("line", "kind", "user", "address", "port"),
    [
        ("error: Certificate invalid: expired", Kind.CERT_INVALID, "", "", None),
        (
            "error: maximum authentication attempts exceeded for invalid user x from ::1"
            " port 22 ssh2 [preauth]",
            Kind.MAX_TRIES,
            "x",
            "::1",
            22,
        ),
        (
            "Disconnected from authenticating user bob 2001:db8::7 port 50000 [preauth]",
            Kind.CLOSED,
            "bob",
            "2001:db8::7",
            50000,
        ),
        ("Connection closed by 10.0.0.1 port 5 [preauth]", Kind.CLOSED, "", "10.0.0.1", 5),
        (
            "Disconnecting invalid user a b 10.0.0.1 port 5: Too many authentication failures"
            " [preauth]",
            Kind.CLOSED,
            "a b",
            "10.0.0.1",
            5,
        ),
        (
            "refused streamlocal port forward: originator  port -2, target /run/x.sock",
            Kind.FORWARDING,
            "",
            "",
            None,
        ),
        (
            "Received request to connect to path /run/x.sock, but the request was denied.",
            Kind.FORWARDING,
            "",
            "",
            None,
        ),
        (
            "User bob from 192.0.2.1 not allowed because shell /bin/nope does not exist",
            Kind.NOT_ALLOWED,
            "bob",
            "192.0.2.1",
            None,
        ),
    ],
)
def test_other_formats(line: str, kind: Kind, user: str, address: str, port: int | None) -> None:
    obs = parse_line(line, NOW, pid=7)
    assert obs is not None
    assert (obs.kind, obs.unix_user, obs.client_address, obs.client_port, obs.pid) == (
        kind,
        user,
        address,
        port,
        7,
    )


def test_spoofed_address_in_a_user_name_does_not_move_the_address() -> None:
    inv = parse_line("Invalid user x from 6.6.6.6 port 1 from 192.0.2.9 port 40000", NOW)
    assert inv is not None
    assert (inv.unix_user, inv.client_address, inv.client_port) == (
        "x from 6.6.6.6 port 1",
        "192.0.2.9",
        40000,
    )
    closed = parse_line(
        "Connection closed by invalid user y 6.6.6.6 port 1 192.0.2.9 port 40000 [preauth]", NOW
    )
    assert closed is not None and closed.client_address == "192.0.2.9"


def test_spoofed_address_in_a_key_id_does_not_move_the_address() -> None:
    kid = f"k from 6.6.6.6 port 1 ssh2: ED25519-CERT {FP} ID z"
    line = (
        f"Failed publickey for alice from 192.0.2.9 port 40000 ssh2: ED25519-CERT {FP}"
        f" ID {kid} (serial 5) CA ED25519 {CAFP}"
    )
    obs = parse_line(line, NOW)
    assert obs is not None
    assert (obs.unix_user, obs.client_address, obs.client_port) == ("alice", "192.0.2.9", 40000)
    assert obs.user_email == kid and obs.cert_serial == 5 and obs.ca_fingerprint == CAFP


@pytest.mark.parametrize(
    "line",
    [
        b"Accepted publickey for \xff from 1.2.3.4 port 1 ssh2",  # not UTF-8
        "Invalid user x from 1.2.3.4 port 1\x00",  # NUL
        "Invalid user x\tfrom 1.2.3.4 port 1",  # a raw control character: not from sshd
        "Invalid user x from 1.2.3.4 port 99999",  # no such port
        "Invalid user x from 999.2.3.4 port 1",  # no such address
        "Invalid user x from ::g port 1",
        "Accepted publickey for  from 1.2.3.4 port 1 ssh2",  # no user
        "Accepted publickey for bob from 1.2.3.4 port 1 ssh2: garbage",
        "Failed publickey for bob from 1.2.3.4 port 1 ssh2: ED25519 SHA256:short",
        "Invalid user " + "x" * 5000 + " from 1.2.3.4 port 1",  # huge
        "",
        "Server listening on 0.0.0.0 port 22.",
    ],
)
def test_garbage_is_none(line: str | bytes) -> None:
    assert parse_line(line, NOW) is None


def test_values_are_cut_to_the_collector_limits() -> None:
    user = "u" * 300
    obs = parse_line(f"Invalid user {user} from 1.2.3.4 port 1", NOW)
    assert obs is not None and obs.unix_user == "u" * 64
    kid = "k" * 1000
    line = (
        f"Failed publickey for bob from 1.2.3.4 port 1 ssh2: ED25519-CERT {FP}"
        f" ID {kid} (serial 99999999999999999999) CA ED25519 {CAFP}"
    )
    cert = parse_line(line, NOW)
    assert cert is not None and len(cert.user_email) == 320
    assert cert.cert_serial is None  # above u64: not a serial OpenSSH can have
    method = parse_line("Failed keyboard-interactive/pam for bob from 1.2.3.4 port 1 ssh2", NOW)
    assert method is not None and method.method == "keyboard-interactive-pam"


def test_mutated_golden_lines_never_raise() -> None:
    rng = random.Random(5)
    lines = [ln for p in GOLDEN.glob("*.log") for ln in p.read_text().splitlines()]
    for line in lines:
        data = line.encode()
        for _ in range(30):
            cut = data[: rng.randrange(len(data) + 1)]
            pos = rng.randrange(len(cut) + 1)
            mutated = cut[:pos] + bytes([rng.randrange(256)]) + cut[pos:]
            parse_line(mutated, NOW)  # must not raise


@given(st.one_of(st.text(max_size=600), st.binary(max_size=600)))
def test_any_input_never_raises(text: str | bytes) -> None:
    obs = parse_line(text, NOW)
    if obs is not None:
        assert obs.client_port is None or 0 <= obs.client_port <= 65535
        assert len(obs.unix_user) <= 64 and len(obs.reason) <= 1024
