"""PAM sessions against recordings, sans-IO: no session is ever silently missing.

sshd tells the daemon about each SSH connection twice, independently: the PAM hook (root,
in the ``[priv]`` process) says a session opened and closed; each session channel's recorder
connects from under that same ``[priv]`` process. One PAM session carries N recordings
(ControlMaster multiplexing). The :class:`Reconciler` matches them by the ``[priv]`` pid:

- a PAM session with no recorder within ``grace`` seconds (or opened while the daemon was
  down: a queued event) becomes an ``unrecorded`` record (:class:`Finding`), whose finish time
  is filled in when the PAM session closes;
- a recorder that disconnects without END is ``recorder_lost``, whatever PAM says, with the
  reason telling whether its SSH session was still open;
- the PAM open's ``auth_info`` (sshd's SSH_AUTH_INFO_0, seen by root) stays available to the
  recordings of that connection (:meth:`Reconciler.auth_info`): their identity source.

Invariants: the clock (monotonic seconds, for the grace period), the wall clock (for the
records) and the id generator are parameters; nothing here does I/O; state is bounded by the
live connections (:meth:`Reconciler.poll` forgets sessions whose ``[priv]`` process is gone).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any

from sshaudit.agent.protocol import ProtocolError
from sshaudit.agent.spool import RecordingStatus
from sshaudit.agent.sshcert import MAX_AUTH_INFO

MAX_FIELD = 1024


class PamPhase(Enum):
    OPEN = "open_session"
    CLOSE = "close_session"
    ACCOUNT = "account"


def _text(doc: Mapping[str, Any], name: str) -> str:
    value = doc.get(name, "")
    if not isinstance(value, str):
        raise ProtocolError(f"PAM: {name} must be a string")
    return value[:MAX_FIELD]


@dataclass(frozen=True)
class PamEvent:
    """One PAM message (from the hook, or from its queue when the daemon was down)."""

    phase: PamPhase
    user: str
    rhost: str
    service: str
    tty: str
    priv_pid: int
    at: datetime
    queued: bool = False
    # sshd's SSH_AUTH_INFO_0 as root saw it (open_session only); None: the hook sent none
    auth_info: str | None = None

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], at: datetime, queued: bool = False) -> PamEvent:
        try:
            phase = PamPhase(doc.get("phase"))
        except ValueError:
            raise ProtocolError(
                "PAM: phase must be open_session, close_session or account"
            ) from None
        pid = doc.get("priv_pid")
        if type(pid) is not int or not 1 <= pid < 1 << 31:
            raise ProtocolError("PAM: priv_pid must be a positive integer")
        auth_info = doc.get("auth_info")
        if auth_info is not None and not isinstance(auth_info, str):
            raise ProtocolError("PAM: auth_info must be a string")
        return cls(
            phase=phase,
            user=_text(doc, "user"),
            rhost=_text(doc, "rhost"),
            service=_text(doc, "service"),
            tty=_text(doc, "tty"),
            priv_pid=pid,
            at=at,
            queued=queued,
            # cut, not refused: a cut value no longer ends with a newline, so it is never
            # taken for sshd's (agent/connection.py choose_identity)
            auth_info=None if auth_info is None else auth_info[:MAX_AUTH_INFO],
        )


class FindingKind(Enum):
    UNRECORDED = "unrecorded"  # write a new record: this SSH session has no recording
    FINISHED = "finished"  # the PAM session of an unrecorded record closed: set its finish
    LATE_RECORDER = "late_recorder"  # a recorder came after the record was written


@dataclass(frozen=True)
class Finding:
    kind: FindingKind
    record_id: str  # the session id of the (unrecorded) record to write or update
    pam: PamEvent  # the PAM open event of the SSH session
    at: datetime
    detail: str


@dataclass(frozen=True)
class Outcome:
    """How a recording ended, for its record."""

    status: RecordingStatus
    detail: str | None


@dataclass
class _Tracked:
    opened: PamEvent
    opened_mono: float
    recorders: set[str] = field(default_factory=set)
    recorded: bool = False
    unrecorded_id: str | None = None
    closed: bool = False


class Reconciler:
    def __init__(
        self,
        grace: float,
        clock: Callable[[], float],
        wall: Callable[[], datetime],
        new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    ) -> None:
        self._grace = grace
        self._clock = clock
        self._wall = wall
        self._new_id = new_id
        self._sessions: dict[int, _Tracked] = {}
        self._early: dict[int, set[str]] = {}  # recorders seen before their PAM open

    @property
    def tracked(self) -> int:
        return len(self._sessions) + len(self._early)

    def pam_event(self, event: PamEvent) -> list[Finding]:
        if event.phase is PamPhase.OPEN:
            early = self._early.pop(event.priv_pid, set())
            self._sessions[event.priv_pid] = _Tracked(
                event, self._clock(), recorders=early, recorded=bool(early)
            )
            return []
        if event.phase is PamPhase.CLOSE:
            return self._close(event.priv_pid, event.at)
        return []

    def _close(self, priv_pid: int, at: datetime) -> list[Finding]:
        tracked = self._sessions.get(priv_pid)
        if tracked is None or tracked.closed:
            return []  # opened before this daemon knew it: nothing to say
        tracked.closed = True
        out: list[Finding] = []
        if not tracked.recorded and tracked.unrecorded_id is None:
            out.append(self._unrecorded(tracked, self._why_unrecorded(tracked, closing=True)))
        if tracked.unrecorded_id is not None:
            out.append(
                Finding(FindingKind.FINISHED, tracked.unrecorded_id, tracked.opened, at, "closed")
            )
        if not tracked.recorders:
            del self._sessions[priv_pid]
        return out

    def _unrecorded(self, tracked: _Tracked, detail: str) -> Finding:
        tracked.unrecorded_id = self._new_id()
        return Finding(
            FindingKind.UNRECORDED, tracked.unrecorded_id, tracked.opened, self._wall(), detail
        )

    def _why_unrecorded(self, tracked: _Tracked, closing: bool = False) -> str:
        if tracked.opened.queued:
            return "the SSH session opened while the agent daemon was down"
        if closing:
            return "the SSH session closed without a recorder ever connecting"
        return f"no recorder connected within {self._grace:g} s of the session opening"

    def auth_info(self, priv_pid: int | None) -> str | None:
        """sshd's SSH_AUTH_INFO_0 from the PAM open of this SSH connection, if known."""
        tracked = None if priv_pid is None else self._sessions.get(priv_pid)
        return None if tracked is None else tracked.opened.auth_info

    def recorder_started(self, priv_pid: int | None, session_id: str) -> list[Finding]:
        if priv_pid is None:
            return []
        tracked = self._sessions.get(priv_pid)
        if tracked is None:
            self._early.setdefault(priv_pid, set()).add(session_id)
            return []
        tracked.recorders.add(session_id)
        tracked.recorded = True
        if tracked.unrecorded_id is None or tracked.opened.queued:
            return []
        late = self._clock() - tracked.opened_mono
        detail = f"a recorder connected {late:.1f} s after the session opened: {session_id}"
        return [
            Finding(
                FindingKind.LATE_RECORDER,
                tracked.unrecorded_id,
                tracked.opened,
                self._wall(),
                detail,
            )
        ]

    def recorder_ended(self, priv_pid: int | None, session_id: str, clean: bool) -> Outcome:
        tracked = None if priv_pid is None else self._forget_recorder(priv_pid, session_id)
        if clean:
            return Outcome(RecordingStatus.COMPLETE, None)
        if tracked is None:
            where = "(no PAM session known for it)"
        elif tracked.closed:
            where = "after its SSH session closed"
        else:
            where = "while its SSH session was open"
        return Outcome(
            RecordingStatus.RECORDER_LOST,
            f"the recorder disconnected without ending the recording {where}",
        )

    def _forget_recorder(self, priv_pid: int, session_id: str) -> _Tracked | None:
        tracked = self._sessions.get(priv_pid)
        if tracked is None:
            early = self._early.get(priv_pid, set())
            early.discard(session_id)
            if not early:
                self._early.pop(priv_pid, None)
            return None
        tracked.recorders.discard(session_id)
        if tracked.closed and not tracked.recorders:
            del self._sessions[priv_pid]
        return tracked

    def poll(self, alive: Callable[[int], bool] | None = None) -> list[Finding]:
        """Sessions past the grace period without a recorder; with ``alive``, sessions whose
        ``[priv]`` process is gone count as closed (sshd died without closing PAM)."""
        out: list[Finding] = []
        now = self._clock()
        for pid, tracked in list(self._sessions.items()):
            waiting = not tracked.recorded and tracked.unrecorded_id is None
            if waiting and (tracked.opened.queued or now - tracked.opened_mono >= self._grace):
                out.append(self._unrecorded(tracked, self._why_unrecorded(tracked)))
            if alive is not None and not tracked.closed and not alive(pid):
                out.extend(self._close(pid, self._wall()))
        if alive is not None:
            for pid in [p for p in self._early if not alive(p)]:
                del self._early[pid]
        return out
