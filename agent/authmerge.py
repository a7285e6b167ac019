"""Merge authentication observations into the collector's authentication events (sans-IO).

Invariants:
- No clock, no I/O, no randomness of its own: time comes from the observations and from
  :meth:`AuthMerger.tick`, event ids from the injected ``new_id``.
- One event per SSH *connection*, keyed by (client_address, client_port), or by the sshd
  process id when a source knows it (journald's ``_PID``, the PAM hook's parent): not one per
  "Failed" line. OpenSSH's client tries the bare key before its certificate on every
  certificate login (tests/golden/authlog/accepted-cert.log), so one event per line would
  log a denial beside every successful certificate login. An auditor wants the outcome of
  the connection and why: sshd's "Accepted" decides "allowed" for the connection; otherwise
  any denial wins, and the most specific reason wins (sshd's own reason > the principals
  command's or PAM's reason > a generic "Failed" line > the connection closing).
- Certificate fields (key id, serial, fingerprint) come only from observations of the same
  key as the deciding one, so a failed certificate cannot lend its key id to a login that
  a different key made.
- An attempt is emitted when decided (sshd Accepted, unless ``wait_for_session``; the
  connection closed; maximum attempts exceeded; PAM open_session), else ``settle`` seconds
  after its last observation, with whatever is known. A connection that showed no user and
  no decision (a port scan) yields no event.
- "Certificate invalid"/"Authentication refused" lines carry no address: with a pid they join
  that pid's attempt; without one (``sshd -E``) they join the next sshd failure, accept or
  close line, which is exact when connections do not interleave within the window.
- Memory is bounded: at most ``max_pending`` attempts (the oldest is emitted early with what
  is known), as many remembered finished connections (for attributing later forwarding
  refusals and ignoring late lines), and 64 observations per attempt.
- Every event dict has exactly collector/models.py AuthEvent's fields, within its limits.
"""

from __future__ import annotations

import re
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sshaudit.agent.authlog import Kind, Observation, Source
from sshaudit.errors import UsageError

# collector/ids.py HOST_ID_PATTERN and SESSION_ID_PATTERN (the agent does not import the
# collector package).
_HOST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,252}")
_SESSION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MAX_OBS_PER_ATTEMPT = 64
MAX_ORPHANS = 256
CLOSED_EARLY = "connection closed before authentication completed"
_FINAL = frozenset({Kind.CLOSED, Kind.MAX_TRIES})  # SESSION_OPEN and ACCEPTED: _decided
_JOINS_ORPHANS = frozenset({Kind.FAILED, Kind.ACCEPTED, Kind.CLOSED, Kind.MAX_TRIES})
_SPECIFIC = frozenset({Kind.CERT_INVALID, Kind.REFUSED, Kind.NOT_ALLOWED, Kind.INVALID_USER})
_PORTLESS = frozenset({Kind.CERT_INVALID, Kind.REFUSED, Kind.NOT_ALLOWED})
_LATE_ONLY = frozenset({Kind.CLOSED, Kind.SESSION_OPEN, Kind.ACCOUNT, Kind.CHILD})

ConnKey = tuple[str, int]


@dataclass
class _Attempt:
    serial: int
    key: ConnKey | None
    pid: int | None
    first: datetime
    last: datetime
    obs: list[Observation] = field(default_factory=list)


@dataclass(frozen=True)
class _Known:
    """What a finished connection told, for forwarding refusals that come later."""

    key: ConnKey | None
    unix_user: str
    user_email: str
    session_id: str | None


def _new_id() -> str:
    return uuid.uuid4().hex


class AuthMerger:
    """Observations in (:meth:`add`), finished AuthEvent dicts out (:meth:`add`, :meth:`tick`)."""

    def __init__(
        self,
        target_id: str,
        *,
        new_id: Callable[[], str] = _new_id,
        settle: float = 5.0,
        max_pending: int = 10_000,
        trusted_cas: Iterable[str] = (),
        wait_for_session: bool = False,
        wait_for_log: bool = False,
    ) -> None:
        if _HOST_ID.fullmatch(target_id) is None:
            raise UsageError(f"not a host id: {target_id!r}")
        if settle <= 0 or max_pending < 1:
            raise UsageError("settle must be > 0 and max_pending >= 1")
        self._target = target_id
        self._new_id = new_id
        self._settle = timedelta(seconds=settle)
        self._max = max_pending
        self._trusted: frozenset[str] | None = None
        if trusted_cas:
            self.set_trusted_cas(trusted_cas)
        self._wait_for_session = wait_for_session
        self._wait_for_log = wait_for_log
        self._pending: OrderedDict[int, _Attempt] = OrderedDict()
        self._by_key: dict[ConnKey, _Attempt] = {}
        self._by_pid: dict[int, _Attempt] = {}
        self._done_keys: OrderedDict[ConnKey, _Known] = OrderedDict()
        self._done_pids: OrderedDict[int, _Known] = OrderedDict()
        self._parent_of: OrderedDict[int, int] = OrderedDict()  # session child -> sshd pid
        self._orphans: deque[Observation] = deque(maxlen=MAX_ORPHANS)
        self._serial = 0

    def set_trusted_cas(self, fingerprints: Iterable[str]) -> None:
        """The SHA256 fingerprints of TrustedUserCAKeys: a failed certificate from another
        CA gets the reason "untrusted CA" (sshd 9.2 logs that only at DEBUG2)."""
        self._trusted = frozenset(fingerprints)

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- input -------------------------------------------------------------------------

    def add(self, obs: Observation) -> list[dict[str, Any]]:
        """Take one observation; return the events it finished (often none)."""
        if obs.kind is Kind.FORWARDING:
            return [self._forwarding_event(obs)]
        if obs.kind is Kind.CHILD:
            self._link_child(obs)
            return []
        portless = obs.client_port is None and obs.kind in _PORTLESS
        if portless and (obs.pid is None or obs.pid in self._done_pids):
            self._orphans.append(obs)
            return []
        attempt = self._find(obs)
        events: list[dict[str, Any]] = []
        if attempt is None:
            if not self._starts_attempt(obs):
                return []
            attempt, evicted = self._open(obs)
            events.extend(evicted)
        self._attach(attempt, obs)
        if obs.source is Source.SSHD_LOG and obs.pid is None and obs.kind in _JOINS_ORPHANS:
            self._adopt_orphans(attempt, obs.client_address)
        if self._decided(attempt, obs.kind):
            events.extend(self._finish(attempt))
        return events

    def _decided(self, attempt: _Attempt, kind: Kind) -> bool:
        """Whether ``kind`` completes ``attempt``. With ``wait_for_log``, a PAM session
        waits for sshd's Accepted line (the log is read a little later than PAM reports),
        or else that line would open a second event for the same login; ``settle`` bounds
        the wait when the line never comes."""
        seen = {o.kind for o in attempt.obs}
        if kind is Kind.SESSION_OPEN:
            return not self._wait_for_log or Kind.ACCEPTED in seen
        if kind is Kind.ACCEPTED:
            return not self._wait_for_session or Kind.SESSION_OPEN in seen
        return kind in _FINAL

    def tick(self, now: datetime) -> list[dict[str, Any]]:
        """Emit attempts and unattached reasons quiet for ``settle`` seconds."""
        events: list[dict[str, Any]] = []
        for attempt in [a for a in self._pending.values() if a.last + self._settle <= now]:
            events.extend(self._finish(attempt))
        while self._orphans and self._orphans[0].time + self._settle <= now:
            events.append(self._orphan_event(self._orphans.popleft()))
        return events

    def flush(self) -> list[dict[str, Any]]:
        """Emit everything pending (shutdown)."""
        events: list[dict[str, Any]] = []
        for attempt in list(self._pending.values()):
            events.extend(self._finish(attempt))
        events.extend(self._orphan_event(o) for o in self._orphans)
        self._orphans.clear()
        return events

    # -- bookkeeping -------------------------------------------------------------------

    def _find(self, obs: Observation) -> _Attempt | None:
        if obs.pid is not None and obs.pid in self._by_pid:
            return self._by_pid[obs.pid]
        key = _key(obs)
        if key is not None:
            return self._by_key.get(key)
        if obs.source is Source.PAM and obs.client_address:
            # PAM_RHOST has no port: join the one pending attempt from that address and user.
            found = [
                a
                for a in self._pending.values()
                if a.key is not None
                and a.key[0] == obs.client_address
                and _user(a) in ("", obs.unix_user)
            ]
            return found[0] if len(found) == 1 else None
        return None

    def _starts_attempt(self, obs: Observation) -> bool:
        key = _key(obs)
        late = (key is not None and key in self._done_keys) or (
            obs.pid is not None and obs.pid in self._done_pids
        )
        if late and obs.kind in _LATE_ONLY:
            return False  # a late line about a connection already reported
        if obs.kind is Kind.CLOSED and not obs.unix_user:
            return False  # nothing was attempted (or we saw nothing of it)
        return key is not None or obs.pid is not None or obs.source is not Source.SSHD_LOG

    def _open(self, obs: Observation) -> tuple[_Attempt, list[dict[str, Any]]]:
        evicted: list[dict[str, Any]] = []
        while len(self._pending) >= self._max:
            oldest = next(iter(self._pending.values()))
            evicted.extend(self._finish(oldest))
        self._serial += 1
        attempt = _Attempt(self._serial, None, None, obs.time, obs.time)
        self._pending[attempt.serial] = attempt
        return attempt, evicted

    def _attach(self, attempt: _Attempt, obs: Observation) -> None:
        key = _key(obs)
        if attempt.key is None and key is not None and key not in self._by_key:
            attempt.key = key
            self._by_key[key] = attempt
            self._done_keys.pop(key, None)  # a reused port: a new connection
        if attempt.pid is None and obs.pid is not None and obs.pid not in self._by_pid:
            attempt.pid = obs.pid
            self._by_pid[obs.pid] = attempt
            self._done_pids.pop(obs.pid, None)
        if len(attempt.obs) < MAX_OBS_PER_ATTEMPT:
            attempt.obs.append(obs)
        attempt.first = min(attempt.first, obs.time)
        attempt.last = max(attempt.last, obs.time)

    def _adopt_orphans(self, attempt: _Attempt, address: str) -> None:
        # An orphan that names an address ("User U from IP not allowed") joins only a line
        # from that address; one without ("Certificate invalid: expired") joins the next.
        keep: deque[Observation] = deque(maxlen=MAX_ORPHANS)
        for orphan in self._orphans:
            if orphan.client_address in ("", address):
                self._attach(attempt, orphan)
            else:
                keep.append(orphan)
        self._orphans = keep

    def _finish(self, attempt: _Attempt) -> list[dict[str, Any]]:
        self._pending.pop(attempt.serial, None)
        if attempt.key is not None:
            self._by_key.pop(attempt.key, None)
        if attempt.pid is not None:
            self._by_pid.pop(attempt.pid, None)
        event = self._event(attempt)
        known = _Known(
            attempt.key,
            event["unix_user"] if event else _user(attempt),
            event["user_email"] if event else "",
            event["session_id"] if event else None,
        )
        self._remember(attempt.key, attempt.pid, known)
        return [event] if event is not None else []

    def _remember(self, key: ConnKey | None, pid: int | None, known: _Known) -> None:
        if key is not None:
            self._done_keys[key] = known
            self._done_keys.move_to_end(key)
            while len(self._done_keys) > self._max:
                self._done_keys.popitem(last=False)
        if pid is not None:
            self._done_pids[pid] = known
            self._done_pids.move_to_end(pid)
            while len(self._done_pids) > self._max:
                self._done_pids.popitem(last=False)

    def _link_child(self, obs: Observation) -> None:
        # journald: the connection's sshd (pid) logs "User child is on pid N"; the session
        # child N later logs forwarding refusals under its own pid.
        if obs.pid is None or obs.child_pid is None:
            return
        self._parent_of[obs.child_pid] = obs.pid
        self._parent_of.move_to_end(obs.child_pid)
        while len(self._parent_of) > self._max:
            self._parent_of.popitem(last=False)

    # -- events ------------------------------------------------------------------------

    def _event(self, attempt: _Attempt) -> dict[str, Any] | None:
        obs = attempt.obs
        accepted = [o for o in obs if o.kind in (Kind.ACCEPTED, Kind.SESSION_OPEN)]
        denials = [o for o in obs if o.allowed is False]
        if accepted:
            primary, allowed, reason = accepted[0], True, ""
        elif denials:
            ranked = max(enumerate(denials), key=lambda io: (self._rank(io[1]), io[0]))[1]
            primary, allowed, reason = ranked, False, self._reason(ranked)
        elif any(o.allowed for o in obs):
            primary, allowed, reason = next(o for o in obs if o.allowed), True, ""
        elif _user(attempt):
            primary, allowed, reason = obs[-1], False, CLOSED_EARLY
        else:
            return None
        anchor = primary if primary.cert_fingerprint else _latest_with_key(obs)
        same_key = [
            o for o in obs if anchor is not None and o.cert_fingerprint == anchor.cert_fingerprint
        ]
        ordered = [primary, *reversed(obs)]
        certs = [primary, *reversed(same_key)] if anchor is not None else [primary]
        address = attempt.key[0] if attempt.key else _first(o.client_address for o in ordered)
        return self._shape(
            created=attempt.first,
            user_email=_first(o.user_email for o in certs),
            unix_user=_first(o.unix_user for o in ordered),
            ip_address=address,
            method=_first(o.method for o in [*certs, *reversed(obs)]),
            allowed=allowed,
            reason=reason,
            cert_serial=next((o.cert_serial for o in certs if o.cert_serial is not None), None),
            cert_fingerprint=_first(o.cert_fingerprint for o in certs),
            session_id=next((o.session_id for o in ordered if o.session_id), None),
        )

    def _untrusted(self, obs: Observation) -> bool:
        return bool(
            self._trusted is not None
            and obs.ca_fingerprint
            and obs.ca_fingerprint not in self._trusted
        )

    def _rank(self, obs: Observation) -> int:
        if obs.source is not Source.SSHD_LOG:
            return 2 if obs.reason else 1
        if obs.kind in _SPECIFIC or obs.reason == "unknown user" or self._untrusted(obs):
            return 4
        return 3 if obs.kind is Kind.MAX_TRIES else 1

    def _reason(self, obs: Observation) -> str:
        if obs.kind is Kind.FAILED and self._untrusted(obs):
            return f"certificate signed by an untrusted CA ({obs.ca_fingerprint})"
        return obs.reason or "authentication failed"

    def _forwarding_event(self, obs: Observation) -> dict[str, Any]:
        known = self._known_for(obs)
        return self._shape(
            created=obs.time,
            user_email=known.user_email if known else "",
            unix_user=known.unix_user if known else "",
            ip_address=obs.client_address or (known.key[0] if known and known.key else ""),
            method="forwarding",
            allowed=False,
            reason=obs.reason,
            cert_serial=None,
            cert_fingerprint="",
            session_id=known.session_id if known else None,
        )

    def _known_for(self, obs: Observation) -> _Known | None:
        key = _key(obs)
        if key is not None:
            if key in self._by_key:
                return _Known(key, _user(self._by_key[key]), "", None)
            if key in self._done_keys:
                return self._done_keys[key]
        for pid in (obs.pid, self._parent_of.get(obs.pid or -1)):
            if pid is not None and pid in self._by_pid:
                a = self._by_pid[pid]
                return _Known(a.key, _user(a), "", None)
            if pid is not None and pid in self._done_pids:
                return self._done_pids[pid]
        return None

    def _orphan_event(self, obs: Observation) -> dict[str, Any]:
        return self._shape(
            created=obs.time, user_email="", unix_user=obs.unix_user,
            ip_address=obs.client_address, method="",
            allowed=False, reason=obs.reason, cert_serial=None, cert_fingerprint="",
            session_id=None,
        )  # fmt: skip

    def _shape(self, *, created: datetime, session_id: str | None, **fields: Any) -> dict[str, Any]:
        if session_id is not None and _SESSION_ID.fullmatch(session_id) is None:
            session_id = None
        return {
            "event_id": self._new_id(),
            "created_at": _rfc3339(created),
            "user_email": fields["user_email"][:320],
            "unix_user": fields["unix_user"][:64],
            "ip_address": fields["ip_address"],
            "target_id": self._target,
            "method": fields["method"],
            "allowed": fields["allowed"],
            "reason": fields["reason"][:1024],
            "cert_serial": fields["cert_serial"],
            "cert_fingerprint": fields["cert_fingerprint"][:128],
            "session_id": session_id,
        }


def _key(obs: Observation) -> ConnKey | None:
    if obs.client_address and obs.client_port is not None:
        return (obs.client_address, obs.client_port)
    return None


def _user(attempt: _Attempt) -> str:
    return _first(o.unix_user for o in attempt.obs)


def _first(values: Iterable[str]) -> str:
    return next((v for v in values if v), "")


def _latest_with_key(obs: list[Observation]) -> Observation | None:
    return next((o for o in reversed(obs) if o.cert_fingerprint), None)


def _rfc3339(moment: datetime) -> str:
    # RFC 3339 section 5.6 in UTC; a naive time is taken as UTC.
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
