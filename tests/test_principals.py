"""The principals command's decision and pieces (agent/principals_policy.py, agent/principals.py).

Certificates are real ones from ``ssh-keygen -s`` where the test is about parsing them, and
hand-built with an encoder written here from PROTOCOL.certkeys (independent of the parser)
where the test needs what ssh-keygen will not make. The command itself, run as sshd runs it,
is in tests/test_principals_hostile.py; the helpers here are shared with it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import sshaudit
from sshaudit.agent import principals as cmd
from sshaudit.agent.principals_policy import (
    MAX_FILE_LINES,
    Certificate,
    Decision,
    evaluate,
    parse_certificate,
    valid_principal,
    valid_user,
)
from sshaudit.agent.protocol import Decoder, MsgType
from sshaudit.errors import FormatError

PACKAGE_PARENT = str(Path(sshaudit.__file__).parent.parent)  # not resolved: the link tree
ED_CERT = "ssh-ed25519-cert-v01@openssh.com"

needs_keygen = pytest.mark.skipif(
    shutil.which("ssh-keygen") is None, reason="ssh-keygen (openssh-client) is NOT INSTALLED"
)


# -- helpers shared with test_principals_hostile.py ------------------------------------------


def ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def build_cert(
    principals: list[str] | list[bytes],
    key_id: str = "alice@example.com",
    serial: int = 7,
    cert_type: int = 1,
    key_type: str = ED_CERT,
) -> bytes:
    """A certificate blob laid out by PROTOCOL.certkeys (signature not valid: not checked)."""
    names = b"".join(ssh_string(p.encode() if isinstance(p, str) else p) for p in principals)
    return b"".join(
        [
            ssh_string(key_type.encode()),
            ssh_string(os.urandom(32)),  # nonce
            ssh_string(os.urandom(32)),  # ed25519 public key
            struct.pack(">QI", serial, cert_type),
            ssh_string(key_id.encode()),
            ssh_string(names),
            struct.pack(">QQ", 0, 2**64 - 1),
            ssh_string(b""),  # critical options
            ssh_string(b""),  # extensions
            ssh_string(b""),  # reserved
            ssh_string(ssh_string(b"ssh-ed25519") + ssh_string(os.urandom(32))),  # CA key
            ssh_string(ssh_string(b"ssh-ed25519") + ssh_string(os.urandom(64))),  # signature
        ]
    )


class RealCert:
    """A certificate signed by ssh-keygen in ``work``: its %t, %k, %i, %s, %f."""

    def __init__(self, work: Path, key_id: str, principals: str, serial: int) -> None:
        work.mkdir(parents=True, exist_ok=True)
        ca, user = work / "ca", work / "user"
        for key in (ca, user):
            if not key.exists():
                keygen("-q", "-t", "ed25519", "-N", "", "-f", str(key))
        keygen("-q", "-s", str(ca), "-I", key_id, "-n", principals, "-z", str(serial), str(user))
        self.key_type, self.key = (work / "user-cert.pub").read_text().split()[:2]
        self.key_id, self.serial = key_id, str(serial)
        self.fingerprint = keygen("-l", "-f", str(work / "user.pub")).split()[1]

    def tokens(self, user: str) -> list[str]:
        return [user, self.key_type, self.key, self.key_id, self.serial, self.fingerprint]


def keygen(*args: str) -> str:
    return subprocess.run(
        ["ssh-keygen", *args], capture_output=True, text=True, check=True, timeout=30
    ).stdout


def write_policy(path: Path, principals: dict[str, Any] | None = None, **extra: Any) -> Path:
    doc = {"version": 1, "host_id": "h", "policy": {"principals": principals or {}, **extra}}
    path.write_text(json.dumps(doc))
    path.chmod(0o644)
    return path


def launcher(directory: Path) -> Path:
    """The launcher shape agent/launcher.py writes, pointed at the principals main."""
    path = directory / "principals"
    path.write_text(
        f"#!{sys.executable} -IS\nimport sys\n\nsys.path.insert(0, {PACKAGE_PARENT!r})\n"
        "from sshaudit.agent.principals import main\n\nraise SystemExit(main())\n"
    )
    path.chmod(0o755)
    return path


SO_PEERCRED = getattr(socket, "SO_PEERCRED", 17)  # socket(7): pid, uid, gid of the peer


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (proc(5) /proc/PID/stat, field 3)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class FakeDaemon:
    """A Unix socket server thread that keeps every byte each connection sent (to EOF),
    and whether the sender was still alive once the daemon had read it all."""

    def __init__(self, path: Path, read: bool = True) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(16)
        self.read = read
        self.received: list[bytes] = []
        self.peer_alive: list[bool] = []
        self.errors: list[Exception] = []
        self.got = threading.Event()
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            if not self.read:  # accept and never read, never close
                self.held.append(conn)
                self.got.set()
                continue
            with conn:
                try:
                    self._take(conn)
                except Exception as exc:  # the test reads it: a dead thread would hide it
                    self.errors.append(exc)
                self.got.set()

    def _take(self, conn: socket.socket) -> None:
        pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, SO_PEERCRED, 12))[0]
        data = b""
        conn.settimeout(10)
        while chunk := conn.recv(65536):
            data += chunk
        time.sleep(0.02)  # as a daemon busy checking its peer
        self.peer_alive.append(alive(pid))  # what agent/peer.py needs: /proc/PID
        self.received.append(data)

    def wait(self) -> bool:
        """True once a connection was handled (generous: the machine is shared)."""
        return self.got.wait(20) and not self.errors

    def observations(self) -> list[dict[str, Any]]:
        assert not self.errors, self.errors
        out = []
        for data in self.received:
            msgs = Decoder().feed(data)
            assert len(msgs) == 1 and msgs[0].type is MsgType.AUTH
            out.append(json.loads(msgs[0].payload))
        return out

    def close(self) -> None:
        self.server.close()
        for conn in self.held:
            conn.close()


# -- the policy -----------------------------------------------------------------------------


def cert(principals: tuple[str, ...], cert_type: int = 1) -> Certificate:
    return Certificate(ED_CERT, 1, cert_type, "alice@example.com", principals)


def files(mapping: dict[str, str]) -> Callable[[str], str | None]:
    return mapping.get


BY = "principal 'alice' accepted by rule"
RULES: list[tuple[str, dict[str, Any], str, tuple[str, ...], dict[str, str], Decision]] = [
    (
        "email prefix: user name printed",
        {},
        "alice",
        ("alice", "ops"),
        {},
        Decision(("alice",), True, f"{BY} email_prefix", "email_prefix"),
    ),
    (
        "email prefix off, mapped",
        {"email_prefix": False, "map": {"deploy": ["alice", "bob", "alice"]}},
        "deploy",
        ("alice",),
        {},
        Decision(("alice", "bob"), True, "principal 'alice' accepted by rule map", "map"),
    ),
    (
        "union in rule order, deduplicated",
        {"map": {"deploy": ["bob", "deploy"]}, "files_dir": "/p", "any": True},
        "deploy",
        ("carol",),
        {"/p/deploy": "# ops\n\n  dave  \nbob\n"},
        Decision(
            ("deploy", "bob", "dave", "carol"),
            True,
            "principal 'carol' accepted by rule any",
            "any",
        ),
    ),
    (
        "files_dir: comments and blanks ignored",
        {"email_prefix": False, "files_dir": "/p/"},
        "web",
        ("x", "dave"),
        {"/p/web": "#dave\n\ndave\n"},
        Decision(("dave",), True, "principal 'dave' accepted by rule files_dir", "files_dir"),
    ),
    (
        "mismatch: nothing printed",
        {"map": {"deploy": ["bob"]}},
        "deploy",
        ("alice",),
        {},
        Decision(
            (),
            False,
            "principal mismatch: certificate principals [alice], "
            "user 'deploy' accepts [deploy, bob]",
            "",
        ),
    ),
    (
        "any: unsafe certificate principals never printed",
        {"email_prefix": False, "any": True},
        "root",
        ('command="sh" root', "a\nroot"),
        {},
        Decision(
            (),
            False,
            'principal mismatch: certificate principals [command="sh" root, a?root], '
            "user 'root' accepts []",
            "",
        ),
    ),
    (
        "no principals in the certificate",
        {"any": True},
        "alice",
        (),
        {},
        Decision((), False, "certificate has no principals", ""),
    ),
    (
        "missing per-user file: other rules still apply",
        {"files_dir": "/p"},
        "alice",
        ("alice",),
        {},
        Decision(("alice",), True, f"{BY} email_prefix", "email_prefix"),
    ),
]


@pytest.mark.parametrize(
    ("principals", "user", "cert_principals", "fs", "expected"),
    [r[1:] for r in RULES],
    ids=[r[0] for r in RULES],
)
def test_rules(
    principals: dict[str, Any],
    user: str,
    cert_principals: tuple[str, ...],
    fs: dict[str, str],
    expected: Decision,
) -> None:
    assert evaluate({"principals": principals}, user, cert(cert_principals), files(fs)) == expected


BAD = "cached policy unusable: principals"
ALICE = cert(("alice",))


@pytest.mark.parametrize(
    ("policy", "user", "certificate", "reason"),
    [
        (None, "alice", ALICE, "no cached policy"),
        ({}, "../etc", ALICE, "unknown user form"),
        ({}, ".hidden", ALICE, "unknown user form"),
        ({}, "a" * 33, ALICE, "unknown user form"),
        ({}, "alice", None, "no certificate (plain public key)"),
        ({}, "alice", cert(("alice",), 2), "malformed certificate: not a user certificate"),
        ({"principals": []}, "alice", ALICE, f"{BAD} is not an object"),
        (
            {"principals": {"any": "yes"}},
            "alice",
            ALICE,
            f"{BAD}.email_prefix and principals.any must be true or false",
        ),
        (
            {"principals": {"map": {"alice": "alice"}}},
            "alice",
            ALICE,
            f"{BAD}.map values must be lists of strings",
        ),
        (
            {"principals": {"files_dir": "rel"}},
            "alice",
            ALICE,
            f"{BAD}.files_dir must be an absolute path or null",
        ),
    ],
)
def test_denials(
    policy: dict[str, Any] | None, user: str, certificate: Certificate | None, reason: str
) -> None:
    decision = evaluate(policy, user, certificate, files({}))
    assert decision == Decision((), False, reason, "")


def test_a_mistyped_policy_denies_even_a_matching_principal() -> None:
    policy = {"principals": {"email_prefix": 1}}
    assert not evaluate(policy, "alice", cert(("alice",)), files({})).allowed
    assert evaluate({"principals": {}}, "alice", cert(("alice",)), files({})).allowed


@pytest.mark.parametrize(
    ("text", "note"),
    [
        ("dave\n" * (MAX_FILE_LINES + 1), "more than 1000 lines"),
        ("d" * (64 * 1024 + 1), "larger than 65536 bytes"),
    ],
)
def test_an_oversized_principals_file_is_ignored(text: str, note: str) -> None:
    policy = {"principals": {"email_prefix": False, "files_dir": "/p"}}
    decision = evaluate(policy, "web", cert(("dave",)), files({"/p/web": text}))
    assert not decision.allowed and decision.reason.endswith(note)
    ok = evaluate(policy, "web", cert(("dave",)), files({"/p/web": "dave\n" * MAX_FILE_LINES}))
    assert ok.allowed and ok.principals == ("dave",)


def test_the_file_rule_reads_only_the_users_own_file() -> None:
    asked: list[str] = []

    def read(path: str) -> str | None:
        asked.append(path)
        return "alice\n"

    evaluate({"principals": {"files_dir": "/etc/p.d"}}, "web", cert(("x",)), read)
    assert asked == ["/etc/p.d/web"]


def test_reasons_quote_at_most_a_few_principals() -> None:
    many = tuple(f"p{i}" for i in range(200))
    decision = evaluate({"principals": {}}, "alice", cert(many), files({}))
    assert "p7, ... (+192)]" in decision.reason and len(decision.reason) < 200


@pytest.mark.parametrize(
    ("name", "ok"),
    [("alice", True), ("web-01", True), ("_svc", True), ("host$", True), ("a.b", True),
     ("", False), ("-x", False), (".x", False), ("a/b", False), ("a b", False), ("é", False),
     ("a\udcff", False), ("a" * 32, True), ("a" * 33, False), ("$", False), ("a;b", False)],
)  # fmt: skip
def test_valid_user(name: str, ok: bool) -> None:
    assert valid_user(name) is ok


@pytest.mark.parametrize(
    ("name", "ok"),
    [("alice", True), ("a@b.c", True), ("a,b", True), ("", False), ("a b", False),
     ("a\tb", False), ("#a", False), ("a\x00", False), ("a\udcff", False), ("x" * 257, False)],
)  # fmt: skip
def test_valid_principal(name: str, ok: bool) -> None:
    assert valid_principal(name) is ok


# -- certificates ------------------------------------------------------------------------------


@needs_keygen
def test_parse_a_real_certificate(tmp_path: Path) -> None:
    real = RealCert(tmp_path, "alice@example.com", "alice,ops", 2**64 - 2)
    parsed = parse_certificate(base64.b64decode(real.key))
    assert parsed == Certificate(ED_CERT, 2**64 - 2, 1, "alice@example.com", ("alice", "ops"))


def test_parse_a_built_certificate() -> None:
    parsed = parse_certificate(build_cert(["a", "b"], key_id="k", serial=9))
    assert parsed == Certificate(ED_CERT, 9, 1, "k", ("a", "b"))


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (build_cert(["a"])[:-1], "signature runs past the end"),
        (build_cert(["a"]) + b"x", "1 bytes after the signature"),
        (build_cert(["p"] * 257), "more than 256 principals"),
        (build_cert([b"\xff"]), "principal is not UTF-8"),
        (ssh_string(b"ssh-ed25519") + b"\0" * 64, "unknown key type"),
        (b"", "key type length runs past the end"),
    ],
)
def test_malformed_certificates(blob: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        parse_certificate(blob)


def test_every_truncation_is_a_format_error() -> None:
    blob = build_cert(["alice", "ops"])
    for cut in range(len(blob)):
        with pytest.raises(FormatError):
            parse_certificate(blob[:cut])


# -- the command's pieces ----------------------------------------------------------------------


def test_parse_options() -> None:
    parsed = cmd.parse_options(
        ["--policy", "P", "--socket", "S", "--timeout", "0.5", "u", "--help"]
    )
    assert not isinstance(parsed, str)
    options, words = parsed
    assert options == cmd.Options("P", "S", 0.5) and words == ["u", "--help"]
    assert cmd.parse_options(["--help"]) is cmd.USAGE
    for bad in (["--policy"], ["--timeout", "nan", "u"], ["--timeout", "99"], ["--socket", ""]):
        assert isinstance(cmd.parse_options(bad), str), bad


def test_connection_token_as_one_word_or_four() -> None:
    base = ["u", ED_CERT, "k", "i", "1", "f"]
    one = cmd.parse_attempt([*base, "10.0.0.1 5000 10.0.0.2 22"])
    four = cmd.parse_attempt([*base, "10.0.0.1", "5000", "10.0.0.2", "22"])
    assert (one.address, one.port) == (four.address, four.port) == ("10.0.0.1", 5000)
    assert cmd.parse_attempt(base).port is None
    assert cmd.parse_attempt([*base, "10.0.0.1 99999 10.0.0.2 22"]).port is None


def test_observation_frame_is_the_protocols() -> None:
    attempt = cmd.parse_attempt(["alice", ED_CERT, "k", "id\udcff", "5", "f", "::1 22 ::1 22"])
    decision = Decision(("alice",), True, "ok", "map")
    frame = cmd.encode_observation(cmd.observation(attempt, decision), 1700000000.25)
    (msg,) = Decoder().feed(frame)
    assert msg.type is MsgType.AUTH
    assert json.loads(msg.payload) == {
        "time": 1700000000.25, "source": "principals", "client_address": "::1",
        "client_port": 22, "unix_user": "alice", "method": "certificate", "allowed": True,
        "reason": "ok", "user_email": "id?", "cert_serial": 5, "cert_fingerprint": "f",
        "rule": "map",
    }  # fmt: skip


def test_send_to_a_daemon_and_to_none(tmp_path: Path) -> None:
    daemon = FakeDaemon(tmp_path / "s")
    try:
        assert cmd.send(str(tmp_path / "s"), b"\x0a\0\0\0\x02{}", 1.0, lambda: 0.0)
        assert daemon.wait() and daemon.received == [b"\x0a\0\0\0\x02{}"]
    finally:
        daemon.close()
    assert not cmd.send(str(tmp_path / "absent"), b"x", 1.0, lambda: 0.0)
    assert not cmd.send("/" + "x" * 200, b"x", 1.0, lambda: 0.0)


def test_principals_file_must_be_roots_alone(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("NOT RUN: ownership checks need root (files must be owned by uid 0)")
    d = tmp_path / "p.d"
    d.mkdir(mode=0o755)
    (d / "web").write_text("dave\n")
    assert cmd.read_principals_file(str(d / "web")) == "dave\n"
    (d / "web").chmod(0o666)
    assert cmd.read_principals_file(str(d / "web")) is None
    (d / "web").chmod(0o644)
    os.chown(d / "web", 65534, 65534)
    assert cmd.read_principals_file(str(d / "web")) is None
    os.chown(d / "web", 0, 0)
    d.chmod(0o777)
    assert cmd.read_principals_file(str(d / "web")) is None
    d.chmod(0o755)
    (d / "link").symlink_to(d / "web")
    assert cmd.read_principals_file(str(d / "link")) is None
    os.mkfifo(d / "fifo")
    assert cmd.read_principals_file(str(d / "fifo")) is None  # and did not block
