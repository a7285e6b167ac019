"""Wall time of ``sshaudit-agent enroll`` and ``unenroll`` against a real collector (TLS,
loopback) and a real private sshd, against what any sshd change costs anyway.

Each round: enroll (token exchange, files, daemon start, sshd edits, ``sshd -t``, reload),
then unenroll (restore, ``sshd -t``, reload, daemon stop). Baseline, same rounds: one
``sshd -t`` of the same config plus a SIGHUP reload of the same sshd (what an admin's own
edit costs), and one start of the agent daemon to its listening line is part of enroll.
Goal (issue 5): enroll < 5 s. Run as root. Writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from collector_helpers import cli_ok, start_server
from report import write_section
from sshd_harness import SshdConfig, SshdServer
from sshd_host import harness_env, work_dir

AGENT = str(Path(sys.executable).parent / "sshaudit-agent")


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{argv[1]} failed:\n{done.stdout}{done.stderr}")
    return elapsed


def baseline(server: SshdServer) -> float:
    t0 = time.perf_counter()
    subprocess.run([str(server.link), "-t", "-f", str(server.config_path)], check=True)
    os.kill(server.pid, signal.SIGHUP)
    time.sleep(0.5)  # enroll waits the same after its reload (agent/enroll_proc.py)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    enroll, unenroll, base = [], [], []
    with (
        tempfile.TemporaryDirectory() as tmp,
        harness_env(("sshaudit-alice",)) as env,
        work_dir() as work,
    ):
        data = Path(tmp) / "collector"
        cli_ok("init", "--data", str(data))
        keygen = [str(Path(AGENT).parent / "sshaudit"), "keygen", "-o", f"{tmp}/a.key"]
        subprocess.run(keygen, check=True, capture_output=True)
        cli_ok("keys", "add", "--data", str(data), f"{tmp}/a.key.pub")
        col = start_server(data)
        server = SshdServer.start(SshdConfig(allow_users=("sshaudit-alice",)), env)
        try:
            for i in range(args.rounds):
                token = cli_ok("token", "create", "--data", str(data), "--role", "agent").split()[
                    -1
                ]
                state = work / f"state-{i}"
                assert col.fingerprint is not None
                enroll.append(timed([
                    AGENT, "enroll", "--collector", col.url, "--token", token,
                    "--ca-fingerprint", col.fingerprint, "--sshd-config", str(server.config_path),
                    "--pam-service", server.pam_file.name, "--sshd", str(server.link),
                    "--sshd-log", str(server.log_path), "--principals-user", "nobody",
                    "--state-dir", str(state),
                ]))  # fmt: skip
                unenroll.append(timed([AGENT, "unenroll", "--state-dir", str(state)]))
                base.append(baseline(server))
        finally:
            server.stop()
            col.stop()
    b = sorted(base)[len(base) // 2]
    rows = [
        "| step | median s | max s | vs baseline |",
        "|---|---|---|---|",
        f"| baseline: sshd -t + reload | {b:.2f} | {max(base):.2f} | 1.00x |",
    ]
    for name, xs in (("enroll", enroll), ("unenroll", unenroll)):
        m = sorted(xs)[len(xs) // 2]
        rows.append(f"| {name} | {m:.2f} | {max(xs):.2f} | {m / b:.2f}x |")
    body = (
        "## Enroll and unenroll wall time (`bench/enroll.py`)\n\n"
        f"{args.rounds} rounds against a real collector (TLS, loopback) and a private sshd: "
        "enroll = token exchange, files, daemon start, sshd/PAM edits, `sshd -t`, reload; "
        "unenroll = restore, `sshd -t`, reload, daemon stop. Goal: enroll < 5 s.\n\n"
        + "\n".join(rows)
    )
    print(body)
    if not args.no_write:
        write_section("enroll", body)


if __name__ == "__main__":
    main()
