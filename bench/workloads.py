"""SSH workloads for the benchmarks, each timed against a running test sshd.

Every workload runs the real OpenSSH client against a server from tests/sshd_harness.py;
the variants (plain sshd, sshaudit, tlog, asciinema) differ only in their ForceCommand.
Nothing here asserts a time: the caller compares variants measured in the same run.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from sshd_harness import HOST, SshdServer, client_env
from sshd_host import UnixUser


def timed_ssh(server: SshdServer, user: UnixUser, command: str, tty: bool = False) -> float:
    """Wall time of one ``ssh host command`` whose output goes to /dev/null."""
    argv = [*server.ssh_argv(user), "-tt" if tty else "-T", HOST, command]
    start = time.perf_counter()
    done = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=client_env(),
        timeout=600,
        check=False,
    )
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        where = server.config.force_command or "plain sshd"
        raise RuntimeError(
            f"{command!r} via {where} failed ({done.returncode}): {done.stderr[-500:]!r}"
        )
    return elapsed


def start_time(server: SshdServer, user: UnixUser) -> float:
    return timed_ssh(server, user, "true")


def exec_stream(mb: int) -> Callable[[SshdServer, UnixUser], float]:
    def run(server: SshdServer, user: UnixUser) -> float:
        return timed_ssh(server, user, f"head -c {mb * 1_000_000} /dev/zero")

    return run


def pty_flood(mb: int) -> Callable[[SshdServer, UnixUser], float]:
    # base64 of random data: printable, so the pty's line discipline does the usual work.
    def run(server: SshdServer, user: UnixUser) -> float:
        return timed_ssh(server, user, f"head -c {mb * 750_000} /dev/urandom | base64", tty=True)

    return run


def echo_latencies(server: SshdServer, user: UnixUser, samples: int = 200) -> list[float]:
    """Seconds from a keystroke written to the client's pty to its echo read back."""
    marker = b"READY-" + os.urandom(4).hex().encode()
    with server.interactive(user, "/bin/bash", "--norc", "--noprofile", "-i") as session:
        # Type nothing before the shell prompts: a recorder starting up may drop early input.
        session.read_until(re.compile(rb"\$ "), timeout=30)
        session.send(b"PS1='$ '; stty -ixon; echo " + marker[:6] + b"\\" + marker[6:] + b"\r")
        session.read_until(marker)
        session.read_until(b"$ ")
        out: list[float] = []
        for i in range(samples):
            key = bytes([ord("a") + i % 26])
            start = time.perf_counter()
            session.send(key)
            session.read_until(re.compile(re.escape(key)), timeout=10)
            out.append(time.perf_counter() - start)
        session.send(b"\x15exit\r")
        session.wait(timeout=10)
    return out


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def rss_mib(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


def session_children(server: SshdServer, user: UnixUser) -> list[psutil.Process]:
    """The processes sshd started as ``user`` directly under its session processes."""
    procs = psutil.Process(server.pid).children(recursive=True)
    out = []
    for p in procs:
        try:
            if p.uids().real == user.uid and p.parent() is not None:
                parent = p.parent()
                if parent is not None and parent.exe() == "/usr/sbin/sshd":
                    out.append(p)
        except psutil.Error:
            continue
    return out
