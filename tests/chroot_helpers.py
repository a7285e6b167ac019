"""A clean Debian 12 system in a folder, for the package tests (tests/test_packages.py).

Invariants:
- the base system is ``debootstrap --variant=minbase bookworm``, made once and cached as a
  tarball under ``/var/cache/sshaudit-packages`` (a fresh machine makes it, ~30 s), then
  unpacked into a unique directory per test run;
- the chroot shares the host's network (127.0.0.1 reaches the collector) but gets its own
  ``/run`` (tmpfs: no ``/run/systemd/system``, so enroll starts the daemon itself) and a
  ``policy-rc.d`` that forbids services starting at install (no sshd on port 22);
- :meth:`Chroot.destroy` always runs (fixture ``finally``): it kills every process whose
  root is the chroot, unmounts everything under it and deletes it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

CACHE = Path("/var/cache/sshaudit-packages")
BASE = CACHE / "bookworm-minbase.tar"
APT_ARCHIVES = CACHE / "apt-archives"
MIRROR = "http://deb.debian.org/debian"


def run(argv: list[str], timeout: float = 600, **kw: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kw,  # type: ignore[call-overload]
    )
    assert isinstance(done, subprocess.CompletedProcess)
    return done


def ok(argv: list[str], timeout: float = 600) -> str:
    done = run(argv, timeout)
    assert done.returncode == 0, f"{argv}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return str(done.stdout)


def base_tarball() -> Path:
    """The debootstrapped base, made on first use (atomically: a partial one is never used)."""
    if BASE.exists():
        return BASE
    if shutil.which("debootstrap") is None:
        ok(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "debootstrap"])
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=CACHE))
    try:
        ok(["debootstrap", "--variant=minbase", "bookworm", str(work / "root"), MIRROR], 900)
        tmp = CACHE / f".base-{os.getpid()}.tar"
        ok(["tar", "-C", str(work / "root"), "--numeric-owner", "-cf", str(tmp), "."])
        tmp.rename(BASE)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return BASE


class Chroot:
    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def create(cls) -> Chroot:
        tarball = base_tarball()
        root = Path(tempfile.mkdtemp(prefix="sshaudit-chroot-", dir="/var/tmp"))
        root.chmod(0o755)
        c = cls(root)
        try:
            ok(["tar", "-C", str(root), "--numeric-owner", "-xf", str(tarball)])
            c._mount()
            shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf")
            # invoke-rc.d asks this before starting a service: never, in a test chroot.
            rc = root / "usr/sbin/policy-rc.d"
            rc.write_text("#!/bin/sh\nexit 101\n")
            rc.chmod(0o755)
            (root / "run/sshd").mkdir(mode=0o755)  # sshd's privilege separation directory
        except BaseException:
            c.destroy()
            raise
        return c

    def _mount(self) -> None:
        r = self.root
        ok(["mount", "-t", "proc", "proc", str(r / "proc")])
        # /dev with its devpts: sshd in the chroot allocates ptys for interactive sessions.
        ok(["mount", "--rbind", "/dev", str(r / "dev")])
        ok(["mount", "--make-rslave", str(r / "dev")])
        ok(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(r / "run")])
        # The .debs apt downloads are kept between runs (apt checks their hashes).
        APT_ARCHIVES.mkdir(parents=True, exist_ok=True)
        (APT_ARCHIVES / "partial").mkdir(exist_ok=True)
        ok(["mount", "--bind", str(APT_ARCHIVES), str(r / "var/cache/apt/archives")])

    def path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def run(self, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "DEBIAN_FRONTEND": "noninteractive",
            "LC_ALL": "C.UTF-8",
            "HOME": "/root",
        }
        return run(["chroot", str(self.root), *argv], timeout, env=env)

    def ok(self, *argv: str, timeout: float = 600) -> str:
        done = self.run(*argv, timeout=timeout)
        assert done.returncode == 0, f"{argv}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        return str(done.stdout)

    def pids(self) -> list[int]:
        """Processes whose root directory is this chroot."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.readlink(entry / "root") == str(self.root):
                        found.append(int(entry.name))
                except OSError:
                    continue
        return found

    def kill_all(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 5
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.1)

    def destroy(self) -> None:
        self.kill_all()
        for mount in reversed(self._mounts()):
            if run(["umount", "-R", mount]).returncode != 0:
                run(["umount", "-R", "-l", mount])
        assert not self._mounts(), f"still mounted: {self._mounts()}"
        shutil.rmtree(self.root, ignore_errors=True)

    def _mounts(self) -> list[str]:
        prefix = str(self.root) + "/"
        with open("/proc/self/mounts") as f:
            points = [line.split()[1] for line in f]
        return [p for p in points if p.startswith(prefix)]
