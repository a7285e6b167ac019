"""agent/shipper.py, sans-IO: what the shipper sends next for a session, what each answer of
the collector means, the record document, and the backoff. No files, no HTTP."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from typing import Any

import pytest
from pydantic import ValidationError
from shipper_helpers import AUDITOR, HOST_ID, HOST_KEY, T0, frame_count

from sshaudit.agent.shipper import (
    Action,
    LocalView,
    ShipState,
    Step,
    Verdict,
    backoff_delay,
    classify,
    decide,
    describe,
    document_digest,
    on_response,
    record_document,
)
from sshaudit.agent.spool import RecordingStatus, SessionRecord, SpoolState
from sshaudit.collector.models import SessionRecord as CollectorRecord
from sshaudit.sealed import SealedWriter

SID = "5d6c1a8e-8f7a-4d2b-9c51-3f0e2a7b9c10"
LIMIT = 4 + (1 << 20) + 16


def sealed(n: int, close: bool = True) -> tuple[bytes, list[bytes]]:
    """A prefix and the stored pieces after it (frames, then the trailer if closed)."""
    w = SealedWriter(
        recipients=[AUDITOR.public],
        session_id=SID,
        host_id=HOST_ID,
        created_at=T0,
        host_key=HOST_KEY,
    )
    pieces = [bytes(w.write(f"frame {i}".encode() * 10)) for i in range(n)]
    if close:
        last = bytes(w.close(b"end"))
        (size,) = struct.unpack_from(">I", last, 0)
        pieces += [last[: 4 + size], last[4 + size :]]  # the last frame, the trailer
    return w.start(), pieces


def rec(**fields: Any) -> SessionRecord:
    base: dict[str, Any] = {
        "session_id": SID,
        "unix_user": "jdoe",
        "target_id": HOST_ID,
        "session_start": "2026-11-22T09:00:00Z",
        "program_type": "shell",
    }
    return SessionRecord(**{**base, **fields})


def closed(**fields: Any) -> SessionRecord:
    fields.setdefault("recording_status", RecordingStatus.COMPLETE)
    fields.setdefault("session_finish", "2026-11-22T09:05:00Z")
    fields.setdefault("spool_state", SpoolState.CLOSED)
    return rec(**fields)


def view(record: SessionRecord, data: bytes | None, state: ShipState, **kw: Any) -> LocalView:
    """What the loop would read: the prefix while nothing is acked, else the window."""
    if data is None:
        return LocalView(record, None, **kw)
    prefix = None
    if state.acked == 0:
        n = 14 + struct.unpack_from(">I", data, 10)[0] if len(data) >= 14 else 1 << 30
        prefix = data[:n] if len(data) >= n else None
    window = data[state.acked : state.acked + LIMIT] if state.acked else b""
    return LocalView(record, len(data), prefix, window, **kw)


def run(record: SessionRecord, data: bytes | None, state: ShipState) -> list[Action]:
    """Drive decide/on_response against a perfect collector until it waits or deletes."""
    remote = b""
    sealed_remote = False
    final_record = False
    actions: list[Action] = []
    for _ in range(100):
        action = decide(state, view(record, data, state), LIMIT)
        actions.append(action)
        if action.step in (Step.WAIT, Step.DELETE, Step.FAIL):
            return actions
        if action.step is Step.PREFIX:
            remote = action.body
        elif action.step is Step.APPEND:
            assert action.offset == len(remote)
            remote += action.body
            sealed_remote = frame_count(remote)[1]
        elif action.step is Step.RECORD:
            final_record = action.final
        state = on_response(
            state,
            action,
            200,
            {"length": len(remote), "state": "sealed_verified" if sealed_remote else "open"},
        ).state
    raise AssertionError(f"no end: {[a.step for a in actions]}, final_record={final_record}")


def test_a_complete_recording_goes_prefix_frames_record_then_delete() -> None:
    prefix, pieces = sealed(3)
    data = prefix + b"".join(pieces)
    actions = run(closed(), data, ShipState(SID))
    steps = [a.step for a in actions]
    assert steps == [Step.STATUS, Step.PREFIX, Step.APPEND, Step.RECORD, Step.DELETE]
    assert actions[1].body == prefix
    assert actions[2].offset == len(prefix) and actions[2].body == b"".join(pieces)
    doc = actions[3].document
    assert doc is not None and doc["recording_status"] == "complete" and actions[3].final


def test_chunks_are_whole_frames_within_the_limit() -> None:
    prefix, pieces = sealed(40)
    data = prefix + b"".join(pieces)
    state = ShipState(SID, acked=len(prefix), synced=True)
    limit = 3 * len(pieces[0]) + 5  # three frames and a bit: never a cut frame
    action = decide(state, LocalView(closed(), len(data), window=data[len(prefix) :]), limit)
    assert action.step is Step.APPEND and action.body == b"".join(pieces[:3])


def test_a_live_recording_streams_frames_and_waits_for_more() -> None:
    prefix, pieces = sealed(2, close=False)
    live = rec(spool_state=SpoolState.WRITING)
    partial = pieces[1][:7]  # a frame still being written: not shipped yet
    data = prefix + pieces[0] + partial
    actions = run(live, data, ShipState(SID))
    assert [a.step for a in actions] == [
        Step.STATUS,
        Step.PREFIX,
        Step.APPEND,
        Step.RECORD,
        Step.WAIT,
    ]
    assert actions[2].body == pieces[0]
    doc = actions[3].document
    assert doc is not None and doc["recording_status"] == "recording" and not actions[3].final


def test_the_final_record_waits_for_the_last_frames() -> None:
    prefix, pieces = sealed(2)
    data = prefix + b"".join(pieces)
    state = ShipState(SID, acked=len(prefix), synced=True)
    action = decide(state, view(closed(), data, state), LIMIT)
    assert action.step is Step.APPEND  # not RECORD: the record says complete
    # nothing acked yet but the header is not on disk: a live file waits, no record first
    state = ShipState(SID, synced=True)
    live = rec(spool_state=SpoolState.WRITING)
    assert decide(state, LocalView(live, 5, prefix=None), LIMIT).step is Step.RECORD


def test_nothing_is_deleted_before_the_collector_confirmed_everything() -> None:
    prefix, pieces = sealed(2)
    data = prefix + b"".join(pieces)
    record = closed()
    digest = document_digest(record_document(record))
    everything = ShipState(
        SID, acked=len(data), sealed=True, record_digest=digest, record_final=True, synced=True
    )
    assert decide(everything, view(record, data, everything), LIMIT).step is Step.DELETE
    for partial in (
        replace(everything, acked=len(data) - 1, sealed=False),  # not all bytes
        replace(everything, record_final=False),  # the final record not accepted
        replace(everything, record_digest="0" * 64),  # another version of the record
        replace(everything, synced=False),  # not asked in this run yet
    ):
        assert decide(partial, view(record, data, partial), LIMIT).step is not Step.DELETE
    live = replace(
        record, spool_state=SpoolState.WRITING, recording_status=RecordingStatus.RECORDING
    )
    live_digest = document_digest(record_document(live))
    state = replace(everything, record_digest=live_digest, record_final=False)
    assert decide(state, view(live, data, state), LIMIT).step is Step.WAIT


def test_a_truncated_recording_without_trailer_settles_on_its_whole_frames() -> None:
    prefix, pieces = sealed(3, close=False)
    torn = pieces[2][:10]  # the daemon was killed inside a write
    data = prefix + pieces[0] + pieces[1] + torn
    record = closed(recording_status=RecordingStatus.TRUNCATED)
    actions = run(record, data, ShipState(SID))
    assert [a.step for a in actions][-3:] == [Step.APPEND, Step.RECORD, Step.DELETE]
    assert actions[-3].body == pieces[0] + pieces[1]


def test_records_without_recordings() -> None:
    unrecorded = closed(recording_status=RecordingStatus.UNRECORDED, spool_state=SpoolState.NONE)
    assert [a.step for a in run(unrecorded, None, ShipState(SID))] == [Step.RECORD, Step.DELETE]
    dropped = closed(spool_state=SpoolState.DROPPED)
    actions = run(dropped, None, ShipState(SID))
    assert [a.step for a in actions] == [Step.RECORD, Step.DELETE]
    doc = actions[0].document
    assert doc is not None and doc["details"]["spool_dropped"] is True
    assert "dropped" in doc["error"]


def test_an_unrecorded_record_waits_for_its_finish_time_within_the_hold() -> None:
    open_one = rec(
        recording_status=RecordingStatus.UNRECORDED,
        spool_state=SpoolState.NONE,
        session_finish=None,
    )
    state = ShipState(SID)
    assert decide(state, LocalView(open_one, None, record_age=10), LIMIT, hold=60).step is Step.WAIT
    sent = decide(state, LocalView(open_one, None, record_age=61), LIMIT, hold=60)
    assert sent.step is Step.RECORD
    stale = LocalView(open_one, None, record_age=1, record_stale=True)
    assert decide(state, stale, LIMIT, hold=60).step is Step.RECORD
    # sent after the hold: kept (the daemon will write its finish time), deleted once stale
    accepted = on_response(state, sent, 200, {"outcome": "created"}).state
    assert decide(accepted, LocalView(open_one, None, record_age=61), LIMIT, 60).step is Step.WAIT
    assert decide(accepted, stale, LIMIT, 60).step is Step.DELETE


def test_local_and_remote_that_disagree_park_the_session() -> None:
    prefix, pieces = sealed(2)
    data = prefix + b"".join(pieces)
    state = ShipState(SID, acked=len(data) + 10, synced=True)
    action = decide(state, view(closed(), data, state), LIMIT)
    assert action.step is Step.FAIL and "not the same file" in action.note
    state = ShipState(SID, acked=len(prefix), synced=True)
    garbage = LocalView(closed(), len(data), window=b"\x00\x00\x00\x01zz")
    action = decide(state, garbage, LIMIT)
    assert action.step is Step.FAIL and "not whole frames" in action.note


def test_answers() -> None:
    state = ShipState(SID, acked=100, synced=True)
    append = Action(Step.APPEND, offset=100, body=b"x" * 50)
    ok = on_response(state, append, 200, {"length": 150, "state": "open"})
    assert ok.verdict is Verdict.OK and ok.state.acked == 150 and not ok.state.sealed
    done = on_response(state, append, 200, {"length": 150, "state": "sealed_verified"})
    assert done.state.sealed
    # resume from the collector's length, whichever way it differs
    for code in ("offset_mismatch", "not_started", "recording_sealed"):
        out = on_response(state, append, 409, {"error": code, "length": 80})
        assert out.verdict is Verdict.OK and out.state.acked == 80 and out.state.synced
        assert out.state.sealed is (code == "recording_sealed")
    out = on_response(state, append, 409, {"error": "replay_mismatch", "length": 120})
    assert out.verdict is Verdict.PARK and "replay_mismatch" in out.state.error
    for status, body in [(507, {"error": "storage_full"}), (503, {}), (500, {}), (429, {})]:
        out = on_response(state, append, status, body)
        assert out.verdict is Verdict.RETRY and not out.state.synced and out.state.acked == 100
    assert on_response(state, append, 401, {"error": "token_revoked"}).verdict is Verdict.RETRY
    assert on_response(state, append, 403, {"error": "wrong_role"}).verdict is Verdict.RETRY
    assert on_response(state, append, 403, {"error": "foreign_session"}).verdict is Verdict.PARK
    big = on_response(state, append, 413, {"error": "body_too_large"})
    assert big.verdict is Verdict.PARK and "upload_chunk_bytes" in big.message
    ask = Action(Step.STATUS)
    none = on_response(state, ask, 404, {"error": "no_recording", "length": 0})
    assert none.verdict is Verdict.OK and none.state.acked == 0 and none.state.synced
    assert on_response(state, ask, 404, {"error": "not_found"}).verdict is Verdict.PARK
    assert on_response(state, ask, 200, {}).verdict is Verdict.RETRY  # no length: odd


def test_a_final_record_the_collector_already_holds_otherwise() -> None:
    state = ShipState(SID)
    final = Action(Step.RECORD, document={}, digest="ab" * 32, final=True)
    out = on_response(state, final, 409, {"error": "record_immutable"})
    assert out.verdict is Verdict.OK and out.state.record_final and out.message
    live = replace(final, final=False)
    assert on_response(state, live, 409, {"error": "record_immutable"}).verdict is Verdict.PARK
    assert on_response(state, final, 422, {"error": "invalid_request"}).verdict is Verdict.PARK


def test_classify() -> None:
    assert classify(200, {}) is Verdict.OK
    assert classify(400, {"error": "malformed_chunk"}) is Verdict.PARK
    assert classify(408, {}) is Verdict.RETRY and classify(502, {}) is Verdict.RETRY


def test_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    assert [backoff_delay(a, 300, 0.999999) for a in range(4)] == pytest.approx(
        [0.5, 1, 2, 4], rel=1e-5
    )
    assert backoff_delay(3, 300, 0.5) == pytest.approx(2.0)
    assert backoff_delay(0, 300, 0.0) == 0.0
    assert backoff_delay(40, 300, 0.999999) == pytest.approx(300, rel=1e-5)
    assert backoff_delay(10_000, 7.5, 0.5) == pytest.approx(3.75)  # no overflow


def test_ship_state_round_trip_and_validation() -> None:
    state = ShipState(SID, acked=7, sealed=True, record_digest="ab", error="x", synced=True)
    back = ShipState.from_json(json.loads(json.dumps(state.to_json())))
    assert back == state and not back.synced  # synced is this run's, never saved
    assert "synced" not in state.to_json()
    for bad in ({"session_id": SID, "acked": -1}, {"session_id": SID, "acked": "7"}, {"acked": 1}):
        with pytest.raises(ValueError, match="ship state"):
            ShipState.from_json(bad)


def test_record_document_has_the_design_fields_and_the_collector_takes_it() -> None:
    doc = record_document(closed(user_email="jdoe@example.com", exit_status=3, cert_serial=9))
    assert set(doc) == set(CollectorRecord.model_fields)
    parsed = CollectorRecord.model_validate(doc)
    assert parsed.unix_user == "jdoe" and parsed.exit_status == 3 and parsed.cert_serial == 9
    assert parsed.recording_status.value == "complete" and parsed.target_id == HOST_ID


def test_record_document_fits_odd_records_into_what_the_collector_takes() -> None:
    odd = closed(
        session_start="",  # an orphan file whose header was unreadable
        client_address="client.example.com",  # PAM_RHOST with UseDNS yes
        server_address="not an address",
        unix_user="u\x00" + "x" * 100,
        error="e" * 10_000,
        command="c" * 70_000,
        program_type="weird",
        exit_status=1 << 40,
        cert_serial=-1,
        client_port=70000,
        bytes_in=-5,
        target_id="web 1/..",
        details={"deep": json.loads("[" * 40 + "]" * 40)},
    )
    doc = record_document(odd)
    parsed = CollectorRecord.model_validate(doc)
    assert parsed.session_start == "2026-11-22T09:05:00Z"  # the finish stands in
    assert parsed.client_address == "" and parsed.program_type is None
    assert parsed.exit_status is None and parsed.cert_serial is None and parsed.client_port is None
    assert parsed.target_id == "" and parsed.bytes_in == 0
    assert parsed.error is not None and len(parsed.error) == 4096
    assert parsed.details == {
        "details_dropped": "more than the collector takes (64 KiB, 32 levels)"
    }
    hostful = record_document(closed(client_address="client.example.com"))
    assert hostful["details"]["client_host"] == "client.example.com"
    assert hostful["details"].get("session_start_unknown") is None
    assert record_document(odd)["details"] == doc["details"]  # deterministic
    assert document_digest(doc) == document_digest(record_document(odd))


def test_the_unfixed_document_would_have_been_refused() -> None:
    """The cases above are real refusals: the raw values fail the collector's model."""
    with pytest.raises(ValidationError):
        CollectorRecord.model_validate(
            {
                "session_id": SID,
                "session_start": "2026-11-22T09:00:00Z",
                "recording_status": "complete",
                "client_address": "client.example.com",
            }
        )


def test_messages_from_the_collector_cannot_forge_log_lines() -> None:
    text = describe(409, {"error": "x", "detail": "a\nFAKE 2026 line\r\x1b[2J"})
    assert text == "HTTP 409 x: a?FAKE 2026 line??[2J"
