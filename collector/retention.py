"""Retention: which sessions have outlived the policy, and the job that deletes them.

The policy lives in the admin policy document (``PUT /v1/admin/policy``) under
``"retention"`` (docs/collector.md "Retention")::

    {"retention": {"default_days": 365,
                   "groups": {"<name>": {"days": N, "targets": ["<host id>", ...]}}}}

Invariants:
- :func:`plan` is sans-IO: sessions, holds, policy and ``now`` in, the sessions to delete
  out; it never returns a session still ``recording``, one whose recording is not sealed,
  one a hold names (by session id, user_email or target id), nor one younger than its
  period;
- a session's age counts from ``session_finish`` (``session_start`` when the record has
  none) and its period is that of its target's group; a target in several groups keeps
  the longest period (the safe reading of an ambiguous policy); no group: ``default_days``;
- a missing ``"retention"`` key means 365 days for all; a malformed one is refused
  (:class:`UnprocessableError`) and the job deletes nothing rather than guess;
- only :func:`run` deletes, through :meth:`Storage.delete_expired`, which re-checks holds
  and state in its own transaction (a hold added after planning still wins) and logs each
  deletion as a ``retention_delete`` audit event; no HTTP route calls it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sshaudit.collector.models import RecordingStatus, format_time, parse_time, to_us
from sshaudit.collector.problems import CollectorError, UnprocessableError
from sshaudit.collector.storage import (
    DeleteOutcome,
    Hold,
    HoldKind,
    RecordingState,
    SessionQuery,
    Storage,
    StoredSession,
)

log = logging.getLogger("sshaudit.collector")

DEFAULT_DAYS = 365
MAX_DAYS = 36500  # a hundred years: anything longer is a typo, not a policy
PAGE = 500


@dataclass(frozen=True)
class TargetGroup:
    name: str
    days: int
    targets: frozenset[str]


@dataclass(frozen=True)
class RetentionPolicy:
    default_days: int = DEFAULT_DAYS
    groups: tuple[TargetGroup, ...] = ()

    def period(self, target_id: str) -> tuple[int, str | None]:
        """(days, group name or None) for a target: the longest of its groups' periods."""
        mine = [g for g in self.groups if target_id in g.targets]
        if not mine:
            return self.default_days, None
        best = max(mine, key=lambda g: (g.days, g.name))
        return best.days, best.name

    @property
    def shortest_days(self) -> int:
        return min([self.default_days, *(g.days for g in self.groups)])


@dataclass(frozen=True)
class Candidate:
    """What planning needs to know of one stored session."""

    session_id: str
    target_id: str
    user_email: str
    ended_at: datetime  # session_finish, or session_start when there is none
    final: bool  # not recording, and the recording (if any) is sealed


@dataclass(frozen=True)
class Expired:
    session_id: str
    target_id: str
    user_email: str
    ended_at: datetime
    days: int
    group: str | None

    @property
    def reason(self) -> str:
        scope = f"group {self.group}" if self.group else "default"
        return f"older than {self.days} days ({scope}); ended {format_time(self.ended_at)}"


def _days(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DAYS:
        raise UnprocessableError(
            f"the policy's {where} must be a whole number of days, 1 to {MAX_DAYS}",
            code="invalid_policy",
        )
    return value


def _group(name: str, doc: Any) -> TargetGroup:
    where = f"retention group {name!r}"
    if not isinstance(doc, Mapping) or set(doc) != {"days", "targets"}:
        raise UnprocessableError(
            f"{where} must be an object with exactly days and targets", code="invalid_policy"
        )
    targets = doc["targets"]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise UnprocessableError(
            f"{where}: targets must be a list of host ids", code="invalid_policy"
        )
    return TargetGroup(name, _days(doc["days"], f"{where} days"), frozenset(targets))


def parse_policy(document: Mapping[str, Any]) -> RetentionPolicy:
    """The retention part of the admin policy document (module docstring)."""
    doc = document.get("retention")
    if doc is None:
        return RetentionPolicy()
    if not isinstance(doc, Mapping) or not set(doc) <= {"default_days", "groups"}:
        raise UnprocessableError(
            "the policy's retention must be an object with default_days and/or groups",
            code="invalid_policy",
        )
    default = _days(doc.get("default_days", DEFAULT_DAYS), "retention default_days")
    groups = doc.get("groups", {})
    if not isinstance(groups, Mapping):
        raise UnprocessableError(
            "the policy's retention groups must be an object", code="invalid_policy"
        )
    return RetentionPolicy(default, tuple(_group(n, g) for n, g in sorted(groups.items())))


def _held(c: Candidate, holds: Iterable[Hold]) -> bool:
    wanted = {
        (HoldKind.SESSION, c.session_id),
        (HoldKind.USER, c.user_email),
        (HoldKind.TARGET, c.target_id),
    }
    return any((h.kind, h.value) in wanted for h in holds)


def plan(
    candidates: Iterable[Candidate],
    holds: Sequence[Hold],
    policy: RetentionPolicy,
    now: datetime,
) -> list[Expired]:
    """The sessions to delete now, in the order given."""
    out = []
    for c in candidates:
        days, group = policy.period(c.target_id)
        if not c.final or _held(c, holds) or c.ended_at + timedelta(days=days) > now:
            continue
        out.append(Expired(c.session_id, c.target_id, c.user_email, c.ended_at, days, group))
    return out


def candidate(stored: StoredSession) -> Candidate:
    r = stored.record
    sealed = stored.recording is None or stored.recording.state is not RecordingState.OPEN
    final = r.recording_status is not RecordingStatus.RECORDING and sealed
    ended = parse_time(r.session_finish or r.session_start)
    return Candidate(r.session_id, r.target_id, r.user_email, ended, final)


def candidates(storage: Storage, policy: RetentionPolicy, now: datetime) -> list[Candidate]:
    """Every session that could be old enough: a session starts before it ends, so one
    that started within the shortest period cannot have expired (keeps the scan small)."""
    until = to_us(now - timedelta(days=policy.shortest_days)) + 1
    out: list[Candidate] = []
    after: tuple[int, str] | None = None
    while True:
        page = storage.query_sessions(SessionQuery(until_us=until, after=after, limit=PAGE))
        out.extend(candidate(s) for s in page)
        if len(page) < PAGE:
            return out
        last = page[-1].record
        after = (to_us(parse_time(last.session_start)), last.session_id)


@dataclass(frozen=True)
class Result:
    expired: Expired
    outcome: DeleteOutcome | None  # None: a dry run


def run(storage: Storage, now: datetime, *, dry_run: bool = False) -> list[Result]:
    """Plan with the stored policy and holds, then (unless ``dry_run``) delete."""
    policy = parse_policy(storage.get_policy().document)
    expired = plan(candidates(storage, policy, now), storage.list_holds(), policy, now)
    if dry_run:
        return [Result(e, None) for e in expired]
    return [Result(e, storage.delete_expired(e.session_id, e.reason, now)) for e in expired]


class Periodic:
    """Runs :func:`run` every ``interval`` seconds in a daemon thread until :meth:`stop`;
    the clock is the caller's. A failed run is logged and retried next time."""

    def __init__(self, storage: Storage, interval: float, clock: Callable[[], datetime]) -> None:
        self.storage, self.interval, self.clock = storage, interval, clock
        self.stopped = threading.Event()
        self.runs = 0
        self._thread = threading.Thread(target=self._loop, name="retention", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self._thread.join(timeout=30)

    def once(self) -> list[Result]:
        try:
            results = run(self.storage, self.clock())
        except CollectorError as exc:
            log.error("retention run failed: %s", exc.message)
            return []
        finally:
            self.runs += 1
        for r in results:
            what = r.outcome.value if r.outcome else "planned"
            log.info("retention: %s %s (%s)", what, r.expired.session_id, r.expired.reason)
        return results

    def _loop(self) -> None:
        while not self.stopped.is_set():
            try:
                self.once()
            except Exception:
                log.exception("retention run failed")
            self.stopped.wait(self.interval)
