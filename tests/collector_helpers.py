"""Shared helpers for the collector tests (test_collector_*.py): sealed files cut the way
the upload protocol sends them, an in-process app with a controllable clock, and a real
``sshaudit-collector serve`` process on loopback with TLS, reached with the pinned client.

The file splitter here parses FORMAT.md framing on its own (not with collector/upload.py),
so the tests do not check the collector's framing with the collector's own parser.

Storage: by default every collector here is the embedded one (SQLite + files). With
``SSHAUDIT_STORAGE=pg_s3`` the same tests run on PostgreSQL + S3: each fresh state directory
(``local_collector``, ``open_test_storage``, ``cli("init", ...)``) gets a ``collector.toml``
naming its own PostgreSQL schema and S3 key prefix, on the servers that ``SSHAUDIT_PG_URL``
and ``SSHAUDIT_S3_*`` name, or else that ``scripts/services start`` starts.
"""

from __future__ import annotations

import atexit
import base64
import functools
import json
import os
import re
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient

from sshaudit.collector import admin
from sshaudit.collector.app import create_app
from sshaudit.collector.deps import Context, Settings
from sshaudit.collector.models import EnrollRequest
from sshaudit.collector.pinning import pinned_session
from sshaudit.collector.storage import Storage, TokenKind, open_storage
from sshaudit.collector.storage_pg_config import CONFIG_NAME
from sshaudit.collector.storage_sqlite import DB_NAME, SqliteStorage
from sshaudit.keys import AuditorPrivateKey
from sshaudit.sealed import SealedWriter

COLLECTOR = str(Path(sys.executable).parent / "sshaudit-collector")
REPO = Path(__file__).resolve().parent.parent
STORAGE = os.environ.get("SSHAUDIT_STORAGE", "sqlite")  # "sqlite" or "pg_s3"
if STORAGE not in ("sqlite", "pg_s3"):
    raise RuntimeError(f"SSHAUDIT_STORAGE={STORAGE!r}: use sqlite or pg_s3")
T0 = datetime(2026, 11, 22, 9, 0, 0, tzinfo=UTC)
AUDITOR = AuditorPrivateKey.generate()
_U32 = struct.Struct(">I")


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@dataclass
class Host:
    host_id: str
    credential: str
    key: Ed25519PrivateKey
    hostname: str

    @property
    def public_b64(self) -> str:
        return base64.b64encode(self.key.public_key().public_bytes_raw()).decode()


@dataclass
class Sealed:
    """A sealed file cut as the upload protocol sends it."""

    data: bytes
    prefix: bytes
    frames: list[bytes]  # each u32 length + ciphertext, as stored
    trailer: bytes | None  # mark + length + JSON, or None

    @property
    def body(self) -> bytes:
        return b"".join(self.frames) + (self.trailer or b"")


def split_sealed(data: bytes) -> Sealed:
    """Cut a sealed file into prefix, frames and trailer (FORMAT.md "Layout")."""
    (hlen,) = _U32.unpack_from(data, 10)
    pos = 14 + hlen
    prefix, frames, trailer = data[:pos], [], None
    while pos < len(data):
        (n,) = _U32.unpack_from(data, pos)
        if n == 0xFFFFFFFF:
            trailer = data[pos:]
            break
        frames.append(data[pos : pos + 4 + n])
        pos += 4 + n
    return Sealed(data, prefix, frames, trailer)


def make_sealed(
    host: Host,
    session_id: str,
    pieces: Sequence[bytes],
    *,
    close: bool = True,
    signing: Ed25519PrivateKey | None = None,
    host_id: str | None = None,
) -> Sealed:
    writer = SealedWriter(
        recipients=[AUDITOR.public],
        session_id=session_id,
        host_id=host_id or host.host_id,
        created_at=T0,
        host_key=signing or host.key,
    )
    out = writer.start() + b"".join(bytes(writer.write(p)) for p in pieces)
    if close:
        out += bytes(writer.close(b"bye\r\n"))
    return split_sealed(out)


def cast_pieces(n: int = 5) -> list[bytes]:
    header = b'{"version": 2, "width": 80, "height": 24, "timestamp": 1795000000}\n'
    return [header] + [f'[{i}.5, "o", "line {i}\\r\\n"]\n'.encode() for i in range(n)]


def new_session_id() -> str:
    return str(uuid.uuid4())


def record(session_id: str, **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "session_id": session_id,
        "user_email": "jdoe@example.com",
        "unix_user": "jdoe",
        "client_address": "192.0.2.7",
        "client_port": 50022,
        "server_address": "198.51.100.1",
        "server_port": 22,
        "session_start": "2026-11-22T09:00:00Z",
        "program_type": "shell",
        "recording_status": "recording",
    }
    doc.update(fields)
    return doc


def auth_event(event_id: str, **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "event_id": event_id,
        "created_at": "2026-11-22T09:00:00Z",
        "user_email": "jdoe@example.com",
        "unix_user": "jdoe",
        "ip_address": "192.0.2.7",
        "method": "certificate",
        "allowed": True,
    }
    doc.update(fields)
    return doc


@dataclass
class Local:
    """An in-process collector (FastAPI TestClient) over a fresh embedded storage."""

    storage: Storage
    clock: Clock
    client: TestClient
    tokens: dict[str, str] = field(default_factory=dict)

    def token(self, kind: str) -> str:
        if kind not in self.tokens:
            self.tokens[kind] = make_token(self.storage, TokenKind(kind), self.clock())
        return self.tokens[kind]

    def auth(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def as_role(self, kind: str) -> dict[str, str]:
        return self.auth(self.token(kind))

    def enroll(self, hostname: str = "web-1") -> Host:
        key = Ed25519PrivateKey.generate()
        enrollment = make_token(self.storage, TokenKind.AGENT, self.clock())
        pub = base64.b64encode(key.public_key().public_bytes_raw()).decode()
        resp = self.client.post(
            "/v1/enroll",
            json={"hostname": hostname, "host_public_key": pub},
            headers=self.auth(enrollment),
        )
        assert resp.status_code == 200, resp.text
        doc = resp.json()
        return Host(doc["host_id"], doc["credential"], key, hostname)


def make_token(storage: Storage, kind: TokenKind, now: datetime) -> str:
    token, _ = admin.create_token(storage, kind, now, actor="test", ttl=timedelta(days=1))
    return token


# --- storage: embedded, or PostgreSQL + S3 (SSHAUDIT_STORAGE=pg_s3)

FLEET_ENV = (
    "SSHAUDIT_PG_URL",
    "SSHAUDIT_S3_ENDPOINT",
    "SSHAUDIT_S3_BUCKET",
    "SSHAUDIT_S3_REGION",
    "SSHAUDIT_S3_ACCESS_KEY",
    "SSHAUDIT_S3_SECRET_KEY",
)
_SCHEMAS: list[str] = []


@functools.cache
def fleet_env() -> dict[str, str]:
    """Where the PostgreSQL and S3 servers are: from the environment, or from
    ``scripts/services start`` (which installs and starts them on loopback)."""
    if all(os.environ.get(k) for k in FLEET_ENV):
        return {k: os.environ[k] for k in FLEET_ENV}
    proc = subprocess.run(
        [str(REPO / "scripts" / "services"), "start"],
        capture_output=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            "scripts/services start failed; PostgreSQL + S3 are not available:\n"
            + proc.stderr.decode("utf-8", "replace")
        )
    env = dict(re.findall(r"^export (SSHAUDIT_\w+)='([^']*)'$", proc.stdout.decode(), re.MULTILINE))
    missing = [k for k in FLEET_ENV if k not in env]
    if missing:
        raise RuntimeError(f"scripts/services start printed no {', '.join(missing)}")
    return env


def fleet_toml(schema: str, prefix: str) -> str:
    """A collector.toml for one test: its own schema and key prefix on the shared servers."""
    env = fleet_env()
    q = json.dumps  # a JSON string is a valid TOML basic string
    return (
        '[storage]\nbackend = "postgresql+s3"\n\n'
        f"[storage.postgresql]\nurl = {q(env['SSHAUDIT_PG_URL'])}\nschema = {q(schema)}\n"
        "pool_size = 4\n\n"
        f"[storage.s3]\nendpoint = {q(env['SSHAUDIT_S3_ENDPOINT'])}\n"
        f"bucket = {q(env['SSHAUDIT_S3_BUCKET'])}\nregion = {q(env['SSHAUDIT_S3_REGION'])}\n"
        f"prefix = {q(prefix)}\naccess_key_id = {q(env['SSHAUDIT_S3_ACCESS_KEY'])}\n"
        f"secret_access_key = {q(env['SSHAUDIT_S3_SECRET_KEY'])}\n"
    )


def write_fleet_config(data: Path, schema: str | None = None) -> str:
    """Make ``data`` (0700) a PostgreSQL + S3 state directory; returns its schema name."""
    schema = schema or f"t_{uuid.uuid4().hex[:16]}"
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = data / CONFIG_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(fleet_toml(schema, f"{schema.replace('_', '-')}/"))
    if not _SCHEMAS:
        atexit.register(_drop_schemas)
    _SCHEMAS.append(schema)
    return schema


def _drop_schemas() -> None:
    """At exit: drop the test schemas and delete the objects under their key prefixes."""
    import boto3
    import psycopg
    from botocore.exceptions import BotoCoreError, ClientError
    from psycopg import sql

    env = fleet_env()
    try:
        with psycopg.connect(env["SSHAUDIT_PG_URL"], autocommit=True) as con:
            for schema in _SCHEMAS:
                con.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
                )
        s3 = boto3.client(
            "s3",
            endpoint_url=env["SSHAUDIT_S3_ENDPOINT"],
            region_name=env["SSHAUDIT_S3_REGION"],
            aws_access_key_id=env["SSHAUDIT_S3_ACCESS_KEY"],
            aws_secret_access_key=env["SSHAUDIT_S3_SECRET_KEY"],
        )
        pages = s3.get_paginator("list_objects_v2")
        for schema in _SCHEMAS:
            prefix = f"{schema.replace('_', '-')}/"
            for page in pages.paginate(Bucket=env["SSHAUDIT_S3_BUCKET"], Prefix=prefix):
                if page.get("Contents"):
                    s3.delete_objects(
                        Bucket=env["SSHAUDIT_S3_BUCKET"],
                        Delete={"Objects": [{"Key": o["Key"]} for o in page["Contents"]]},
                    )
    except (psycopg.Error, BotoCoreError, ClientError) as exc:
        print(f"collector_helpers: could not clean up the test schemas: {exc}", file=sys.stderr)


def prepare_data_dir(data: Path) -> None:
    """Under ``SSHAUDIT_STORAGE=pg_s3``, give a state directory that has no storage yet its
    own collector.toml; otherwise (and for a directory in use) nothing."""
    if STORAGE == "pg_s3" and not (data / CONFIG_NAME).exists() and not (data / DB_NAME).exists():
        write_fleet_config(data)


def open_test_storage(data: Path) -> Storage:
    """The storage a test's state directory uses (see the module docstring)."""
    prepare_data_dir(data)
    return open_storage(data)


def local_collector(
    data: Path, settings: Settings | None = None, *, embedded: bool = False
) -> Local:
    """``embedded``: SQLite + files whatever SSHAUDIT_STORAGE says (file-level tests)."""
    storage = SqliteStorage(data) if embedded else open_test_storage(data)
    clock = Clock()
    ctx = Context(storage, settings or Settings(), clock)
    client = TestClient(create_app(ctx), raise_server_exceptions=False)
    return Local(storage, clock, client)


def enroll_direct(storage: Storage, now: datetime, hostname: str = "web-1") -> Host:
    """Enroll without HTTP (for storage-level tests)."""
    key = Ed25519PrivateKey.generate()
    _, record = admin.create_token(
        storage, TokenKind.AGENT, now, actor="test", ttl=timedelta(days=1)
    )
    pub = base64.b64encode(key.public_key().public_bytes_raw()).decode()
    resp = admin.enroll(storage, record, EnrollRequest(hostname=hostname, host_public_key=pub), now)
    return Host(resp.host_id, resp.credential, key, hostname)


# --- a real collector process


def cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    if args[:1] == ("init",) and "--data" in args:
        prepare_data_dir(Path(args[args.index("--data") + 1]))
    return subprocess.run(
        [COLLECTOR, *args], input=stdin, capture_output=True, timeout=60, check=False
    )


def cli_ok(*args: str) -> str:
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


_LISTEN_RE = re.compile(r"listening on (https?)://127\.0\.0\.1:(\d+)(?: \(certificate (\S+)\))?")


@dataclass
class Server:
    url: str
    fingerprint: str | None
    data: Path
    proc: subprocess.Popen[bytes]
    log: list[str]

    def client(self, token: str | None = None) -> requests.Session:
        if self.fingerprint is None:
            session = requests.Session()
        else:
            session = pinned_session(self.fingerprint)
        if token is not None:
            session.headers["Authorization"] = f"Bearer {token}"
        return session

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(data: Path, *extra: str, timeout: float = 30.0) -> Server:
    proc = subprocess.Popen(
        [COLLECTOR, "serve", "--data", str(data), "--listen", "127.0.0.1:0", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    log: list[str] = []
    found = threading.Event()
    match: list[re.Match[str]] = []

    def drain() -> None:  # keeps reading, so the server never blocks on a full pipe
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace")
            log.append(line)
            m = _LISTEN_RE.search(line)
            if m and not found.is_set():
                match.append(m)
                found.set()

    threading.Thread(target=drain, daemon=True).start()
    if not found.wait(timeout):
        proc.kill()
        raise AssertionError("collector did not start:\n" + "".join(log))
    scheme, port, pin = match[0].groups()
    server = Server(f"{scheme}://127.0.0.1:{port}", pin, data, proc, log)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if server.client().get(server.url + "/healthz", timeout=5).status_code == 200:
                return server
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            server.stop()
            raise AssertionError("collector not healthy:\n" + "".join(log))
        time.sleep(0.1)
