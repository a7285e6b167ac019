"""Spool quotas, enforced on every append (issue 9, point 6).

Three limits bound what the spool holds (docs/agent-config.md):
- per session (``policy.spool_session_max_bytes``): one recording's sealed file;
- per user (``policy.spool_user_max_bytes``): every recording of one uid still in the spool,
  being written or finished and waiting to be shipped;
- the whole spool (``policy.spool_max_bytes``): every file in it.

:class:`QuotaLedger` counts, sans-IO: every append of a session reports the session's sealed
size (:meth:`QuotaLedger.charge`); a periodic scan of the directory (:func:`scan_usage`,
in a thread) brings in what changed behind the daemon's back (the shipper deleting shipped
recordings, records rewritten). :class:`SpoolQuota` is the daemon's side: it charges, lets
``drop_oldest`` make room at the spool cap, and logs each cut once. :func:`cut_tail` is what
a cut session's file ends with: a marker saying why, then no last frame (it reads as
truncated, FORMAT.md).

Invariants:
- a cut is decided when an append brings the session, its user or the spool within
  ``headroom`` bytes of a limit, where ``headroom`` = :data:`BATCH_ALLOWANCE` + one frame +
  the marker. So a file never passes its limit as long as each append is at most
  :data:`BATCH_ALLOWANCE` bytes (one read of a recorder's socket sealed: 64 KiB, at most
  about twice that once quoted as asciicast); a larger append overshoots by at most itself.
  Frames already sealed are never dropped: the frame numbers would have a gap and the whole
  recording would fail to decrypt;
- the ledger's sizes only grow between scans, and a scan never forgets a session charged
  while it ran (sizes are taken as the larger of the scan's and the ledger's).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol

from sshaudit.agent.config import OnSpoolFull, PolicyConfig
from sshaudit.agent.protocol import Marker
from sshaudit.agent.spool import RECORD_SUFFIX, SEALED_SUFFIX, SpoolState, read_record
from sshaudit.errors import SealedFormatError

log = logging.getLogger("sshaudit.agent")

BATCH_ALLOWANCE = 192 * 1024
MARKER_ROOM = 4096  # the cut marker's line and its frame's length and tag, with room spare


class QuotaKind(Enum):
    SESSION = "session"
    USER = "user"
    SPOOL = "spool"


@dataclass(frozen=True)
class QuotaLimits:
    session: int
    user: int
    spool: int
    headroom: int

    @classmethod
    def from_policy(cls, policy: PolicyConfig) -> QuotaLimits:
        return cls(
            session=policy.spool_session_max_bytes,
            user=policy.spool_user_max_bytes,
            spool=policy.spool_max_bytes,
            headroom=BATCH_ALLOWANCE + policy.frame_max_bytes + MARKER_ROOM,
        )


@dataclass(frozen=True)
class QuotaCut:
    """Why a session's recording is cut: which limit, of how many bytes, for whom."""

    kind: QuotaKind
    limit: int
    session_id: str
    uid: int

    @property
    def message(self) -> str:
        whom = {
            QuotaKind.SESSION: "this session",
            QuotaKind.USER: f"uid {self.uid}",
            QuotaKind.SPOOL: "the whole spool",
        }[self.kind]
        return f"recording cut: spool quota of {self.limit} bytes reached for {whom}"


class QuotaExceededError(OSError):
    """Raised on a cut session's append path: the recording cannot go on (EDQUOT)."""

    def __init__(self, cut: QuotaCut) -> None:
        super().__init__(errno.EDQUOT, cut.message)
        self.cut = cut


@dataclass(frozen=True)
class SessionUsage:
    uid: int | None  # None: a file no record attributes to a user (counted for the spool)
    size: int
    live: bool  # its record says it is still being written


@dataclass(frozen=True)
class SpoolUsage:
    """One scan of the spool directory."""

    total: int  # every file
    sessions: Mapping[str, SessionUsage] = field(default_factory=dict)


@dataclass
class _Known:
    uid: int | None
    size: int
    live: bool


class QuotaLedger:
    """Bytes per session, per uid and in all, as appends and scans report them."""

    def __init__(self, limits: QuotaLimits) -> None:
        self.limits = limits
        self._sessions: dict[str, _Known] = {}
        self._by_uid: dict[int, int] = {}
        self._other = 0  # files that are not recordings, and unattributed recordings
        self._charged: set[str] = set()  # since the current scan began

    @property
    def total(self) -> int:
        return self._other + sum(k.size for k in self._sessions.values())

    def user_bytes(self, uid: int) -> int:
        return self._by_uid.get(uid, 0)

    def charge(self, session_id: str, uid: int, size: int) -> QuotaCut | None:
        """The session's file is now ``size`` bytes; the first limit it comes near, if any."""
        known = self._sessions.setdefault(session_id, _Known(uid, 0, True))
        if known.uid is None:
            known.uid = uid
        grow = max(size - known.size, 0)
        known.size += grow
        self._by_uid[uid] = self._by_uid.get(uid, 0) + grow
        self._charged.add(session_id)
        return self.check(session_id, uid)

    def check(self, session_id: str, uid: int) -> QuotaCut | None:
        room = self.limits.headroom
        known = self._sessions.get(session_id)
        if known is not None and known.size + room > self.limits.session:
            return QuotaCut(QuotaKind.SESSION, self.limits.session, session_id, uid)
        if self.user_bytes(uid) + room > self.limits.user:
            return QuotaCut(QuotaKind.USER, self.limits.user, session_id, uid)
        if self.total + room > self.limits.spool:
            return QuotaCut(QuotaKind.SPOOL, self.limits.spool, session_id, uid)
        return None

    def begin_scan(self) -> None:
        self._charged.clear()

    def apply_scan(self, usage: SpoolUsage) -> None:
        """Replace the counts by a scan's, keeping what was charged while it ran."""
        sessions = {sid: _Known(u.uid, u.size, u.live) for sid, u in usage.sessions.items()}
        for sid in self._charged:
            old = self._sessions[sid]
            new = sessions.setdefault(sid, _Known(old.uid, 0, True))
            new.size, new.live = max(new.size, old.size), True
        self._sessions = sessions
        self._other = usage.total - sum(u.size for u in usage.sessions.values())
        self._by_uid = {}
        for k in sessions.values():
            if k.uid is not None:
                self._by_uid[k.uid] = self._by_uid.get(k.uid, 0) + k.size


class UidCache:
    """Session id -> (uid, finished) from the records: a uid never changes, and a finished
    record never goes back to writing, so each record is read about once."""

    def __init__(self) -> None:
        self._done: dict[str, int | None] = {}

    def lookup(self, directory: Path, session_id: str) -> tuple[int | None, bool]:
        if session_id in self._done:
            return self._done[session_id], False
        try:
            record = read_record(directory / (session_id + RECORD_SUFFIX))
        except (OSError, SealedFormatError):
            return None, True  # no record yet: a session starting (its own charge counts)
        uid = record.details.get("uid")
        uid = uid if isinstance(uid, int) and not isinstance(uid, bool) else None
        live = record.spool_state is SpoolState.WRITING
        if not live:
            self._done[session_id] = uid
        return uid, live

    def forget_missing(self, present: set[str]) -> None:
        for sid in [s for s in self._done if s not in present]:
            del self._done[sid]


def scan_usage(directory: Path, uids: UidCache) -> SpoolUsage:
    """Every file's size, and each recording's owner and state (blocking: run in a thread)."""
    total, sessions = 0, {}
    for entry in os.scandir(directory):
        with contextlib.suppress(FileNotFoundError):
            if not entry.is_file(follow_symlinks=False):
                continue
            size = entry.stat(follow_symlinks=False).st_size
            total += size
            if entry.name.endswith(SEALED_SUFFIX) and not entry.name.startswith("."):
                sid = entry.name.removesuffix(SEALED_SUFFIX)
                uid, live = uids.lookup(directory, sid)
                sessions[sid] = SessionUsage(uid, size, live)
    uids.forget_missing(set(sessions))
    return SpoolUsage(total, sessions)


class Cuttable(Protocol):
    """What :func:`cut_tail` needs of a recording (agent/session.py RecordingSession)."""

    finished: bool

    def marker(self, msg: Marker, now: float) -> bytes: ...
    def abandon(self) -> bytes: ...


def cut_tail(session: Cuttable, cut: QuotaCut, now: float) -> bytes:
    """The last bytes of a cut recording: the marker (at the last event's time), then the
    pending frame, and no last frame, so the file reads as truncated; b"" if it ended."""
    if session.finished:
        return b""
    return session.marker(Marker(0.0, f"sshaudit: {cut.message}"), now) + session.abandon()


class SpoolQuota:
    """The daemon's quotas: a ledger, kept current by scans, with ``drop_oldest`` at the cap."""

    def __init__(
        self,
        policy: PolicyConfig,
        directory: Path,
        io: Callable[..., Awaitable[object]],
        make_room: Callable[[int, int], Awaitable[bool]],
    ) -> None:
        self.ledger = QuotaLedger(QuotaLimits.from_policy(policy))
        self._drop = policy.on_spool_full is OnSpoolFull.DROP_OLDEST
        self._directory = directory
        self._io = io
        self._make_room = make_room
        self._uids = UidCache()
        self.cuts = 0

    async def rescan(self) -> None:
        self.ledger.begin_scan()
        usage = await self._io(scan_usage, self._directory, self._uids)
        assert isinstance(usage, SpoolUsage)
        self.ledger.apply_scan(usage)

    async def charge(self, session_id: str, uid: int, size: int) -> QuotaCut | None:
        """Count a session's append; the cut it must take, if any (logged here, once)."""
        cut = self.ledger.charge(session_id, uid, size)
        # drop_oldest: this user's oldest finished recordings, or shipped ones, may go
        # (agent/spool.py Spool.make_room); never another user's unshipped recording
        spool_full = cut is not None and cut.kind is QuotaKind.SPOOL and self._drop
        if spool_full and await self._make_room(uid, self.ledger.limits.headroom):
            await self.rescan()
            cut = self.ledger.check(session_id, uid)
        if cut is not None:
            self.cuts += 1
            log.warning("session %s uid %d: %s", session_id, uid, cut.message)
        return cut
