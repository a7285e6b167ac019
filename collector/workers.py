"""``serve --workers N``: N server processes on one listening socket, one supervisor.

The collector's request handling is bound by one event loop per process (TLS, HTTP parsing,
the ASGI layers: docs/benchmarks.md), so a host with several cores serves uploads faster
with several processes. They share the socket the supervisor bound (the kernel hands each
connection to one of them), the storage (SQLite serialises writers with a lock file,
collector/storage_sqlite_db.py; PostgreSQL and S3 are shared services) and their metrics
(collector/metrics.py writes each worker's counts to a directory they all read).

Invariants: the supervisor serves nothing; SIGTERM or SIGINT to it reaches every worker,
which finish their requests and exit; a worker that dies on its own stops the others and
the supervisor exits 1 (systemd restarts the service: a half-sized collector is not hidden);
each worker opens its own storage after the fork (no connection crosses a fork).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable


def _child(serve: Callable[[], None]) -> None:
    """Runs in a worker: never returns."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)  # uvicorn installs its own in serve()
    code = 0
    try:
        serve()
    except BaseException as exc:  # reported, then the worker ends
        print(f"sshaudit-collector: worker {os.getpid()}: {exc}", file=sys.stderr)
        code = 1
    finally:
        sys.stderr.flush()
        os._exit(code)  # no atexit or finally of the parent's stack in a forked child


def run_workers(n: int, serve: Callable[[], None], started: Callable[[], None]) -> int:
    """Fork ``n`` workers running ``serve``; call ``started`` in the supervisor; wait."""
    children: set[int] = set()
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            _child(serve)
        children.add(pid)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    started()
    status = 0
    while children:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        children.discard(pid)
        code = os.waitstatus_to_exitcode(wait_status)
        if not stopping:
            print(
                f"sshaudit-collector: worker {pid} exited ({code}): stopping the others",
                file=sys.stderr,
            )
            status = 1
            forward(signal.SIGTERM, None)
    return status
