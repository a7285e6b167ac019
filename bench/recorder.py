"""The recorder's cost, side by side with plain sshd, tlog-rec-session and asciinema rec.

Four sshds on loopback run at once, differing only in their ForceCommand: none (plain),
sshaudit (recorder + root daemon + PAM hook, input recorded, frames sealed and fsynced),
Debian's tlog-rec-session (file writer) and Debian's asciinema rec. Every workload is run
interleaved across the variants, so the machine's drift hits all alike; results are
medians, and ratios are taken against plain sshd measured in the same run.

Run as root (it starts sshd). Writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from agent_harness import Agent
from report import write_section
from sshd_harness import HOST, SshdConfig, SshdServer, client_env
from sshd_host import SSHD, HarnessEnv, UnixUser, harness_env, work_dir, write_root_file
from workloads import (
    echo_latencies,
    exec_stream,
    median,
    percentile,
    pty_flood,
    rss_mib,
    start_time,
)

USER = "sshaudit-alice"
Workload = Callable[[SshdServer, UnixUser], float]

TLOG = """#!/bin/sh
# tlog as a ForceCommand: its file writer, since this machine runs no journald.
export TLOG_REC_SESSION_CONF_TEXT='{"writer":"file","file":{"path":"/tmp/tlog-bench.log"}}'
if [ -n "$SSH_ORIGINAL_COMMAND" ]; then exec tlog-rec-session -c "$SSH_ORIGINAL_COMMAND"; fi
exec tlog-rec-session
"""
ASCIINEMA = """#!/bin/sh
# asciinema rec as a ForceCommand (DESIGN.md: it loses non-pty exec output; start time
# and pty workloads only).
f=$(mktemp /tmp/asciinema-bench.XXXXXX.cast)
c=${SSH_ORIGINAL_COMMAND:-}
if [ -n "$c" ]; then exec asciinema rec -q --overwrite -c "$c" "$f"; fi
exec asciinema rec -q --overwrite -c "$SHELL -l" "$f"
"""


def tlog_prerequisites() -> None:
    """tlog-rec-session fails its pty tap without a utmp file (seen here: a container has
    none) and wants a lock directory; both are created as a Debian system would have them."""
    utmp = Path("/run/utmp")
    if not utmp.exists():
        utmp.touch(mode=0o664)
        with contextlib.suppress(KeyError, OSError):
            import grp

            os.chown(utmp, 0, grp.getgrnam("utmp").gr_gid)
    Path("/run/tlog").mkdir(mode=0o1777, exist_ok=True)
    Path("/run/tlog").chmod(0o1777)


@contextlib.contextmanager
def servers(work: Path, env: HarnessEnv) -> Iterator[tuple[dict[str, SshdServer], Agent]]:
    agent_dir = work / "agent"
    agent_dir.mkdir(mode=0o755)
    agent = Agent(agent_dir).start()
    # The same with the exec stream hash off (policy exec_hash): past the capture cap the
    # recorder then splices bytes without copying them through Python (DESIGN.md).
    nohash_dir = work / "agent-nohash"
    nohash_dir.mkdir(mode=0o755)
    nohash = Agent(nohash_dir, exec_hash=False).start()
    tlog = write_root_file(work / "tlog-force", TLOG)
    asc = write_root_file(work / "asciinema-force", ASCIINEMA)
    base = SshdConfig(allow_users=(USER,), max_sessions=300, max_startups=300)
    cfgs = {
        "plain": base,
        # As the installer sets sshd up (DESIGN.md "Installing on a server").
        "sshaudit": replace(
            base,
            force_command=agent.force_command(),
            pam_extra=(agent.pam_line(),),
            permit_user_rc=False,
            extra_lines=("SetEnv SHLVL=1",),
        ),
        "nohash": replace(
            base,
            force_command=nohash.force_command(),
            pam_extra=(nohash.pam_line(),),
            permit_user_rc=False,
            extra_lines=("SetEnv SHLVL=1",),
        ),
        "tlog": replace(base, force_command=str(tlog)),
        "asciinema": replace(base, force_command=str(asc)),
    }
    started: dict[str, SshdServer] = {}
    tlog_prerequisites()
    try:
        for name, cfg in cfgs.items():
            started[name] = SshdServer.start(cfg, env)
        yield started, agent
    finally:
        for server in started.values():
            server.stop()
        agent.stop()
        nohash.stop()
        Path("/tmp/tlog-bench.log").unlink(missing_ok=True)
        for cast in Path("/tmp").glob("asciinema-bench.*.cast"):
            cast.unlink(missing_ok=True)


def interleaved(
    srv: dict[str, SshdServer], user: UnixUser, names: list[str], work: Workload, runs: int
) -> dict[str, float]:
    times: dict[str, list[float]] = {n: [] for n in names}
    for name in names:  # one warm-up each (page cache, first-login costs)
        work(srv[name], user)
    for _ in range(runs):
        for name in names:
            times[name].append(work(srv[name], user))
    return {n: median(v) for n, v in times.items()}


def ratio_rows(label: str, med: dict[str, float], goal: str) -> list[str]:
    base = med["plain"]
    cells = [f"{med[n]:.3f} s ({med[n] / base:.2f}x)" if n in med else "n/a" for n in VARIANTS]
    return [f"| {label} | " + " | ".join(cells) + f" | {goal} |"]


VARIANTS = ["plain", "sshaudit", "tlog", "asciinema"]


def recorder_rss(srv: SshdServer, user: UnixUser) -> float:
    """Peak RSS (VmHWM) of the ForceCommand process during an interactive session."""
    with srv.interactive(user) as session:
        session.read_until(re.compile(rb"\$ "), timeout=30)
        session.send(b"echo RSS-PROBE-$((6*7))\r")
        session.read_until(b"RSS-PROBE-42")
        session.send(b"head -c 3000000 /dev/urandom | base64 | tail -c 100; echo DONE-$((1+1))\r")
        session.read_until(b"DONE-2", timeout=60)
        peak = 0.0
        for proc in _force_command_procs(srv, user):
            peak = max(peak, _hwm_mib(proc.pid))
        session.send(b"exit\r")
        session.wait(timeout=15)
    return peak


def _force_command_procs(srv: SshdServer, user: UnixUser) -> list[psutil.Process]:
    """The user's processes whose parent is an sshd session process (``sshd: user@...``)."""
    out = []
    for p in psutil.Process(srv.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            parent = p.parent()
            if p.uids().real == user.uid and parent is not None and parent.exe() == str(SSHD):
                out.append(p)
    return out


def _hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def daemon_rss_with_sessions(
    srv: SshdServer, user: UnixUser, agent: Agent, count: int
) -> tuple[float, float, int]:
    """Daemon RSS idle, and its peak with ``count`` concurrent recorded sessions."""
    assert agent.proc is not None
    idle = rss_mib(agent.proc.pid)
    cmd = "for i in $(seq 20); do date; sleep 0.5; done"
    procs = [
        subprocess.Popen(
            [*srv.ssh_argv(user), "-T", HOST, cmd],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=client_env(),
        )
        for _ in range(count)
    ]
    peak, connected = 0.0, 0
    deadline = time.monotonic() + 60
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        peak = max(peak, rss_mib(agent.proc.pid))
        connected = max(connected, len(os.listdir(agent.spool)) // 2)
        time.sleep(0.2)
    for p in procs:
        p.wait(timeout=60)
    return idle, max(peak, _hwm_mib(agent.proc.pid)), sum(p.returncode == 0 for p in procs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7, help="runs per variant (median)")
    parser.add_argument("--stream-mb", type=int, default=1000)
    parser.add_argument("--flood-mb", type=int, default=40)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/recorder.py runs sshd: run it as root")
    with harness_env([USER]) as env, work_dir() as work, servers(work, env) as (srv, agent):
        user = env.user(USER)
        rows = ["| workload | plain sshd | sshaudit | tlog-rec-session | asciinema rec | goal |"]
        rows.append("|---|---|---|---|---|---|")
        med = interleaved(srv, user, VARIANTS, start_time, max(args.runs, 15))
        rows += ratio_rows("`ssh host true` (start time)", med, "<= 1.05x")
        stream = exec_stream(args.stream_mb)
        med = interleaved(srv, user, ["plain", "sshaudit", "nohash"], stream, args.runs)
        nohash_ratio = med["nohash"] / med["plain"]
        med_tlog = interleaved(srv, user, ["plain", "tlog"], exec_stream(100), 3)
        med["tlog"] = med_tlog["tlog"] / med_tlog["plain"] * med["plain"]  # same ratio
        rows += ratio_rows(f"exec stream {args.stream_mb} MB, no pty (tlog: 100 MB, scaled)",
                           med, ">= 0.95x speed")  # fmt: skip
        med = interleaved(srv, user, VARIANTS, pty_flood(args.flood_mb), args.runs)
        rows += ratio_rows(f"pty flood, {args.flood_mb} MB of base64", med, ">= 0.9x, < tlog")
        lat = {n: echo_latencies(srv[n], user) for n in VARIANTS}
        lat_rows = [
            "| variant | p50 ms | p99 ms | added p99 vs plain, ms |",
            "|---|---|---|---|",
        ]
        for n in VARIANTS:
            p50, p99 = percentile(lat[n], 0.5) * 1e3, percentile(lat[n], 0.99) * 1e3
            added = p99 - percentile(lat["plain"], 0.99) * 1e3
            lat_rows.append(f"| {n} | {p50:.2f} | {p99:.2f} | {added:+.2f} |")
        rss = {n: recorder_rss(srv[n], user) for n in ("sshaudit", "tlog", "asciinema")}
        idle, peak, ok = daemon_rss_with_sessions(srv["sshaudit"], user, agent, args.sessions)
    body = "\n".join(
        [
            "## The recorder against plain sshd, tlog and asciinema (`bench/recorder.py`)",
            "",
            f"Medians of {args.runs} interleaved runs (start time: of 15). Each cell is the wall",
            "time and its ratio to plain sshd in the same run (1.10x = 10 % slower). Throughput",
            "goals convert: >= 0.95x of plain throughput means a time ratio <= 1.05x, >= 0.9x",
            "means <= 1.11x.",
            "",
            *rows,
            "",
            f"Exec stream with the policy's `exec_hash = false` (no SHA-256 of the streams past "
            f"the capture cap; bytes spliced): {nohash_ratio:.2f}x plain.",
            "",
            "Keystroke echo latency (200 keystrokes into an interactive `ssh -tt` session):",
            "",
            *lat_rows,
            "",
            "Memory: peak RSS (VmHWM) of the ForceCommand process in an interactive session: "
            + ", ".join(f"{n} {v:.1f} MiB" for n, v in rss.items())
            + " (goal for sshaudit: <= 15 MiB). "
            + f"Daemon RSS: {idle:.1f} MiB idle, {peak:.1f} MiB peak with {args.sessions} "
            f"concurrent recorded sessions ({ok} completed; goal <= 80 MiB).",
        ]
    )
    print(body)
    if not args.no_write:
        write_section("recorder", body)


if __name__ == "__main__":
    main()
