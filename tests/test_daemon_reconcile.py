"""agent/reconcile.py with a fake clock: unrecorded sessions, recorder_lost, multiplexing,
late recorders, queued events, and forgetting sessions whose sshd died."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sshaudit.agent.protocol import ProtocolError
from sshaudit.agent.reconcile import FindingKind, PamEvent, PamPhase, Reconciler
from sshaudit.agent.spool import RecordingStatus

T0 = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def wall(self) -> datetime:
        return T0 + timedelta(seconds=self.t - 1000.0)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def rec(clock: Clock) -> Reconciler:
    ids = (f"id-{i}" for i in itertools.count())
    return Reconciler(5.0, clock, clock.wall, new_id=lambda: next(ids))


def pam(phase: str, pid: int = 100, clock: Clock | None = None, **kw: Any) -> PamEvent:
    doc: dict[str, Any] = {
        "phase": phase,
        "user": "jdoe",
        "rhost": "192.0.2.9",
        "service": "sshd",
        "tty": "ssh",
    }
    doc["priv_pid"] = pid
    return PamEvent.from_json(doc, clock.wall() if clock else T0, **kw)


def test_a_recorded_session_produces_no_finding(rec: Reconciler, clock: Clock) -> None:
    assert rec.pam_event(pam("open_session", clock=clock)) == []
    clock.t += 0.2
    assert rec.recorder_started(100, "s1") == []
    clock.t += 60
    assert rec.poll() == []
    assert rec.recorder_ended(100, "s1", clean=True).status is RecordingStatus.COMPLETE
    assert rec.pam_event(pam("close_session", clock=clock)) == []
    assert rec.tracked == 0


def test_no_recorder_within_grace_is_unrecorded_then_finished(
    rec: Reconciler, clock: Clock
) -> None:
    rec.pam_event(pam("open_session", clock=clock))
    clock.t += 4.9
    assert rec.poll() == []
    clock.t += 0.2
    (f,) = rec.poll()
    assert f.kind is FindingKind.UNRECORDED and f.record_id == "id-0"
    assert f.pam.user == "jdoe" and f.pam.at == T0
    assert f.at == T0 + timedelta(seconds=5.1)
    assert "within 5 s" in f.detail
    assert rec.poll() == []  # reported once
    clock.t += 30
    (done,) = rec.pam_event(pam("close_session", clock=clock))
    assert done.kind is FindingKind.FINISHED and done.record_id == "id-0"
    assert done.at == T0 + timedelta(seconds=35.1)
    assert rec.tracked == 0


def test_closed_before_grace_without_recorder(rec: Reconciler, clock: Clock) -> None:
    rec.pam_event(pam("open_session", clock=clock))
    clock.t += 1
    found = rec.pam_event(pam("close_session", clock=clock))
    assert [f.kind for f in found] == [FindingKind.UNRECORDED, FindingKind.FINISHED]
    assert found[0].record_id == found[1].record_id
    assert "closed without a recorder" in found[0].detail


def test_recorder_lost_while_open_and_after_close(rec: Reconciler, clock: Clock) -> None:
    rec.pam_event(pam("open_session", clock=clock))
    rec.recorder_started(100, "s1")
    rec.recorder_started(100, "s2")  # ControlMaster: a second channel, same [priv]
    lost = rec.recorder_ended(100, "s1", clean=False)
    assert lost.status is RecordingStatus.RECORDER_LOST
    assert lost.detail is not None and "while its SSH session was open" in lost.detail
    rec.pam_event(pam("close_session", clock=clock))
    late = rec.recorder_ended(100, "s2", clean=False)
    assert late.detail is not None and "after its SSH session closed" in late.detail
    assert rec.tracked == 0


def test_recorder_without_pam_session(rec: Reconciler) -> None:
    assert rec.recorder_started(None, "s0") == []
    out = rec.recorder_ended(None, "s0", clean=False)
    assert out.detail is not None and "no PAM session" in out.detail
    assert rec.recorder_ended(7, "x", clean=True).status is RecordingStatus.COMPLETE
    assert rec.tracked == 0


def test_recorder_before_pam_open_counts(rec: Reconciler, clock: Clock) -> None:
    rec.recorder_started(100, "s1")  # the hook's message arrived late
    rec.pam_event(pam("open_session", clock=clock))
    clock.t += 10
    assert rec.poll() == []
    rec.recorder_ended(100, "s1", clean=True)
    assert rec.pam_event(pam("close_session", clock=clock)) == []
    assert rec.tracked == 0


def test_late_recorder_is_noted_on_the_unrecorded_record(rec: Reconciler, clock: Clock) -> None:
    rec.pam_event(pam("open_session", clock=clock))
    clock.t += 6
    (f,) = rec.poll()
    clock.t += 1
    (late,) = rec.recorder_started(100, "s9")
    assert late.kind is FindingKind.LATE_RECORDER and late.record_id == f.record_id
    assert "7.0 s" in late.detail and "s9" in late.detail


def test_queued_open_is_unrecorded_at_once(rec: Reconciler, clock: Clock) -> None:
    rec.pam_event(pam("open_session", queued=True))
    (f,) = rec.poll()
    assert f.kind is FindingKind.UNRECORDED and "daemon was down" in f.detail
    (done,) = rec.pam_event(pam("close_session", queued=True))
    assert done.kind is FindingKind.FINISHED


def test_queued_open_and_close_together(rec: Reconciler) -> None:
    rec.pam_event(pam("open_session", queued=True))
    found = rec.pam_event(pam("close_session", queued=True))
    assert [f.kind for f in found] == [FindingKind.UNRECORDED, FindingKind.FINISHED]
    assert "daemon was down" in found[0].detail


def test_close_without_open_and_account_are_ignored(rec: Reconciler, clock: Clock) -> None:
    assert rec.pam_event(pam("close_session", clock=clock)) == []
    assert rec.pam_event(pam("account", clock=clock)) == []
    assert rec.tracked == 0


def test_dead_sshd_is_forgotten(rec: Reconciler, clock: Clock) -> None:
    rec.pam_event(pam("open_session", pid=100, clock=clock))
    rec.recorder_started(100, "s1")
    rec.recorder_started(200, "early")  # never gets a PAM open
    clock.t += 100
    assert rec.poll(alive=lambda pid: True) == []
    assert rec.poll(alive=lambda pid: False) == []
    rec.recorder_ended(100, "s1", clean=True)
    assert rec.tracked == 0


def test_dead_sshd_with_unrecorded_session_finishes_it(rec: Reconciler, clock: Clock) -> None:
    rec.pam_event(pam("open_session", clock=clock))
    clock.t += 6
    (f,) = rec.poll(alive=lambda pid: True)
    clock.t += 1
    (done,) = rec.poll(alive=lambda pid: False)
    assert done.kind is FindingKind.FINISHED and done.record_id == f.record_id
    assert rec.tracked == 0


@pytest.mark.parametrize(
    "doc",
    [
        {"phase": "auth", "priv_pid": 1},
        {"phase": "open_session", "priv_pid": "1"},
        {"phase": "open_session", "priv_pid": 0},
        {"phase": "open_session", "priv_pid": True},
        {"phase": "open_session", "priv_pid": 1, "user": 5},
    ],
)
def test_bad_pam_messages(doc: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        PamEvent.from_json(doc, T0)


def test_long_fields_are_cut() -> None:
    doc = {"phase": "open_session", "priv_pid": 1, "user": "u" * 5000}
    event = PamEvent.from_json(doc, T0)
    assert event.phase is PamPhase.OPEN and len(event.user) == 1024
