"""Who is on the other end of the daemon's socket: SO_PEERCRED and the process ancestry.

The socket is open to every user (mode 0666); the kernel's SO_PEERCRED (unix(7)) says which
pid/uid/gid connected, and cannot be forged. From the pid, the process tree says whether the
peer is a recorder that sshd started (DESIGN.md "Facts about OpenSSH", checked on 9.2):

    sshd: USER [priv]          root, one per SSH connection (PAM runs here)
     `- sshd: USER@pts/N       the user (or USER@notty; several ttys when multiplexed)
         `- [login shell -c]   the user, only if the shell did not exec the ForceCommand
             `- recorder       the user: the peer

Invariants:
- a recorder peer is accepted only if its uid is the user's, its parent (or its parent's
  parent, through a login shell) is that user's ``sshd: USER@...`` process and the next one
  up is a root ``sshd: USER [priv]`` process. Anything the user starts inside a session
  descends from the recorder, so it cannot pass (its parent chain meets the recorder, not an
  sshd process, first);
- a PAM peer must be root;
- every psutil failure (the process went away, access denied) is a refusal, raised as
  :class:`PeerError` from the psutil exception, never a crash.
"""

from __future__ import annotations

import os
import pwd
import re
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

from sshaudit.errors import SSHAuditError

_CRED = struct.Struct("3i")  # struct ucred: pid_t pid, uid_t uid, gid_t gid (unix(7))
# OpenSSH's setproctitle prefixes the program name (sshd, sshd-session, or the name of a
# link it was started through), then ": ".
_PRIV_RE = re.compile(r"(?P<prog>[\w.-]*sshd[\w.-]*): (?P<user>[^\s@]+) \[priv\]\s*")
_SESSION_RE = re.compile(r"(?P<prog>[\w.-]*sshd[\w.-]*): (?P<user>[^\s@]+)@(?P<ttys>\S+)\s*")


class PeerError(SSHAuditError):
    """The peer is not who it must be; the message says why (for the daemon's log)."""


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_cred(sock: socket.socket) -> PeerCred:
    """The connecting process's credentials as the kernel recorded them at connect(2)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    pid, uid, gid = _CRED.unpack(raw)
    return PeerCred(pid, uid, gid)


@dataclass(frozen=True)
class ProcInfo:
    """What the ancestry check needs to know about one process."""

    pid: int
    ppid: int
    uids: tuple[int, int, int]  # real, effective, saved
    title: str  # argv[0] as /proc/PID/cmdline shows it (sshd rewrites it: setproctitle)
    exe: str  # the executable, symlinks resolved


ProcLookup = Callable[[int], ProcInfo]


def psutil_lookup(pid: int) -> ProcInfo:
    """Read a process with psutil (and its title from /proc, unsplit)."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            ppid = proc.ppid()
            uids = proc.uids()
            try:
                exe = proc.exe()
            except psutil.AccessDenied:
                exe = ""
    except psutil.Error as exc:
        raise PeerError(f"process {pid} cannot be inspected: {exc}") from exc
    try:
        # psutil splits a rewritten title on spaces; the first NUL-terminated string is it.
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError as exc:
        raise PeerError(f"process {pid} went away") from exc
    title = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    return ProcInfo(pid, ppid, (uids.real, uids.effective, uids.saved), title, exe)


def login_shells(extra: Iterable[str] = ()) -> frozenset[str]:
    """The executables of /etc/shells (and ``extra``), symlinks resolved as /proc shows them."""
    names = set(extra)
    try:
        text = Path("/etc/shells").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    names.update(line.strip() for line in text.splitlines() if line.strip().startswith("/"))
    return frozenset(os.path.realpath(n) for n in names)


@dataclass(frozen=True)
class Lineage:
    """A recorder's place in sshd's process tree."""

    user: str
    uid: int
    priv_pid: int  # sshd's [priv] process: one per SSH connection, links to PAM
    session_pid: int  # sshd's USER@tty process


def _user_uid(name: str) -> int:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError as exc:
        raise PeerError(f"sshd names user {name!r}, who does not exist") from exc


def sshd_executable(path: str) -> bool:
    """Whether ``path`` is an sshd binary an admin installed: named sshd (or sshd-session,
    OpenSSH >= 9.8), owned by root and writable by nobody else. A process title is only
    text any process can set; a copy of sshd in a user's home fails the ownership test."""
    if Path(path).name not in ("sshd", "sshd-session"):
        return False
    try:
        st = Path(path).stat()
    except OSError:
        return False
    return st.st_uid == 0 and not st.st_mode & 0o022


class AncestryCheck:
    """The recorder check, with the process table and the user database as parameters."""

    def __init__(
        self,
        lookup: ProcLookup = psutil_lookup,
        shells: Callable[[int], frozenset[str]] | None = None,
        uid_of: Callable[[str], int] = _user_uid,
        is_sshd: Callable[[str], bool] = sshd_executable,
    ) -> None:
        self._lookup = lookup
        self._shells = shells or (lambda uid: login_shells(_pw_shell(uid)))
        self._uid_of = uid_of
        self._is_sshd = is_sshd

    def __call__(self, cred: PeerCred) -> Lineage:
        peer = self._lookup(cred.pid)
        if peer.uids[0] != cred.uid or peer.uids[1] != cred.uid:
            raise PeerError(f"pid {cred.pid}: uid changed since it connected")
        parent = self._lookup(peer.ppid)
        session_proc = parent
        if not _SESSION_RE.fullmatch(parent.title):
            # the login shell may not have exec'ed the ForceCommand: one shell in between
            if parent.exe not in self._shells(cred.uid) or parent.uids[0] != cred.uid:
                raise PeerError(
                    f"pid {cred.pid}: its parent {parent.pid} ({parent.title[:60]!r}) is "
                    "neither an sshd session process nor a login shell"
                )
            session_proc = self._lookup(parent.ppid)
        match = _SESSION_RE.fullmatch(session_proc.title)
        if match is None or not self._is_sshd(session_proc.exe):
            raise PeerError(f"pid {cred.pid}: not started by an sshd session process")
        user = match["user"]
        if session_proc.uids[0] != cred.uid or self._uid_of(user) != cred.uid:
            raise PeerError(f"pid {cred.pid}: uid {cred.uid} is not sshd's user {user!r}")
        priv = self._lookup(session_proc.ppid)
        priv_match = _PRIV_RE.fullmatch(priv.title)
        bad_priv = priv_match is None or priv_match["user"] != user
        if bad_priv or priv.uids[0] != 0 or not self._is_sshd(priv.exe):
            raise PeerError(
                f"pid {cred.pid}: sshd session process {session_proc.pid} is not a child "
                f"of a root 'sshd: {user} [priv]' process"
            )
        return Lineage(user=user, uid=cred.uid, priv_pid=priv.pid, session_pid=session_proc.pid)


def _pw_shell(uid: int) -> tuple[str, ...]:
    try:
        return (pwd.getpwuid(uid).pw_shell,)
    except KeyError:
        return ()


def check_pam_peer(cred: PeerCred) -> None:
    """The PAM hook runs as root inside sshd; nobody else may speak for PAM."""
    if cred.uid != 0:
        raise PeerError(f"pid {cred.pid}: a PAM message from uid {cred.uid}, not root")


def check_principals_peer(
    cred: PeerCred, principals_uid: int | None, lookup: ProcLookup = psutil_lookup
) -> int:
    """The principals command runs as ``AuthorizedPrincipalsCommandUser`` (or root), a child
    of sshd's root monitor process for the connection (sshd_config(5)); returns that
    parent's pid. Anyone else could invent authentication decisions."""
    if cred.uid not in (0, principals_uid):
        raise PeerError(f"pid {cred.pid}: an AUTH message from uid {cred.uid}")
    parent = lookup(lookup(cred.pid).ppid)
    # Real uid, not effective: sshd's monitor runs the command with its effective uid
    # switched to the command user for the moment (temporarily_use_uid, checked on 9.2);
    # only root can have real uid 0.
    if parent.uids[0] != 0 or not sshd_executable(parent.exe):
        raise PeerError(
            f"pid {cred.pid}: an AUTH message not from a child of a root sshd "
            f"(parent {parent.pid} {parent.title!r} euid {parent.uids[1]} exe {parent.exe!r})"
        )
    return parent.pid
