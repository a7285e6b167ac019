"""``sshaudit-collector`` through its entry point: init, tokens, keys, CA keys, policy, holds,
hosts, serve's refusals, and the JSON lines export (stdout, file, HTTP, follow, resume)."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import signal
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from collector_helpers import (
    AUDITOR,
    COLLECTOR,
    STORAGE,
    T0,
    auth_event,
    cli,
    cli_ok,
    enroll_direct,
    new_session_id,
    record,
    start_server,
)
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sshaudit.collector import ingest
from sshaudit.collector.models import AuthEvent, SessionRecord
from sshaudit.collector.storage import open_storage


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    cli_ok("init", "--data", str(path), "--name", "audit.example.com", "--name", "10.1.2.3")
    return path


def fail(proc: subprocess.CompletedProcess[bytes], status: int, words: str) -> None:
    err = proc.stderr.decode()
    assert proc.returncode == status, err
    assert "Traceback" not in err
    assert err.startswith("sshaudit-collector: ") and words in err, err
    assert err.count("\n") == 1  # one line


def test_init_makes_a_private_state_dir_and_prints_the_fingerprint(data: Path) -> None:
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "tls" / "key.pem").stat().st_mode) == 0o600
    pem = (data / "tls" / "cert.pem").read_bytes()
    der = ssl.PEM_cert_to_DER_cert(pem.decode())
    out = cli_ok("init", "--data", str(data))  # again: nothing changes
    assert out.splitlines()[-1] == "SHA256:" + hashlib.sha256(der).hexdigest()
    assert (data / "tls" / "cert.pem").read_bytes() == pem
    cert = x509.load_pem_x509_certificate(pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["audit.example.com"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert cert.signature_hash_algorithm is not None


def test_state_dir_refusals(tmp_path: Path, data: Path) -> None:
    fail(cli("token", "list", "--data", str(tmp_path / "none")), 2, "No such file")
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    fail(cli("token", "list", "--data", str(empty)), 2, "not a collector state directory")
    data.chmod(0o755)
    fail(cli("token", "list", "--data", str(data)), 2, "must be mode 0700")
    data.chmod(0o700)
    link = tmp_path / "link"
    link.symlink_to(data)
    fail(cli("token", "list", "--data", str(link)), 2, "not a directory")
    os.chown(data, 65534, 65534)
    fail(cli("token", "list", "--data", str(data)), 2, "owned by uid 65534")
    os.chown(data, 0, 0)


def test_tokens(data: Path) -> None:
    d = str(data)
    out = cli_ok("token", "create", "--data", d, "--role", "auditor", "--comment", "alice")
    token = out.splitlines()[-1]
    assert token.startswith("sa_auditor_") and len(out.splitlines()) == 1
    listed = json.loads(cli_ok("token", "list", "--data", d, "--json"))
    (row,) = listed
    assert row["role"] == "auditor" and row["state"] == "active" and row["comment"] == "alice"
    assert token not in json.dumps(listed)
    if STORAGE == "sqlite":  # only the hash is stored (PostgreSQL: test_collector_pg_s3.py)
        assert token.encode() not in (data / "collector.sqlite3").read_bytes()
    cli_ok("token", "revoke", "--data", d, row["token_id"])
    assert json.loads(cli_ok("token", "list", "--data", d, "--json"))[0]["state"] == "revoked"
    fail(cli("token", "revoke", "--data", d, "0123456789abcdef"), 1, "no token")
    fail(cli("token", "create", "--data", d, "--role", "agent", "--ttl", "5y"), 2, "--ttl")
    fail(cli("token", "create", "--data", d, "--role", "admin", "--comment", "é"), 2, "comment")
    never = cli_ok("token", "create", "--data", d, "--role", "admin", "--ttl", "never")
    assert never.strip().startswith("sa_admin_")
    assert cli("token", "create", "--data", d, "--role", "host").returncode == 2  # argparse


def test_auditor_keys(data: Path, tmp_path: Path) -> None:
    d = str(data)
    pub = tmp_path / "a.pub"
    pub.write_text(base64.b64encode(AUDITOR.public.raw).decode() + "\n")
    kid = cli_ok("keys", "add", "--data", d, str(pub), "--comment", "audit team").strip()
    assert kid == AUDITOR.public.kid
    assert json.loads(cli_ok("keys", "list", "--data", d, "--json"))[0]["comment"] == "audit team"
    assert kid in cli_ok("keys", "list", "--data", d)
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key\n")
    fail(cli("keys", "add", "--data", d, str(bad)), 2, "not base64")
    cli_ok("keys", "remove", "--data", d, kid)
    assert json.loads(cli_ok("keys", "list", "--data", d, "--json")) == []
    fail(cli("keys", "remove", "--data", d, kid), 1, "no auditor key")


def _ca_line(comment: str) -> str:
    key = Ed25519PrivateKey.generate().public_key()
    raw = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"{raw.decode()} {comment}"


def test_ca_keys(data: Path, tmp_path: Path) -> None:
    d = str(data)
    lines = [_ca_line("ca-1"), _ca_line("ca-2")]
    f = tmp_path / "cas.pub"
    f.write_text("# our user CAs\n\n" + "\n".join(lines) + "\n")
    prints = cli_ok("ca", "add", "--data", d, str(f)).split()
    assert len(prints) == 2 and all(p.startswith("SHA256:") for p in prints)
    listed = json.loads(cli_ok("ca", "list", "--data", d, "--json"))
    assert sorted(r["line"] for r in listed) == sorted(lines)
    cli_ok("ca", "remove", "--data", d, prints[0])
    (left,) = json.loads(cli_ok("ca", "list", "--data", d, "--json"))
    assert left["fingerprint"] == prints[1]
    cli_ok("ca", "remove", "--data", d, left["key_id"])
    assert json.loads(cli_ok("ca", "list", "--data", d, "--json")) == []
    f.write_text(lines[0] + "\nssh-ed25519 AAAAbroken\n")
    fail(cli("ca", "add", "--data", d, str(f)), 2, "does not parse")
    assert json.loads(cli_ok("ca", "list", "--data", d, "--json")) == []  # none of the file


def test_policy_hosts_holds(data: Path, tmp_path: Path) -> None:
    d = str(data)
    pol = tmp_path / "policy.json"
    pol.write_text('{"record_input": false, "on_daemon_down": "allow"}')
    assert cli_ok("policy", "set", "--data", d, str(pol)).strip() == "1"
    shown = json.loads(cli_ok("policy", "show", "--data", d))
    assert shown == {"policy": {"on_daemon_down": "allow", "record_input": False}, "version": 1}
    pol.write_text("[1, 2]")
    fail(cli("policy", "set", "--data", d, str(pol)), 2, "JSON object")
    storage = open_storage(data)
    host = enroll_direct(storage, T0, "db-7")
    storage.close()
    (row,) = json.loads(cli_ok("hosts", "list", "--data", d, "--json"))
    assert (row["host_id"], row["hostname"]) == (host.host_id, "db-7")
    hold_id = cli_ok("hold", "add", "--data", d, "--target", host.host_id, "--reason", "x").strip()
    assert json.loads(cli_ok("hold", "list", "--data", d, "--json"))[0]["hold_id"] == hold_id
    fail(cli("hold", "add", "--data", d, "--session", "nope"), 2, "legal hold")
    cli_ok("hold", "remove", "--data", d, hold_id)
    fail(cli("hold", "remove", "--data", d, hold_id), 1, "no legal hold")


def test_serve_refusals(data: Path) -> None:
    d = str(data)
    fail(cli("serve", "--data", d, "--listen", "0.0.0.0:0", "--insecure-http"), 2, "loopback")
    fail(cli("serve", "--data", d, "--listen", "127.0.0.1:0", "--tls-cert", "x"), 2, "together")
    fail(cli("serve", "--data", d, "--listen", "nope"), 2, "HOST:PORT")
    fail(cli("serve", "--data", d, "--listen", "127.0.0.1:0", "--max-chunk", "10"), 2, "chunk")
    fail(
        cli(
            "serve", "--data", d, "--listen", "127.0.0.1:0", "--tls-cert", "/no", "--tls-key", "/no"
        ),
        2,
        "no such file",
    )


def test_serve_insecure_http_on_loopback(data: Path) -> None:
    server = start_server(data, "--insecure-http")
    try:
        assert server.url.startswith("http://") and server.fingerprint is None
        assert requests.get(server.url + "/healthz", timeout=10).json() == {"status": "ok"}
    finally:
        server.stop()
    # A clean stop: uvicorn finishes, then exits by the SIGTERM it got (systemd counts
    # that as success).
    assert server.proc.returncode in (0, -signal.SIGTERM)
    assert any("Finished server process" in line for line in server.log)


def test_help_pages() -> None:
    for args in (
        [],
        ["init"],
        ["serve"],
        ["export"],
        ["token", "create"],
        ["keys", "add"],
        ["ca", "add"],
        ["policy", "set"],
        ["hold", "add"],
    ):
        out = cli_ok(*args, "--help")
        assert "usage: sshaudit-collector" in out and "exit status" in out, args


# --- export


def _fill(data: Path) -> tuple[str, str]:
    storage = open_storage(data)
    host = enroll_direct(storage, T0)
    h = storage.get_host(host.host_id)
    assert h is not None
    done, live = new_session_id(), new_session_id()
    doc = record(done, recording_status="complete", session_start="2026-11-20T00:00:00Z")
    ingest.put_session(storage, h, done, SessionRecord.model_validate(doc), T0)
    ingest.put_session(storage, h, live, SessionRecord.model_validate(record(live)), T0)
    events = [auth_event("old", created_at="2026-01-01T00:00:00Z"), auth_event("new")]
    ingest.add_auth_events(storage, h, [AuthEvent.model_validate(e) for e in events], T0)
    storage.close()
    return done, live


def test_export_jsonl_since_and_resume(data: Path, tmp_path: Path) -> None:
    done, _live = _fill(data)
    lines = [
        json.loads(x)
        for x in cli_ok("export", "--data", str(data), "--format", "jsonl").splitlines()
    ]
    assert [(x["record_type"], x.get("session_id") or x["event_id"]) for x in lines] == [
        ("session", done),  # the live one is not final: not exported yet
        ("auth_event", "old"),
        ("auth_event", "new"),
    ]
    assert set(lines[0]) == {"record_type", *SessionRecord.model_fields} - {"details"}
    assert set(lines[1]) == {"record_type", *AuthEvent.model_fields}
    since = cli_ok("export", "--data", str(data), "--since", "2026-11-01T00:00:00Z")
    assert [json.loads(x).get("event_id") for x in since.splitlines()] == [None, "new"]
    state, out = tmp_path / "pos", tmp_path / "out.jsonl"
    args = ["export", "--data", str(data), "--state-file", str(state), "--to", str(out)]
    cli_ok(*args)
    assert len(out.read_text().splitlines()) == 3
    cli_ok(*args)  # resumed from the position: nothing twice
    assert len(out.read_text().splitlines()) == 3
    fail(cli("export", "--data", str(data), "--since", "soon"), 2, "--since")


def test_export_follow_to_http(data: Path) -> None:
    received: list[bytes] = []

    class Sink(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            n = int(self.headers["Content-Length"])
            assert self.headers["Authorization"] == "Splunk secret"
            received.append(self.rfile.read(n))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    headers = data.parent / "headers"
    headers.write_text("# for the SIEM\nAuthorization: Splunk secret\n")
    proc = subprocess.Popen(
        [
            COLLECTOR,
            "export",
            "--data",
            str(data),
            "--follow",
            "--interval",
            "0.2",
            "--to",
            f"http://127.0.0.1:{httpd.server_port}/ingest",
            "--to-header-file",
            str(headers),
        ],
        stderr=subprocess.PIPE,
    )
    try:
        _wait(lambda: False, 1.0)
        done, _ = _fill(data)
        _wait(lambda: b"new" in b"".join(received), 20.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        httpd.shutdown()
    assert proc.returncode == 0, err
    lines = [json.loads(x) for batch in received for x in batch.decode().splitlines()]
    assert [x.get("session_id") or x.get("event_id") for x in lines] == [done, "old", "new"]


def _wait(ready: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not ready():
        time.sleep(0.1)
