"""``sshaudit-collector init``, ``serve`` and ``export``.

Invariants: ``init`` is idempotent (an existing database and certificate are kept, so the
fingerprint agents pinned stays valid) and prints the fingerprint alone on its last stdout
line; ``serve`` speaks TLS unless ``--insecure-http`` is given, which it accepts on a loopback
address only; ``serve`` binds its socket itself and reports the address it got (so
``--listen 127.0.0.1:0`` works for tests); ``export`` writes whole lines only.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path

from sshaudit.collector.cli_common import (
    EXIT_OK,
    Sub,
    add_command,
    add_data,
    open_data,
    state_dir,
)
from sshaudit.collector.storage import open_storage
from sshaudit.collector.storage_sqlite import DB_NAME
from sshaudit.collector.tls import fingerprint_pem, self_signed
from sshaudit.errors import UsageError

TLS_DIR = "tls"


def add_parsers(sub: Sub) -> None:
    p = add_command(
        sub,
        "init",
        "make a collector state directory",
        "Creates DIR (mode 0700) with the database and, unless one is there already, a\n"
        "self-signed TLS certificate (ECDSA P-256, valid ten years) for the given names.\n"
        "Prints the certificate's fingerprint, SHA256:<64 hex digits> (SHA-256 of the DER\n"
        "certificate, as `openssl x509 -noout -fingerprint -sha256` computes it), alone on\n"
        "the last line: agents and auditors pin it. Running init again changes nothing.\n"
        "With DIR/collector.toml written first (PostgreSQL + S3, docs/collector.md), init\n"
        "migrates that database and checks the bucket instead of making a SQLite file.",
        "  sshaudit-collector init --data /var/lib/sshaudit-collector --name audit.example.com",
    )
    add_data(p)
    p.add_argument(
        "--name",
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS name or IP address for the certificate (repeatable; "
        "default: this host's name, localhost, 127.0.0.1, ::1)",
    )
    p.set_defaults(handler=cmd_init)

    p = add_command(
        sub,
        "serve",
        "run the collector's HTTPS API",
        "Serves the API (docs/collector.md) on HOST:PORT with TLS, using the certificate\n"
        "made by init unless --tls-cert/--tls-key name others. --insecure-http serves plain\n"
        "HTTP, for tests on a loopback address only. Logs go to stderr. Stops cleanly on\n"
        "SIGTERM or SIGINT, finishing the requests in progress.",
        "  sshaudit-collector serve --data /var/lib/sshaudit-collector --listen 0.0.0.0:8443",
    )
    add_data(p)
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to bind")
    p.add_argument("--tls-cert", metavar="FILE", help="PEM certificate (chain) to serve")
    p.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    p.add_argument("--insecure-http", action="store_true", help="plain HTTP (loopback only)")
    p.add_argument(
        "--max-chunk",
        type=int,
        default=8 << 20,
        metavar="BYTES",
        help="largest recording upload accepted (default 8 MiB)",
    )
    p.add_argument(
        "--retention-interval",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="run the retention job this often (default hourly; 0: never)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="uvicorn's log level (default info: one line per request)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="server processes sharing the socket (default 1; one per core for a busy "
        "collector: each process's event loop serves about 150-200 MB/s of uploads)",
    )
    p.set_defaults(handler=cmd_serve)

    p = add_command(
        sub,
        "export",
        "export session records and authentication events as JSON lines",
        "Writes one JSON object per line with DESIGN.md's field names and a record_type of\n"
        '"session" or "auth_event", in the order the collector stored them. Sessions are\n'
        'exported once final (recording_status no longer "recording"). --since keeps only\n'
        "records whose session_start / created_at is at or after the time. --follow keeps\n"
        "polling for new ones. --state-file remembers the position reached, so a restarted\n"
        "export goes on where it stopped. --to names a file (appended to) or an http(s) URL\n"
        "(each batch POSTed as application/x-ndjson); default stdout.",
        "  sshaudit-collector export --data DIR --since 2026-11-01T00:00:00Z --format jsonl\n"
        "  sshaudit-collector export --data DIR --format jsonl --follow \\\n"
        "      --state-file /var/lib/siem/pos --to https://siem.example.com/ingest",
    )
    add_data(p)
    p.add_argument("--since", metavar="RFC3339", help="only records from this time on")
    p.add_argument("--format", choices=("jsonl",), default="jsonl", help="output format")
    p.add_argument("--follow", action="store_true", help="keep exporting new records")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="poll period")
    p.add_argument("--to", metavar="FILE|URL", help="where to write (default: stdout)")
    p.add_argument(
        "--to-header-file",
        metavar="FILE",
        help="HTTP headers for --to URL, one 'Name: value' per line (kept off the command line)",
    )
    p.add_argument("--state-file", metavar="FILE", help="position file to resume from")
    p.set_defaults(handler=cmd_export)


def _default_names() -> list[str]:
    return list(dict.fromkeys([socket.gethostname(), "localhost", "127.0.0.1", "::1"]))


def _write_private(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def cmd_init(args: argparse.Namespace) -> int:
    data = state_dir(args.data, create=True)
    fresh = not (data / DB_NAME).exists() and not (data / TLS_DIR).exists()
    open_storage(data).close()
    tls = data / TLS_DIR
    tls.mkdir(mode=0o700, exist_ok=True)
    cert, key = tls / "cert.pem", tls / "key.pem"
    if cert.exists() != key.exists():
        raise UsageError(f"{tls}: only one of cert.pem and key.pem exists; remove the other")
    if not cert.exists():
        cert_pem, key_pem = self_signed(args.name or _default_names(), datetime.now(UTC))
        _write_private(key, key_pem, 0o600)
        _write_private(cert, cert_pem, 0o644)
        print(f"made a self-signed TLS certificate: {cert}", file=sys.stderr)
    print(f"{'initialised' if fresh else 'already initialised:'} {data}", file=sys.stderr)
    print(fingerprint_pem(cert.read_bytes()))
    return EXIT_OK


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--listen {text!r}: use HOST:PORT, e.g. 0.0.0.0:8443 or [::1]:8443")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
    # sockets whose protocol says TCP; with proto 0 every response waited ~40 ms for the
    # client's delayed ACK (measured: 44 ms -> 1.5 ms per request).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _tls_files(args: argparse.Namespace, data: Path) -> tuple[Path, Path] | None:
    if args.insecure_http:
        if args.tls_cert or args.tls_key:
            raise UsageError("--insecure-http and --tls-cert/--tls-key exclude each other")
        return None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    cert = Path(args.tls_cert) if args.tls_cert else data / TLS_DIR / "cert.pem"
    key = Path(args.tls_key) if args.tls_key else data / TLS_DIR / "key.pem"
    for path in (cert, key):
        if not path.is_file():
            raise UsageError(f"{path}: no such file (run init, or give --tls-cert/--tls-key)")
    return cert, key


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from sshaudit.collector.app import create_app
    from sshaudit.collector.deps import Context, Settings
    from sshaudit.collector.metrics import Metrics
    from sshaudit.collector.retention import Periodic
    from sshaudit.collector.user_ca_store import KEY_NAME
    from sshaudit.collector.workers import run_workers

    host, port = parse_listen(args.listen)
    if args.insecure_http and not _is_loopback(host):
        raise UsageError("--insecure-http is for loopback addresses only (127.0.0.1, ::1)")
    data = state_dir(args.data)
    tls = _tls_files(args, data)
    try:
        settings = Settings(max_chunk=args.max_chunk)
    except ValueError as exc:
        raise UsageError(f"--max-chunk: {exc}") from exc
    if args.retention_interval < 0:
        raise UsageError("--retention-interval: must be 0 (off) or a number of seconds")
    if not 1 <= args.workers <= 64:
        raise UsageError("--workers: from 1 to 64")
    open_data(args.data).close()  # a storage problem is reported before anything listens
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    scheme = "http" if tls is None else "https"
    where = f"[{host}]" if ":" in host else host
    pin = "" if tls is None else f" (certificate {fingerprint_pem(tls[0].read_bytes())})"
    share = _metrics_dir(data) if args.workers > 1 else None

    def serve() -> None:
        storage = open_data(args.data)
        ctx = Context(storage, settings, metrics=Metrics(share), user_ca_key=data / KEY_NAME)
        config = uvicorn.Config(
            create_app(ctx),
            ssl_certfile=None if tls is None else str(tls[0]),
            ssl_keyfile=None if tls is None else str(tls[1]),
            log_level=args.log_level,
            lifespan="off",
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=10,
        )
        try:
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            storage.close()

    jobs: list[Periodic] = []

    def start_job() -> None:
        if args.retention_interval > 0:
            job = Periodic(open_data(args.data), args.retention_interval, lambda: datetime.now(UTC))
            jobs.append(job)
            job.start()

    print(f"sshaudit-collector: listening on {scheme}://{where}:{bound}{pin}", file=sys.stderr)
    sys.stderr.flush()
    try:
        if args.workers == 1:
            start_job()
            serve()
            return EXIT_OK
        return run_workers(args.workers, serve, start_job)
    finally:
        for job in jobs:
            job.stop()
        sock.close()


def _metrics_dir(data: Path) -> Path:
    """Where the workers share their counters: emptied at each start (counts are per run)."""
    share = data / "run" / "metrics"
    share.mkdir(parents=True, exist_ok=True, mode=0o700)
    for old in share.glob("*.json"):
        old.unlink()
    return share


def cmd_export(args: argparse.Namespace) -> int:
    from sshaudit.collector.cli_export import run

    return run(args)
