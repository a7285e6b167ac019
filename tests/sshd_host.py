"""The host side of the sshd test harness: test users, the client key, root-owned dirs.

Invariants:
- runs as root; :func:`unavailable_reason` says why not, for a loud skip (or a CI failure);
- test users are created idempotently and kept (useradd is slow and harmless to repeat), but
  the session's key is removed from their authorized_keys afterwards; edits of
  authorized_keys are serialized with flock, since several pytest runs may share the users;
- every path the harness creates carries the creating process's pid (ID = PID-RANDOM), so
  :func:`sweep_stale` removes what a killed run left behind, never a live run's files;
- directories that sshd checks (AuthorizedPrincipalsCommand, ForceCommand scripts) are
  root-owned 0755 under /var/lib/sshaudit-test, never under the world-writable /tmp.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil

from sshaudit.errors import SSHAuditError

BASE_DIR = Path("/var/lib/sshaudit-test")
LINK_DIR = Path("/usr/local/sbin")
PAM_DIR = Path("/etc/pam.d")
SSHD = Path("/usr/sbin/sshd")
NAME_PREFIX = "sshd-sshaudit-test-"
_IDENT_RE = re.compile(r"(\d+)-[0-9a-f]+$")
_KEY_COMMENT_RE = re.compile(r" sshaudit-test-(\d+)-[0-9a-f]+$")
_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,30}$")


class SshdHarnessError(SSHAuditError):
    """The test sshd or client could not be set up, or did not behave as a test needs."""


@dataclass(frozen=True)
class UnixUser:
    name: str
    uid: int
    gid: int
    home: Path


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path

    def public_line(self) -> str:
        return self.public.read_text().strip()


def new_ident() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def unavailable_reason() -> str | None:
    """Why the harness cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "the sshd harness needs root (useradd, /etc/pam.d, a root sshd listener)"
    if not SSHD.is_file():
        return f"{SSHD} is missing: install openssh-server (scripts/bootstrap does)"
    for tool in ("ssh", "ssh-keygen", "scp", "sftp", "useradd", "usermod"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH: install openssh-client / passwd"
    return None


def run_checked(argv: Sequence[str], what: str, timeout: float = 30.0) -> bytes:
    """Run a set-up command; its output in the error when it fails."""
    try:
        done = subprocess.run(list(argv), capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SshdHarnessError(f"{what}: {shlex.join(argv)}: {exc}") from exc
    if done.returncode != 0:
        out = (done.stdout + done.stderr).decode(errors="replace")
        raise SshdHarnessError(f"{what} failed ({done.returncode}): {shlex.join(argv)}\n{out}")
    return done.stdout


def root_dir(path: Path) -> Path:
    """Create ``path`` as a root-owned 0755 directory, refusing symlinks."""
    with suppress(FileExistsError):
        path.mkdir(mode=0o755)
    st = path.lstat()
    if not path.is_dir() or path.is_symlink():
        raise SshdHarnessError(f"{path} is not a directory")
    if st.st_uid != 0:
        os.chown(path, 0, 0)
    path.chmod(0o755)
    return path


def ensure_user(name: str) -> UnixUser:
    """Create (or reuse) an unprivileged user with a home, /bin/bash and password ``*``.

    ``*`` matches no password but is not "locked": with UsePAM no, sshd refuses accounts whose
    password starts with ``!`` (what useradd leaves) even for publickey logins.
    """
    if not _USER_RE.match(name):
        raise SshdHarnessError(f"bad test user name: {name!r}")
    try:
        pwd.getpwnam(name)
    except KeyError:
        run_checked(
            ["useradd", "--create-home", "--user-group", "--shell", "/bin/bash", name], "useradd"
        )
    run_checked(["usermod", "--password", "*", "--shell", "/bin/bash", name], "usermod")
    entry = pwd.getpwnam(name)
    home = Path(entry.pw_dir)
    if not home.is_dir():
        raise SshdHarnessError(f"{name}: home {home} is missing")
    return UnixUser(name, entry.pw_uid, entry.pw_gid, home)


def make_key(path: Path, comment: str) -> KeyPair:
    run_checked(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        "ssh-keygen",
    )
    return KeyPair(path, path.with_name(path.name + ".pub"))


@contextmanager
def _keys_lock() -> Iterator[None]:
    # Several pytest runs may edit the same users' authorized_keys at once.
    with open(root_dir(BASE_DIR) / ".authorized_keys.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _edit_authorized_keys(user: UnixUser, keep: Callable[[str], bool], add: str = "") -> None:
    """Keep the lines ``keep`` accepts, then append ``add`` (when given)."""
    # Root writes into a directory the user owns: never follow a symlink the user planted
    # (O_NOFOLLOW on both components; /home itself is root's).
    ssh_dir = user.home / ".ssh"
    with _keys_lock():
        with suppress(FileExistsError):
            ssh_dir.mkdir(mode=0o700)
        try:
            dfd = os.open(ssh_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as exc:
            raise SshdHarnessError(f"{ssh_dir}: {exc.strerror} (a symlink?)") from exc
        try:
            # StrictModes (sshd_config(5)): owned by the user, not group/world-writable.
            os.fchown(dfd, user.uid, user.gid)
            os.fchmod(dfd, 0o700)
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
            fd = os.open("authorized_keys", flags, 0o600, dir_fd=dfd)
            with os.fdopen(fd, "r+") as f:
                lines = [x for x in f.read().splitlines() if keep(x.strip())]
                f.seek(0)
                f.truncate()
                f.write("".join(x + "\n" for x in [*lines, *([add] if add else [])]))
                os.fchown(fd, user.uid, user.gid)
                os.fchmod(fd, 0o600)
        finally:
            os.close(dfd)


def _ours_and_dead(line: str) -> bool:
    """A key line a harness run added (its comment names the run) whose process is gone."""
    m = _KEY_COMMENT_RE.search(line)
    return m is not None and not _pid_alive(int(m.group(1)))


def authorize_key(user: UnixUser, key: KeyPair) -> None:
    """Add ``key``; drop the keys that runs whose process is gone left behind."""
    line = key.public_line()
    _edit_authorized_keys(user, lambda x: x != line and not _ours_and_dead(x), add=line)


def revoke_key(user: UnixUser, key: KeyPair) -> None:
    line = key.public_line()
    _edit_authorized_keys(user, lambda x: x != line)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[Path]:
    """Remove what runs whose process is gone left behind (links, PAM files, dirs, sshds)."""
    removed: list[Path] = []
    candidates = [*LINK_DIR.glob(NAME_PREFIX + "*"), *PAM_DIR.glob(NAME_PREFIX + "*")]
    if BASE_DIR.is_dir():
        candidates += [*BASE_DIR.glob("srv-*"), *BASE_DIR.glob("work-*")]
    for path in candidates:
        m = _IDENT_RE.search(path.name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        if path.name.startswith("srv-"):
            _kill_stale_sshd(path, LINK_DIR / (NAME_PREFIX + m.group(0)))
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _kill_stale_sshd(private_dir: Path, link: Path) -> None:
    # The listener's title (setproctitle writes over argv) still names its link and config.
    try:
        listener = psutil.Process(int((private_dir / "sshd.pid").read_text()))
        if listener.exe() != str(SSHD) or str(link) not in " ".join(listener.cmdline()):
            return
        procs = [listener, *listener.children(recursive=True)]
    except (OSError, ValueError, psutil.Error):
        return
    for proc in procs:
        with suppress(psutil.Error):
            proc.kill()


@dataclass(frozen=True)
class HarnessEnv:
    """Session-wide state: the test users and the client key authorized for each."""

    users: tuple[UnixUser, ...]
    key: KeyPair
    client_dir: Path

    def user(self, name: str) -> UnixUser:
        for u in self.users:
            if u.name == name:
                return u
        raise SshdHarnessError(f"no test user {name!r}")


@contextmanager
def harness_env(user_names: Sequence[str]) -> Iterator[HarnessEnv]:
    """Users (kept after the run: creation is idempotent), a fresh key, authorized; undone."""
    sweep_stale()
    root_dir(BASE_DIR)
    client_dir = Path(tempfile.mkdtemp(prefix="sshaudit-client-"))  # root-owned, 0700
    authorized: list[UnixUser] = []
    try:
        # The comment names this run: authorize_key drops keys of runs that died.
        key = make_key(client_dir / "id_ed25519", f"sshaudit-test-{new_ident()}")
        users = tuple(ensure_user(n) for n in user_names)
        for u in users:
            authorize_key(u, key)
            authorized.append(u)
        yield HarnessEnv(users, key, client_dir)
    finally:
        for u in authorized:
            revoke_key(u, key)
        shutil.rmtree(client_dir, ignore_errors=True)


@contextmanager
def work_dir() -> Iterator[Path]:
    """A root-owned 0755 directory under /var/lib/sshaudit-test (for ForceCommand scripts)."""
    path = root_dir(root_dir(BASE_DIR) / f"work-{new_ident()}")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_root_file(path: Path, text: str, mode: int = 0o755) -> Path:
    path.write_text(text)
    os.chown(path, 0, 0)
    path.chmod(mode)
    return path


@contextmanager
def user_scratch(user: UnixUser, tag: str) -> Iterator[Path]:
    """A fresh directory in ``user``'s home, owned by them, removed afterwards."""
    path = user.home / f"{tag}-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir()
    os.chown(path, user.uid, user.gid)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
