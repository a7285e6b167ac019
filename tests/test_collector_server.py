"""The collector as deployed: ``sshaudit-collector serve`` (a real uvicorn) on loopback with
TLS and its self-signed certificate, reached with the pinned client the agent uses
(collector/pinning.py). Every route of the app is exercised here at least once; the rest
are the hostile cases: wrong pins, tokens and roles, another host's session, path
traversal, 2 GB and endless bodies, reordered and replayed chunks, a tampered trailer."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from collector_helpers import (
    AUDITOR,
    Host,
    Server,
    auth_event,
    cast_pieces,
    cli_ok,
    make_sealed,
    new_session_id,
    record,
    start_server,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sshaudit.collector import upload
from sshaudit.collector.openapi import openapi_document
from sshaudit.sealed import Completeness, SealedReader, SignatureStatus

pytestmark = pytest.mark.slow


class World:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.admin = self.token("admin")
        self.auditor = self.token("auditor")

    def token(self, role: str) -> str:
        out = cli_ok("token", "create", "--data", str(self.server.data), "--role", role)
        return out.strip().splitlines()[-1]

    def url(self, path: str) -> str:
        return self.server.url + path

    def client(self, token: str | None = None) -> requests.Session:
        return self.server.client(token)

    def enroll(self, hostname: str = "web-1") -> Host:
        key = Ed25519PrivateKey.generate()
        pub = base64.b64encode(key.public_key().public_bytes_raw()).decode()
        resp = self.client(self.token("agent")).post(
            self.url("/v1/enroll"), json={"hostname": hostname, "host_public_key": pub}
        )
        assert resp.status_code == 200, resp.text
        return Host(resp.json()["host_id"], resp.json()["credential"], key, hostname)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    data = tmp_path_factory.mktemp("collector") / "data"
    cli_ok("init", "--data", str(data))
    server = start_server(data)
    try:
        yield World(server)
    finally:
        server.stop()


def test_init_fingerprint_is_the_served_certificate(world: World) -> None:
    pem = (world.server.data / "tls" / "cert.pem").read_bytes()
    der = ssl.PEM_cert_to_DER_cert(pem.decode())
    assert world.server.fingerprint == "SHA256:" + hashlib.sha256(der).hexdigest()
    with _tls(world) as tls:
        assert tls.getpeercert(binary_form=True) == der


def test_wrong_pin_fails_before_any_request_is_sent(world: World) -> None:
    before = _requests_seen(world)
    wrong = "SHA256:" + "00" * 32
    token = world.auditor
    session = Server(world.server.url, wrong, world.server.data, world.server.proc, []).client(
        token
    )
    with pytest.raises(requests.exceptions.SSLError, match=r"[Ff]ingerprint"):
        session.get(world.url("/v1/sessions"))
    time.sleep(0.3)
    assert _requests_seen(world) == before  # the token never reached the server
    plain = world.client(token)
    with pytest.raises(requests.exceptions.InvalidSchema):
        plain.get(world.url("/healthz").replace("https://", "http://"))
    unpinned = requests.Session()
    with pytest.raises(requests.exceptions.SSLError):  # a CA-checking client refuses it
        unpinned.get(world.url("/healthz"))


def _requests_seen(world: World) -> int:
    return sum(1 for line in world.server.log if '"GET /v1/sessions' in line)


# --- every route, through the real server


def _route_key(method: str, path: str, templates: list[tuple[str, re.Pattern[str]]]) -> str:
    for template, rx in templates:
        if rx.fullmatch(path):
            return f"{method} {template}"
    return f"{method} {path}"


def test_every_route_through_real_uvicorn(world: World) -> None:
    spec = openapi_document()
    routes = {f"{m.upper()} {p}" for p, ops in spec["paths"].items() for m in ops}
    templates = [(p, re.compile(re.sub(r"\{[^}]+\}", "[^/]+", p))) for p in spec["paths"]]
    hits: set[str] = set()

    def hook(resp: requests.Response, *args: Any, **kwargs: Any) -> None:
        path = resp.request.path_url.split("?")[0]
        assert resp.request.method is not None
        hits.add(_route_key(resp.request.method, path, templates))
        assert resp.status_code < 500, resp.text

    def client(token: str | None) -> requests.Session:
        s = world.client(token)
        s.hooks["response"].append(hook)
        return s

    _full_scenario(world, client)
    assert routes - hits == set(), "routes not exercised through the server"


def _full_scenario(world: World, client: Any) -> None:
    anon, admin, auditor = client(None), client(world.admin), client(world.auditor)
    url = world.url
    assert anon.get(url("/healthz")).json() == {"status": "ok"}
    assert "sshaudit_collector_uploads_total" in anon.get(url("/metrics")).text
    assert anon.get(url("/openapi.json")).json()["info"]["title"] == "sshaudit collector"
    pub = base64.b64encode(AUDITOR.public.raw).decode()
    kid = admin.post(url("/v1/admin/auditor-keys"), json={"public_key": pub}).json()["kid"]
    assert [k["kid"] for k in admin.get(url("/v1/admin/auditor-keys")).json()] == [kid]
    ca_key = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    blob = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + ca_key
    line = "ssh-ed25519 " + base64.b64encode(blob).decode() + " users-ca"
    ca = admin.post(url("/v1/admin/ca-keys"), json={"line": line}).json()
    assert admin.get(url("/v1/admin/ca-keys")).json()[0]["line"] == line
    assert admin.put(url("/v1/admin/policy"), json={"policy": {"exec_hash": True}}).ok
    assert admin.get(url("/v1/admin/policy")).json()["policy"] == {"exec_hash": True}
    made = admin.post(url("/v1/admin/tokens"), json={"role": "agent", "ttl": "1h"}).json()
    assert made["token_id"] in {t["token_id"] for t in admin.get(url("/v1/admin/tokens")).json()}
    key = Ed25519PrivateKey.generate()
    agent = client(made["token"])
    enrolled = agent.post(
        url("/v1/enroll"),
        json={
            "hostname": "scenario",
            "host_public_key": base64.b64encode(key.public_key().public_bytes_raw()).decode(),
        },
    ).json()
    assert enrolled["ca_keys"] == [line] and enrolled["auditor_keys"][0]["kid"] == kid
    host = Host(enrolled["host_id"], enrolled["credential"], key, "scenario")
    hc = client(host.credential)
    assert hc.get(url("/v1/host/config")).json()["policy"] == {"exec_hash": True}
    assert hc.put(url("/v1/host/backlog"), json={"sessions": 1, "bytes": 10}).ok
    sid = new_session_id()
    f = make_sealed(host, sid, cast_pieces(9))
    rec_url = url(f"/v1/sessions/{sid}/recording")
    assert hc.put(rec_url, data=f.prefix).json()["length"] == len(f.prefix)
    assert hc.post(rec_url, params={"offset": len(f.prefix)}, data=f.body).ok
    assert hc.get(rec_url + "/status").json()["state"] == "sealed_verified"
    final = record(sid, recording_status="complete", session_finish="2026-11-22T09:30:00Z")
    assert hc.put(url(f"/v1/sessions/{sid}"), json=final).json()["outcome"] == "created"
    events = [auth_event(f"scenario-{sid}")]
    assert hc.post(url("/v1/auth-events"), json={"events": events}).json()["added"] == 1
    listed = auditor.get(url("/v1/sessions"), params={"target_id": host.host_id}).json()
    assert [s["session_id"] for s in listed["items"]] == [sid]
    shown = auditor.get(url(f"/v1/sessions/{sid}")).json()
    assert shown["recording"]["state"] == "sealed_verified"
    assert auditor.get(rec_url).content == f.data
    ev = auditor.get(url("/v1/auth-events"), params={"target_id": host.host_id}).json()
    assert ev["items"][0]["event_id"] == f"scenario-{sid}"
    hold = admin.post(url("/v1/admin/holds"), json={"kind": "session", "value": sid}).json()
    assert admin.get(url("/v1/admin/holds")).json()[-1] == hold
    assert admin.delete(url(f"/v1/admin/holds/{hold['hold_id']}")).status_code == 204
    assert host.host_id in {h["host_id"] for h in admin.get(url("/v1/admin/hosts")).json()}
    assert admin.get(url("/v1/admin/audit-events")).json()
    assert admin.delete(url(f"/v1/admin/ca-keys/{ca['key_id']}")).status_code == 204
    assert admin.delete(url(f"/v1/admin/auditor-keys/{kid}")).status_code == 204
    revoked = admin.post(url(f"/v1/admin/tokens/{made['token_id']}/revoke")).json()
    assert revoked["state"] == "revoked" and revoked["used_at"] is not None
    # the built-in user CA (tests/test_collector_user_ca.py): this world has made none
    body = {"role": "user", "email": "jdoe@example.com"}
    user = client(admin.post(url("/v1/admin/tokens"), json=body).json()["token"])
    no_ca = user.post(url("/v1/certificates"), json={"public_key": line})
    assert (no_ca.status_code, no_ca.json()["error"]) == (409, "no_user_ca")


# --- a whole recording, shipped in pieces, resumed, downloaded, decrypted


def test_sealed_file_round_trip_in_chunks_with_resume(world: World) -> None:
    host = world.enroll("ship-1")
    hc = world.client(host.credential)
    sid = new_session_id()
    f = make_sealed(host, sid, [b"x" * 200_000, *cast_pieces(30)])
    rec_url = world.url(f"/v1/sessions/{sid}/recording")
    assert hc.put(rec_url, data=f.prefix).status_code == 200
    offset, body, sent = len(f.prefix), f.body, 0
    while sent < len(body):
        n = upload.plan_chunk(body[sent:], 64 * 1024 if sent else 250_000)
        assert n > 0
        resp = hc.post(rec_url, params={"offset": offset + sent}, data=body[sent : sent + n])
        assert resp.status_code == 200, resp.text
        if sent == 0:  # the agent restarts and re-sends what it already sent
            again = hc.post(rec_url, params={"offset": offset}, data=body[:n])
            assert again.json() == resp.json()
        sent += n
        assert resp.json()["length"] == offset + sent
    assert resp.json()["state"] == "sealed_verified"
    auditor = world.client(world.auditor)
    half = len(f.data) // 2
    first = auditor.get(rec_url, headers={"Range": f"bytes=0-{half - 1}"})
    assert first.status_code == 206
    rest = auditor.get(
        rec_url, headers={"Range": f"bytes={half}-", "If-Range": first.headers["ETag"]}
    )
    assert rest.status_code == 206
    data = first.content + rest.content
    assert data == f.data  # byte-identical to what the host wrote
    reader = SealedReader([AUDITOR])
    plain = reader.feed(data)
    result = reader.finish()
    assert plain == b"x" * 200_000 + b"".join(cast_pieces(30)) + b"bye\r\n"
    assert (result.completeness, result.signature) == (
        Completeness.COMPLETE,
        SignatureStatus.VALID,
    )


def test_reordered_replayed_and_tampered_chunks(world: World) -> None:
    host = world.enroll("chaos-1")
    hc = world.client(host.credential)
    sid = new_session_id()
    f = make_sealed(host, sid, cast_pieces(8))
    rec_url = world.url(f"/v1/sessions/{sid}/recording")
    hc.put(rec_url, data=f.prefix)
    n = len(f.prefix)
    late = hc.post(rec_url, params={"offset": n + len(f.frames[0])}, data=f.frames[1])
    assert late.status_code == 409 and late.json() == {
        "error": "offset_mismatch",
        "detail": late.json()["detail"],
        "length": n,
    }
    assert hc.post(rec_url, params={"offset": n}, data=f.frames[0]).status_code == 200
    replay = hc.post(rec_url, params={"offset": n}, data=f.frames[1])
    assert replay.status_code == 409 and replay.json()["error"] == "replay_mismatch"
    at = n + len(f.frames[0])
    swapped = f.frames[2] + f.frames[1] + b"".join(f.frames[3:]) + (f.trailer or b"")
    bad = hc.post(rec_url, params={"offset": at}, data=swapped)
    assert bad.status_code == 422 and bad.json()["error"] == "signature_invalid"
    assert hc.get(rec_url + "/status").json()["length"] == at  # nothing changed
    good = b"".join(f.frames[1:]) + (f.trailer or b"")
    assert hc.post(rec_url, params={"offset": at}, data=good).json()["state"] == "sealed_verified"


def test_tokens_roles_and_foreign_sessions_over_tls(world: World) -> None:
    a, b = world.enroll("a"), world.enroll("b")
    sid = new_session_id()
    f = make_sealed(a, sid, cast_pieces())
    rec_url = world.url(f"/v1/sessions/{sid}/recording")
    assert world.client(a.credential).put(rec_url, data=f.prefix).status_code == 200
    resp = world.client(b.credential).post(rec_url, params={"offset": len(f.prefix)}, data=f.body)
    assert (resp.status_code, resp.json()["error"]) == (403, "foreign_session")
    resp = world.client(b.credential).put(world.url(f"/v1/sessions/{sid}"), json=record(sid))
    assert (resp.status_code, resp.json()["error"]) == (403, "foreign_session")
    resp = world.client(a.credential).get(world.url("/v1/sessions"))
    assert (resp.status_code, resp.json()["error"]) == (403, "wrong_role")
    resp = world.client(world.auditor).put(rec_url, data=f.prefix)
    assert (resp.status_code, resp.json()["error"]) == (403, "wrong_role")
    resp = world.client("sa_admin_" + "x" * 43).get(world.url("/v1/admin/tokens"))
    assert (resp.status_code, resp.json()["error"]) == (401, "invalid_token")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/sessions/..%2F..%2F..%2Fetc%2Fpasswd/recording",
        "/v1/sessions/%2e%2e/recording",
        "/v1/sessions/..%252F..%252Fetc/recording",
        "/v1/sessions/00000000-0000-4000-8000-000000000000%00/recording",
        "/v1/sessions/00000000-0000-4000-8000-00000000000A/recording",
        "/v1/sessions/../../../../etc/passwd",
    ],
)
def test_path_traversal_in_ids(world: World, path: str) -> None:
    host = world.enroll("trav")
    f = make_sealed(host, new_session_id(), cast_pieces())
    for method, token in (("PUT", host.credential), ("GET", world.auditor)):
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        head += f"Content-Length: {len(f.prefix)}\r\nConnection: close\r\n\r\n"
        status, body = _raw(world, head.encode() + f.prefix)
        assert 400 <= status < 500, (method, path, status, body)
        assert "error" in json.loads(body)
    data = world.server.data
    outside = [p for p in data.rglob("*") if p.is_file() and p.suffix == ".sealed"]
    assert all(p.parent.parent == data / "recordings" for p in outside)


def test_two_gigabyte_content_length_is_refused_unread(world: World) -> None:
    host = world.enroll("big")
    sid = new_session_id()
    for path in (f"/v1/sessions/{sid}/recording?offset=100", f"/v1/sessions/{sid}"):
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {host.credential}\r\n"
            "Content-Type: application/octet-stream\r\nContent-Length: 2147483648\r\n\r\n"
        )
        started = time.monotonic()
        status, body = _raw(world, head.encode() + b"only a few bytes")
        assert status == 413 and json.loads(body)["error"] == "body_too_large"
        assert time.monotonic() - started < 5  # answered without waiting for 2 GB


@pytest.mark.parametrize(("path", "total"), [("recording?offset=100", 9 << 20), ("", 2 << 20)])
def test_endless_chunked_body_is_cut_at_the_limit(world: World, path: str, total: int) -> None:
    host = world.enroll("chunked")
    sid = new_session_id()
    target = f"/v1/sessions/{sid}/{path}".rstrip("/")
    method = "POST" if path else "PUT"
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {host.credential}\r\n"
        "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"%x\r\n%s\r\n" % (64 * 1024, b"z" * 64 * 1024)
    chunks = [head.encode()] + [piece] * (total // (64 * 1024)) + [b"0\r\n\r\n"]
    status, body = _raw(world, b"".join(chunks))
    assert status == 413 and json.loads(body)["error"] == "body_too_large"
    assert world.client().get(world.url("/healthz")).status_code == 200


def test_oversized_chunk_from_the_pinned_client_gets_a_clean_413(world: World) -> None:
    """requests sends a bytes body with its Content-Length; a collector that answered
    before reading it would reset the connection and the agent would see a network
    error, not the 413 that tells it to send smaller chunks."""
    host = world.enroll("too-big")
    sid = new_session_id()
    resp = world.client(host.credential).post(
        world.url(f"/v1/sessions/{sid}/recording"), params={"offset": 100}, data=b"z" * (9 << 20)
    )
    assert resp.status_code == 413 and resp.json()["limit"] == 8 << 20


def _tls(world: World) -> ssl.SSLSocket:
    port = int(world.server.url.rsplit(":", 1)[1])
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # pinned just below, as the real client does
    tls = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=20))
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    assert world.server.fingerprint == "SHA256:" + hashlib.sha256(der).hexdigest()
    return tls


def _raw(world: World, request: bytes) -> tuple[int, str]:
    """Send raw bytes over a pinned TLS connection; the status and body of the answer.
    The server may close before all is sent (that is the point of some tests)."""
    with _tls(world) as tls:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, ssl.SSLError):
            tls.sendall(request)
        data = b""
        try:
            while chunk := tls.recv(65536):
                data += chunk
        except (ConnectionResetError, ssl.SSLError, TimeoutError):
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body.decode("utf-8", "replace")
