"""agent/shipper_loop.py against a fake collector (tests/shipper_helpers.py): a spool written
with the real SealedWriter and Spool APIs, shipped pass by pass with an injected clock,
random and sleep. The real collector over TLS is tests/test_shipper_collector.py."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from shipper_helpers import (
    FakeCollector,
    cast_pieces,
    frame_count,
    make_spool,
    start_recording,
    write_recording,
)

from sshaudit.agent.ship_files import queue_auth_events, read_ship_state, write_atomic
from sshaudit.agent.shipper import ShipState
from sshaudit.agent.shipper_loop import Shipper
from sshaudit.agent.spool import RecordingStatus, SessionRecord, Spool, SpoolState

CHUNK = 4 + (1 << 20) + 16


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def shipper(spool: Spool, fake: FakeCollector, **kw: Any) -> Shipper:
    kw.setdefault("rand", lambda: 0.999)
    kw.setdefault("chunk_bytes", CHUNK)
    return Shipper(spool.directory, fake, **kw)


def files(spool: Spool) -> set[str]:
    return {p.name for p in spool.directory.iterdir()}


def contiguous(fake: FakeCollector, sid: str) -> None:
    """Every stored append starts where the previous ended: no gap, no byte twice."""
    spans = fake.stored.get(sid, [])
    pos = fake.prefix_len[sid]
    for offset, length in spans:
        assert offset == pos, (offset, pos)
        pos += length
    assert pos == len(fake.files[sid])


def test_complete_recordings_arrive_byte_identical_then_leave_the_spool(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    recs = [write_recording(spool, cast_pieces(n)) for n in (1, 5, 30)]
    fake = FakeCollector()
    ship = shipper(spool, fake)
    assert ship.run_once() == ship.poll_interval
    for r in recs:
        assert bytes(fake.files[r.session_id]) == bytes(r.data)
        assert r.session_id in fake.sealed
        contiguous(fake, r.session_id)
        assert fake.records[r.session_id]["recording_status"] == "complete"
    assert files(spool) == set()
    assert fake.backlog[-1] == {"sessions": 0, "bytes": 0}


def test_big_recordings_go_in_chunks_of_whole_frames(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    rec = write_recording(spool, [os.urandom(60_000) for _ in range(60)])  # ~3.6 MB
    fake = FakeCollector()
    shipper(spool, fake).run_once()
    spans = fake.stored[rec.session_id]
    assert len(spans) >= 4 and all(length <= CHUNK for _, length in spans)
    assert bytes(fake.files[rec.session_id]) == bytes(rec.data)
    contiguous(fake, rec.session_id)


def test_a_live_recording_streams_as_it_is_written(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    rec = start_recording(spool)
    fake = FakeCollector()
    ship = shipper(spool, fake)
    ship.run_once()
    assert bytes(fake.files[rec.session_id]) == bytes(rec.data)  # the prefix
    assert fake.records[rec.session_id]["recording_status"] == "recording"
    for i in range(3):
        rec.append(*cast_pieces(2 + i))
        ship.run_once()
        assert bytes(fake.files[rec.session_id]) == bytes(rec.data)
        assert rec.session_id not in fake.sealed
        assert (spool.directory / f"{rec.session_id}.sealed").exists()
    sidecar = read_ship_state(spool.directory, rec.session_id)
    assert sidecar is not None and sidecar.acked == len(rec.data)
    rec.close()
    ship.run_once()
    assert rec.session_id in fake.sealed and bytes(fake.files[rec.session_id]) == bytes(rec.data)
    assert fake.records[rec.session_id]["recording_status"] == "complete"
    contiguous(fake, rec.session_id)
    assert files(spool) == set()


def test_collector_down_backs_off_exponentially_keeps_everything_then_ships(
    tmp_path: Path,
) -> None:
    spool = make_spool(tmp_path / "spool")
    recs = [write_recording(spool, cast_pieces(4)) for _ in range(3)]
    before = {p.name: p.read_bytes() for p in spool.directory.iterdir()}
    fake = FakeCollector(down=True)
    ship = shipper(spool, fake, retry_max=10.0)
    delays = [ship.run_once() for _ in range(7)]
    assert delays == pytest.approx([0.4995, 0.999, 1.998, 3.996, 7.992, 9.99, 9.99])
    assert {p.name: p.read_bytes() for p in spool.directory.iterdir()} == before
    fake.down = False
    assert ship.run_once() == ship.poll_interval
    for r in recs:
        assert bytes(fake.files[r.session_id]) == bytes(r.data)
        contiguous(fake, r.session_id)
    assert files(spool) == set()


def test_a_full_collector_disk_keeps_the_spool(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    rec = write_recording(spool, cast_pieces(3))
    fake = FakeCollector(status=507)
    ship = shipper(spool, fake)
    assert ship.run_once() > 0 and ship.run_once() > 0
    assert files(spool) >= {f"{rec.session_id}.sealed", f"{rec.session_id}.json"}
    assert (spool.directory / f"{rec.session_id}.sealed").read_bytes() == bytes(rec.data)
    fake.status = None
    ship.run_once()
    assert bytes(fake.files[rec.session_id]) == bytes(rec.data) and files(spool) == set()


def test_answers_lost_after_the_collector_stored_the_bytes(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    rec = start_recording(spool)
    rec.append(*cast_pieces(3))
    fake = FakeCollector(lose_answers=2)  # the prefix and the first chunk are stored
    ship = shipper(spool, fake)
    ship.run_once()
    ship.run_once()
    rec.append(*cast_pieces(4))
    rec.close()
    for _ in range(3):
        ship.run_once()
    assert bytes(fake.files[rec.session_id]) == bytes(rec.data)
    contiguous(fake, rec.session_id)  # the re-sent bytes were replays, never stored twice
    assert files(spool) == set()


def test_a_restarted_shipper_asks_the_collector_and_resumes(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    rec = start_recording(spool)
    rec.append(*cast_pieces(5))
    fake = FakeCollector()
    shipper(spool, fake).run_once()
    rec.append(*cast_pieces(5))
    rec.close()
    fake.calls.clear()
    shipper(spool, fake).run_once()  # a new process: nothing in memory, the sidecar on disk
    sid = rec.session_id
    first = [c for c in fake.calls if sid in c[1]]
    assert first[0] == ("GET", f"/v1/sessions/{sid}/recording/status", -1)
    assert all(c[0] != "PUT" or not c[1].endswith("/recording") for c in first)  # no prefix
    assert bytes(fake.files[sid]) == bytes(rec.data)
    contiguous(fake, sid)


def test_the_collector_lost_the_recording_so_it_is_sent_again(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    rec = start_recording(spool)
    rec.append(*cast_pieces(2))
    fake = FakeCollector()
    ship = shipper(spool, fake)
    ship.run_once()
    fake.files.clear()  # a collector restored from an older backup
    fake.stored.clear()
    rec.append(*cast_pieces(2))
    ship.run_once()  # 409 not_started: from the start again
    ship.run_once()
    assert bytes(fake.files[rec.session_id]) == bytes(rec.data)


def test_a_crash_during_deletion_is_finished_without_asking(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    rec = write_recording(spool, cast_pieces(2))
    sid = rec.session_id
    write_atomic(
        spool.directory, f"{sid}.ship", json.dumps(ShipState(sid, done=True).to_json()).encode()
    )
    (spool.directory / f"{sid}.sealed").unlink()  # the first unlink happened, then the crash
    fake = FakeCollector()
    shipper(spool, fake).run_once()
    assert files(spool) == set()
    assert not [c for c in fake.calls if sid in c[1]]
    # and a sidecar left alone (the crash came after the record went) is removed too
    write_atomic(spool.directory, f"{sid}.ship", b"{}")
    shipper(spool, fake).run_once()
    assert files(spool) == set()


def test_a_refused_session_is_parked_with_its_files_and_the_others_go_on(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    bad = write_recording(spool, cast_pieces(3), session_start="2026-11-22T08:00:00Z")
    good = write_recording(spool, cast_pieces(3))
    fake = FakeCollector()
    # the collector holds more than the spool file for the first session: another file
    fake.files[bad.session_id] = bytearray(bytes(bad.data) + b"\x00" * 40)
    fake.prefix_len[bad.session_id] = 14
    now = Clock()
    ship = shipper(spool, fake, retry_max=60.0, monotonic=now)
    ship.run_once()
    assert (
        good.session_id in fake.sealed
        and not (spool.directory / f"{good.session_id}.json").exists()
    )
    assert (spool.directory / f"{bad.session_id}.sealed").read_bytes() == bytes(bad.data)
    state = read_ship_state(spool.directory, bad.session_id)
    assert state is not None and "not the same file" in state.error
    fake.calls.clear()
    ship.run_once()
    assert not [c for c in fake.calls if bad.session_id in c[1]]  # parked: left alone
    now.now += 61
    ship.run_once()
    assert [c for c in fake.calls if bad.session_id in c[1]]  # tried again after retry_max
    assert (spool.directory / f"{bad.session_id}.sealed").exists()


def test_unrecorded_and_recorder_lost_records_are_shipped(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    sid = "6a0c3f52-1f55-4b8e-8a7e-4b1d2a9c7e01"
    spool.write_record(
        SessionRecord(
            session_id=sid,
            unix_user="jdoe",
            client_address="192.0.2.9",
            session_start="2026-11-22T09:00:00Z",
            session_finish="2026-11-22T09:01:00Z",
            recording_status=RecordingStatus.UNRECORDED,
            spool_state=SpoolState.NONE,
            error="the SSH session closed without a recorder ever connecting",
        )
    )
    lost = start_recording(spool)
    lost.append(*cast_pieces(3))
    lost.close(RecordingStatus.RECORDER_LOST, error="the recorder disconnected")
    fake = FakeCollector()
    shipper(spool, fake).run_once()
    assert fake.records[sid]["recording_status"] == "unrecorded"
    assert sid not in fake.files
    assert fake.records[lost.session_id]["recording_status"] == "recorder_lost"
    assert bytes(fake.files[lost.session_id]) == bytes(lost.data)
    assert frame_count(bytes(lost.data)) == (4, False)
    assert files(spool) == set()


def test_authentication_events_are_shipped_or_set_aside(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    events = [
        {"event_id": f"ev-{i}", "created_at": "2026-11-22T09:00:00Z", "allowed": True}
        for i in range(1500)
    ]
    written = queue_auth_events(spool.directory, events)
    assert len(written) == 2 and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in written)
    fake = FakeCollector()
    shipper(spool, fake).run_once()
    assert set(fake.events) == {e["event_id"] for e in events} and files(spool) == set()

    class Refusing(FakeCollector):
        def send(self, method: str, path: str, **kw: Any) -> Any:
            reply = super().send(method, path, **kw)
            if path == "/v1/auth-events":
                return type(reply)(409, {"error": "event_conflict", "detail": "ev-1"})
            return reply

    (one,) = queue_auth_events(spool.directory, events[:1])
    shipper(spool, Refusing()).run_once()
    assert files(spool) == {one.name + ".rejected"}  # kept for the operator, not retried


def test_live_sessions_come_first_whatever_the_backlog(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    old = [write_recording(spool, cast_pieces(2)) for _ in range(3)]
    live = start_recording(spool)
    fake = FakeCollector()
    ship = shipper(spool, fake, pass_budget=-1.0)  # the budget is spent before the backlog
    ship.run_once()
    assert live.session_id in fake.files
    assert not any(r.session_id in fake.files for r in old)
    assert fake.backlog[-1]["sessions"] == 4
    assert fake.backlog[-1]["bytes"] == sum(len(r.data) for r in old)


def test_backlog_reports_are_sent_when_it_changes_and_periodically(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    now = Clock()
    fake = FakeCollector(down=True)
    rec = write_recording(spool, cast_pieces(2))
    ship = shipper(spool, fake, monotonic=now, backlog_interval=30.0)
    ship.run_once()
    fake.down = False
    fake.status = 503
    ship.run_once()
    fake.status = None
    assert fake.backlog == []
    rec2 = start_recording(spool)
    ship.run_once()
    assert fake.backlog == [{"sessions": 1, "bytes": 0}]  # rec shipped, rec2 live
    ship.run_once()
    now.now += 5
    ship.run_once()
    assert len(fake.backlog) == 1  # unchanged
    now.now += 30
    ship.run_once()
    assert len(fake.backlog) == 2
    rec2.append(*cast_pieces(3))
    fake.down = True
    ship.run_once()
    assert rec.session_id in fake.files


def test_sidecars_are_private_files(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    rec = start_recording(spool)
    shipper(spool, FakeCollector()).run_once()
    side = spool.directory / f"{rec.session_id}.ship"
    assert stat.S_IMODE(side.stat().st_mode) == 0o600
    doc = json.loads(side.read_text())
    assert doc["acked"] == len(rec.data) and doc["done"] is False and "synced" not in doc
    side.write_text("not json")
    assert read_ship_state(spool.directory, rec.session_id) is None


def test_run_sleeps_between_passes_and_stops(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    write_recording(spool, cast_pieces(2))
    fake = FakeCollector(down=True)
    ship = shipper(spool, fake, retry_max=5.0)
    slept: list[float] = []
    stop: Callable[[], bool] = lambda: len(slept) >= 3  # noqa: E731
    ship.run(stop, slept.append)
    assert slept == pytest.approx([0.4995, 0.999, 1.998])


def test_a_missing_spool_directory_is_waited_for(tmp_path: Path) -> None:
    fake = FakeCollector()
    ship = Shipper(tmp_path / "none", fake)
    assert ship.run_once() == ship.poll_interval and fake.calls == []


def test_files_that_are_not_session_records_are_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = make_spool(tmp_path / "spool")
    (spool.directory / "notes.json").write_text("{}")
    (spool.directory / "pam-queue.jsonl").write_text("")
    fake = FakeCollector()
    ship = shipper(spool, fake)
    ship.run_once()
    ship.run_once()
    assert files(spool) == {"notes.json", "pam-queue.jsonl"}
    assert [c for c in fake.calls if c[1].startswith("/v1/sessions")] == []
    assert sum("'notes.json'" in r.getMessage() for r in caplog.records) == 1  # said once
