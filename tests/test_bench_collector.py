"""Smoke test of bench/collector.py: the benchmark runs end to end at minimal sizes (a real
TLS collector, load-generator processes, the record loader, the query timings) and prints a
complete report without touching docs/benchmarks.md. It asserts no timing, only that every
measurement happened: the benchmark cannot rot unnoticed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
NUM = r"[\d,]+(?:\.\d+)?"


def test_bench_collector_minimal() -> None:
    before = DOC.read_bytes() if DOC.exists() else None
    args = "--sessions 2 --frames-per-session 3 --small-frames 5 --workers 2 --healthz 3"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "collector.py"), "--backend", "sqlite",
         *args.split(), "--records", "300", "--queries", "3", "--no-write"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    for case in ("large frames", "1 KiB frames"):
        row = rf"\| sqlite \| {case} \| ({NUM}) \| ({NUM}) \| ({NUM}) \| {NUM}x of {NUM} \|"
        m = re.search(row, out)
        assert m, f"no ingest row for {case}:\n{out}"
        assert all(float(g.replace(",", "")) > 0 for g in m.groups())
    queries = re.findall(rf"^\| sqlite \| [^|]+ \| {NUM} \| {NUM} \| (\d+) \|$", out, re.M)
    assert len(queries) == 8, out
    assert int(queries[0]) == 100  # the unfiltered first page is full: the records loaded
    assert "300 session records" in out
    assert (DOC.read_bytes() if DOC.exists() else None) == before  # --no-write
