"""A real OpenSSH sshd on a loopback port, and the real ssh client, for end-to-end tests.

Invariants:
- Everything runs as root (useradd, /etc/pam.d, the listener); callers check
  :func:`unavailable_reason` first and skip (or fail, in CI) loudly.
- Each server is isolated and never touches /etc/ssh or /etc/pam.d/sshd: its own root-owned
  0755 directory under /var/lib/sshaudit-test (sshd refuses AuthorizedPrincipalsCommand paths
  with a non-root or writable parent, so never /tmp), host key, config, log and PidFile, and its
  own PAM stack: OpenSSH names its PAM service after its program name, so it is started through
  a symlink /usr/local/sbin/sshd-sshaudit-test-ID -> /usr/sbin/sshd and reads
  /etc/pam.d/sshd-sshaudit-test-ID (tests/test_sshd_harness.py checks this on this build).
- Every name the harness creates carries the creating process's pid (ID = PID-RANDOM), so a
  later run removes what a killed run left behind without disturbing a concurrent run.
- The client reads no ssh config and no agent (``-F /dev/null``, ``IdentityAgent none``), and
  checks the host key strictly against a known_hosts written from the server's own key.
"""

from __future__ import annotations

import enum
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil
from pty_session import PtySession
from sshd_host import (
    BASE_DIR,
    LINK_DIR,
    NAME_PREFIX,
    PAM_DIR,
    SSHD,
    HarnessEnv,
    SshdHarnessError,
    UnixUser,
    make_key,
    new_ident,
    root_dir,
    run_checked,
    write_root_file,
)

SFTP_SERVER = "/usr/lib/openssh/sftp-server"
HOST = "127.0.0.1"
_SSHD_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


SshdFactory = Callable[..., "SshdServer"]
"""The ``sshd_server`` fixture: ``(config=SshdConfig(), **fields) -> SshdServer``, stopped after
the test."""


class SftpMode(enum.Enum):
    """The ``Subsystem sftp`` line of sshd_config(5)."""

    SERVER = SFTP_SERVER
    INTERNAL = "internal-sftp"
    NONE = ""


@dataclass(frozen=True)
class SshdConfig:
    """What goes into the test sshd's sshd_config and PAM file (sshd_config(5), pam.d(5))."""

    force_command: str | None = None
    expose_auth_info: bool = True
    use_pam: bool = True
    permit_user_rc: bool = True  # sshd's default; the installer turns it off
    allow_tcp_forwarding: bool = True
    allow_agent_forwarding: bool = True
    x11_forwarding: bool = False
    permit_tunnel: bool = False
    sftp: SftpMode = SftpMode.SERVER
    accept_env: tuple[str, ...] = ("LANG", "LC_*")  # as Debian's stock sshd_config
    allow_users: tuple[str, ...] = ()  # empty: no AllowUsers line
    # 50 concurrent sessions: MaxStartups counts unauthenticated connections (default
    # 10:30:100 drops some at random), MaxSessions the channels of one multiplexed connection.
    max_sessions: int = 100
    max_startups: int = 200
    log_level: str = "VERBOSE"
    extra_lines: tuple[str, ...] = ()  # appended last, so Match blocks work
    pam_base: str | None = None  # None: a copy of Debian's /etc/pam.d/sshd
    pam_extra: tuple[str, ...] = ()  # appended to the PAM file

    def __post_init__(self) -> None:
        words = [self.force_command or "", self.log_level, *self.accept_env, *self.allow_users]
        for text in (*words, *self.extra_lines, *self.pam_extra):
            if "\n" in text or "\r" in text:
                raise SshdHarnessError(f"newline in an sshd/PAM config value: {text!r}")

    def render(self, port: int, private_dir: Path) -> str:
        def yn(flag: bool) -> str:
            return "yes" if flag else "no"

        lines = [
            f"Port {port}",
            f"ListenAddress {HOST}",
            f"HostKey {private_dir / 'ssh_host_ed25519_key'}",
            f"PidFile {private_dir / 'sshd.pid'}",
            f"LogLevel {self.log_level}",
            f"UsePAM {yn(self.use_pam)}",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "AuthorizedKeysFile .ssh/authorized_keys",
            "PermitRootLogin no",
            "StrictModes yes",
            "PrintMotd no",
            f"ExposeAuthInfo {yn(self.expose_auth_info)}",
            f"PermitUserRC {yn(self.permit_user_rc)}",
            f"AllowTcpForwarding {yn(self.allow_tcp_forwarding)}",
            f"AllowAgentForwarding {yn(self.allow_agent_forwarding)}",
            f"X11Forwarding {yn(self.x11_forwarding)}",
            f"PermitTunnel {yn(self.permit_tunnel)}",
            f"MaxSessions {self.max_sessions}",
            f"MaxStartups {self.max_startups}",
        ]
        if self.accept_env:
            lines.append("AcceptEnv " + " ".join(self.accept_env))
        if self.allow_users:
            lines.append("AllowUsers " + " ".join(self.allow_users))
        if self.sftp is not SftpMode.NONE:
            lines.append(f"Subsystem sftp {self.sftp.value}")
        if self.force_command is not None:
            lines.append(f"ForceCommand {self.force_command}")
        return "\n".join([*lines, *self.extra_lines]) + "\n"

    def render_pam(self) -> str:
        base = self.pam_base if self.pam_base is not None else (PAM_DIR / "sshd").read_text()
        extra = "".join(line + "\n" for line in self.pam_extra)
        return base.rstrip("\n") + "\n\n# sshaudit test harness additions\n" + extra


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


class SshdServer:
    """A running test sshd (start with :meth:`start`) and the client commands that reach it."""

    def __init__(self, config: SshdConfig, env: HarnessEnv, ident: str) -> None:
        self.config = config
        self.env = env
        self.ident = ident
        self.pam_service = NAME_PREFIX + ident
        self.link = LINK_DIR / self.pam_service
        self.pam_file = PAM_DIR / self.pam_service
        self.private_dir = BASE_DIR / f"srv-{ident}"
        self.config_path = self.private_dir / "sshd_config"
        self.log_path = self.private_dir / "sshd.log"
        self.known_hosts = self.private_dir / "known_hosts"
        self.host_key = self.private_dir / "ssh_host_ed25519_key"
        self.host = HOST
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._final_log: str | None = None

    @classmethod
    def start(cls, config: SshdConfig, env: HarnessEnv) -> SshdServer:
        server = cls(config, env, new_ident())
        try:
            server._prepare()
            server._launch()
        except BaseException:
            server.stop()
            raise
        return server

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise SshdHarnessError("sshd is not running")
        return self._proc.pid

    def _prepare(self) -> None:
        root_dir(Path("/run/sshd"))  # sshd's privilege-separation directory
        root_dir(self.private_dir)
        make_key(self.host_key, "sshaudit-test-host")
        write_root_file(self.pam_file, self.config.render_pam(), mode=0o644)
        LINK_DIR.mkdir(parents=True, exist_ok=True)
        self.link.unlink(missing_ok=True)
        self.link.symlink_to(SSHD)

    def _launch(self) -> None:
        for _attempt in range(5):  # the free port may be taken between probe and bind
            self.port = _free_port()
            write_root_file(
                self.config_path, self.config.render(self.port, self.private_dir), mode=0o644
            )
            host_key = Path(str(self.host_key) + ".pub").read_text().split()
            self.known_hosts.write_text(f"[{HOST}]:{self.port} {host_key[0]} {host_key[1]}\n")
            self._validate()
            self.log_path.unlink(missing_ok=True)
            self._proc = subprocess.Popen(
                [str(self.link), "-D", "-f", str(self.config_path), "-E", str(self.log_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                env=_SSHD_ENV,
            )
            if self._wait_listening():
                return
        raise SshdHarnessError(f"sshd found no free port:\n{self.log()}")

    def _validate(self) -> None:
        try:
            run_checked([str(self.link), "-t", "-f", str(self.config_path)], "sshd -t")
        except SshdHarnessError as exc:
            text = self.config_path.read_text()
            raise SshdHarnessError(f"{exc}\n--- {self.config_path}:\n{text}") from exc

    def _wait_listening(self, timeout: float = 10.0) -> bool:
        assert self._proc is not None
        ready = f"Server listening on {HOST} port {self.port}."
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if ready in text:
                return True
            if self._proc.poll() is not None:
                if "Address already in use" in text:
                    return False
                raise SshdHarnessError(f"sshd exited with {self._proc.returncode}:\n{text}")
            time.sleep(0.02)
        raise SshdHarnessError(f"sshd did not listen within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        """The sshd log so far (after :meth:`stop`, as it was at the end)."""
        if self._final_log is not None:
            return self._final_log
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """SIGTERM the listener and every session under it; remove all files. Idempotent."""
        try:
            if self._proc is not None:
                _terminate_tree(self._proc)
        finally:
            if self._final_log is None:
                self._final_log = self.log()
            self.link.unlink(missing_ok=True)
            self.pam_file.unlink(missing_ok=True)
            shutil.rmtree(self.private_dir, ignore_errors=True)

    def __enter__(self) -> SshdServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the client side ------------------------------------------------------------------

    def client_options(self, user: UnixUser | str) -> list[str]:
        """Options ssh, scp and sftp share (not the port: ``-p`` for ssh, ``-P`` for the rest)."""
        name = user.name if isinstance(user, UnixUser) else user
        opts = {
            "User": name,
            "IdentityFile": str(self.env.key.private),
            "IdentitiesOnly": "yes",
            "IdentityAgent": "none",
            "UserKnownHostsFile": str(self.known_hosts),
            "GlobalKnownHostsFile": "/dev/null",
            "StrictHostKeyChecking": "yes",
            "BatchMode": "yes",
            "ConnectTimeout": "10",
        }
        return ["-F", "/dev/null", *(a for k, v in opts.items() for a in ("-o", f"{k}={v}"))]

    def ssh_argv(self, user: UnixUser | str, extra_opts: Sequence[str] = ()) -> list[str]:
        """``ssh`` with every option, without the destination (append ``server.host``).

        ``extra_opts`` come first: for ssh "the first obtained value will be used"
        (ssh_config(5)), so they override the harness defaults.
        """
        return ["ssh", *extra_opts, *self.client_options(user), "-p", str(self.port)]

    def scp_argv(self, user: UnixUser | str) -> list[str]:
        return ["scp", *self.client_options(user), "-P", str(self.port)]

    def sftp_argv(self, user: UnixUser | str) -> list[str]:
        """``sftp`` with every option, without the destination (append ``server.host``)."""
        return ["sftp", *self.client_options(user), "-P", str(self.port)]

    def ssh_command(self, user: UnixUser | str) -> str:
        """One shell-quoted ssh command, for ``rsync -e`` and ``GIT_SSH_COMMAND``."""
        return shlex.join(self.ssh_argv(user))

    def remote(self, path: str | Path) -> str:
        """``HOST:path`` for scp, rsync and git (the user comes from ``-o User``)."""
        return f"{HOST}:{path}"

    def ssh(
        self,
        user: UnixUser | str,
        *command: str,
        tty: bool = False,
        input: bytes | None = None,
        timeout: float = 30.0,
        extra_opts: Sequence[str] = (),
        control_path: Path | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run the real ``ssh`` (``-tt`` when ``tty``, else ``-T``); stdin is ``input`` or empty."""
        opts = [*(["-o", f"ControlPath={control_path}"] if control_path else []), *extra_opts]
        argv = [*self.ssh_argv(user, opts), "-tt" if tty else "-T", HOST, *command]
        try:
            return subprocess.run(
                argv,
                input=input,
                capture_output=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL if input is None else None,
                env=client_env(),
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise SshdHarnessError(
                f"ssh timed out after {timeout} s: {shlex.join(argv)}\n"
                f"sshd log:\n{self.log()[-4000:]}"
            ) from exc

    @contextmanager
    def control_master(self, user: UnixUser | str) -> Iterator[Path]:
        """A ControlMaster connection; pass the yielded socket as ``ssh(control_path=...)``."""
        path = self.env.client_dir / f"cm-{secrets.token_hex(4)}"
        opts = ["-o", "ControlMaster=yes", "-o", f"ControlPath={path}", "-o", "ControlPersist=no"]
        argv = [*self.ssh_argv(user, opts), "-f", "-N", HOST]
        # -f leaves the master running in the background: it must not inherit our pipes.
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=client_env(),
            timeout=20,
            check=False,
        )
        if done.returncode != 0 or not path.exists():
            raise SshdHarnessError(f"ControlMaster failed ({done.returncode}):\n{self.log()}")
        try:
            yield path
        finally:
            subprocess.run(
                [*self.ssh_argv(user, ["-o", f"ControlPath={path}"]), "-O", "exit", HOST],
                capture_output=True,
                timeout=10,
                check=False,
            )

    def interactive(
        self,
        user: UnixUser | str,
        *command: str,
        rows: int = 24,
        cols: int = 80,
        extra_opts: Sequence[str] = (),
        term: str = "xterm",
    ) -> PtySession:
        """``ssh -tt`` on a new pty of ``rows`` x ``cols``, as a user at a terminal runs it."""
        argv = [*self.ssh_argv(user, extra_opts), "-tt", HOST, *command]
        return PtySession(argv, rows=rows, cols=cols, env={**client_env(), "TERM": term})


def client_env() -> dict[str, str]:
    """Our environment minus the agent: the client must use only the harness key."""
    return {k: v for k, v in os.environ.items() if k not in ("SSH_AUTH_SOCK", "SSH_AGENT_PID")}


def _terminate_tree(proc: subprocess.Popen[bytes]) -> None:
    # sshd setsid()s each connection's process, so a process group does not reach the
    # sessions: collect the tree first, then stop the listener, then what it left.
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for child in children:
        with suppress(psutil.Error):
            child.terminate()
    for child in wait_gone(children, timeout=3.0):
        with suppress(psutil.Error):
            child.kill()
    wait_gone(children, timeout=3.0)


def _running(proc: psutil.Process) -> bool:
    try:  # a zombie has finished; its reaper (init, once sshd is gone) may be slow to reap
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_gone(procs: Sequence[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until no process in ``procs`` runs; return those still running at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if _running(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)
