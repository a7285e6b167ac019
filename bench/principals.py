"""Latency of the principals command, run as sshd runs it, against bare process starts.

sshd runs the AuthorizedPrincipalsCommand at every certificate login attempt and waits for
it to exit, so its whole run is added to every login. Each run here is one
``subprocess.run`` of the ``python3 -I -S`` launcher with sshd's tokens (%u %t %k %i %s %f
%C) and a real ``ssh-keygen`` certificate, its stdout read through a pipe as sshd reads it.
Baselines, started the same way in the same rounds: ``/bin/true`` (the cost of any
fork+exec from Python) and ``python3 -I -S -c pass`` (the bare interpreter the launcher
runs). Variants are interleaved run by run, so the machine's drift hits all alike.
Goal (issue 5): p99 <= 20 ms.

Run as root (the command trusts only a root-owned policy file). Writes its section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from report import write_section
from test_principals import RealCert, launcher, write_policy
from workloads import percentile

CONN = "192.0.2.7 50022 192.0.2.1 22"


class Sink:
    """A daemon stand-in: accepts each connection and reads it to the end."""

    def __init__(self, path: Path) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(64)
        self.count = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                while conn.recv(65536):
                    pass
            self.count += 1

    def close(self) -> None:
        self.server.close()


def timed(argv: list[str], expect: bytes | None) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, check=False)  # stdout: a pipe, as sshd
    elapsed = time.perf_counter() - start
    if expect is not None and (done.stdout, done.stderr) != (expect, b""):
        raise SystemExit(f"unexpected output from {argv[0]}: {done.stdout!r} {done.stderr!r}")
    return elapsed


def measure(work: Path, runs: int) -> tuple[dict[str, list[float]], int]:
    cmd = str(launcher(work))
    policy = write_policy(work / "policy.json", {"map": {"deploy": ["alice"]}})
    tokens = [*RealCert(work / "keys", "alice@example.com", "alice,ops", 42).tokens("deploy")]
    head = [cmd, "--policy", str(policy), "--socket"]
    python = os.path.realpath(sys.executable)
    variants: dict[str, tuple[list[str], bytes | None]] = {
        "/bin/true": (["/bin/true"], b""),
        "python3 -I -S -c pass": ([python, "-I", "-S", "-c", "pass"], b""),
        "principals, no daemon socket": (
            [*head, str(work / "absent.sock"), *tokens, CONN],
            b"deploy\nalice\n",
        ),
        "principals, listening daemon": (
            [*head, str(work / "agent.sock"), *tokens, CONN],
            b"deploy\nalice\n",
        ),
        "principals, denied (mismatch)": (
            [*head, str(work / "agent.sock"), "bob", *tokens[1:], CONN],
            b"",
        ),
    }
    sink = Sink(work / "agent.sock")
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for argv, expect in variants.values():  # warm the page cache, check outputs
            timed(argv, expect)
        for _ in range(runs):
            for name, (argv, expect) in variants.items():
                times[name].append(timed(argv, expect))
        time.sleep(0.2)
    finally:
        sink.close()
    return times, sink.count


def report(times: dict[str, list[float]], runs: int, received: int) -> str:
    bare = percentile(times["python3 -I -S -c pass"], 0.5)
    rows = [
        "| what ran | p50 ms | p99 ms | p50 vs `python3 -I -S -c pass` | p99 goal |",
        "|---|---|---|---|---|",
    ]
    for name, values in times.items():
        p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
        goal = "<= 20 ms" if name.startswith("principals") else ""
        rows.append(f"| {name} | {p50 * 1e3:.1f} | {p99 * 1e3:.1f} | {p50 / bare:.2f}x | {goal} |")
    return (
        "## Principals command latency (`bench/principals.py`)\n\n"
        f"{runs} runs of each, interleaved; each run is one `subprocess.run` of the "
        "`python3 -I -S` launcher with sshd's tokens (a real ssh-keygen certificate, the "
        "cached policy mapping the user) and stdout read through a pipe, as sshd runs "
        "the AuthorizedPrincipalsCommand and waits for it. Baselines started the same way "
        "in the same rounds.\n\n" + "\n".join(rows) + "\n\n"
        f"The listening daemon (a socket server thread in the benchmark process that reads "
        f"and drops each message) received {received} observations."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the command trusts only a root-owned policy file")
    with tempfile.TemporaryDirectory(prefix="bench-principals-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        times, received = measure(work, args.runs)
    body = report(times, args.runs, received)
    print(body)
    if not args.no_write:
        write_section("principals", body)


if __name__ == "__main__":
    main()
