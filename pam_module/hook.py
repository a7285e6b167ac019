"""The PAM hook: tells the agent daemon that sshd opened or closed a session.

Run by the stock ``pam_exec.so`` as root inside sshd's PAM stack (see the package docstring
for the PAM lines). pam_exec(8) passes ``PAM_TYPE`` (``open_session``, ``close_session``,
``account``), ``PAM_USER``, ``PAM_RHOST``, ``PAM_SERVICE`` and ``PAM_TTY`` in the environment;
our parent is the process that called PAM, sshd's ``[priv]`` process of the connection, whose
pid links this PAM session to its recordings (one PAM session : N recordings).

Invariants:
- it never breaks or delays a login beyond ``--timeout`` (default 1 s, the whole run): every
  failure is swallowed and the exit status is always 0 (the PAM line is ``optional`` too);
- when the daemon cannot be reached, a session event is appended to ``pam-queue.jsonl`` in
  the spool directory (root-only; checked before use), and the daemon reconciles it when it
  starts, so a session opened while the daemon was down is still recorded as ``unrecorded``;
- at ``open_session`` it also sends ``auth_info``: sshd's ``SSH_AUTH_INFO_0`` (the content of
  the ``SSH_USER_AUTH`` file, which the user owns and can rewrite, e.g. from another channel
  of a multiplexed connection), at most 64 KiB, so the daemon takes the session's identity
  (certificate key id, serial, fingerprint) from root's copy. sshd puts it in the PAM
  environment before ``pam_open_session``, but any PAM module before the hook may change it:
  Debian's ``pam_env.so user_readenv=1`` reads the user's own ``~/.pam_environment``. So the
  hook's line must come before every ``pam_env.so`` line of the session stack (the daemon
  also rejects a value sshd cannot have written: sshd ends each method line with a newline,
  auth2.c, and pam_env cannot write one);
- the PAM items it reads (``PAM_USER``, ``PAM_TYPE``...) cannot be forged the same way:
  pam_exec(8) appends them after the PAM environment, and CPython's ``os.environ`` keeps the
  last of duplicate entries;
- it imports only a few standard modules (no json, no re, no package code), because it runs
  on every login: start with ``python3 -I -S``. The message framing is the one in
  ``sshaudit/agent/protocol.py`` (u8 type, u32 big-endian length, JSON payload), restated
  here; tests/test_pam_hook.py checks the two agree.
"""

from __future__ import annotations

import _socket  # not socket: its enums cost milliseconds on every login
import os
import stat
import struct
import sys
import time

TYPE_CHECKING = False  # not from typing: importing typing costs ~10 ms on every login
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

MSG_PAM = 9  # protocol.MsgType.PAM
MSG_DONE = 8  # protocol.MsgType.DONE
HEAD = struct.Struct(">BI")  # protocol._HEAD
PAM_QUEUE_NAME = "pam-queue.jsonl"
DEFAULT_SOCKET = "/run/sshaudit/agent.sock"
DEFAULT_TIMEOUT = 1.0
PHASES = ("open_session", "close_session", "account")
QUEUED_PHASES = ("open_session", "close_session")
MAX_FIELD = 1024
MAX_AUTH_INFO = 64 * 1024  # as the recorder's SSH_USER_AUTH copy (agent/record.py)

USAGE = """\
usage: hook.py [--config FILE] [--socket PATH] [--spool-dir DIR] [--timeout SECONDS]

The sshaudit PAM hook, for pam_exec.so (it reads PAM_TYPE, PAM_USER, PAM_RHOST, PAM_SERVICE
and PAM_TTY from the environment). It tells the sshaudit agent daemon that a session opened
or closed, waits at most --timeout seconds (default 1) for the answer, and always exits 0.

  --config FILE     read `socket` and `spool_dir` from the agent's TOML config
  --socket PATH     the daemon's socket (default /run/sshaudit/agent.sock)
  --spool-dir DIR   where to queue the event when the daemon is down
  --timeout SECONDS the most this hook may take (default 1)

--socket and --spool-dir override the config and save parsing it (faster logins).
"""


def json_string(text: str) -> str:
    """A JSON string literal (RFC 8259 section 7) without importing json."""
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch < " " or ch == "\x7f" or "\ud800" <= ch <= "\udfff":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def encode_event(event: Mapping[str, str | int]) -> bytes:
    items = []
    for key, value in event.items():
        text = str(value) if isinstance(value, int) else json_string(value)
        items.append(f"{json_string(key)}:{text}")
    return ("{" + ",".join(items) + "}").encode("utf-8", "replace")


def build_event(environ: Mapping[str, str], priv_pid: int, now: float) -> dict[str, str | int]:
    def get(name: str) -> str:
        return environ.get(name, "")[:MAX_FIELD]

    event: dict[str, str | int] = {
        "phase": get("PAM_TYPE"),
        "user": get("PAM_USER"),
        "rhost": get("PAM_RHOST"),
        "service": get("PAM_SERVICE"),
        "tty": get("PAM_TTY"),
        "priv_pid": priv_pid,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
    }
    if event["phase"] == "open_session":
        # Always sent, even empty: the daemon then knows root's copy exists and never
        # falls back to the user's SSH_USER_AUTH file for this connection.
        event["auth_info"] = environ.get("SSH_AUTH_INFO_0", "")[:MAX_AUTH_INFO]
    return event


def parse_args(argv: Sequence[str]) -> dict[str, str] | None:
    """``--name value`` and ``--name=value`` pairs; None when --help or unknown."""
    opts: dict[str, str] = {}
    it = iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=")
        if name not in ("--config", "--socket", "--spool-dir", "--timeout"):
            return None
        opts[name[2:]] = value if eq else next(it, "")
    return opts


def read_config(path: str) -> dict[str, str]:
    import tomllib  # only when asked: parsing costs a few ms on every login

    with open(path, "rb") as f:
        doc = tomllib.load(f)
    return {k: v for k, v in doc.items() if k in ("socket", "spool_dir") and isinstance(v, str)}


def send(path: str, payload: bytes, deadline: float) -> bool:
    """Deliver the PAM message; True once it was sent (an answer is waited for, bounded)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.connect(path)
        sock.sendall(HEAD.pack(MSG_PAM, len(payload)) + payload)
    except OSError:
        sock.close()
        return False
    try:  # DONE means the daemon has the event; a slow daemon still has it: no queueing.
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.recv(HEAD.size)
    except OSError:
        pass
    finally:
        sock.close()
    return True


def queue(spool_dir: str, line: bytes) -> bool:
    """Append the event to the spool's PAM queue, if the spool is the daemon's (root, 0700)."""
    try:
        st = os.lstat(spool_dir)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            return False
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(os.path.join(spool_dir, PAM_QUEUE_NAME), flags, 0o600)  # noqa: PTH118
        try:
            os.write(fd, line + b"\n")  # one write with O_APPEND: lines never interleave
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        return False
    return True


def run(
    argv: Sequence[str],
    environ: Mapping[str, str],
    priv_pid: int,
    wall_time: float | None = None,
) -> int:
    opts = parse_args(argv)
    if opts is None:
        sys.stderr.write(USAGE)
        return 0
    start = time.monotonic()
    try:
        timeout = float(opts.get("timeout") or DEFAULT_TIMEOUT)
    except ValueError:
        timeout = DEFAULT_TIMEOUT
    deadline = start + min(max(timeout, 0.01), 10.0)
    event = build_event(environ, priv_pid, time.time() if wall_time is None else wall_time)
    if event["phase"] not in PHASES:
        return 0
    config: dict[str, str] = {}
    if opts.get("config") and not (opts.get("socket") and opts.get("spool-dir")):
        try:
            config = read_config(opts["config"])
        except (OSError, ValueError):
            config = {}
    path = opts.get("socket") or config.get("socket") or DEFAULT_SOCKET
    payload = encode_event(event)
    if not send(path, payload, deadline) and event["phase"] in QUEUED_PHASES:
        spool_dir = opts.get("spool-dir") or config.get("spool_dir")
        if spool_dir:
            queue(spool_dir, payload)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv, os.environ, os.getppid())
    except BaseException:  # never break a login, whatever happened (PAM line is optional)
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
