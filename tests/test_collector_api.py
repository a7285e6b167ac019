"""The collector's API in process (FastAPI TestClient, a clock the test moves): roles and
tokens, enrollment, ingest rules, uploads, queries, downloads, admin routes, error shapes.
The same routes run through a real uvicorn with TLS in test_collector_server.py."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from collector_helpers import (
    AUDITOR,
    Host,
    Local,
    auth_event,
    cast_pieces,
    local_collector,
    make_sealed,
    new_session_id,
    record,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sshaudit.collector.deps import Settings
from sshaudit.collector.metrics import Metrics
from sshaudit.sealed import Completeness, SealedReader, SignatureStatus


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Local]:
    loc = local_collector(tmp_path)
    yield loc
    loc.client.close()
    loc.storage.close()


def err(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    doc: dict[str, Any] = resp.json()
    assert set(doc) >= {"error", "detail"}, doc
    if code is not None:
        assert doc["error"] == code, doc
    return doc


def host_headers(local: Local, host: Host) -> dict[str, str]:
    return local.auth(host.credential)


# --- tokens and roles


def test_missing_malformed_unknown_tokens(local: Local) -> None:
    c = local.client
    doc = err(c.get("/v1/sessions"), 401, "missing_token")
    assert "token" in doc["detail"]
    resp = c.get("/v1/sessions", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    err(resp, 401, "missing_token")
    assert resp.headers["www-authenticate"] == "Bearer"
    err(c.get("/v1/sessions", headers=local.auth("hello")), 401, "invalid_token")
    fake = "sa_auditor_" + "A" * 43
    err(c.get("/v1/sessions", headers=local.auth(fake)), 401, "invalid_token")


def test_expired_and_revoked_tokens(local: Local) -> None:
    headers = local.as_role("auditor")
    assert local.client.get("/v1/sessions", headers=headers).status_code == 200
    local.clock.advance(days=2)  # helpers make tokens for one day
    err(local.client.get("/v1/sessions", headers=headers), 401, "token_expired")
    local.tokens.clear()
    headers = local.as_role("auditor")
    (tok,) = [
        t
        for t in local.client.get("/v1/admin/tokens", headers=local.as_role("admin")).json()
        if t["role"] == "auditor" and t["state"] == "active"
    ]
    resp = local.client.post(
        f"/v1/admin/tokens/{tok['token_id']}/revoke", headers=local.as_role("admin")
    )
    assert resp.json()["state"] == "revoked"
    err(local.client.get("/v1/sessions", headers=headers), 401, "token_revoked")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v1/sessions", {"auditor"}),
        ("GET", "/v1/auth-events", {"auditor"}),
        ("GET", "/v1/admin/tokens", {"admin"}),
        ("GET", "/v1/admin/policy", {"admin"}),
        ("GET", "/v1/host/config", {"host"}),
        ("POST", "/v1/enroll", {"agent"}),
    ],
)
def test_wrong_role_is_403(local: Local, method: str, path: str, allowed: set[str]) -> None:
    host = local.enroll()
    creds = {
        "auditor": local.token("auditor"),
        "admin": local.token("admin"),
        "host": host.credential,
        "agent": local.token("agent"),
    }
    for role, token in creds.items():
        resp = local.client.request(method, path, headers=local.auth(token), json={})
        if role in allowed:
            assert resp.status_code != 403, (role, resp.text)
        else:
            err(resp, 403, "wrong_role")


# --- enrollment


def test_enrollment_hands_out_keys_ca_policy_once(local: Local) -> None:
    admin = local.as_role("admin")
    pub = base64.b64encode(AUDITOR.public.raw).decode()
    assert local.client.post(
        "/v1/admin/auditor-keys", json={"public_key": pub, "comment": "team"}, headers=admin
    ).is_success
    ca = Ed25519PrivateKey.generate().public_key()
    line = _ssh_line(ca)
    assert local.client.post("/v1/admin/ca-keys", json={"line": line}, headers=admin).is_success
    resp = local.client.put(
        "/v1/admin/policy", json={"policy": {"record_input": False}}, headers=admin
    )
    assert resp.json()["version"] == 1
    key = Ed25519PrivateKey.generate()
    body = {
        "hostname": "db-1",
        "host_public_key": base64.b64encode(key.public_key().public_bytes_raw()).decode(),
    }
    token = local.token("agent")
    resp = local.client.post("/v1/enroll", json=body, headers=local.auth(token))
    doc = resp.json()
    assert resp.status_code == 200, doc
    assert doc["credential"].startswith("sa_host_")
    assert doc["auditor_keys"][0]["kid"] == AUDITOR.public.kid
    assert doc["ca_keys"] == [line]
    assert doc["policy"] == {"record_input": False} and doc["policy_version"] == 1
    err(local.client.post("/v1/enroll", json=body, headers=local.auth(token)), 401, "token_used")
    config = local.client.get("/v1/host/config", headers=local.auth(doc["credential"])).json()
    assert config["host_id"] == doc["host_id"] and config["ca_keys"] == [line]


def _ssh_line(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return raw.decode() + " ca@example.com"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"hostname": "db-1", "host_public_key": "AAAA"}, 422, "invalid_host_key"),
        ({"hostname": "db-1", "host_public_key": "!" * 44}, 422, "invalid_host_key"),
        ({"hostname": "-bad", "host_public_key": "A" * 43 + "="}, 422, "invalid_request"),
        ({"hostname": "db-1"}, 422, "invalid_request"),
        ({"hostname": "db-1", "host_public_key": "A" * 43 + "=", "x": 1}, 422, "invalid_request"),
    ],
)
def test_enrollment_refuses_bad_input(
    local: Local, body: dict[str, Any], status: int, code: str
) -> None:
    token = local.token("agent")
    err(local.client.post("/v1/enroll", json=body, headers=local.auth(token)), status, code)
    # nothing was used up: the token still enrolls
    key = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    good = {"hostname": "db-1", "host_public_key": base64.b64encode(key).decode()}
    assert local.client.post("/v1/enroll", json=good, headers=local.auth(token)).is_success


# --- session records and events


def test_session_records_through_the_api(local: Local) -> None:
    a, b = local.enroll("a"), local.enroll("b")
    sid = new_session_id()
    put = local.client.put
    resp = put(f"/v1/sessions/{sid}", json=record(sid), headers=host_headers(local, a))
    assert resp.json() == {"session_id": sid, "outcome": "created"}
    resp = put(f"/v1/sessions/{sid}", json=record(sid), headers=host_headers(local, a))
    assert resp.json()["outcome"] == "unchanged"
    err(put(f"/v1/sessions/{sid}", json=record(sid), headers=host_headers(local, b)), 403)
    other = new_session_id()
    err(
        put(f"/v1/sessions/{other}", json=record(sid), headers=host_headers(local, a)),
        422,
        "session_id_mismatch",
    )
    err(
        put(
            f"/v1/sessions/{other}",
            json=record(other, target_id=b.host_id),
            headers=host_headers(local, a),
        ),
        403,
        "foreign_session",
    )
    final = record(sid, recording_status="complete", exit_status=0)
    assert put(f"/v1/sessions/{sid}", json=final, headers=host_headers(local, a)).is_success
    err(
        put(
            f"/v1/sessions/{sid}", json={**final, "exit_status": 1}, headers=host_headers(local, a)
        ),
        409,
        "record_immutable",
    )
    shown = local.client.get(f"/v1/sessions/{sid}", headers=local.as_role("auditor")).json()
    assert shown["target_id"] == a.host_id and shown["exit_status"] == 0
    assert shown["hostname"] == "a" and shown["recording"] is None


@pytest.mark.parametrize(
    "change",
    [
        {"session_start": "yesterday"},
        {"session_start": "2026-13-01T00:00:00Z"},
        {"client_port": 70000},
        {"client_port": "22"},
        {"client_address": "not-an-ip"},
        {"unix_user": "a\x00b"},
        {"bytes_in": -1},
        {"bytes_in": 1 << 64},
        {"cert_serial": 1 << 64},
        {"recording_status": "deleted"},
        {"program_type": "tunnel"},
        {"surprise": 1},
        {"details": {"a": "x" * 70000}},
        {"command": "x" * 70000},
    ],
)
def test_session_record_validation(local: Local, change: dict[str, Any]) -> None:
    host = local.enroll()
    sid = new_session_id()
    resp = local.client.put(
        f"/v1/sessions/{sid}", json=record(sid, **change), headers=host_headers(local, host)
    )
    doc = err(resp, 422, "invalid_request")
    assert all(set(e) == {"loc", "msg", "type"} for e in doc["detail"])  # input not echoed


def test_odd_bodies_are_4xx_never_500(local: Local) -> None:
    host = local.enroll()
    sid = new_session_id()
    h = {**host_headers(local, host), "Content-Type": "application/json"}
    url = f"/v1/sessions/{sid}"
    for body in (
        b"",
        b"{",
        b"\xff\xfe",
        b"[]",
        b"null",
        b'{"details": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"session_id": 1e999}',
    ):
        resp = local.client.put(url, content=body, headers=h)
        assert 400 <= resp.status_code < 500, (body[:20], resp.status_code, resp.text)
        assert "error" in resp.json()


def test_json_needs_json_and_finite_numbers(local: Local) -> None:
    host = local.enroll()
    sid = new_session_id()
    url = f"/v1/sessions/{sid}"
    body = json.dumps(record(sid)).encode()
    h = host_headers(local, host)
    err(local.client.put(url, content=body, headers=h), 415, "unsupported_media_type")
    h = {**h, "Content-Type": "application/json"}
    nan = body[:-1] + b', "details": {"x": NaN}}'
    err(local.client.put(url, content=nan, headers=h), 422, "invalid_request")
    deep = body[:-1] + b', "details": {"x": ' + b"[" * 40 + b"]" * 40 + b"}}"
    err(local.client.put(url, content=deep, headers=h), 422, "invalid_request")
    ok = body[:-1] + b', "details": {"x": [1.5, {"y": null}]}}'
    assert local.client.put(url, content=ok, headers=h).status_code == 200
    shown = local.client.get(url, headers=local.as_role("auditor")).json()
    assert shown["details"] == {"x": [1.5, {"y": None}]}
    admin = {**local.as_role("admin"), "Content-Type": "application/json"}
    inf = b'{"policy": {"a": 1e400}}'
    err(local.client.put("/v1/admin/policy", content=inf, headers=admin), 422)


def test_auth_events_through_the_api(local: Local) -> None:
    a, b = local.enroll("a"), local.enroll("b")
    post = local.client.post
    events = [auth_event("ev-1"), auth_event("ev-2", allowed=False, reason="no principal")]
    resp = post("/v1/auth-events", json={"events": events}, headers=host_headers(local, a))
    assert resp.json() == {"added": 2, "duplicates": 0}
    resp = post("/v1/auth-events", json={"events": events}, headers=host_headers(local, a))
    assert resp.json() == {"added": 0, "duplicates": 2}
    changed = [auth_event("ev-1", reason="edited")]
    err(post("/v1/auth-events", json={"events": changed}, headers=host_headers(local, a)), 409)
    foreign = [auth_event("ev-3", target_id=a.host_id)]
    err(
        post("/v1/auth-events", json={"events": foreign}, headers=host_headers(local, b)),
        403,
        "foreign_event",
    )
    many = [auth_event(f"m{i}") for i in range(1001)]
    err(post("/v1/auth-events", json={"events": many}, headers=host_headers(local, a)), 422)
    err(post("/v1/auth-events", json={"events": []}, headers=host_headers(local, a)), 422)
    auditor = local.as_role("auditor")
    denied = local.client.get("/v1/auth-events?allowed=false", headers=auditor).json()
    assert [e["event_id"] for e in denied["items"]] == ["ev-2"]
    assert denied["items"][0]["target_id"] == a.host_id


# --- uploads


def upload(local: Local, host: Host, sid: str, body: bytes, offset: int | None = None) -> Any:
    url = f"/v1/sessions/{sid}/recording"
    h = {**host_headers(local, host), "Content-Type": "application/octet-stream"}
    if offset is None:
        return local.client.put(url, content=body, headers=h)
    return local.client.post(url, params={"offset": offset}, content=body, headers=h)


def test_upload_protocol_rules(local: Local) -> None:
    host, other = local.enroll("a"), local.enroll("b")
    sid = new_session_id()
    f = make_sealed(host, sid, cast_pieces(6))
    n = len(f.prefix)
    err(upload(local, host, sid, f.frames[0], n), 409, "not_started")
    assert upload(local, host, sid, f.prefix).json() == {
        "length": n,
        "frames": 0,
        "state": "open",
        "durable": True,
    }
    assert upload(local, host, sid, f.prefix).status_code == 200  # idempotent
    err(upload(local, other, sid, f.prefix), 403, "foreign_session")
    err(upload(local, other, sid, f.frames[0], n), 403, "foreign_session")
    f2 = make_sealed(host, sid, cast_pieces(2))  # same session, another header (new DEK)
    err(upload(local, host, sid, f2.prefix), 409, "prefix_mismatch")
    one = upload(local, host, sid, f.frames[0], n).json()
    assert (one["length"], one["frames"]) == (n + len(f.frames[0]), 1)
    skip = upload(local, host, sid, f.frames[2], one["length"] + len(f.frames[1]))
    assert err(skip, 409, "offset_mismatch")["length"] == one["length"]  # resume from here
    assert upload(local, host, sid, f.frames[0], n).json() == one  # replay: nothing changes
    err(upload(local, host, sid, f.frames[1], n), 409, "replay_mismatch")
    err(upload(local, host, sid, f.frames[0] + f.frames[1], n), 409, "offset_mismatch")
    err(upload(local, host, sid, f.frames[1], 3), 400, "bad_offset")
    err(upload(local, host, sid, f.frames[1][:-1], one["length"]), 400, "malformed_chunk")
    rest = b"".join(f.frames[1:]) + (f.trailer or b"")
    done = upload(local, host, sid, rest, one["length"]).json()
    assert done["state"] == "sealed_verified" and done["length"] == len(f.data)
    assert upload(local, host, sid, rest, one["length"]).json() == done  # replay
    err(upload(local, host, sid, f.frames[0], done["length"]), 409, "recording_sealed")
    status = local.client.get(
        f"/v1/sessions/{sid}/recording/status", headers=host_headers(local, host)
    )
    assert status.json() == done


def test_tampered_or_reordered_trailer_is_422_and_changes_nothing(local: Local) -> None:
    host = local.enroll()
    sid = new_session_id()
    f = make_sealed(host, sid, cast_pieces(6))
    n = len(f.prefix)
    upload(local, host, sid, f.prefix)
    assert f.trailer is not None
    doc = json.loads(f.trailer[8:])
    sig = bytearray(base64.b64decode(doc["sig"]))
    sig[5] ^= 1
    bad = json.dumps({"alg": "Ed25519", "sig": base64.b64encode(bytes(sig)).decode()}).encode()
    tampered = f.trailer[:4] + len(bad).to_bytes(4, "big") + bad
    err(upload(local, host, sid, b"".join(f.frames) + tampered, n), 422, "signature_invalid")
    swapped = f.frames[0] + f.frames[2] + f.frames[1] + b"".join(f.frames[3:]) + f.trailer
    err(upload(local, host, sid, swapped, n), 422, "signature_invalid")
    forged = make_sealed(host, sid, cast_pieces(6), signing=Ed25519PrivateKey.generate())
    err(upload(local, host, sid, b"".join(f.frames) + (forged.trailer or b""), n), 422)
    st = local.client.get(f"/v1/sessions/{sid}/recording/status", headers=host_headers(local, host))
    assert st.json() == {"length": n, "frames": 0, "state": "open", "durable": True}
    assert upload(local, host, sid, f.body, n).json()["state"] == "sealed_verified"
    actions = [
        e["action"]
        for e in local.client.get("/v1/admin/audit-events", headers=local.as_role("admin")).json()
    ]
    assert actions.count("recording_signature_invalid") == 3
    assert actions.count("recording_verified") == 1


def test_header_must_match_host_session_and_key(local: Local) -> None:
    host = local.enroll()
    sid = new_session_id()
    wrong_host = make_sealed(host, sid, cast_pieces(), host_id="someone-else")
    err(upload(local, host, sid, wrong_host.prefix), 403, "foreign_session")
    other = new_session_id()
    err(upload(local, host, other, make_sealed(host, sid, []).prefix), 422, "session_id_mismatch")
    wrong_key = make_sealed(host, sid, cast_pieces(), signing=Ed25519PrivateKey.generate())
    err(upload(local, host, sid, wrong_key.prefix), 422, "host_key_mismatch")
    err(upload(local, host, sid, b"GARBAGE"), 400, "malformed_prefix")
    assert (
        local.client.get(
            f"/v1/sessions/{sid}/recording/status", headers=host_headers(local, host)
        ).status_code
        == 404
    )


def test_chunk_limit(tmp_path: Path) -> None:
    loc = local_collector(tmp_path, Settings(max_chunk=(1 << 20) + 200_000))
    host = loc.enroll()
    sid = new_session_id()
    f = make_sealed(host, sid, [b"x" * 300_000] * 5)
    assert len(f.body) > (1 << 20) + 200_000
    upload(loc, host, sid, f.prefix)
    err(upload(loc, host, sid, f.body, len(f.prefix)), 413, "body_too_large")
    assert upload(loc, host, sid, f.frames[0], len(f.prefix)).status_code == 200
    loc.storage.close()


# --- queries and downloads


def _uploaded(local: Local, host: Host, n: int = 6) -> tuple[str, bytes]:
    sid = new_session_id()
    f = make_sealed(host, sid, cast_pieces(n))
    upload(local, host, sid, f.prefix)
    upload(local, host, sid, f.body, len(f.prefix))
    return sid, f.data


def test_download_is_the_file_with_ranges_and_etag(local: Local) -> None:
    host = local.enroll()
    sid, data = _uploaded(local, host)
    auditor = local.as_role("auditor")
    url = f"/v1/sessions/{sid}/recording"
    resp = local.client.get(url, headers=auditor)
    assert resp.status_code == 200 and resp.content == data
    assert resp.headers["content-length"] == str(len(data))
    assert resp.headers["accept-ranges"] == "bytes"
    assert resp.headers["x-sshaudit-recording-state"] == "sealed_verified"
    etag = resp.headers["etag"]
    reader = SealedReader([AUDITOR])
    plain = reader.feed(resp.content)
    result = reader.finish()
    assert plain == b"".join(cast_pieces(6)) + b"bye\r\n"
    assert result.completeness is Completeness.COMPLETE
    assert result.signature is SignatureStatus.VALID
    for rng, span in [
        ("bytes=0-9", (0, 10)),
        ("bytes=10-", (10, len(data))),
        ("bytes=-5", (len(data) - 5, len(data))),
        (f"bytes=5-{len(data) + 100}", (5, len(data))),
    ]:
        part = local.client.get(url, headers={**auditor, "Range": rng})
        assert part.status_code == 206, rng
        assert part.content == data[span[0] : span[1]]
        assert part.headers["content-range"] == f"bytes {span[0]}-{span[1] - 1}/{len(data)}"
    for rng in (f"bytes={len(data)}-", "bytes=9-3", "bytes=-0", "items=0-1", "bytes=x-y"):
        resp = local.client.get(url, headers={**auditor, "Range": rng})
        err(resp, 416, "range_not_satisfiable")
        assert resp.headers["content-range"] == f"bytes */{len(data)}"
    multi = local.client.get(url, headers={**auditor, "Range": "bytes=0-1,5-6"})
    assert multi.status_code == 200 and multi.content == data
    assert local.client.get(url, headers={**auditor, "If-None-Match": etag}).status_code == 304
    stale = local.client.get(url, headers={**auditor, "Range": "bytes=0-1", "If-Range": '"x"'})
    assert stale.status_code == 200 and stale.content == data
    err(local.client.get(f"/v1/sessions/{new_session_id()}/recording", headers=auditor), 404)
    err(local.client.get(url, headers=host_headers(local, host)), 403, "wrong_role")


def test_etag_follows_the_length_of_an_open_recording(local: Local) -> None:
    host = local.enroll()
    sid = new_session_id()
    f = make_sealed(host, sid, cast_pieces(), close=False)
    upload(local, host, sid, f.prefix)
    url = f"/v1/sessions/{sid}/recording"
    first = local.client.get(url, headers=local.as_role("auditor"))
    assert first.content == f.prefix and first.headers["x-sshaudit-recording-state"] == "open"
    upload(local, host, sid, f.frames[0], len(f.prefix))
    second = local.client.get(url, headers=local.as_role("auditor"))
    assert second.headers["etag"] != first.headers["etag"]
    assert second.content == f.prefix + f.frames[0]


def test_listing_filters_pages_and_bad_parameters(local: Local) -> None:
    a, b = local.enroll("a"), local.enroll("b")
    ids = []
    for i in range(7):
        sid = new_session_id()
        ids.append(sid)
        doc = record(sid, session_start=f"2026-11-0{i + 1}T00:00:00Z", unix_user=f"u{i % 2}")
        local.client.put(
            f"/v1/sessions/{sid}", json=doc, headers=host_headers(local, a if i < 4 else b)
        )
    auditor = local.as_role("auditor")
    got, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = local.client.get("/v1/sessions", params=params, headers=auditor).json()
        got += [s["session_id"] for s in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert got == ids[::-1]
    q: dict[str, Any] = {"target_id": b.host_id, "unix_user": "u0"}
    only = local.client.get("/v1/sessions", params=q, headers=auditor).json()["items"]
    assert [s["session_id"] for s in only] == [ids[6], ids[4]]
    q = {"since": "2026-11-02T00:00:00Z", "until": "2026-11-04T00:00:00Z"}
    window = local.client.get("/v1/sessions", params=q, headers=auditor).json()["items"]
    assert [s["session_id"] for s in window] == [ids[2], ids[1]]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"cursor": "!!!"}, "invalid_cursor"),
        ({"cursor": base64.urlsafe_b64encode(b'[1, "../x"]').decode()}, "invalid_cursor"),
        ({"since": "last week"}, "invalid_time"),
        ({"limit": 0}, "invalid_request"),
        ({"limit": 1001}, "invalid_request"),
        ({"program_type": "tunnel"}, "invalid_request"),
    ]
    for bad, code in cases:
        resp = local.client.get("/v1/sessions", params=bad, headers=auditor)
        assert resp.status_code in (400, 422)
        assert resp.json()["error"] == code
    err(local.client.get("/v1/sessions/not-a-uuid", headers=auditor), 422, "invalid_request")
    err(local.client.get(f"/v1/sessions/{new_session_id()}", headers=auditor), 404)


# --- admin


def test_admin_routes_and_audit_log(local: Local) -> None:
    admin = local.as_role("admin")
    c = local.client
    made = c.post("/v1/admin/tokens", json={"role": "auditor", "ttl": "2h"}, headers=admin).json()
    assert made["token"].startswith("sa_auditor_")
    assert c.get("/v1/sessions", headers=local.auth(made["token"])).status_code == 200
    err(c.post("/v1/admin/tokens", json={"role": "host"}, headers=admin), 422)
    err(c.post("/v1/admin/tokens", json={"role": "agent", "ttl": "99y"}, headers=admin), 422)
    listed = c.get("/v1/admin/tokens", headers=admin).json()
    assert made["token_id"] in [t["token_id"] for t in listed]
    assert all("token" not in t and "digest" not in t for t in listed)
    err(c.post("/v1/admin/tokens/0123456789abcdef/revoke", headers=admin), 404, "unknown_token")
    err(c.post("/v1/admin/auditor-keys", json={"public_key": "AAAA"}, headers=admin), 422)
    pub = base64.b64encode(AUDITOR.public.raw).decode()
    key = c.post("/v1/admin/auditor-keys", json={"public_key": pub}, headers=admin).json()
    assert c.get("/v1/admin/auditor-keys", headers=admin).json() == [key]
    assert c.delete(f"/v1/admin/auditor-keys/{key['kid']}", headers=admin).status_code == 204
    err(c.delete(f"/v1/admin/auditor-keys/{key['kid']}", headers=admin), 404)
    for line in ("ssh-ed25519 AAAA", "ssh-dss AAAAB3Nz", "cert-authority ssh-ed25519 AAAA", ""):
        err(c.post("/v1/admin/ca-keys", json={"line": line}, headers=admin), 422, "invalid_key")
    ca = c.post(
        "/v1/admin/ca-keys",
        json={"line": _ssh_line(Ed25519PrivateKey.generate().public_key())},
        headers=admin,
    ).json()
    assert ca["fingerprint"].startswith("SHA256:")
    assert c.delete(f"/v1/admin/ca-keys/{ca['key_id']}", headers=admin).status_code == 204
    hold = c.post(
        "/v1/admin/holds", json={"kind": "user", "value": "jdoe@example.com"}, headers=admin
    ).json()
    assert c.get("/v1/admin/holds", headers=admin).json() == [hold]
    err(c.post("/v1/admin/holds", json={"kind": "session", "value": "x"}, headers=admin), 422)
    assert c.delete(f"/v1/admin/holds/{hold['hold_id']}", headers=admin).status_code == 204
    host = local.enroll()
    assert c.put(
        "/v1/host/backlog", json={"sessions": 3, "bytes": 4096}, headers=local.auth(host.credential)
    ).is_success
    (h,) = c.get("/v1/admin/hosts", headers=admin).json()
    assert (h["host_id"], h["backlog_bytes"], h["backlog_sessions"]) == (host.host_id, 4096, 3)
    actions = [e["action"] for e in c.get("/v1/admin/audit-events", headers=admin).json()]
    for want in (
        "token_created",
        "auditor_key_added",
        "auditor_key_removed",
        "ca_key_added",
        "ca_key_removed",
        "hold_added",
        "hold_removed",
        "host_enrolled",
    ):
        assert want in actions
    later = c.get("/v1/admin/audit-events", params={"after": 3}, headers=admin).json()
    assert later[0]["event_id"] == 4


def test_metrics_count_uploads_and_show_backlog(local: Local) -> None:
    host = local.enroll()
    _uploaded(local, host)
    local.client.put(
        "/v1/host/backlog", json={"sessions": 2, "bytes": 77}, headers=local.auth(host.credential)
    )
    local.client.get("/v1/sessions")  # a 401
    text = local.client.get("/metrics").text
    assert 'sshaudit_collector_uploads_total{kind="chunk"} 1' in text
    assert 'sshaudit_collector_uploads_total{kind="prefix"} 1' in text
    assert "sshaudit_collector_recordings_verified_total 1" in text
    assert (
        f'sshaudit_collector_host_backlog_bytes{{host_id="{host.host_id}",hostname="web-1"}} 77'
        in text
    )
    assert 'sshaudit_collector_errors_total{code="missing_token",status="401"} 1' in text


def test_metric_labels_are_escaped() -> None:
    from datetime import UTC, datetime

    from sshaudit.collector.storage import Host as StoredHost

    m = Metrics()
    m.inc("sshaudit_collector_errors_total", status="400", code='x"} 1\nevil 2')
    text = m.render([StoredHost("h", 'a"b\\c\nd', b"", datetime.now(UTC), "t")])
    assert "\nevil" not in text
    assert 'code="x\\"} 1\\nevil 2"' in text
    assert 'hostname="a\\"b\\\\c\\nd"' in text
    with pytest.raises(ValueError):
        m.inc("no_such_metric")


def test_openapi_has_no_route_that_deletes_or_rewrites_data(local: Local) -> None:
    spec = local.client.get("/openapi.json").json()
    for path, ops in spec["paths"].items():
        if path.startswith(("/v1/sessions", "/v1/auth-events")):
            assert not {"delete", "patch"} & set(ops), path
    recording = spec["paths"]["/v1/sessions/{session_id}/recording"]
    assert set(recording) == {"get", "put", "post"}  # PUT: the prefix, idempotent only


def test_healthz(local: Local) -> None:
    assert local.client.get("/healthz").json() == {"status": "ok"}
    err(local.client.get("/nope"), 404, "not_found")
    err(local.client.post("/healthz"), 405, "method_not_allowed")
