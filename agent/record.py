"""The recorder: sshd's ForceCommand, run as the logged-in user for every session channel.

It decides what sshd would have run (sshd(8) "LOGIN PROCESS": the login shell, or
``$SHELL -c "$SSH_ORIGINAL_COMMAND"``), asks the root daemon to record it (agent/protocol.py:
HELLO -> ACCEPT/REFUSE ... END -> DONE), runs it through the pty or pipe relay, and leaves
with the child's exit status, or dies by the child's signal so sshd reports exit-signal.

Invariants:
- standard library only, its cheap modules only (no dataclasses, enum, typing, json,
  tomllib, contextlib, signal or socket: agent/protocol.py says why and what stands in),
  and relays imported only for the session type that needs them: this runs on every login
  (DESIGN.md "Performance facts"; tests/test_recorder_startup.py holds the line);
- nothing runs unrecorded unless the policy says so (``on_daemon_down = "allow"`` or a
  break-glass user): otherwise a one-line reason on stderr and exit status 1;
- an unrecorded session is the program itself (exec, no relay): exactly what sshd runs;
- the daemon socket is never inherited by the session (Python fds are close-on-exec).
"""

from __future__ import annotations

import _socket  # not socket: its enums and selectors cost ~7 ms at every login
import os
import pwd
import sys
import time

from sshaudit.agent import protocol
from sshaudit.agent.protocol import Frozen, StrCode, member
from sshaudit.agent.recorder_config import DEFAULT_CONFIG, RecorderConfig, load
from sshaudit.agent.relay_common import ChildStatus, RelayResult, Sink, say
from sshaudit.errors import ConfigError, UsageError

# typing costs start time at every login: it is imported for the type checker only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any, ClassVar


CONNECT_TIMEOUT = 2.0  # a daemon that does not even accept the connection is down
# Once connected, the daemon is alive: in a burst of logins it may take a while to check
# each peer and open each recording, and refusing a login then would be wrong (seen here:
# 200 simultaneous logins, 150 refused with a 2 s limit). A hung daemon still ends in the
# policy's answer, just later. The policy's handshake_timeout sets it.
HANDSHAKE_TIMEOUT = 30.0
DONE_TIMEOUT = 2.0  # seconds for the daemon to seal the last frame after END
SEND_TIMEOUT = 10.0  # a daemon that takes no data this long is treated as gone
MAX_AUTH_INFO = 64 * 1024
DEFAULT_SHELL = "/bin/sh"  # sshd's _PATH_BSHELL when the passwd entry has no shell
# Where distributions put the sftp server that "internal-sftp" stands for.
SFTP_SERVERS = (
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/lib/ssh/sftp-server",
    "/usr/libexec/sftp-server",
)
UNAVAILABLE = "sshaudit: session refused: the recording service is unavailable"

HELP = """\
NAME
    sshaudit-agent record - record an SSH session (sshd ForceCommand)

SYNOPSIS
    sshaudit-agent record [--config FILE]
    sshaudit-agent record --help

DESCRIPTION
    Run by sshd for every session channel, as the logged-in user, through the
    ForceCommand line of sshd_config(5). It runs what sshd would have run -- the
    user's login shell in a new pseudo-terminal, or "$SHELL -c $SSH_ORIGINAL_COMMAND"
    (with a pty when the client asked for one, else on three separate pipes), or the
    sftp subsystem ("internal-sftp" runs the sftp-server program) -- and streams the
    session to the sshaudit agent daemon, which seals it into the root-only spool.

    Interactive sessions are recorded as the user saw them (asciicast v2): output,
    input (unless the policy turns input recording off) and window resizes. Input
    typed while the terminal does not echo (passwords) is replaced by a marker.
    Sessions without a pty record the first exec_capture_cap bytes of stdin, stdout
    and stderr; past that only byte counts and a SHA-256 of each stream.

    When the daemon cannot be reached, policy.on_daemon_down decides: "deny" refuses
    the session with a one-line reason and exit status 1; "allow" runs it unrecorded.
    Users in policy.break_glass_users always get their session.

OPTIONS
    --config FILE   the agent configuration (default: /etc/sshaudit/agent.toml);
                    only socket, policy.on_daemon_down and policy.break_glass_users
                    are read here.
    -h, --help      show this text and exit.

ENVIRONMENT (set by sshd)
    SSH_ORIGINAL_COMMAND   the command the client asked for (absent: a shell)
    SSH_CONNECTION         client and server addresses and ports
    SSH_TTY                the pty sshd allocated, if any
    SSH_USER_AUTH          file naming the key or certificate used (ExposeAuthInfo)
    TERM                   the client's terminal type (pty sessions)

EXIT STATUS
    The session's exit status; if the session's program died by a signal, the
    recorder dies by the same signal, so the client sees the same exit-signal.
    1 when the session is refused; 2 for a bad command line.

FILES
    /etc/sshaudit/agent.toml   configuration (docs/agent-config.md)
    /run/sshaudit/agent.sock   the daemon's socket (config key "socket")

SEE ALSO
    sshd(8), sshd_config(5), sshaudit-agent daemon
"""


class ProgramType(StrCode):
    """DESIGN.md session field ``program_type``.
    (A StrCode, not an Enum: enum costs ~5 ms at every login; agent/protocol.py.)"""

    SHELL: ClassVar[ProgramType] = member("shell")
    EXEC: ClassVar[ProgramType] = member("exec")
    SUBSYSTEM: ClassVar[ProgramType] = member("subsystem")


class Plan(Frozen):
    """What sshd would have run for this channel."""

    __slots__ = ("program_type", "command", "path", "argv", "pty", "user", "shell")  # noqa: RUF023
    program_type: ProgramType
    command: str | None  # SSH_ORIGINAL_COMMAND as sshd gave it
    path: str  # the executable
    argv: tuple[str, ...]
    pty: bool
    user: str
    shell: str

    def __init__(
        self,
        program_type: ProgramType,
        command: str | None,
        path: str,
        argv: tuple[str, ...],
        pty: bool,
        user: str,
        shell: str,
    ) -> None:
        super().__init__(program_type, command, path, argv, pty, user, shell)


class Accept(Frozen):
    __slots__ = ("session_id", "record_input", "exec_capture_cap", "exec_hash")  # noqa: RUF023
    session_id: str
    record_input: bool
    exec_capture_cap: int
    exec_hash: bool

    def __init__(
        self, session_id: str, record_input: bool, exec_capture_cap: int, exec_hash: bool
    ) -> None:
        super().__init__(session_id, record_input, exec_capture_cap, exec_hash)


class Refuse(Frozen):
    __slots__ = ("reason",)
    reason: str

    def __init__(self, reason: str) -> None:
        super().__init__(reason)


def parse_args(argv: Sequence[str]) -> str | None:
    """The config path, or None for --help. Hand-parsed: argparse costs start time."""
    config = DEFAULT_CONFIG
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            return None
        if arg == "--config" and args:
            config = args.pop(0)
        elif arg.startswith("--config="):
            config = arg.removeprefix("--config=")
        else:
            raise UsageError(f"unexpected argument {arg!r} (try --help)")
    if not config:
        raise UsageError("--config needs a file name")
    return config


def map_subsystem(command: str, exists: Any = os.path.exists) -> str | None:
    """The runnable form of a subsystem command, or None when it is not a subsystem.

    sshd hands a forced command the subsystem's configured command line; "internal-sftp"
    names code inside sshd that no shell can run, so it becomes the sftp-server program
    with the same options (sftp-server(8) takes the options internal-sftp takes).
    """
    words = command.split(maxsplit=1)
    if not words:
        return None
    if words[0] == "internal-sftp":
        server = next((p for p in SFTP_SERVERS if exists(p)), None)
        if server is None:
            raise UsageError("internal-sftp: no sftp-server program on this host")
        return " ".join([server, *words[1:]])
    return command if _basename(words[0]) == "sftp-server" else None


def _basename(path: str) -> str:
    return path.rpartition("/")[2]  # no pathlib on the login path: it costs start time


def user_and_shell(environ: Mapping[str, str]) -> tuple[str, str]:
    """The user name and login shell from passwd (sshd sets $SHELL from the same entry)."""
    try:
        entry = pwd.getpwuid(os.getuid())
        return entry.pw_name, entry.pw_shell or DEFAULT_SHELL
    except KeyError:
        return environ.get("USER", str(os.getuid())), environ.get("SHELL") or DEFAULT_SHELL


def plan_session(
    environ: Mapping[str, str], user: str, shell: str, pty: bool, exists: Any = os.path.exists
) -> Plan:
    command = environ.get("SSH_ORIGINAL_COMMAND")
    if command is None:  # a login shell: argv[0] is "-" + basename (sshd(8), login(1))
        argv0 = "-" + _basename(shell)
        return Plan(ProgramType.SHELL, None, shell, (argv0,), pty, user, shell)
    mapped = map_subsystem(command, exists)
    kind = ProgramType.EXEC if mapped is None else ProgramType.SUBSYSTEM
    # sshd passes the shell's basename as argv[0] of "-c" too (session.c do_child)
    return Plan(kind, command, shell, (_basename(shell), "-c", mapped or command), pty, user, shell)


def read_auth_info(environ: Mapping[str, str]) -> str:
    """The content of the SSH_USER_AUTH file (ExposeAuthInfo), at most 64 KiB, or ""."""
    path = environ.get("SSH_USER_AUTH")
    if not path:
        return ""
    try:
        with open(path, "rb") as fh:
            return fh.read(MAX_AUTH_INFO).decode("utf-8", "replace")
    except OSError:
        return ""


def build_hello(
    plan: Plan, environ: Mapping[str, str], size: tuple[int, int] | None
) -> dict[str, Any]:
    cols, rows = size or (80, 24)
    return {
        "version": protocol.PROTOCOL_VERSION,
        "program_type": plan.program_type.value,
        "command": plan.command,
        "term": environ.get("TERM"),
        "shell": plan.shell,
        "width": cols,
        "height": rows,
        "ssh_connection": environ.get("SSH_CONNECTION", ""),
        "ssh_user_auth": read_auth_info(environ),
        "tty": environ.get("SSH_TTY"),
        "pty": plan.pty,
    }


def _one_line(text: object, limit: int = 300) -> str:
    """Daemon text shown to the user: printable, one line (no terminal escapes)."""
    clean = "".join(c if c.isprintable() else " " for c in str(text))
    return clean[:limit].strip() or "no reason given"


def parse_reply(msg: protocol.Message) -> Accept | Refuse:
    doc = msg.json()
    if msg.type is protocol.MsgType.REFUSE:
        return Refuse(_one_line(doc.get("reason", "")))
    if msg.type is not protocol.MsgType.ACCEPT:
        raise protocol.ProtocolError(f"expected ACCEPT or REFUSE, got {msg.type.name}")
    sid, rec, cap, hsh = (
        doc.get(k) for k in ("session_id", "record_input", "exec_capture_cap", "exec_hash")
    )
    if not (
        isinstance(sid, str)
        and sid
        and isinstance(rec, bool)
        and isinstance(hsh, bool)
        and isinstance(cap, int)
        and not isinstance(cap, bool)
        and cap >= 0
    ):
        raise protocol.ProtocolError("ACCEPT: missing or mistyped fields")
    return Accept(sid, rec, cap, hsh)


def receive(
    sock: _socket.socket, decoder: protocol.Decoder, deadline: float, clock: Any = time.monotonic
) -> protocol.Message:
    """The next message from the daemon before ``deadline`` (raises TimeoutError/OSError)."""
    while True:
        left = deadline - clock()
        if left <= 0:
            raise TimeoutError("the daemon did not answer in time")
        sock.settimeout(left)
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the daemon closed the connection")
        msgs = decoder.feed(data)
        if msgs:
            return msgs[0]


def handshake(
    path: str, hello: dict[str, Any], timeout: float = HANDSHAKE_TIMEOUT
) -> tuple[_socket.socket, Accept | Refuse]:
    """Connect, send HELLO, wait for ACCEPT/REFUSE (raises OSError or ProtocolError)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(min(timeout, CONNECT_TIMEOUT))
        sock.connect(path)
        deadline = time.monotonic() + timeout
        sock.settimeout(timeout)
        sock.sendall(protocol.encode_json(protocol.MsgType.HELLO, hello))
        reply = parse_reply(receive(sock, protocol.Decoder(), deadline))
    except BaseException:
        sock.close()
        raise
    return sock, reply


def end_message(result: RelayResult) -> bytes:
    return protocol.encode_json(
        protocol.MsgType.END,
        {
            "exit_status": result.status.exit_status,
            "signal": result.status.signal,
            "bytes_in": result.count("stdin"),
            "bytes_out": result.count("stdout"),
            "bytes_err": result.count("stderr"),
            "streams": {k: v.to_json() for k, v in result.streams.items()},
            "error": result.error,
        },
    )


def finish(sock: _socket.socket, result: RelayResult, timeout: float = DONE_TIMEOUT) -> bool:
    """Send END and wait (bounded) for DONE; True when the daemon confirmed."""
    try:
        sock.settimeout(timeout)
        sock.sendall(end_message(result))
        msg = receive(sock, protocol.Decoder(), time.monotonic() + timeout)
        return msg.type is protocol.MsgType.DONE
    except (OSError, protocol.ProtocolError):
        return False
    finally:
        sock.close()


def run_relay(
    plan: Plan, environ: Mapping[str, str], sink: Sink, accept: Accept, clock: Any
) -> RelayResult:
    if plan.pty:
        from sshaudit.agent.relay_pty import run_pty

        return run_pty(
            plan.path, plan.argv, environ, sink=sink, clock=clock, record_input=accept.record_input
        )
    from sshaudit.agent.relay_exec import ExecPolicy, run_exec

    policy = ExecPolicy(accept.exec_capture_cap, accept.exec_hash, accept.record_input)
    return run_exec(plan.path, plan.argv, environ, sink=sink, clock=clock, policy=policy)


def session_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment sshd gave the session, minus what the shell running us added.

    sshd runs the ForceCommand as ``$SHELL -c``; bash then exports SHLVL (decremented to 0
    when it execs us). sshd itself sets no SHLVL, so the session's shell gets none, as
    without the recorder: bash then counts level 1 and, built with SSH_SOURCE_BASHRC as on
    Debian, sources ~/.bashrc for ``ssh host cmd`` exactly as plain sshd makes it do.
    """
    env = dict(environ)
    env.pop("SHLVL", None)
    return env


def exec_unrecorded(plan: Plan, environ: Mapping[str, str]) -> int:
    """Become the session's program, exactly as sshd would have run it."""
    try:
        os.execve(plan.path, list(plan.argv), session_env(environ))  # noqa: S606 (the user's shell)
    except OSError as exc:
        say(2, f"{plan.path}: {exc.strerror}\n")
    return 1


def exit_like(status: ChildStatus) -> int:
    """The exit status to leave with; dies by the child's signal when it died by one."""
    if status.signal is None:
        return status.exit_status if status.exit_status is not None else 1
    import resource

    if TYPE_CHECKING:
        import signal
    else:
        import _signal as signal  # not signal: see relay_common (enum)

    # Our death is not a crash: no core file of the recorder for SIGSEGV/SIGABRT/SIGQUIT.
    # (try/except, not contextlib.suppress: contextlib costs start time, relay_common.say)
    try:  # noqa: SIM105
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError):
        pass
    try:  # noqa: SIM105 (SIGKILL's disposition cannot be set)
        signal.signal(status.signal, signal.SIG_DFL)
    except (OSError, ValueError):
        pass
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [status.signal])
    os.kill(os.getpid(), status.signal)
    return 128 + status.signal  # the signal did not end us (not a fatal one)


def _session_size(pty: bool) -> tuple[int, int] | None:
    if not pty:
        return None
    from sshaudit.agent.relay_pty import get_winsize

    return get_winsize(0)


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """The ForceCommand; returns the exit status (or dies by the session's signal)."""
    try:
        return _main(argv, environ)
    except KeyboardInterrupt:  # ^C on the terminal before the relay took it over
        return 130
    except Exception as exc:  # never a traceback in the user's session
        say(2, f"sshaudit: internal error: {type(exc).__name__}: {exc}\n")
        return 1


def _main(argv: list[str] | None, environ: Mapping[str, str] | None) -> int:
    started = time.monotonic()
    env = os.environ if environ is None else environ
    try:
        config_path = parse_args(sys.argv[1:] if argv is None else argv)
        if config_path is None:
            sys.stdout.write(HELP)
            return 0
        config = load(config_path)
    except UsageError as exc:
        say(2, f"sshaudit-agent record: {exc}\n")
        return 2
    except ConfigError as exc:
        say(2, f"sshaudit: session refused: {exc}\n")
        return 1
    user, shell = user_and_shell(env)
    try:
        plan = plan_session(env, user, shell, os.isatty(0))
    except UsageError as exc:
        say(2, f"sshaudit: {exc}\n")
        return 1
    return _run(plan, env, config, lambda: time.monotonic() - started)


def _run(plan: Plan, env: Mapping[str, str], config: RecorderConfig, clock: Any) -> int:
    hello = build_hello(plan, env, _session_size(plan.pty))
    try:
        sock, reply = handshake(config.socket, hello, config.handshake_timeout)
    except (OSError, protocol.ProtocolError):
        if config.may_run_unrecorded(plan.user):
            return exec_unrecorded(plan, env)
        say(2, UNAVAILABLE + "\n")
        return 1
    if isinstance(reply, Refuse):
        sock.close()
        if plan.user in config.break_glass_users:
            return exec_unrecorded(plan, env)
        say(2, f"sshaudit: session refused: {reply.reason}\n")
        return 1
    sock.settimeout(SEND_TIMEOUT)
    sink = Sink(sock.sendall, watch=sock, end_on_loss=not config.may_run_unrecorded(plan.user))
    result = run_relay(plan, session_env(env), sink, reply, clock)
    if sink.active:
        finish(sock, result)
    else:
        sock.close()
    return exit_like(result.status)
