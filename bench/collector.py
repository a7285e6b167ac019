"""Collector ingest throughput and query latency, over TLS, against a real collector process.

Per backend (SQLite + files; PostgreSQL + S3), one ``sshaudit-collector serve`` process on
127.0.0.1 with its self-signed certificate; the load generator runs in separate processes
(``spawn``), each with the agent's pinned ``requests`` session, one host credential each,
uploading sealed files (core/sealed.py, signed by the enrolled host key) that every worker
seals *before* the clock starts, in chunks of whole frames cut with ``upload.plan_chunk``.

Baselines, in the same run, by the same worker processes on the same data:
- ``disk``: the same chunks written to a file on the collector's disk with one ``fsync``
  per chunk, which is what a 200 to an upload promises (docs/collector.md): what the disk
  alone allows; ``collector MB/s / disk MB/s`` is the share of it the collector reaches;
- ``healthz``: ``GET /healthz`` in a loop over the same keep-alive TLS sessions: the
  HTTP+TLS request floor; ``chunk requests/s / healthz requests/s`` is the share of the
  bare request rate that ingest keeps while doing its work (parse, hash, store, fsync).

Query latency: ``--records`` session records are loaded straight into the storage (setup,
not measured: one transaction of batch inserts), then ``GET /v1/sessions`` with typical
filters is timed over HTTPS from this process, one request at a time.
Goals (issue 4): >= 5,000 frames/s and >= 200 MB/s on SQLite; p99 <= 50 ms.
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing as mp
import os
import queue
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section

from sshaudit.collector.pinning import pinned_session
from sshaudit.collector.routes_query import encode_cursor
from sshaudit.collector.storage import open_storage
from sshaudit.collector.upload import plan_chunk
from sshaudit.keys import AuditorPrivateKey
from sshaudit.sealed import SealedWriter

REPO = Path(__file__).resolve().parent.parent
COLLECTOR = str(Path(sys.executable).parent / "sshaudit-collector")
BACKENDS = ("sqlite", "pg_s3")
PHASES = ("disk", "healthz", "ingest_large", "ingest_small")
SMALL_FRAME = 1024
_LISTEN_RE = re.compile(r"listening on https://127\.0\.0\.1:(\d+) \(certificate (\S+)\)")
_ENV_RE = re.compile(r"^export (SSHAUDIT_\w+)='([^']*)'$", re.MULTILINE)
_T0 = datetime(2025, 11, 22, tzinfo=UTC)  # the loaded records span the year after this


@dataclass(frozen=True)
class Job:
    """What one load-generator process does (picklable for ``spawn``)."""

    url: str
    fingerprint: str
    host_id: str
    credential: str
    host_key: bytes  # raw Ed25519 private key: the recordings are signed by the host
    sessions: int
    frames: int
    frame_bytes: int
    small_frames: int
    chunk_frames: int
    healthz: int
    disk_dir: str


@dataclass(frozen=True)
class Result:
    phase: str
    start: float  # time.monotonic(): CLOCK_MONOTONIC, one clock for every process
    end: float
    frames: int
    nbytes: int
    requests: int


@dataclass(frozen=True)
class Sealed:
    session_id: str
    prefix: bytes
    body: bytes  # frames + trailer, as stored after the prefix
    frames: int


# --- the load generator (runs in its own process)


def seal_session(job: Job, key: Ed25519PrivateKey, frame_bytes: int, frames: int) -> Sealed:
    session_id = str(uuid.uuid4())
    writer = SealedWriter(
        recipients=[AuditorPrivateKey.generate().public],
        session_id=session_id,
        host_id=job.host_id,
        created_at=datetime.now(UTC),
        host_key=key,
    )
    plain = os.urandom(frame_bytes)
    body = b"".join(bytes(writer.write(plain)) for _ in range(frames - 1))
    body += bytes(writer.close(plain))
    return Sealed(session_id, writer.start(), body, frames)


def chunks(body: bytes, limit: int) -> Iterator[bytes]:
    view, pos = memoryview(body), 0
    while pos < len(body):
        n = plan_chunk(view[pos:], limit)
        if n == 0:
            raise RuntimeError("plan_chunk found no whole frame: chunk limit below one frame")
        yield body[pos : pos + n]
        pos += n


def _check(resp: requests.Response) -> None:
    if resp.status_code != 200:
        raise RuntimeError(f"{resp.request.method} {resp.url}: {resp.status_code} {resp.text}")


def upload(http: requests.Session, url: str, sealed: Sealed, limit: int) -> int:
    """Ship one session as the agent does; returns the number of requests made."""
    base = f"{url}/v1/sessions/{sealed.session_id}"
    start = _T0.strftime("%Y-%m-%dT%H:%M:%SZ")
    doc: dict[str, Any] = {
        "session_id": sealed.session_id,
        "unix_user": "bench",
        "session_start": start,
        "program_type": "shell",
        "recording_status": "recording",
    }
    _check(http.put(base, json=doc, timeout=60))
    _check(http.put(base + "/recording", data=sealed.prefix, timeout=60))
    offset, n = len(sealed.prefix), 2
    for chunk in chunks(sealed.body, limit):
        _check(http.post(base + "/recording", params={"offset": offset}, data=chunk, timeout=60))
        offset, n = offset + len(chunk), n + 1
    _check(http.put(base, json=doc | {"recording_status": "complete"}, timeout=60))
    return n + 1


def write_disk(directory: Path, sealed: Sealed, limit: int) -> int:
    fd = os.open(directory / sealed.session_id, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for piece in (sealed.prefix, *chunks(sealed.body, limit)):
            os.write(fd, piece)
            os.fsync(fd)  # one fsync per acknowledged piece, as the collector does
    finally:
        os.close(fd)
    return 0


def worker(job: Job, barrier: Any, results: Any) -> None:
    key = Ed25519PrivateKey.from_private_bytes(job.host_key)
    large = [seal_session(job, key, job.frame_bytes, job.frames) for _ in range(job.sessions)]
    small = [seal_session(job, key, SMALL_FRAME, job.small_frames) for _ in range(job.sessions)]
    http = pinned_session(job.fingerprint)
    http.headers["Authorization"] = f"Bearer {job.credential}"
    _check(http.get(job.url + "/healthz", timeout=30))  # the TLS session is set up untimed
    disk = Path(job.disk_dir) / str(uuid.uuid4())
    disk.mkdir()
    for phase in PHASES:
        files = small if phase == "ingest_small" else large
        size = SMALL_FRAME if phase == "ingest_small" else job.frame_bytes
        limit = job.chunk_frames * (size + 20)  # u32 length + 16-byte tag per frame
        barrier.wait()
        start, n = time.monotonic(), 0
        if phase == "healthz":
            for _ in range(job.healthz):
                _check(http.get(job.url + "/healthz", timeout=30))
            n = job.healthz
        else:
            for sealed in files:
                n += (
                    write_disk(disk, sealed, limit)
                    if phase == "disk"
                    else upload(http, job.url, sealed, limit)
                )
        end = time.monotonic()
        nframes = sum(s.frames for s in files) if phase != "healthz" else 0
        nbytes = sum(len(s.prefix) + len(s.body) for s in files) if phase != "healthz" else 0
        results.put(Result(phase, start, end, nframes, nbytes, n))


# --- the collector process


@dataclass
class Collector:
    data: Path
    workers: int = 1
    url: str = ""
    fingerprint: str = ""
    proc: subprocess.Popen[bytes] | None = None

    def run(self, *args: str) -> str:
        proc = subprocess.run(
            [COLLECTOR, *args, "--data", str(self.data)], capture_output=True, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"sshaudit-collector {args[0]}: {proc.stderr.decode()}")
        return proc.stdout.decode()

    def serve(self) -> None:
        self.proc = subprocess.Popen(
            [
                COLLECTOR,
                "serve",
                "--data",
                str(self.data),
                "--listen",
                "127.0.0.1:0",
                "--workers",
                str(self.workers),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        found = threading.Event()

        def drain() -> None:  # keeps reading, so the server never blocks on a full pipe
            assert self.proc is not None and self.proc.stderr is not None
            for raw in self.proc.stderr:
                m = _LISTEN_RE.search(raw.decode("utf-8", "replace"))
                if m and not found.is_set():
                    self.url, self.fingerprint = f"https://127.0.0.1:{m[1]}", m[2]
                    found.set()

        threading.Thread(target=drain, daemon=True).start()
        if not found.wait(60):
            self.stop()
            raise RuntimeError("the collector did not start")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if pinned_session(self.fingerprint).get(self.url + "/healthz").ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("the collector is not healthy")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def enroll(self) -> tuple[str, str, bytes]:
        token = self.run("token", "create", "--role", "agent").strip().splitlines()[-1]
        key = Ed25519PrivateKey.generate()
        pub = base64.b64encode(key.public_key().public_bytes_raw()).decode()
        http = pinned_session(self.fingerprint)
        resp = http.post(
            self.url + "/v1/enroll",
            json={"hostname": f"bench-{uuid.uuid4().hex[:8]}", "host_public_key": pub},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        _check(resp)
        doc = resp.json()
        return doc["host_id"], doc["credential"], key.private_bytes_raw()


def fleet_config(data: Path) -> str:
    """A collector.toml on the servers ``scripts/services start`` runs; returns the schema."""
    out = subprocess.run(
        [str(REPO / "scripts" / "services"), "start"], capture_output=True, check=True
    ).stdout.decode()
    env = dict(_ENV_RE.findall(out))
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    q = json.dumps  # a JSON string is a valid TOML basic string
    text = (
        '[storage]\nbackend = "postgresql+s3"\n\n'
        f"[storage.postgresql]\nurl = {q(env['SSHAUDIT_PG_URL'])}\nschema = {q(schema)}\n\n"
        f"[storage.s3]\nendpoint = {q(env['SSHAUDIT_S3_ENDPOINT'])}\n"
        f"bucket = {q(env['SSHAUDIT_S3_BUCKET'])}\nregion = {q(env['SSHAUDIT_S3_REGION'])}\n"
        f"prefix = {q(schema + '/')}\naccess_key_id = {q(env['SSHAUDIT_S3_ACCESS_KEY'])}\n"
        f"secret_access_key = {q(env['SSHAUDIT_S3_SECRET_KEY'])}\n"
    )
    data.mkdir(mode=0o700)
    fd = os.open(data / "collector.toml", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return schema


def drop_fleet(data: Path, schema: str) -> None:
    """Drop the benchmark's schema and its objects, so runs do not pile up on the servers."""
    import boto3
    import psycopg
    from psycopg import sql

    from sshaudit.collector.storage_pg_config import load_config

    config = load_config(data)
    assert config.postgresql is not None and config.s3 is not None
    with psycopg.connect(config.postgresql.url, autocommit=True) as con:
        con.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    s3c = config.s3
    s3 = boto3.client(
        "s3",
        endpoint_url=s3c.endpoint,
        region_name=s3c.region,
        aws_access_key_id=s3c.access_key_id,
        aws_secret_access_key=s3c.secret_access_key,
    )
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3c.bucket, Prefix=s3c.prefix):
        if page.get("Contents"):
            objects = [{"Key": o["Key"]} for o in page["Contents"]]
            s3.delete_objects(Bucket=s3c.bucket, Delete={"Objects": objects})  # type: ignore[typeddict-item]


# --- loading session records (setup, not measured)

COLS = (
    "session_id", "target_id", "user_email", "unix_user", "hostname", "client_address",
    "client_port", "server_address", "server_port", "session_start", "start_us",
    "session_finish", "program_type", "command", "exit_status", "error", "recording_status",
    "bytes_in", "bytes_out", "cert_serial", "cert_fingerprint", "principal", "details",
    "received_at", "updated_at", "seq",
)  # fmt: skip
USERS = [f"u{i:04d}" for i in range(2000)]
TARGETS = [f"t-{i:04d}" for i in range(500)]
PROGRAMS = (("shell", 60), ("exec", 35), ("subsystem", 5))
STATUSES = (("complete", 90), ("truncated", 5), ("unrecorded", 3), ("recorder_lost", 1))
YEAR_S = 365 * 86400


def _pick(rng: random.Random, table: tuple[tuple[str, int], ...]) -> str:
    return rng.choices([v for v, _ in table], [w for _, w in table])[0]


def record_rows(n: int, received: object, seed: int = 7) -> Iterator[tuple[object, ...]]:
    """``n`` session records spread over a year: 2,000 users, 500 targets."""
    rng = random.Random(seed)
    for seq in range(1, n + 1):
        sec = rng.randrange(YEAR_S)
        start = _T0 + timedelta(seconds=sec)
        user, target = rng.choice(USERS), rng.choice(TARGETS)
        program = _pick(rng, PROGRAMS)
        yield (
            str(uuid.UUID(int=rng.getrandbits(128), version=4)), target,
            f"{user}@example.com", user, f"host-{target}",
            f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
            rng.randrange(1024, 65536), "192.0.2.1", 22, start.strftime("%Y-%m-%dT%H:%M:%SZ"),
            int(start.timestamp()) * 1_000_000,
            (start + timedelta(seconds=600)).strftime("%Y-%m-%dT%H:%M:%SZ"), program,
            "uptime" if program == "exec" else None, 0, None, _pick(rng, STATUSES),
            rng.randrange(1 << 16), rng.randrange(1 << 20), None, "", "", None,
            received, received, seq,
        )  # fmt: skip


def load_records(data: Path, n: int, batch: int = 100_000) -> None:
    """Batch inserts through the backend's own connection and transaction helpers."""
    from sshaudit.collector.storage_pg import PgS3Storage
    from sshaudit.collector.storage_sqlite import SqliteStorage

    storage = open_storage(data)
    now = datetime.now(UTC)
    cols = ", ".join(COLS)
    try:
        if isinstance(storage, SqliteStorage):
            rows = record_rows(n, now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
            marks = ", ".join("?" for _ in COLS)
            for first in range(0, n, batch):
                with storage._write() as con:
                    part = [next(rows) for _ in range(min(batch, n - first))]
                    con.executemany(f"INSERT INTO sessions ({cols}) VALUES ({marks})", part)
                    con.execute("UPDATE sequence SET value = value + ?", (len(part),))
        elif isinstance(storage, PgS3Storage):
            pg_rows = record_rows(n, now)
            with storage._write() as cur:
                with cur.copy(f"COPY sessions ({cols}) FROM STDIN") as copy:
                    for row in pg_rows:
                        copy.write_row(row)
                cur.execute("UPDATE counters SET value = value + %s WHERE name = 'seq'", (n,))
            with storage._write() as cur:
                cur.execute("ANALYZE sessions")  # what autovacuum does after a bulk load
        else:
            raise RuntimeError(f"unknown storage {type(storage).__name__}")
    finally:
        storage.close()


# --- measuring


def run_load(col: Collector, args: argparse.Namespace, tmp: Path) -> dict[str, Result]:
    ctx = mp.get_context("spawn")  # no fork of a process with threads
    barrier, results = ctx.Barrier(args.workers), ctx.Queue()
    per = -(-args.sessions // args.workers)
    procs = []
    for _ in range(args.workers):
        host_id, credential, key = col.enroll()
        job = Job(
            col.url, col.fingerprint, host_id, credential, key, per, args.frames_per_session,
            args.frame_bytes, args.small_frames, args.chunk_frames, args.healthz, str(tmp),
        )  # fmt: skip
        procs.append(ctx.Process(target=worker, args=(job, barrier, results), daemon=True))
    for p in procs:
        p.start()
    got: list[Result] = []
    deadline = time.monotonic() + args.timeout
    try:
        while len(got) < args.workers * len(PHASES):
            try:
                got.append(results.get(timeout=1))
            except queue.Empty:
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    raise RuntimeError(f"load generator failed (exit codes {failed})") from None
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    out = {}
    for phase in PHASES:
        rs = [r for r in got if r.phase == phase]
        out[phase] = Result(
            phase,
            min(r.start for r in rs),
            max(r.end for r in rs),
            sum(r.frames for r in rs),
            sum(r.nbytes for r in rs),
            sum(r.requests for r in rs),
        )
    return out


def query_cases(n: int) -> dict[str, Callable[[random.Random], dict[str, str]]]:
    def day(rng: random.Random, days: int) -> dict[str, str]:
        start = _T0 + timedelta(days=rng.randrange(365 - days))
        fmt = "%Y-%m-%dT%H:%M:%SZ"
        return {"since": start.strftime(fmt), "until": (start + timedelta(days)).strftime(fmt)}

    # Deep pages: cursors at records of the loaded set taken again from the same generator.
    deep = [(int(r[10]), str(r[0])) for r in record_rows(min(n, 20_000), None)]  # type: ignore[call-overload]
    return {
        "first page, no filter": lambda rng: {},
        "unix_user": lambda rng: {"unix_user": rng.choice(USERS)},
        "target_id": lambda rng: {"target_id": rng.choice(TARGETS)},
        "time range (1 day)": lambda rng: day(rng, 1),
        "unix_user + 30 days": lambda rng: {"unix_user": rng.choice(USERS)} | day(rng, 30),
        "program_type=exec": lambda rng: {"program_type": "exec"},
        "recording_status=recorder_lost (1%)": lambda rng: {"recording_status": "recorder_lost"},
        "deep cursor page": lambda rng: {"cursor": encode_cursor(*rng.choice(deep))},
    }


def run_queries(col: Collector, args: argparse.Namespace) -> dict[str, tuple[float, float, int]]:
    http = pinned_session(col.fingerprint)
    http.headers["Authorization"] = (
        "Bearer " + col.run("token", "create", "--role", "auditor").strip().splitlines()[-1]
    )
    rng, out = random.Random(11), {}
    for name, params in query_cases(args.records).items():
        times, items = [], 0
        for _ in range(args.queries):
            p = params(rng)
            t = time.perf_counter()
            resp = http.get(col.url + "/v1/sessions", params=p, timeout=60)
            times.append(time.perf_counter() - t)
            _check(resp)
            items += len(resp.json()["items"])
        q = statistics.quantiles(times, n=100, method="inclusive")
        out[name] = (q[49] * 1000, q[98] * 1000, items // args.queries)
    return out


# --- the run and the report


@dataclass(frozen=True)
class Outcome:
    backend: str
    load_s: float
    ingest: dict[str, Result]
    queries: dict[str, tuple[float, float, int]]


def run_backend(backend: str, args: argparse.Namespace, tmp: Path) -> Outcome:
    data = tmp / backend
    schema = fleet_config(data) if backend == "pg_s3" else None
    col = Collector(data, workers=args.server_workers)
    try:
        col.run("init")
        t = time.perf_counter()
        load_records(data, args.records)
        load_s = time.perf_counter() - t
        col.serve()
        ingest = run_load(col, args, tmp)
        return Outcome(backend, load_s, ingest, run_queries(col, args))
    finally:
        col.stop()
        if schema is not None:
            drop_fleet(data, schema)


def ingest_rows(o: Outcome) -> list[str]:
    def rate(r: Result, amount: int) -> float:
        return amount / (r.end - r.start)

    disk, hz = o.ingest["disk"], o.ingest["healthz"]
    disk_mbs, hz_rps = rate(disk, disk.nbytes) / 1e6, rate(hz, hz.requests)
    rows = []
    for phase, label in (("ingest_large", "large frames"), ("ingest_small", "1 KiB frames")):
        r = o.ingest[phase]
        mbs, rps = rate(r, r.nbytes) / 1e6, rate(r, r.requests)
        rows.append(
            f"| {o.backend} | {label} | {rate(r, r.frames):,.0f} | {mbs:.1f} | {rps:,.0f} | "
            f"{mbs / disk_mbs:.2f}x of {disk_mbs:.0f} | {rps / hz_rps:.2f}x of {hz_rps:,.0f} |"
        )
    return rows


def report(args: argparse.Namespace, outcomes: list[Outcome]) -> str:
    frame = args.frame_bytes // 1024
    lines = [
        "## Collector ingest and query latency (`bench/collector.py`)",
        "",
        f"One `sshaudit-collector serve --workers {args.server_workers}` per backend over TLS "
        f"on 127.0.0.1; {args.workers} "
        f"load-generator processes (one enrolled host each, the agent's pinned `requests` "
        f"session), {args.sessions} sessions per case; each session: its record, the prefix, "
        f"chunks of {args.chunk_frames} whole frames (`upload.plan_chunk`), the signature "
        "trailer (verified by the collector), the final record. Large frames: "
        f"{args.frames_per_session} x {frame} KiB per session; small: {args.small_frames} x "
        "1 KiB. Sealed before the clock starts. Bytes are the sealed file as stored.",
        "",
        "Baselines, same processes, same chunks: *disk* = write + fsync per chunk to a file on "
        "the same file system (what a 200 promises; the disk alone); *healthz* = `GET /healthz` "
        "in a loop over the same TLS sessions (the HTTP+TLS request floor). "
        "Goals: >= 5,000 frames/s and >= 200 MB/s on SQLite.",
        "",
        "| backend | case | frames/s | MB/s | chunk req/s | MB/s vs disk fsync | "
        "req/s vs healthz |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        lines += ingest_rows(o)
    lines += [
        "",
        f"Query latency: `GET /v1/sessions` (default page, 100 items) over HTTPS, one at a "
        f"time, {args.queries} requests per filter with varying values, over {args.records:,} "
        "session records (2,000 users, 500 targets, one year) loaded before the collector "
        "starts. Goal: p99 <= 50 ms.",
        "",
        "| backend | filter | p50 ms | p99 ms | items/page |",
        "|---|---|---|---|---|",
    ]
    for o in outcomes:
        for name, (p50, p99, items) in o.queries.items():
            lines.append(f"| {o.backend} | {name} | {p50:.1f} | {p99:.1f} | {items} |")
    loads = ", ".join(f"{o.backend} {args.records / o.load_s:,.0f} records/s" for o in outcomes)
    lines += ["", f"Loading (setup, batch inserts, not the API): {loads}."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    add = parser.add_argument
    add("--backend", choices=(*BACKENDS, "both"), default="both")
    add("--sessions", type=int, default=16, help="sessions per case, over all workers")
    add("--frames-per-session", type=int, default=128)
    add("--frame-bytes", type=int, default=64 * 1024, help="plaintext bytes per large frame")
    add("--small-frames", type=int, default=512, help="1 KiB frames per small session")
    # 32 x 64 KiB frames: the agent's default upload_chunk_bytes (2 MiB)
    add("--chunk-frames", type=int, default=32, help="frames per upload chunk")
    add("--workers", type=int, default=4, help="load-generator processes")
    add("--server-workers", type=int, default=os.cpu_count() or 1, help="serve --workers")
    add("--healthz", type=int, default=500, help="GET /healthz per worker (baseline)")
    add("--records", type=int, default=1_000_000, help="session records for the queries")
    add("--queries", type=int, default=300, help="requests per query filter")
    add("--timeout", type=float, default=1800, help="seconds a phase may take")
    add("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    for name in ("sessions", "frames_per_session", "small_frames", "chunk_frames", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 1 <= args.frame_bytes <= 1 << 20 or args.records < 1 or args.queries < 2:
        parser.error("--frame-bytes 1..1048576, --records >= 1, --queries >= 2")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    backends = BACKENDS if args.backend == "both" else (args.backend,)
    state = REPO / ".state"
    state.mkdir(exist_ok=True)
    # Under .state: the same file system as the collector's data and the test services.
    with tempfile.TemporaryDirectory(dir=state, prefix="bench-collector-") as tmp:
        outcomes = [run_backend(b, args, Path(tmp)) for b in backends]
    body = report(args, outcomes)
    print(body)
    if not args.no_write:
        write_section("collector", body)


if __name__ == "__main__":
    main()
