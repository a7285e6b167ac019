"""The fleet backend (PostgreSQL + S3) on real servers: a PostgreSQL server and a SeaweedFS
S3 server on loopback, started by ``scripts/services`` (or named by ``SSHAUDIT_PG_URL`` and
``SSHAUDIT_S3_*``). Each test gets its own schema and key prefix.

What is checked here beyond the shared suite (which runs on this backend too with
``SSHAUDIT_STORAGE=pg_s3``): the configuration file and backend selection, versioned
migrations (also two collectors migrating at once), connections the database closed being
replaced without a failed request, tokens stored as hashes only, parts
in S3 that are checked and never served uncommitted or altered, exactly one winner for two
appends at one offset (two storages, and two real collector processes), an upload that
switches between two collector processes mid-recording and stays byte-identical, and an
export feed that misses nothing while two collectors write at once.
"""

from __future__ import annotations

import base64
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import boto3
import psycopg
import pytest
import requests
from botocore.exceptions import ClientError
from collector_helpers import (
    AUDITOR,
    T0,
    Host,
    Server,
    auth_event,
    cast_pieces,
    cli_ok,
    enroll_direct,
    fleet_env,
    make_sealed,
    new_session_id,
    record,
    start_server,
    write_fleet_config,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg import sql

from sshaudit.collector import admin, ingest, upload
from sshaudit.collector.models import AuthEvent, SessionRecord
from sshaudit.collector.problems import ConflictError, StorageError
from sshaudit.collector.storage import (
    DeleteOutcome,
    RecordingState,
    Storage,
    TokenKind,
    open_storage,
)
from sshaudit.collector.storage_pg import PgS3Storage
from sshaudit.collector.storage_pg_config import Backend, LockMode, load_config, parse_config
from sshaudit.collector.storage_pg_schema import MIGRATIONS
from sshaudit.collector.storage_s3 import lock_params
from sshaudit.collector.storage_sqlite import SqliteStorage
from sshaudit.errors import ConfigError
from sshaudit.sealed import Completeness, SealedReader, SignatureStatus

# --- the servers, a schema per test


@pytest.fixture(scope="module")
def fleet() -> dict[str, str]:
    try:
        return fleet_env()
    except RuntimeError as exc:
        message = f"POSTGRESQL + S3 TESTS NOT RUN: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def data(fleet: dict[str, str], tmp_path: Path) -> Path:
    path = tmp_path / "data"
    write_fleet_config(path)
    return path


def pg_store(data: Path) -> PgS3Storage:
    storage = open_storage(data)
    assert isinstance(storage, PgS3Storage)
    return storage


@pytest.fixture
def store(data: Path) -> Iterator[PgS3Storage]:
    s = pg_store(data)
    yield s
    s.close()


def rows(store: PgS3Storage, query: str, *params: object) -> list[dict[str, Any]]:
    """Look at the database behind the storage's back (as an operator with psql would)."""
    with psycopg.connect(store.config.url, row_factory=psycopg.rows.dict_row) as con:
        con.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(store.config.schema)))
        cur = con.execute(query.encode(), params)
        return cur.fetchall() if cur.description is not None else []


def s3_client(fleet: dict[str, str]) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=fleet["SSHAUDIT_S3_ENDPOINT"],
        region_name=fleet["SSHAUDIT_S3_REGION"],
        aws_access_key_id=fleet["SSHAUDIT_S3_ACCESS_KEY"],
        aws_secret_access_key=fleet["SSHAUDIT_S3_SECRET_KEY"],
    )


T = TypeVar("T")


def race(*calls: Callable[[], T]) -> list[T]:
    """Run the calls in threads released at the same instant; their results in order."""
    gate = threading.Barrier(len(calls))

    def run(call: Callable[[], T]) -> T:
        gate.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def started(store: Storage, host: Host, n: int = 6) -> tuple[str, Any]:
    """A session whose prefix is stored; returns its id and the sealed file."""
    sid = new_session_id()
    sealed = make_sealed(host, sid, cast_pieces(n))
    stored = store.get_host(host.host_id)
    assert stored is not None
    ingest.put_prefix(store, stored, sid, sealed.prefix, T0)
    return sid, sealed


# --- configuration


TOML = """
[storage]
backend = "postgresql+s3"
[storage.postgresql]
url = "postgresql://u:pw@127.0.0.1/db"
[storage.s3]
bucket = "b"
"""


def test_config_is_parsed_strictly() -> None:
    config = parse_config(TOML)
    assert config.backend is Backend.POSTGRESQL_S3
    assert config.postgresql is not None and config.postgresql.schema == "public"
    assert config.s3 is not None and config.s3.bucket == "b"
    assert "pw" not in repr(config)  # secrets stay out of logs and tracebacks
    assert parse_config("").backend is Backend.SQLITE
    for text, words in [
        ("[storage]\nbackend = 'mysql'", "backend must be one of"),
        (TOML.replace('bucket = "b"', ""), "needs bucket"),
        (TOML + "typo = 1\n", "unknown keys: typo"),
        (TOML.replace("[storage.s3]", "[storage.s3]\nprefix = '../x'"), "prefix"),
        (TOML.replace("[storage.s3]", "[storage.s3]\nprefix = 'a/../'"), "prefix"),
        (TOML.replace("[storage.s3]", "[storage.s3]\naccess_key_id = 'k'"), "go together"),
        (TOML + "pool_size = true\n", "pool_size must be an integer"),
        (TOML.replace("[storage.postgresql]", "[storage.postgresql]\nschema = 'A;x'"), "schema"),
        ("[storage.s3]\nbucket = 'b'", "need a backend"),
        ("nonsense = [", "not valid TOML"),
    ]:
        with pytest.raises(ConfigError, match=words):
            parse_config(text)


def test_config_file_must_be_private_and_selects_the_backend(tmp_path: Path) -> None:
    sqlite = open_storage(tmp_path)  # no file: the embedded backend
    assert isinstance(sqlite, SqliteStorage)
    sqlite.close()
    path = tmp_path / "collector.toml"
    path.write_text(TOML)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="mode 0600"):
        load_config(tmp_path)
    path.chmod(0o600)
    assert load_config(tmp_path).backend is Backend.POSTGRESQL_S3
    path.rename(tmp_path / "real.toml")
    path.symlink_to(tmp_path / "real.toml")
    with pytest.raises(ConfigError, match="symlink"):
        load_config(tmp_path)


def test_unreachable_servers_are_clear_errors_without_secrets(data: Path, tmp_path: Path) -> None:
    text = (data / "collector.toml").read_text()
    env = fleet_env()
    bad = tmp_path / "bad"
    bad.mkdir(mode=0o700)
    wrong_key = text.replace(env["SSHAUDIT_S3_SECRET_KEY"], "not-the-secret")
    (bad / "collector.toml").write_text(wrong_key)
    (bad / "collector.toml").chmod(0o600)
    with pytest.raises(StorageError, match="bucket 'sshaudit-test'") as exc:
        open_storage(bad)
    assert "not-the-secret" not in str(exc.value)
    password = env["SSHAUDIT_PG_URL"].split(":")[2].split("@")[0]
    (bad / "collector.toml").write_text(text.replace(password, "wrong-password"))
    with pytest.raises(StorageError, match="cannot use the PostgreSQL database") as exc:
        open_storage(bad)
    assert "wrong-password" not in str(exc.value) and password not in str(exc.value)


# --- schema


def test_schema_is_migrated_once_and_versioned(data: Path) -> None:
    with ThreadPoolExecutor(4) as pool:  # four collectors starting at once on a new schema
        stores = list(pool.map(lambda _: pg_store(data), range(4)))
    newest = max(v for v, _ in MIGRATIONS)
    assert all(s.schema_version() == newest for s in stores)
    got = rows(stores[0], "SELECT version FROM schema_migrations ORDER BY version")
    assert [r["version"] for r in got] == [v for v, _ in MIGRATIONS]
    for s in stores:
        s.close()
    again = pg_store(data)  # reopening applies nothing twice
    rows(again, "INSERT INTO schema_migrations VALUES (999, now())")
    again.close()
    with pytest.raises(StorageError, match="newer than this collector"):
        open_storage(data)


def test_connections_the_server_closed_are_replaced(store: PgS3Storage) -> None:
    with ThreadPoolExecutor(3) as pool:  # a few pooled connections
        list(pool.map(lambda _: store.list_hosts(), range(6)))
    pids = [con.info.backend_pid for con in store._all]  # this storage's connections only
    assert pids
    killed = rows(store, "SELECT pg_terminate_backend(p) AS ok FROM unnest(%s::int[]) p", pids)
    assert [r["ok"] for r in killed] == [True] * len(pids)
    time.sleep(0.2)
    for _ in range(4):  # as after a database restart: no request fails
        assert store.get_policy().version == 0


def test_tokens_are_stored_as_hashes_only(store: PgS3Storage) -> None:
    token, rec = admin.create_token(store, TokenKind.ADMIN, T0, actor="t", ttl=timedelta(hours=1))
    dump = rows(store, "SELECT string_agg(t::text, ' ') AS all FROM tokens t")[0]["all"]
    assert rec.token_id in dump and token not in dump
    assert token.split("_")[-1] not in dump


# --- recordings in S3


def test_parts_are_objects_named_by_offset_and_reads_join_them(
    store: PgS3Storage, fleet: dict[str, str]
) -> None:
    host = enroll_direct(store, T0)
    sid, sealed = started(store, host)
    n = len(sealed.prefix)
    for frame in sealed.frames:
        rec = store.append_recording(sid, n, frame, 1, T0, seal=False)
        n = rec.length
    parts = rows(store, "SELECT * FROM recording_parts ORDER BY part_offset")
    assert [p["part_offset"] for p in parts][:2] == [0, len(sealed.prefix)]
    prefix = f"{store.config.schema.replace('_', '-')}/{host.host_id}/{sid}/"
    listed = s3_client(fleet).list_objects_v2(Bucket=fleet["SSHAUDIT_S3_BUCKET"], Prefix=prefix)
    keys = sorted(o["Key"] for o in listed["Contents"])
    assert keys == sorted(p["object_key"] for p in parts)
    assert keys[1].startswith(f"{prefix}{len(sealed.prefix):020d}.")
    whole = sealed.prefix + b"".join(sealed.frames)
    for start, end in [(0, n), (3, n - 2), (len(sealed.prefix) - 1, len(sealed.prefix) + 1)]:
        assert b"".join(store.read_recording(sid, start, end)) == whole[start:end]
    with pytest.raises(StorageError):
        store.read_recording(sid, 0, n + 1)  # never past the committed length


def test_an_uncommitted_object_is_never_served(store: PgS3Storage, fleet: dict[str, str]) -> None:
    host = enroll_direct(store, T0)
    sid, sealed = started(store, host)
    n = len(sealed.prefix)
    # A collector wrote the next object, then died before its commit.
    stray = f"{store.config.schema.replace('_', '-')}/{host.host_id}/{sid}/{n:020d}.dead"
    s3_client(fleet).put_object(Bucket=fleet["SSHAUDIT_S3_BUCKET"], Key=stray, Body=b"x" * 99)
    rec = store.get_recording(sid)
    assert rec is not None and rec.length == n
    assert b"".join(store.read_recording(sid, 0, n)) == sealed.prefix
    stored = store.get_host(host.host_id)
    assert stored is not None
    ingest.append_chunk(store, stored, sid, n, sealed.body, T0)
    rec = store.get_recording(sid)
    assert rec is not None and rec.state is RecordingState.SEALED_VERIFIED
    assert b"".join(store.read_recording(sid, 0, rec.length)) == sealed.data


def test_an_altered_object_is_refused_not_served(store: PgS3Storage, fleet: dict[str, str]) -> None:
    host = enroll_direct(store, T0)
    sid, sealed = started(store, host)
    n = len(sealed.prefix)
    store.append_recording(sid, n, sealed.frames[0], 1, T0, seal=False)
    (part,) = rows(store, "SELECT object_key FROM recording_parts WHERE part_offset > 0")
    flipped = bytes([sealed.frames[0][0] ^ 1]) + sealed.frames[0][1:]
    s3 = s3_client(fleet)
    s3.put_object(Bucket=fleet["SSHAUDIT_S3_BUCKET"], Key=part["object_key"], Body=flipped)
    assert b"".join(store.read_recording(sid, 0, n)) == sealed.prefix  # other parts still read
    with pytest.raises(StorageError, match="changed in the object store"):
        b"".join(store.read_recording(sid, 0, n + len(flipped)))
    s3.delete_object(Bucket=fleet["SSHAUDIT_S3_BUCKET"], Key=part["object_key"])
    with pytest.raises(StorageError, match="object store error"):
        b"".join(store.read_recording(sid, n, n + 1))


def test_two_appends_at_one_offset_exactly_one_wins(data: Path) -> None:
    one, two = pg_store(data), pg_store(data)  # two collectors: two pools, one database
    host = enroll_direct(one, T0)
    sid, sealed = started(one, host, n=20)
    other = make_sealed(host, sid, [b"other " * 50] * 21)
    offset, expect = len(sealed.prefix), sealed.prefix
    for i in range(20):

        def append(s: PgS3Storage, chunk: bytes, at: int) -> object:
            try:
                return s.append_recording(sid, at, chunk, 1, T0, seal=False)
            except ConflictError as exc:
                return exc

        results = race(
            functools.partial(append, one, sealed.frames[i], offset),
            functools.partial(append, two, other.frames[i], offset),
        )
        wins = [r for r in results if not isinstance(r, ConflictError)]
        losses = [r for r in results if isinstance(r, ConflictError)]
        assert len(wins) == 1 and len(losses) == 1, results
        winner = sealed.frames[i] if results[0] is wins[0] else other.frames[i]
        offset += len(winner)
        expect += winner
        assert losses[0].extra == {"length": offset}  # the loser learns where to resume
    assert b"".join(two.read_recording(sid, 0, offset)) == expect
    one.close()
    two.close()


# --- the export feed with two writers


def test_export_feed_misses_nothing_while_two_collectors_write(data: Path) -> None:
    one, two, reader = pg_store(data), pg_store(data), pg_store(data)
    host = enroll_direct(one, T0)
    stored = one.get_host(host.host_id)
    assert stored is not None
    written: list[str] = []

    def write(s: PgS3Storage, tag: str) -> None:
        for i in range(30):
            sid = new_session_id()
            doc = record(sid, recording_status="complete")
            ingest.put_session(s, stored, sid, SessionRecord.model_validate(doc), T0)
            event = AuthEvent.model_validate(auth_event(f"{tag}-{i}"))
            ingest.add_auth_events(s, stored, [event], T0)
            written.extend([sid, event.event_id])

    seen: list[tuple[int, str]] = []
    writers = [threading.Thread(target=write, args=(s, t)) for s, t in ((one, "a"), (two, "b"))]
    for w in writers:
        w.start()
    after, deadline = 0, time.monotonic() + 120
    while time.monotonic() < deadline:
        done = not any(w.is_alive() for w in writers)
        for c in reader.changes(after, 7):
            name = c.session.record.session_id if c.session else c.auth_event.event.event_id  # type: ignore[union-attr]
            seen.append((c.seq, name))
            after = c.seq
        if done and not reader.changes(after, 1):
            break
    assert [s for s, _ in seen] == sorted({s for s, _ in seen})  # increasing, none twice
    assert sorted(n for _, n in seen) == sorted(written)  # and none skipped
    for s in (one, two, reader):
        s.close()


# --- two real collector processes on one database and bucket


class Pair:
    def __init__(self, a: Server, b: Server) -> None:
        self.a, self.b = a, b

    def token(self, role: str, server: Server | None = None) -> str:
        data = (server or self.a).data
        return cli_ok("token", "create", "--data", str(data), "--role", role).split()[-1]


@pytest.fixture(scope="module")
def pair(fleet: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    base = tmp_path_factory.mktemp("pair")
    schema = write_fleet_config(base / "a")
    write_fleet_config(base / "b", schema=schema)  # the same database schema and bucket
    for side in ("a", "b"):
        cli_ok("init", "--data", str(base / side))  # each its own TLS certificate
    a = start_server(base / "a")
    try:
        b = start_server(base / "b")
    except BaseException:
        a.stop()
        raise
    try:
        assert a.fingerprint != b.fingerprint
        yield Pair(a, b)
    finally:
        for server in (a, b):  # both at once: each waits for its open connections
            if server.proc.poll() is None:
                server.proc.terminate()
        a.stop()
        b.stop()


def enroll(pair: Pair, server: Server) -> Host:
    key = Ed25519PrivateKey.generate()
    pub = base64.b64encode(key.public_key().public_bytes_raw()).decode()
    resp = server.client(pair.token("agent")).post(
        server.url + "/v1/enroll", json={"hostname": "fleet-1", "host_public_key": pub}
    )
    assert resp.status_code == 200, resp.text
    return Host(resp.json()["host_id"], resp.json()["credential"], key, "fleet-1")


def test_upload_switching_collectors_mid_recording_loses_nothing(pair: Pair) -> None:
    host = enroll(pair, pair.b)  # enrolled through b, uploads start on a
    sid = new_session_id()
    path = f"/v1/sessions/{sid}/recording"
    urls = [pair.a.url + path, pair.b.url + path]
    hosts = [pair.a.client(host.credential), pair.b.client(host.credential)]
    f = make_sealed(host, sid, [os.urandom(150_000), *cast_pieces(40)])
    assert hosts[0].put(urls[0], data=f.prefix).status_code == 200
    assert hosts[1].put(urls[1], data=f.prefix).json()["length"] == len(f.prefix)  # idempotent
    body, sent, turn = f.body, 0, 0
    while sent < len(body):
        k, turn = turn % 2, turn + 1  # every chunk to the other collector
        # The agent reconnects to another collector: it asks where to resume.
        status = hosts[k].get(urls[k] + "/status").json()
        assert status["length"] == len(f.prefix) + sent
        n = upload.plan_chunk(body[sent:], len(f.frames[0]) if sent == 0 else 300)
        assert n > 0
        chunk = body[sent : sent + n]
        resp = hosts[k].post(urls[k], params={"offset": status["length"]}, data=chunk)
        assert resp.status_code == 200, resp.text
        if turn == 2:  # the answer was lost: the same chunk again, to the other collector
            again = hosts[1 - k].post(urls[1 - k], params={"offset": status["length"]}, data=chunk)
            assert again.json() == resp.json()
        sent += n
    assert turn >= 6  # it did switch, many times
    assert resp.json()["state"] == "sealed_verified"
    auditors = [pair.a.client(pair.token("auditor")), pair.b.client(pair.token("auditor"))]
    whole = auditors[1].get(urls[1]).content
    half = len(whole) // 2
    first = auditors[0].get(urls[0], headers={"Range": f"bytes=0-{half - 1}"})
    rest = auditors[1].get(urls[1], headers={"Range": f"bytes={half}-"})
    assert (first.status_code, rest.status_code) == (206, 206)
    assert whole == first.content + rest.content == f.data  # byte-identical everywhere
    reader = SealedReader([AUDITOR])
    reader.feed(whole)
    result = reader.finish()
    assert (result.completeness, result.signature) == (
        Completeness.COMPLETE,
        SignatureStatus.VALID,
    )


def test_session_record_and_events_through_either_collector(pair: Pair) -> None:
    host = enroll(pair, pair.a)
    a, b = pair.a.client(host.credential), pair.b.client(host.credential)
    sid = new_session_id()
    assert a.put(f"{pair.a.url}/v1/sessions/{sid}", json=record(sid)).status_code == 200
    final = record(sid, recording_status="complete", bytes_out=7)
    assert b.put(f"{pair.b.url}/v1/sessions/{sid}", json=final).json()["outcome"] == "updated"
    again = a.put(f"{pair.a.url}/v1/sessions/{sid}", json=record(sid, bytes_out=8))
    assert again.status_code == 409 and again.json()["error"] == "record_immutable"
    events = {"events": [auth_event(f"fleet-{sid}")]}
    assert a.post(f"{pair.a.url}/v1/auth-events", json=events).json()["added"] == 1
    assert b.post(f"{pair.b.url}/v1/auth-events", json=events).json()["duplicates"] == 1
    listed = pair.b.client(pair.token("auditor")).get(
        f"{pair.b.url}/v1/sessions", params={"target_id": host.host_id}
    )
    (item,) = listed.json()["items"]
    assert (item["recording_status"], item["bytes_out"]) == ("complete", 7)


def test_concurrent_appends_to_both_collectors_exactly_one_wins(pair: Pair) -> None:
    host = enroll(pair, pair.a)
    sid = new_session_id()
    mine, theirs = (make_sealed(host, sid, [os.urandom(3000 + i)] * 16) for i in (0, 1))
    path = f"/v1/sessions/{sid}/recording"
    clients = [(s, s.client(host.credential)) for s in (pair.a, pair.b)]
    assert clients[0][1].put(pair.a.url + path, data=mine.prefix).status_code == 200
    offset, expect = len(mine.prefix), mine.prefix
    for i in range(15):
        bodies = [mine.frames[i], theirs.frames[i]]

        def post(k: int, body: bytes, at: int) -> requests.Response:
            server, client = clients[k]
            return client.post(server.url + path, params={"offset": at}, data=body)

        answers = race(*(functools.partial(post, k, bodies[k], offset) for k in (0, 1)))
        codes = sorted(r.status_code for r in answers)
        assert codes == [200, 409], [r.text for r in answers]
        won = 0 if answers[0].status_code == 200 else 1
        offset += len(bodies[won])
        expect += bodies[won]
        assert answers[won].json()["length"] == offset
        assert answers[1 - won].json()["error"] in ("offset_mismatch", "replay_mismatch")
    got = pair.b.client(pair.token("auditor")).get(pair.b.url + path)
    assert got.content == expect


# --- S3 Object Lock (issue 4 point 6)

LOCK_BUCKET = "sshaudit-test-lock"


def test_object_lock_config_is_parsed_strictly() -> None:
    s3 = parse_config(TOML).s3
    assert s3 is not None and s3.object_lock_days is None
    s3 = parse_config(TOML + "object_lock_days = 30\n").s3
    assert s3 is not None and s3.object_lock_days == 30
    assert s3.object_lock_mode is LockMode.COMPLIANCE  # the default: nobody can lift it
    s3 = parse_config(TOML + "object_lock_days = 7\nobject_lock_mode = 'GOVERNANCE'\n").s3
    assert s3 is not None and s3.object_lock_mode is LockMode.GOVERNANCE
    for extra, words in [
        ("object_lock_mode = 'COMPLIANCE'", "object_lock_mode needs object_lock_days"),
        ("object_lock_days = 0", r"object_lock_days must be 1\.\.36500"),
        ("object_lock_days = 36501", r"object_lock_days must be 1\.\.36500"),
        ("object_lock_days = '30'", "object_lock_days must be an integer"),
        ("object_lock_days = true", "object_lock_days must be an integer"),
        ("object_lock_days = 1.5", "object_lock_days must be an integer"),
        ("object_lock_days = 1\nobject_lock_mode = 'compliance'", "COMPLIANCE or GOVERNANCE"),
        ("object_lock_days = 1\nobject_lock_mode = 3", "object_lock_mode must be a string"),
    ]:
        with pytest.raises(ConfigError, match=words):
            parse_config(f"{TOML}{extra}\n")


def test_lock_params_are_the_mode_and_now_plus_the_days() -> None:
    s3 = parse_config(TOML).s3
    assert s3 is not None
    assert lock_params(s3, T0) == {}  # no lock configured: plain objects
    now = datetime(2026, 11, 22, 10, 30, tzinfo=timezone(timedelta(hours=2)))
    assert lock_params(replace(s3, object_lock_days=30), now) == {
        "ObjectLockMode": "COMPLIANCE",
        "ObjectLockRetainUntilDate": datetime(2026, 12, 22, 8, 30, tzinfo=UTC),
    }
    gov = replace(s3, object_lock_days=1, object_lock_mode=LockMode.GOVERNANCE)
    assert lock_params(gov, T0)["ObjectLockMode"] == "GOVERNANCE"
    with pytest.raises(ValueError, match="timezone-aware"):
        lock_params(gov, datetime(2026, 11, 22, 9, 0))  # naive: refused


def lock_bucket(fleet: dict[str, str]) -> str:
    """A bucket with Object Lock (S3 can only enable it at creation), made once."""
    try:
        s3_client(fleet).create_bucket(Bucket=LOCK_BUCKET, ObjectLockEnabledForBucket=True)
    except ClientError as exc:
        if exc.response["Error"]["Code"] not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
            raise
    return LOCK_BUCKET


def locked_data(data: Path, bucket: str, days: int = 1) -> Path:
    """``data``'s collector.toml with the recordings in ``bucket``, locked ``days`` days."""
    path = data / "collector.toml"
    bucket_line = f'bucket = "{fleet_env()["SSHAUDIT_S3_BUCKET"]}"'
    text = path.read_text()
    assert bucket_line in text and "[storage.s3]" in text.splitlines()[-7:]  # the last table
    path.write_text(
        text.replace(bucket_line, f'bucket = "{bucket}"') + f"object_lock_days = {days}\n"
    )
    return data


def test_a_bucket_without_object_lock_is_refused(data: Path, fleet: dict[str, str]) -> None:
    locked_data(data, fleet["SSHAUDIT_S3_BUCKET"])  # the shared test bucket has no lock
    with pytest.raises(ConfigError, match="does not have S3 Object Lock enabled") as exc:
        open_storage(data)
    assert fleet["SSHAUDIT_S3_SECRET_KEY"] not in str(exc.value)


def finished(store: PgS3Storage, host: Host) -> tuple[str, list[str]]:
    """A sealed recording with its finished session record; its id and object keys."""
    sid, sealed = started(store, host)
    stored = store.get_host(host.host_id)
    assert stored is not None
    ingest.append_chunk(store, stored, sid, len(sealed.prefix), sealed.body, T0)
    doc = record(sid, recording_status="complete", session_finish="2026-11-22T09:05:00Z")
    ingest.put_session(store, stored, sid, SessionRecord.model_validate(doc), T0)
    keys = rows(store, "SELECT object_key FROM recording_parts WHERE session_id = %s", sid)
    return sid, [k["object_key"] for k in keys]


def test_locked_objects_carry_their_retention_and_outlive_retention(
    data: Path, fleet: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    bucket = lock_bucket(fleet)
    store = pg_store(locked_data(data, bucket, days=2))
    s3 = s3_client(fleet)
    try:
        before = datetime.now(UTC)
        sid, keys = finished(store, enroll_direct(store, T0))
        after = datetime.now(UTC)
        assert len(keys) == 2  # the prefix and the rest: each object its own lock
        for key in keys:
            head = s3.head_object(Bucket=bucket, Key=key)
            assert head["ObjectLockMode"] == "COMPLIANCE"
            until = head["ObjectLockRetainUntilDate"]
            # S3 keeps the date to the second: allow the truncation below ``before``.
            assert before + timedelta(days=2, seconds=-1) <= until <= after + timedelta(days=2)
            retention = s3.get_object_retention(Bucket=bucket, Key=key)["Retention"]
            assert (retention["Mode"], retention["RetainUntilDate"]) == ("COMPLIANCE", until)
            with pytest.raises(ClientError) as refused:  # the store itself says no
                s3.delete_object(Bucket=bucket, Key=key, VersionId=head["VersionId"])
            assert refused.value.response["Error"]["Code"] == "AccessDenied"
        with caplog.at_level(logging.ERROR, logger="sshaudit.collector"):
            assert store.delete_expired(sid, "test", T0) is DeleteOutcome.DELETED
        assert "refused to delete" in caplog.text and "AccessDenied" in caplog.text
        assert store.get_session(sid) is None  # the record and its audit event: as always
        events = rows(store, "SELECT actor FROM audit_events WHERE action = 'retention_delete'")
        assert events == [{"actor": "retention"}]
        for key in keys:  # the bytes are still there, current (no delete marker hides them)
            assert s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    finally:
        store.close()


def test_retention_deletes_every_version_of_unlocked_objects(
    data: Path, fleet: dict[str, str]
) -> None:
    bucket = lock_bucket(fleet)
    store = pg_store(locked_data(data, bucket))
    s3 = s3_client(fleet)
    try:
        key = f"{store.config.schema.replace('_', '-')}/{'a' * 32}/{new_session_id()}/x"
        for body in (b"one", b"two"):  # two versions (written past the collector, unlocked)
            s3.put_object(Bucket=bucket, Key=key, Body=body)
        s3.delete_object(Bucket=bucket, Key=key)  # and a delete marker on top
        store.blobs.delete([key])
        listed = s3.list_object_versions(Bucket=bucket, Prefix=key)
        assert not listed.get("Versions") and not listed.get("DeleteMarkers")
    finally:
        store.close()
