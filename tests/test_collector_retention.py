"""Retention and immutability (issue 4, point 6): the planning rules on their own, then the
job against a real storage (SQLite + files, or PostgreSQL + S3 with SSHAUDIT_STORAGE=pg_s3)
with a clock the test controls: expired sessions go with their recordings, held and open
ones stay, a per-group period applies, each deletion is an audit event; the CLI and the
periodic task inside ``serve``; and no API call of any role deletes or rewrites a recording."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from collector_helpers import (
    STORAGE,
    T0,
    Clock,
    Host,
    Local,
    cast_pieces,
    cli,
    cli_ok,
    local_collector,
    make_sealed,
    new_session_id,
    record,
    start_server,
)

from sshaudit.collector import retention
from sshaudit.collector.problems import UnprocessableError
from sshaudit.collector.retention import Candidate, RetentionPolicy, TargetGroup, parse_policy
from sshaudit.collector.storage import DeleteOutcome, Hold, HoldKind, Storage

DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
FINISH = "2026-11-22T09:10:00Z"  # T0 + 10 minutes


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Local]:
    (tmp_path / "data").mkdir(mode=0o700)
    loc = local_collector(tmp_path / "data")
    yield loc
    loc.client.close()
    loc.storage.close()


# --- planning, sans-IO


def _cand(
    sid: str, *, target: str = "t1", user: str = "u@x", age: timedelta = 2 * DAY
) -> Candidate:
    return Candidate(sid, target, user, T0 - age, final=True)


def test_policy_parsing() -> None:
    assert parse_policy({}) == RetentionPolicy(365, ())
    assert parse_policy({"other": 1}).default_days == 365
    doc = {"retention": {"default_days": 1, "groups": {"db": {"days": 30, "targets": ["h1"]}}}}
    assert parse_policy(doc) == RetentionPolicy(1, (TargetGroup("db", 30, frozenset({"h1"})),))
    bad: dict[str, Any]
    for bad in (
        {"retention": []},
        {"retention": {"default_days": 0}},
        {"retention": {"default_days": True}},
        {"retention": {"default_days": "30"}},
        {"retention": {"default_days": 10**6}},
        {"retention": {"days": 3}},
        {"retention": {"groups": []}},
        {"retention": {"groups": {"g": {"days": 3}}}},
        {"retention": {"groups": {"g": {"days": 3, "targets": "h1"}}}},
        {"retention": {"groups": {"g": {"days": 3, "targets": [1]}}}},
    ):
        with pytest.raises(UnprocessableError):
            parse_policy(bad)


def test_plan_rules() -> None:
    policy = RetentionPolicy(
        1, (TargetGroup("long", 30, frozenset({"t2"})), TargetGroup("short", 2, frozenset({"t2"})))
    )
    cands = [
        _cand("old"),
        _cand("edge", age=DAY),  # exactly one day: its period is over
        _cand("young", age=DAY - timedelta(seconds=1)),
        Candidate("open", "t1", "u@x", T0 - 5 * DAY, final=False),
        _cand("grouped", target="t2", age=29 * DAY),  # in two groups: the longest wins
        _cand("grouped-old", target="t2", age=30 * DAY),
        _cand("by-session"),
        _cand("by-user", user="held@x"),
        _cand("by-target", target="t9"),
    ]
    holds = [
        Hold("1", HoldKind.SESSION, "by-session", "", T0, "t"),
        Hold("2", HoldKind.USER, "held@x", "", T0, "t"),
        Hold("3", HoldKind.TARGET, "t9", "", T0, "t"),
    ]
    out = retention.plan(cands, holds, policy, T0)
    assert [e.session_id for e in out] == ["old", "edge", "grouped-old"]
    assert (out[2].days, out[2].group) == (30, "long")
    assert "older than 30 days (group long)" in out[2].reason
    assert retention.plan(cands, [], policy, T0 - 40 * DAY) == []


# --- against a storage, through the API


def _upload(local: Local, host: Host, sid: str, *, sealed: bool = True) -> bytes:
    f = make_sealed(host, sid, cast_pieces(3), close=sealed)
    h = {**local.auth(host.credential), "Content-Type": "application/octet-stream"}
    url = f"/v1/sessions/{sid}/recording"
    assert local.client.put(url, content=f.prefix, headers=h).status_code == 200
    resp = local.client.post(url, params={"offset": len(f.prefix)}, content=f.body, headers=h)
    assert resp.status_code == 200, resp.text
    return f.data if sealed else f.prefix + f.body


def session(
    local: Local,
    host: Host,
    *,
    user: str = "jdoe@example.com",
    status: str = "complete",
    finish: str | None = FINISH,
    recorded: bool = True,
    sealed: bool = True,
    start: str = "2026-11-22T09:00:00Z",
) -> str:
    sid = new_session_id()
    if recorded:
        _upload(local, host, sid, sealed=sealed)
    doc = record(sid, user_email=user, recording_status=status, session_start=start)
    if finish is not None:
        doc["session_finish"] = finish
    resp = local.client.put(f"/v1/sessions/{sid}", json=doc, headers=local.auth(host.credential))
    assert resp.status_code == 200, resp.text
    return sid


def _rfc3339(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _exists(local: Local, sid: str) -> bool:
    auditor = local.as_role("auditor")
    got = local.client.get(f"/v1/sessions/{sid}", headers=auditor).status_code
    dl = local.client.get(f"/v1/sessions/{sid}/recording", headers=auditor).status_code
    assert (got, dl) in ((200, 200), (404, 404), (200, 404)), (got, dl)
    return got == 200


def _blob_gone(storage: Storage, data: Path, host_id: str, sid: str) -> bool:
    if STORAGE == "sqlite":
        return not (data / "recordings" / host_id / f"{sid}.sealed").exists()
    blobs: Any = storage.blobs  # type: ignore[attr-defined]
    listed = blobs._s3.list_objects_v2(
        Bucket=blobs.bucket, Prefix=f"{blobs.prefix}{host_id}/{sid}/"
    )
    return int(listed["KeyCount"]) == 0


def _retention_events(local: Local) -> list[dict[str, Any]]:
    events = local.client.get(
        "/v1/admin/audit-events", params={"limit": 1000}, headers=local.as_role("admin")
    ).json()
    return [e for e in events if e["action"] == "retention_delete"]


def _set_policy(local: Local, doc: dict[str, Any]) -> None:
    resp = local.client.put(
        "/v1/admin/policy", json={"policy": doc}, headers=local.as_role("admin")
    )
    assert resp.status_code == 200, resp.text


def _hold(local: Local, kind: str, value: str) -> str:
    resp = local.client.post(
        "/v1/admin/holds", json={"kind": kind, "value": value}, headers=local.as_role("admin")
    )
    assert resp.status_code == 200, resp.text
    return str(resp.json()["hold_id"])


def test_retention_deletes_expired_keeps_held_and_open(local: Local, tmp_path: Path) -> None:
    a, b, c = local.enroll("a"), local.enroll("b"), local.enroll("c")
    _set_policy(
        local,
        {"retention": {"default_days": 1, "groups": {"db": {"days": 30, "targets": [c.host_id]}}}},
    )
    old = session(local, a)
    unrecorded = session(local, a, status="unrecorded", recorded=False)
    no_finish = session(local, a, status="recorder_lost", finish=None)
    kept = {
        "held_session": session(local, a),
        "held_user": session(local, a, user="alice@example.com"),
        "held_target": session(local, b),
        "recording": session(local, a, status="recording", finish=None, sealed=False),
        "unsealed": session(local, a, sealed=False),
        "young": session(local, a, start="2026-11-23T20:00:00Z", finish="2026-11-23T21:00:00Z"),
        "group": session(local, c),
    }
    user_hold = _hold(local, "user", "alice@example.com")
    _hold(local, "session", kept["held_session"])
    _hold(local, "target", b.host_id)
    expired = {old, unrecorded, no_finish}
    now = T0 + 2 * DAY

    dry = retention.run(local.storage, now, dry_run=True)
    assert {r.expired.session_id for r in dry} == expired
    assert all(r.outcome is None for r in dry)
    assert all(_exists(local, s) for s in [*expired, *kept.values()])
    assert _retention_events(local) == []

    done = retention.run(local.storage, now)
    assert {r.expired.session_id: r.outcome for r in done} == dict.fromkeys(
        expired, DeleteOutcome.DELETED
    )
    assert not any(_exists(local, s) for s in expired)
    assert all(_exists(local, s) for s in kept.values())
    for sid in (old, no_finish):
        assert _blob_gone(local.storage, tmp_path / "data", a.host_id, sid)
    assert not _blob_gone(local.storage, tmp_path / "data", a.host_id, kept["held_session"])
    events = _retention_events(local)
    assert {e["subject"] for e in events} == expired
    for e in events:
        assert e["actor"] == "retention"
        assert e["detail"]["session_id"] == e["subject"]
        assert e["detail"]["target_id"] == a.host_id
        assert e["detail"]["user_email"] == "jdoe@example.com"
        assert "older than 1 days (default)" in e["detail"]["reason"]
    listed = local.client.get("/v1/sessions", headers=local.as_role("auditor")).json()
    assert not expired & {s["session_id"] for s in listed["items"]}
    assert retention.run(local.storage, now) == []  # nothing left to do: idempotent

    # Lifting a hold lets retention take the session on its next run; the group's 30 days
    # keep c's session until they are over.
    no_content = local.client.delete(f"/v1/admin/holds/{user_hold}", headers=local.as_role("admin"))
    assert no_content.status_code == 204
    assert [r.expired.session_id for r in retention.run(local.storage, now)] == [kept["held_user"]]
    later = [r.expired.session_id for r in retention.run(local.storage, T0 + 31 * DAY)]
    assert set(later) == {kept["young"], kept["group"]}
    assert _exists(local, kept["held_session"]) and _exists(local, kept["held_target"])
    assert _exists(local, kept["recording"]) and _exists(local, kept["unsealed"])
    assert len(_retention_events(local)) == 6


def test_delete_expired_rechecks_holds_and_state(local: Local) -> None:
    """A hold added after planning, or a session that is not final, wins over the plan."""
    a = local.enroll("a")
    sid, open_sid = session(local, a), session(local, a, status="recording", finish=None)
    _hold(local, "target", a.host_id)
    st = local.storage
    assert st.delete_expired(sid, "test", T0) is DeleteOutcome.HELD
    assert st.delete_expired(open_sid, "test", T0) is DeleteOutcome.OPEN
    assert st.delete_expired(new_session_id(), "test", T0) is DeleteOutcome.MISSING
    assert _exists(local, sid) and _exists(local, open_sid)
    assert _retention_events(local) == []


def test_bad_retention_policy_is_refused(local: Local) -> None:
    resp = local.client.put(
        "/v1/admin/policy",
        json={"policy": {"retention": {"default_days": -1}}},
        headers=local.as_role("admin"),
    )
    assert resp.status_code == 422 and resp.json()["error"] == "invalid_policy", resp.text


def test_periodic_job_uses_the_given_clock(local: Local) -> None:
    a = local.enroll("a")
    _set_policy(local, {"retention": {"default_days": 1}})
    sid = session(local, a)
    clock = Clock(T0 + timedelta(hours=23))
    job = retention.Periodic(local.storage, 0.05, clock)
    assert job.once() == [] and _exists(local, sid)
    clock.advance(hours=2)
    job.start()
    deadline = time.monotonic() + 20
    while _exists(local, sid) and time.monotonic() < deadline:
        time.sleep(0.05)
    job.stop()
    assert not _exists(local, sid)
    assert job.runs >= 2


def test_cli_run_dry_run_and_serve_task(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cli_ok("init", "--data", str(data))
    loc = local_collector(data)
    try:
        a = loc.enroll("a")
        _set_policy(loc, {"retention": {"default_days": 1}})
        # `serve` judges ages by the real clock, so this session is dated from it: an hour
        # old today, whatever today is. The CLI runs below judge at three days later.
        now = datetime.now(UTC).replace(microsecond=0)
        sid = session(loc, a, start=_rfc3339(now - 2 * HOUR), finish=_rfc3339(now - HOUR))
        ancient = session(loc, a, start="2020-01-01T00:00:00Z", finish="2020-01-01T01:00:00Z")
    finally:
        loc.client.close()
        loc.storage.close()
    args = ("retention", "run", "--data", str(data), "--now", _rfc3339(now + 3 * DAY))
    out = cli_ok(*args, "--dry-run").splitlines()
    assert sorted(line.split()[:2][1] for line in out) == sorted([sid, ancient])
    assert all(line.startswith("would-delete ") for line in out)
    again = cli_ok(*args, "--dry-run")  # still there: the dry run deleted nothing
    assert sid in again and ancient in again
    bad = cli("retention", "run", "--data", str(data), "--now", "yesterday")
    assert bad.returncode == 2 and b"--now" in bad.stderr
    # The periodic task in `serve` runs with the real clock: only the 2020 session is old.
    admin = cli_ok("token", "create", "--data", str(data), "--role", "admin").splitlines()[-1]
    server = start_server(data, "--retention-interval", "0.2")
    try:
        client = server.client(admin)
        deadline = time.monotonic() + 30
        events: list[dict[str, Any]] = []
        while not events and time.monotonic() < deadline:
            got = client.get(server.url + "/v1/admin/audit-events", params={"limit": 1000})
            events = [e for e in got.json() if e["action"] == "retention_delete"]
            time.sleep(0.1)
        assert [e["subject"] for e in events] == [ancient]
    finally:
        server.stop()
    out = cli_ok(*args).splitlines()
    assert out == [line for line in out if line.startswith(f"deleted {sid} ")] and len(out) == 1


# --- immutability: every route, every role, every method


def _tokens(local: Local, host: Host, other: Host) -> dict[str, str | None]:
    return {
        "none": None,
        "auditor": local.token("auditor"),
        "admin": local.token("admin"),
        "host": host.credential,
        "other_host": other.credential,
        "agent": local.token("agent"),
    }


def _attempts(path: str, sid: str, f: Any, length: int) -> list[dict[str, Any]]:
    """Request variants for a path: altered bodies for the session and recording routes."""
    if path == "/v1/sessions/{session_id}":
        changed = record(sid, user_email="mallory@example.com", recording_status="truncated")
        return [{"json": changed}, {"json": record(sid, recording_status="recording")}, {}]
    if path == "/v1/sessions/{session_id}/recording":
        tampered = bytearray(f.data)
        tampered[len(f.prefix) + 8] ^= 0xFF
        bodies = [bytes(tampered[: len(f.prefix)]), bytes(tampered), f.frames[0], f.data]
        offsets = [None, 0, len(f.prefix), length, length - 1]
        return [
            {"content": b, "params": {} if o is None else {"offset": o}}
            for b in bodies
            for o in offsets
        ]
    return [{"json": {}}]


def test_no_api_call_of_any_role_deletes_or_rewrites_a_recording(local: Local) -> None:
    host, other = local.enroll("a"), local.enroll("b")
    sid = new_session_id()
    f = make_sealed(host, sid, cast_pieces(4))
    h = {**local.auth(host.credential), "Content-Type": "application/octet-stream"}
    url = f"/v1/sessions/{sid}/recording"
    local.client.put(url, content=f.prefix, headers=h)
    local.client.post(url, params={"offset": len(f.prefix)}, content=f.body, headers=h)
    final = record(sid, recording_status="complete", session_finish=FINISH)
    resp = local.client.put(f"/v1/sessions/{sid}", json=final, headers=local.auth(host.credential))
    assert resp.status_code == 200, resp.text
    st = local.storage
    before = (st.get_session(sid), st.get_recording(sid))
    assert before[1] is not None and before[1].length == len(f.data)
    ids = {"session_id": sid, "token_id": "0123456789abcdef", "hold_id": "0123456789abcdef"}
    spec = local.client.get("/openapi.json").json()
    sent = 0
    for template in spec["paths"]:
        path = template
        for name in ("kid", "key_id"):
            path = path.replace("{" + name + "}", "x")
        for name, value in ids.items():
            path = path.replace("{" + name + "}", value)
        assert "{" not in path, template
        for role, token in _tokens(local, host, other).items():
            headers = {} if token is None else local.auth(token)
            for method in ("GET", "PUT", "POST", "DELETE", "PATCH"):
                for extra in _attempts(template, sid, f, len(f.data)):
                    resp = local.client.request(method, path, headers=headers, **extra)
                    assert resp.status_code < 500, (method, path, role, resp.text)
                    sent += 1
    assert sent > 300
    assert (st.get_session(sid), st.get_recording(sid)) == before
    assert b"".join(st.read_recording(sid, 0, len(f.data))) == f.data
    got = local.client.get(url, headers=local.as_role("auditor"))
    assert got.status_code == 200 and got.content == f.data
    assert _retention_events(local) == []
