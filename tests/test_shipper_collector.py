"""Shipping against the real collector: ``sshaudit-collector serve`` (uvicorn) on loopback
over TLS with its self-signed certificate, reached through the agent's pinned transport;
spools written by the real daemon (AgentDaemon on a thread, or ``sshaudit-agent daemon``
as a process) or by the SealedWriter and Spool APIs.

What must hold: recordings arrive byte-identical and decrypt; a running session streams;
a collector stopped and restarted loses and duplicates nothing; a daemon SIGKILLed in the
middle of an upload resumes with no gap and no duplicate (the collector's compare-and-set
and its signature check prove both); a wrong pin sends nothing; local files go only after
the collector confirmed them."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from collector_helpers import Server, cli_ok, start_server
from daemon_helpers import (
    DaemonThread,
    KeySet,
    config_doc,
    decrypt,
    make_keys,
    toml_text,
    wait_for,
)
from shipper_helpers import cast_pieces, frame_count, make_spool, start_recording

from sshaudit.agent.config import MIN_UPLOAD_CHUNK, AgentConfig, parse_config
from sshaudit.agent.protocol import MsgType, Stream
from sshaudit.agent.ship_files import queue_auth_events
from sshaudit.agent.ship_http import HttpTransport, ShipError
from sshaudit.agent.shipper_loop import Shipper, ShipperThread
from sshaudit.agent.spool import RecordingStatus, SessionRecord, SpoolState
from sshaudit.sealed import Completeness, SignatureStatus

pytestmark = pytest.mark.slow
AGENT = str(Path(sys.executable).parent / "sshaudit-agent")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class World:
    """One collector (restartable on the same port and data) and one enrolled host."""

    def __init__(self, data: Path, keys: KeySet) -> None:
        self.data = data
        self.keys = keys
        self.port = _free_port()
        self.server = self._start()
        self.auditor = self.token("auditor")
        self.admin = self.token("admin")
        pub = base64.b64encode(keys.host.public_key().public_bytes_raw()).decode()
        resp = self.client(self.token("agent")).post(
            self.url("/v1/enroll"), json={"hostname": "web-1", "host_public_key": pub}
        )
        assert resp.status_code == 200, resp.text
        self.host_id: str = resp.json()["host_id"]
        self.credential: str = resp.json()["credential"]

    def _start(self) -> Server:
        return start_server(self.data, "--listen", f"127.0.0.1:{self.port}")

    def restart(self) -> None:
        self.server = self._start()

    @property
    def pin(self) -> str:
        assert self.server.fingerprint is not None
        return self.server.fingerprint

    def token(self, role: str) -> str:
        out = cli_ok("token", "create", "--data", str(self.data), "--role", role)
        return out.strip().splitlines()[-1]

    def url(self, path: str) -> str:
        return self.server.url + path

    def client(self, token: str | None = None) -> requests.Session:
        return self.server.client(token)

    def get(self, path: str, token: str | None = None) -> requests.Response:
        with self.client(token or self.auditor) as client:
            return client.get(self.url(path), timeout=30)

    def session(self, sid: str) -> dict[str, Any]:
        resp = self.get(f"/v1/sessions/{sid}")
        assert resp.status_code == 200, resp.text
        doc: dict[str, Any] = resp.json()
        return doc

    def download(self, sid: str) -> bytes:
        resp = self.get(f"/v1/sessions/{sid}/recording")
        assert resp.status_code == 200, resp.text
        return resp.content

    def frames_stored(self) -> int:
        with self.client() as client:
            resp = client.get(self.url("/metrics"), timeout=30)
        m = re.search(r"^sshaudit_collector_frames_total (\d+)", resp.text, re.M)
        return int(m.group(1)) if m else 0

    def transport(self, pin: str | None = None) -> HttpTransport:
        return HttpTransport(self.server.url, pin or self.pin, self.credential)

    def config(self, tmp: Path, **policy: Any) -> AgentConfig:
        doc = config_doc(tmp, self.keys, **policy)
        doc["host_id"] = self.host_id
        return parse_config(doc)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    data = tmp_path_factory.mktemp("collector") / "data"
    cli_ok("init", "--data", str(data))
    w = World(data, make_keys(tmp_path_factory.mktemp("keys")))
    try:
        yield w
    finally:
        w.server.stop()


def shipping(world: World, spool_dir: Path, **kw: Any) -> ShipperThread:
    kw.setdefault("retry_max", 1.0)
    kw.setdefault("poll_interval", 0.05)
    return ShipperThread(Shipper(spool_dir, world.transport(), **kw)).start()


def spool_names(spool_dir: Path) -> set[str]:
    return {p.name for p in spool_dir.iterdir() if not p.name.startswith(".")}


def emptied(spool_dir: Path) -> Callable[[], bool]:
    return lambda: not {n for n in spool_names(spool_dir) if n.endswith((".json", ".sealed"))}


def run_session(d: DaemonThread, *outputs: bytes, end: bool = True) -> str:
    c = d.client()
    sid: str = c.handshake().json()["session_id"]
    for out in outputs:
        c.data(Stream.OUTPUT, out)
    if end:
        reply = c.end(bytes_out=sum(map(len, outputs)))
        assert reply is not None and reply.type is MsgType.DONE
    c.close()
    return sid


def check_arrived(world: World, sid: str, local: bytes, *texts: bytes, complete: bool) -> None:
    """Byte-identical at the collector, whole frames counted once, and it decrypts."""
    assert world.download(sid) == local
    doc = world.session(sid)
    frames, trailer = frame_count(local)
    assert doc["recording"]["length"] == len(local) and doc["recording"]["frames"] == frames
    assert doc["recording"]["state"] == ("sealed_verified" if complete else "open")
    assert trailer is complete
    plain, result = decrypt(local, world.keys.auditor)
    for text in texts:
        assert text in plain
    if complete:
        assert result.completeness is Completeness.COMPLETE
        assert result.signature is SignatureStatus.VALID


def test_daemon_recordings_arrive_byte_identical_and_decrypt(world: World, tmp_path: Path) -> None:
    config = world.config(tmp_path)
    d = DaemonThread(config).start()
    try:
        sids = [run_session(d, f"output {i}\r\n".encode() * (i + 1)) for i in range(3)]
        local = {sid: d.sealed(sid) for sid in sids}
    finally:
        d.stop()
    ship = shipping(world, config.spool_dir)
    try:
        wait_for(emptied(config.spool_dir), 20)
    finally:
        ship.stop()
    for i, sid in enumerate(sids):
        check_arrived(world, sid, local[sid], f"output {i}".encode(), complete=True)
        doc = world.session(sid)
        assert doc["recording_status"] == "complete" and doc["unix_user"] == "jdoe"
        assert doc["target_id"] == world.host_id and doc["program_type"] == "shell"
        assert doc["exit_status"] == 0 and doc["client_address"] == "192.0.2.10"
    assert spool_names(config.spool_dir) == set()


def test_a_running_session_streams_and_then_completes(world: World, tmp_path: Path) -> None:
    config = world.config(tmp_path, frame_interval=0.1)
    d = DaemonThread(config).start()
    ship = shipping(world, config.spool_dir)
    try:
        c = d.client()
        sid = c.handshake().json()["session_id"]
        c.data(Stream.OUTPUT, b"first burst\r\n")

        def streamed() -> bool:
            resp = world.get(f"/v1/sessions/{sid}")
            if resp.status_code == 404:
                return False  # the record is not there yet
            doc = resp.json()
            rec = doc["recording"]
            return bool(rec and rec["frames"] >= 2 and doc["recording_status"] == "recording")

        wait_for(streamed, 20)  # the session is still open: frames arrived while it runs
        partial, result = decrypt(world.download(sid), world.keys.auditor)
        assert b"first burst" in partial and result.completeness is Completeness.TRUNCATED
        assert (config.spool_dir / f"{sid}.sealed").exists()  # not confirmed: kept
        c.data(Stream.OUTPUT, b"second burst\r\n")
        assert c.end() is not None
        c.close()
        local = d.sealed(sid)
        wait_for(emptied(config.spool_dir), 20)
    finally:
        ship.stop()
        d.stop()
    check_arrived(world, sid, local, b"first burst", b"second burst", complete=True)
    assert world.session(sid)["recording_status"] == "complete"


def test_collector_stopped_then_restarted_loses_nothing(world: World, tmp_path: Path) -> None:
    config = world.config(tmp_path, frame_interval=0.1)
    world.server.stop()
    d = DaemonThread(config).start()
    ship = shipping(world, config.spool_dir, retry_max=1.0)
    try:
        sids = [run_session(d, f"while down {i}\r\n".encode()) for i in range(3)]
        lost = run_session(d, b"the recorder dies\r\n", end=False)
        wait_for(lambda: d.record(lost)["spool"]["state"] == "closed")
        local = {sid: d.sealed(sid) for sid in [*sids, lost]}
        time.sleep(1.5)  # a few retries against the stopped collector
        for sid in [*sids, lost]:
            assert (config.spool_dir / f"{sid}.sealed").read_bytes() == local[sid]
        world.restart()
        wait_for(emptied(config.spool_dir), 30)
    finally:
        ship.stop()
        d.stop()
    for i, sid in enumerate(sids):
        check_arrived(world, sid, local[sid], f"while down {i}".encode(), complete=True)
    check_arrived(world, lost, local[lost], b"the recorder dies", complete=False)
    assert world.session(lost)["recording_status"] == "recorder_lost"


def test_daemon_killed_mid_upload_resumes_with_no_gap_and_no_duplicate(
    world: World, tmp_path: Path
) -> None:
    config = world.config(tmp_path)
    spool = make_spool(config.spool_dir)
    rec = start_recording(
        spool, host_id=world.host_id, host_key=world.keys.host, auditor=world.keys.auditor
    )
    rec.append(*(os.urandom(64 * 1024 - 64) for _ in range(400)))  # ~25 MiB of frames
    rec.close()
    data = bytes(rec.data)
    frames = frame_count(data)[0]
    token = tmp_path / "collector.token"
    token.write_text(world.credential + "\n")
    token.chmod(0o600)
    doc = config_doc(tmp_path, world.keys)
    doc["host_id"] = world.host_id
    doc["collector"] = {
        "url": world.server.url,
        "fingerprint": world.pin,
        "credential_file": str(token),
        "upload_chunk_bytes": MIN_UPLOAD_CHUNK,
        "retry_max_seconds": 1.0,
    }
    path = tmp_path / "agent.toml"
    path.write_text(toml_text(doc))
    stored_before = world.frames_stored()
    status = f"/v1/sessions/{rec.session_id}/recording/status"

    poller = world.client(world.credential)  # one kept-alive connection: a poll is quick

    def held() -> int:
        resp = poller.get(world.url(status), timeout=30)
        return int(resp.json()["length"]) if resp.status_code == 200 else 0

    log = (tmp_path / "daemon.log").open("wb")
    first = subprocess.Popen([AGENT, "daemon", "--config", str(path)], stderr=log)
    try:
        deadline = time.monotonic() + 30
        while not 2 * MIN_UPLOAD_CHUNK < held() < len(data) - 2 * MIN_UPLOAD_CHUNK:
            assert time.monotonic() < deadline and held() < len(data), "no upload in progress"
            time.sleep(0.005)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.kill()
    cut = held()
    assert 0 < cut < len(data)
    assert (config.spool_dir / f"{rec.session_id}.sealed").read_bytes() == data
    second = subprocess.Popen([AGENT, "daemon", "--config", str(path)], stderr=log)
    try:
        wait_for(emptied(config.spool_dir), 60)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(20) == 0
    poller.close()
    check_arrived(world, rec.session_id, data, complete=True)
    # Each frame was stored exactly once: a duplicate would have been counted twice (the
    # compare-and-set refuses it anyway), a gap would have failed the signature check.
    assert world.frames_stored() - stored_before == frames
    text = (tmp_path / "daemon.log").read_text()
    assert "shipping" in text and "removed from the spool" in text


def test_a_wrong_pin_sends_nothing_and_keeps_the_spool(world: World, tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    rec = start_recording(
        spool, host_id=world.host_id, host_key=world.keys.host, auditor=world.keys.auditor
    )
    rec.append(*cast_pieces(3))
    rec.close()
    before = {p.name: p.read_bytes() for p in spool.directory.iterdir()}
    requests_before = len(world.server.log)
    transport = world.transport("SHA256:" + "00" * 32)
    ship = Shipper(spool.directory, transport, rand=lambda: 0.5)
    assert ship.run_once() > 0  # backing off
    assert ship.run_once() > 0
    transport.close()
    time.sleep(0.3)
    assert {p.name: p.read_bytes() for p in spool.directory.iterdir()} == before
    assert not any(rec.session_id in line for line in world.server.log[requests_before:])
    assert world.get(f"/v1/sessions/{rec.session_id}").status_code == 404
    with pytest.raises(ShipError, match="not the pinned one") as err:
        world.transport("SHA256:" + "00" * 32).send("GET", "/v1/host/config")
    assert world.credential not in str(err.value)
    plain = HttpTransport(world.server.url.replace("https:", "http:"), world.pin, world.credential)
    with pytest.raises(ShipError, match="refusing plain HTTP"):
        plain.send("GET", "/v1/host/config")


def test_records_events_and_the_backlog_reach_the_collector(world: World, tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    unrecorded = "7f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"
    spool.write_record(
        SessionRecord(
            session_id=unrecorded,
            unix_user="jdoe",
            target_id=world.host_id,
            client_address="client.example.com",  # PAM_RHOST under UseDNS yes
            session_start="2026-11-22T09:00:00Z",
            session_finish="2026-11-22T09:02:00Z",
            recording_status=RecordingStatus.UNRECORDED,
            spool_state=SpoolState.NONE,
            error="no recorder connected within 5 s of the session opening",
        )
    )
    queue_auth_events(
        spool.directory,
        [
            {
                "event_id": f"pam-{world.host_id}-{i}",
                "created_at": "2026-11-22T09:00:00Z",
                "unix_user": "jdoe",
                "method": "publickey",
                "allowed": i == 0,
                "reason": "" if i == 0 else "account expired",
            }
            for i in range(2)
        ],
    )
    live = start_recording(
        spool, host_id=world.host_id, host_key=world.keys.host, auditor=world.keys.auditor
    )
    live.append(*cast_pieces(2))
    transport = world.transport()
    ship = Shipper(spool.directory, transport)
    assert ship.run_once() == ship.poll_interval
    transport.close()
    doc = world.session(unrecorded)
    assert doc["recording_status"] == "unrecorded" and doc["recording"] is None
    assert doc["details"]["client_host"] == "client.example.com"
    events = world.get(f"/v1/auth-events?target_id={world.host_id}").json()["items"]
    assert {e["event_id"] for e in events} >= {f"pam-{world.host_id}-{i}" for i in range(2)}
    assert spool_names(spool.directory) == {
        f"{live.session_id}.{s}" for s in ("json", "sealed", "ship")
    }
    hosts = world.get("/v1/admin/hosts", world.admin).json()
    (host,) = [h for h in hosts if h["host_id"] == world.host_id]
    assert host["backlog_sessions"] == 1 and host["backlog_bytes"] == 0  # live, all sent
    assert world.download(live.session_id) == bytes(live.data)
    sidecar = json.loads((spool.directory / f"{live.session_id}.ship").read_text())
    assert sidecar["acked"] == len(live.data) and not sidecar["done"]
