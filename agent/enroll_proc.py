"""The processes enrollment talks to: sshd (validate, effective settings, reload) and the
agent daemon (start, stop). Commands are argument lists, never shell strings.

Invariants:
- ``sshd -t`` decides whether an edited configuration is used: its error text is returned
  whole to the admin, because it names the offending line;
- a reload is a SIGHUP to the pid in sshd's own ``PidFile`` (what ``systemctl reload ssh``
  does, ExecReload in Debian's unit), sent only after the pid is checked to be an sshd
  binary owned by root; an sshd that is not running is not an error (it reads the new
  settings when it starts);
- the daemon is started through systemd when the host runs it with the default layout,
  else as a detached process whose pid is kept in the layout's run directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from sshaudit.agent.layout import Layout
from sshaudit.errors import ConfigError, SSHAuditError

TIMEOUT = 20.0


def _run(argv: Sequence[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SSHAuditError(f"cannot run {argv[0]}: {exc}") from exc


def sshd_check(sshd: Path, config: Path) -> str | None:
    """``sshd -t -f CONFIG``: None when valid, else sshd's complaint."""
    done = _run([str(sshd), "-t", "-f", str(config)])
    if done.returncode == 0:
        return None
    return (done.stderr or done.stdout).strip() or f"sshd -t exited {done.returncode}"


def sshd_effective(sshd: Path, config: Path, user: str = "root") -> dict[str, list[str]]:
    """``sshd -T``: the settings sshd would use for a connection of ``user`` from loopback
    (Match blocks evaluated, sshd(8) -C), keyword (lowercase) -> values."""
    spec = f"user={user},host=localhost,addr=127.0.0.1,laddr=127.0.0.1,lport=22"
    done = _run([str(sshd), "-T", "-f", str(config), "-C", spec])
    if done.returncode != 0:
        raise ConfigError(f"sshd -T: {(done.stderr or done.stdout).strip()[:500]}")
    out: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition(" ")
        out.setdefault(key.lower(), []).append(value)
    return out


def _sshd_pid(sshd: Path, config: Path) -> int | None:
    try:
        pidfile = sshd_effective(sshd, config).get("pidfile", ["/run/sshd.pid"])[0]
        pid = int(Path(pidfile).read_text().split()[0])
        proc = psutil.Process(pid)
        if proc.uids().real != 0 or "sshd" not in Path(proc.exe()).name:
            return None
    except (OSError, ValueError, IndexError, ConfigError, psutil.Error):
        return None
    return pid


def sshd_reload(sshd: Path, config: Path) -> str:
    """SIGHUP the running sshd; returns what happened, for the admin."""
    pid = _sshd_pid(sshd, config)
    if pid is None:
        return "sshd is not running: it reads the new settings when it starts"
    os.kill(pid, signal.SIGHUP)
    # sshd re-executes itself on SIGHUP (same pid); a broken config would make it exit.
    time.sleep(0.5)
    if not psutil.pid_exists(pid):
        raise SSHAuditError(f"sshd (pid {pid}) exited after the reload: check its log")
    return f"sshd (pid {pid}) reloaded"


def _systemd(layout: Layout) -> bool:
    return layout == Layout.under(None) and Path("/run/systemd/system").is_dir()


def _daemon_running(layout: Layout) -> int | None:
    try:
        pid = int(layout.daemon_pid.read_text().strip())
        proc = psutil.Process(pid)
        if "daemon" not in proc.cmdline():
            return None
    except (OSError, ValueError, psutil.Error):
        return None
    return pid


def agent_command() -> list[str]:
    script = Path(sys.executable).parent / "sshaudit-agent"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "sshaudit.agent.cli"]


def start_daemon(layout: Layout, timeout: float = 20.0) -> str:
    """(Re)start the daemon with the layout's config; waits until it listens."""
    if _systemd(layout):
        done = _run(["systemctl", "restart", "sshaudit-agent.service"], timeout=60)
        if done.returncode != 0:
            raise SSHAuditError(f"systemctl restart sshaudit-agent: {done.stderr.strip()}")
        return "sshaudit-agent.service restarted"
    stop_daemon(layout)
    layout.run.mkdir(parents=True, exist_ok=True, mode=0o755)
    with layout.daemon_log.open("ab") as log_file:
        offset = log_file.tell()
        proc = subprocess.Popen(
            [*agent_command(), "daemon", "--config", str(layout.config)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,  # not killed with the admin's terminal
        )
    layout.daemon_pid.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = layout.daemon_log.read_bytes()[offset:].decode(errors="replace")
        if "listening on" in text:
            return f"agent daemon started (pid {proc.pid}, log {layout.daemon_log})"
        if proc.poll() is not None:
            raise SSHAuditError(f"the agent daemon exited at start:\n{text.strip()[-2000:]}")
        time.sleep(0.05)
    raise SSHAuditError(f"the agent daemon did not start within {timeout:.0f} s")


def stop_daemon(layout: Layout, timeout: float = 20.0) -> str:
    if _systemd(layout):
        _run(["systemctl", "stop", "sshaudit-agent.service"], timeout=60)
        return "sshaudit-agent.service stopped"
    pid = _daemon_running(layout)
    if pid is None:
        return "agent daemon not running"
    proc = psutil.Process(pid)
    proc.terminate()
    try:
        proc.wait(timeout)
    except psutil.TimeoutExpired:
        proc.kill()
    layout.daemon_pid.unlink(missing_ok=True)
    return f"agent daemon (pid {pid}) stopped"


def daemon_pid(layout: Layout) -> int | None:
    if _systemd(layout):
        done = _run(["systemctl", "show", "-p", "MainPID", "--value", "sshaudit-agent.service"])
        value = done.stdout.strip()
        return int(value) if value.isdigit() and value != "0" else None
    return _daemon_running(layout)
