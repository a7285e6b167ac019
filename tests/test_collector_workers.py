"""``sshaudit-collector serve --workers N`` (collector/workers.py): several server processes
on one socket, on the real CLI over TLS. Uploads from several hosts at once all land, the
metrics any worker answers with count every worker's uploads, and SIGTERM to the
supervisor stops every worker."""

from __future__ import annotations

import base64
import re
import threading
import time
from pathlib import Path

import psutil
import pytest
from collector_helpers import (
    Host,
    Server,
    cast_pieces,
    cli,
    cli_ok,
    make_sealed,
    new_session_id,
    prepare_data_dir,
    record,
    start_server,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

pytestmark = pytest.mark.slow
HOSTS, SESSIONS = 4, 3


def _enroll(server: Server, data: Path, name: str) -> Host:
    token = cli_ok("token", "create", "--data", str(data), "--role", "agent").split()[-1]
    key = Ed25519PrivateKey.generate()
    pub = base64.b64encode(key.public_key().public_bytes_raw()).decode()
    with server.client(token) as c:
        resp = c.post(server.url + "/v1/enroll", json={"hostname": name, "host_public_key": pub})
    assert resp.status_code == 200, resp.text
    return Host(resp.json()["host_id"], resp.json()["credential"], key, name)


def _ship(server: Server, host: Host, errors: list[str]) -> None:
    with server.client(host.credential) as c:
        for _ in range(SESSIONS):
            sid = new_session_id()
            sealed = make_sealed(host, sid, cast_pieces(8))
            base = f"{server.url}/v1/sessions/{sid}"
            steps = [
                c.put(base, json=record(sid)),
                c.put(base + "/recording", data=sealed.prefix),
                c.post(
                    base + "/recording", params={"offset": len(sealed.prefix)}, data=sealed.body
                ),
            ]
            errors += [f"{r.url}: {r.status_code} {r.text}" for r in steps if r.status_code != 200]


def _chunks_counted(server: Server) -> int:
    with server.client() as c:
        text = c.get(server.url + "/metrics").text
    m = re.search(r'^sshaudit_collector_uploads_total\{kind="chunk"\} (\d+)$', text, re.M)
    return int(m.group(1)) if m else 0


def test_workers_share_the_socket_the_storage_and_the_metrics(tmp_path: Path) -> None:
    data = tmp_path / "collector"
    prepare_data_dir(data)
    cli_ok("init", "--data", str(data))
    server = start_server(data, "--workers", "2")
    try:
        workers = psutil.Process(server.proc.pid).children()
        assert len(workers) == 2, workers
        hosts = [_enroll(server, data, f"web-{i}") for i in range(HOSTS)]
        errors: list[str] = []
        threads = [threading.Thread(target=_ship, args=(server, h, errors)) for h in hosts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        total = HOSTS * SESSIONS
        auditor = cli_ok("token", "create", "--data", str(data), "--role", "auditor").split()[-1]
        with server.client(auditor) as c:
            items = c.get(server.url + "/v1/sessions", params={"limit": 100}).json()["items"]
        assert len(items) == total
        assert all(i["recording"]["state"] == "sealed_verified" for i in items), items[0]
        # every scrape, whichever worker answers it, counts all the chunks (shared each second)
        deadline = time.monotonic() + 10
        while (seen := [_chunks_counted(server) for _ in range(6)]) != [total] * 6:
            assert time.monotonic() < deadline, seen
            time.sleep(0.5)
    finally:
        server.stop()
    assert server.proc.returncode == 0
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def test_workers_count_is_checked(tmp_path: Path) -> None:
    data = tmp_path / "collector"
    prepare_data_dir(data)
    cli_ok("init", "--data", str(data))
    done = cli("serve", "--data", str(data), "--listen", "127.0.0.1:0", "--workers", "0")
    assert done.returncode == 2 and b"--workers" in done.stderr, done.stderr
