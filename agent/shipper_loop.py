"""The shipper's I/O: it walks the spool, reads files, talks to the collector through a
:class:`~sshaudit.agent.ship_http.Transport`, and sleeps with the ``sleep`` it is given;
agent/shipper.py decides what each step is.

Spool files it reads: ``<id>.json`` and ``<id>.sealed`` (agent/spool.py), and
``auth-events-*.events`` (authentication events queued with
:func:`~sshaudit.agent.ship_files.queue_auth_events`). It writes only ``<id>.ship`` (what the
collector confirmed of a session: agent/ship_files.py) and deletes a session's files once
:func:`~sshaudit.agent.shipper.decide` says so.

Invariants:
- the spool directory is the only state that matters: a sidecar is replaced atomically
  (temporary file, fsync, rename, fsync of the directory); after a restart, the collector's
  answers, not the sidecar, say where an upload resumes;
- a session's record is read before its sealed file, so "closed" in the record means the
  file read after it is whole;
- deletion is ordered so that a crash at any point resumes cleanly: the sidecar says
  ``done`` durably first, then the recording goes, then the record, then the sidecar;
- live sessions (being written) are served first in every pass, the backlog within a time
  budget, so a long backlog never holds back the streaming of running sessions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

from sshaudit.agent.config import AgentConfig
from sshaudit.agent.ship_files import (
    REJECTED_SUFFIX,
    SHIP_SUFFIX,
    fsync_dir,
    is_events_file,
    open_read,
    pread_all,
    read_prefix,
    read_ship_state,
    read_small,
    write_atomic,
)
from sshaudit.agent.ship_http import HttpTransport, Reply, ShipError, Transport, load_credential
from sshaudit.agent.shipper import (
    UNRECORDED_HOLD,
    Action,
    LocalView,
    ShipState,
    Step,
    Verdict,
    backoff_delay,
    classify,
    decide,
    describe,
    on_response,
)
from sshaudit.agent.spool import RECORD_SUFFIX, SEALED_SUFFIX, SessionRecord, SpoolState
from sshaudit.agent.spool import read_record as read_spool_record
from sshaudit.collector.ids import is_session_id
from sshaudit.errors import SealedFormatError

log = logging.getLogger("sshaudit.agent.shipper")

MAX_STEPS = 16  # requests for one session in one pass: the others get their turn


class _Backoff(Exception):  # noqa: N818 - control flow inside this module, never escapes
    pass


class Shipper:
    """Ships one spool directory. :meth:`run_once` is one pass; :meth:`run` loops."""

    def __init__(
        self,
        spool_dir: Path,
        transport: Transport,
        *,
        chunk_bytes: int = 2 << 20,
        retry_max: float = 300.0,
        poll_interval: float = 0.25,
        backlog_interval: float = 30.0,
        hold: float = UNRECORDED_HOLD,
        pass_budget: float = 2.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.spool_dir = spool_dir
        self.transport = transport
        self.chunk_bytes = chunk_bytes
        self.retry_max = retry_max
        self.poll_interval = poll_interval
        self.backlog_interval = backlog_interval
        self.hold = hold
        self.pass_budget = pass_budget
        self._clock = clock
        self._monotonic = monotonic
        self._rand = rand
        self._started = clock()
        self._states: dict[str, ShipState] = {}
        self._records: dict[str, tuple[tuple[int, int, int], SessionRecord]] = {}
        self._sizes: dict[str, int] = {}
        self._parked: dict[str, float] = {}
        self._removed: set[str] = set()  # in this pass
        self._ignored: set[str] = set()
        self._failures = 0
        self._reported: tuple[int, int] | None = None
        self._reported_at = float("-inf")

    # -- the loop ------------------------------------------------------------------------

    def run(self, stopped: Callable[[], bool], sleep: Callable[[float], object]) -> None:
        """Pass after pass until ``stopped()``; ``sleep(seconds)`` between passes."""
        while not stopped():
            try:
                delay = self.run_once()
            except Exception:  # a bug must not end shipping for good: log it, back off
                log.exception("shipping pass failed")
                delay = self._backoff("internal error")
            sleep(delay)

    def run_once(self) -> float:
        """One pass over the spool; returns the seconds to wait before the next one."""
        try:
            names = [entry.name for entry in self.spool_dir.iterdir()]
        except OSError as exc:  # not created yet (the daemon makes it), or unreadable
            log.debug("spool %s: %s", self.spool_dir, exc.strerror)
            return self.poll_interval
        sessions = self._sessions(names)
        self._removed.clear()
        try:
            self._ship_sessions(sessions)
            self._ship_auth_events(sorted(n for n in names if is_events_file(n)))
            self._report_backlog(sessions)
        except (_Backoff, ShipError) as exc:
            return self._backoff(str(exc))
        except OSError as exc:  # the spool itself: full disk, a file replaced under us...
            return self._backoff(f"spool {self.spool_dir}: {exc}")
        self._failures = 0
        return self.poll_interval

    def _backoff(self, reason: str) -> float:
        delay = backoff_delay(self._failures, self.retry_max, self._rand())
        self._failures += 1
        log.warning("shipping paused: %s; retrying in %.1f s", reason, delay)
        return delay

    def _sessions(self, names: Iterable[str]) -> list[str]:
        present = set(names)
        sessions = []
        for name in present:
            sid = name.removesuffix(RECORD_SUFFIX)
            if name.endswith(RECORD_SUFFIX) and not name.startswith("."):
                if is_session_id(sid):
                    sessions.append(sid)
                elif name not in self._ignored:  # the daemon names them by uuid4
                    self._ignored.add(name)
                    log.warning("%r in the spool is not a session record: not shipped", name)
            sid = name.removesuffix(SHIP_SUFFIX)
            if (
                name.endswith(SHIP_SUFFIX)
                and not {sid + RECORD_SUFFIX, sid + SEALED_SUFFIX} & present
            ):
                self._unlink(name)  # a crash between the last two unlinks of a deletion
        for sid in set(self._states) - set(sessions):
            self._forget(sid)
        return sessions

    def _ship_sessions(self, sessions: list[str]) -> None:
        live: list[str] = []
        rest: list[tuple[str, str]] = []
        for sid in sessions:
            record = self._record(sid)
            if record is not None and record.spool_state is SpoolState.WRITING:
                live.append(sid)
            elif record is not None:
                rest.append((record.session_start, sid))  # oldest first
        order = sorted(live) + [sid for _, sid in sorted(rest)]
        deadline = self._monotonic() + self.pass_budget
        for i, sid in enumerate(order):
            if i >= len(live) and self._monotonic() > deadline:
                break  # the rest next pass; the live sessions come first again
            if self._parked.get(sid, float("-inf")) > self._monotonic():
                continue
            self._parked.pop(sid, None)
            self._ship(sid)

    # -- one session ---------------------------------------------------------------------

    def _ship(self, sid: str) -> None:
        for _ in range(MAX_STEPS):
            record = self._record(sid)
            if record is None:
                return
            state = self._state(sid)
            try:
                local = self._local(record, state)
            except OSError as exc:
                log.warning("session %s: reading the spool failed: %s", sid, exc)
                return
            action = decide(state, local, self.chunk_bytes, self.hold)
            if action.step is Step.WAIT:
                return
            if action.step is Step.DELETE:
                self._delete(sid, state)
                return
            if action.step is Step.FAIL:
                self._park(sid, replace(state, synced=False, error=action.note))
                return
            reply = self._send(sid, action)
            outcome = on_response(state, action, reply.status, reply.body)
            self._save(sid, outcome.state)
            if outcome.verdict is Verdict.RETRY:
                raise _Backoff(f"session {sid}: {outcome.message}")
            if outcome.verdict is Verdict.PARK:
                self._park(sid, outcome.state)
                return
            if outcome.message:
                log.warning("session %s: %s", sid, outcome.message)

    def _send(self, sid: str, action: Action) -> Reply:
        base = f"/v1/sessions/{sid}"
        if action.step is Step.STATUS:
            return self.transport.send("GET", base + "/recording/status")
        if action.step is Step.PREFIX:
            return self.transport.send("PUT", base + "/recording", content=action.body)
        if action.step is Step.APPEND:
            params = {"offset": str(action.offset)}
            return self.transport.send(
                "POST", base + "/recording", params=params, content=action.body
            )
        assert action.step is Step.RECORD
        return self.transport.send("PUT", base, json_body=action.document)

    def _record(self, sid: str) -> SessionRecord | None:
        """The session's record, re-read only when its file changed."""
        path = self.spool_dir / (sid + RECORD_SUFFIX)
        try:
            st = path.lstat()
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            cached = self._records.get(sid)
            if cached is not None and cached[0] == key:
                return cached[1]
            record = read_spool_record(path)
        except (OSError, SealedFormatError) as exc:
            if not isinstance(exc, FileNotFoundError):
                log.warning("session %s: unreadable record: %s", sid, exc)
            return None
        if record.session_id != sid:
            log.warning("session %s: its record names session %s", sid, record.session_id)
            return None
        self._records[sid] = (key, record)
        return record

    def _state(self, sid: str) -> ShipState:
        state = self._states.get(sid)
        if state is None:
            state = read_ship_state(self.spool_dir, sid) or ShipState(sid)
            self._states[sid] = state
        return state

    def _save(self, sid: str, state: ShipState) -> None:
        old = self._states.get(sid)
        self._states[sid] = state
        if old is None or old.to_json() != state.to_json():
            data = json.dumps(state.to_json()).encode()
            write_atomic(self.spool_dir, sid + SHIP_SUFFIX, data)

    def _local(self, record: SessionRecord, state: ShipState) -> LocalView:
        sid = record.session_id
        st = (self.spool_dir / (sid + RECORD_SUFFIX)).lstat()
        age = self._clock() - st.st_mtime
        stale = st.st_mtime < self._started
        try:
            fd = open_read(self.spool_dir / (sid + SEALED_SUFFIX))
        except FileNotFoundError:
            self._sizes.pop(sid, None)
            return LocalView(record, None, record_age=age, record_stale=stale)
        try:
            size = os.fstat(fd).st_size
            self._sizes[sid] = size
            prefix, window = None, b""
            if state.synced and not state.sealed:
                if state.acked == 0:
                    prefix = read_prefix(fd, size)
                elif size > state.acked:
                    window = pread_all(fd, min(self.chunk_bytes, size - state.acked), state.acked)
        finally:
            os.close(fd)
        return LocalView(record, size, prefix, window, age, stale)

    def _park(self, sid: str, state: ShipState) -> None:
        """Keep the files; try again after ``retry_max`` seconds (an operator may fix it)."""
        self._save(sid, state)
        self._parked[sid] = self._monotonic() + self.retry_max
        log.error(
            "session %s: not shipped: %s (kept in the spool; retrying in %.0f s)",
            sid,
            state.error,
            self.retry_max,
        )

    def _delete(self, sid: str, state: ShipState) -> None:
        if not state.done:
            self._save(sid, replace(state, done=True))  # durable before anything goes
        for suffix in (SEALED_SUFFIX, RECORD_SUFFIX, SHIP_SUFFIX):
            self._unlink(sid + suffix)
        fsync_dir(self.spool_dir)
        self._forget(sid)
        self._removed.add(sid)
        log.info("session %s: the collector confirmed it; removed from the spool", sid)

    def _unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.spool_dir / name).unlink()

    def _forget(self, sid: str) -> None:
        self._states.pop(sid, None)
        self._records.pop(sid, None)
        self._sizes.pop(sid, None)
        self._parked.pop(sid, None)

    # -- authentication events and the backlog --------------------------------------------

    def _ship_auth_events(self, names: list[str]) -> None:
        for name in names:
            path = self.spool_dir / name
            try:
                doc = json.loads(read_small(path))
            except (OSError, ValueError) as exc:
                log.warning("%s: unreadable: %s", name, exc)
                continue
            reply = self.transport.send("POST", "/v1/auth-events", json_body=doc)
            verdict = classify(reply.status, reply.body)
            if verdict is Verdict.RETRY:
                raise _Backoff(f"{name}: {describe(reply.status, reply.body)}")
            if verdict is Verdict.PARK:
                # Kept for the operator under another name, so it is not retried forever.
                log.error("%s: refused: %s", name, describe(reply.status, reply.body))
                os.replace(path, path.with_name(name + REJECTED_SUFFIX))
            else:
                self._unlink(name)
            fsync_dir(self.spool_dir)

    def backlog(self, sessions: Iterable[str]) -> tuple[int, int]:
        """Sessions not yet confirmed, and the bytes of their files the collector lacks."""
        count = total = 0
        for sid in sessions:
            if sid in self._removed:
                continue
            state = self._states.get(sid) or ShipState(sid)
            if sid not in self._sizes:  # not visited yet (this pass's budget ran out)
                with contextlib.suppress(OSError):
                    self._sizes[sid] = (self.spool_dir / (sid + SEALED_SUFFIX)).stat().st_size
            count += 1
            total += max(0, self._sizes.get(sid, 0) - state.acked)
        return count, total

    def _report_backlog(self, sessions: list[str]) -> None:
        """``PUT /v1/host/backlog`` when it changed (at most every 2 s) or every interval."""
        now = self._monotonic()
        backlog = self.backlog(sessions)
        since = now - self._reported_at
        if since < self.backlog_interval and (backlog == self._reported or since < 2.0):
            return
        reply = self.transport.send(
            "PUT", "/v1/host/backlog", json_body={"sessions": backlog[0], "bytes": backlog[1]}
        )
        if classify(reply.status, reply.body) is Verdict.RETRY:
            raise _Backoff(f"backlog report: {describe(reply.status, reply.body)}")
        if reply.status != 200:
            log.warning("backlog report refused: %s", describe(reply.status, reply.body))
        self._reported, self._reported_at = backlog, now


class ShipperThread:
    """A :class:`Shipper` on its own thread beside the daemon's event loop; :meth:`wake`
    starts the next pass at once (the daemon may call it after writing to the spool)."""

    def __init__(self, shipper: Shipper) -> None:
        self.shipper = shipper
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._main, name="sshaudit-shipper", daemon=True)

    def _main(self) -> None:
        try:
            self.shipper.run(self._stop.is_set, self._sleep)
        finally:
            self.shipper.transport.close()

    def _sleep(self, seconds: float) -> None:
        self._wake.wait(seconds)
        self._wake.clear()

    def start(self) -> ShipperThread:
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)


def start_shipping(config: AgentConfig) -> ShipperThread | None:
    """Start shipping ``config.spool_dir`` to ``[collector]`` (None when there is none).
    Raises ConfigError for an unusable credential file."""
    c = config.collector
    if c is None:
        return None
    credential = load_credential(c.credential_file)
    transport = HttpTransport(c.url, c.fingerprint, credential)
    shipper = Shipper(
        config.spool_dir,
        transport,
        chunk_bytes=c.upload_chunk_bytes,
        retry_max=c.retry_max_seconds,
    )
    log.info("shipping %s to %s", config.spool_dir, c.url)
    return ShipperThread(shipper).start()
