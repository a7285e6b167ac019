"""The daemon's identity side (issue 5): keeps the CA keys, auditor keys and policy fresh,
and turns what the principals command, the PAM hook and sshd's log observe into
authentication events for the collector.

Invariants:
- it runs on threads of its own (refresh, log follower, event flusher): a slow collector or
  a flood of log lines never delays a login the event loop is serving;
- observations go through one :class:`~sshaudit.agent.authmerge.AuthMerger` under a lock;
  finished events are queued durably in the spool (agent/ship_files.py) and the shipper
  sends them, so an event observed while the collector is away is not lost;
- without ``[identity]`` (a host not enrolled) only the PAM events are merged and queued.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sshaudit.agent.authfollow import JOURNAL_ARGV, LogLine, follow_file, follow_journal
from sshaudit.agent.authlog import Observation, parse_line
from sshaudit.agent.authmerge import AuthMerger
from sshaudit.agent.config import AgentConfig
from sshaudit.agent.hostconfig import ca_fingerprints
from sshaudit.agent.refresh import Refresher
from sshaudit.agent.ship_files import queue_auth_events
from sshaudit.agent.ship_http import HttpTransport, load_credential

log = logging.getLogger("sshaudit.agent.identity")
FLUSH_INTERVAL = 1.0


class IdentityService:
    def __init__(
        self,
        config: AgentConfig,
        *,
        on_keys: Callable[[], None] = lambda: None,
        on_events: Callable[[], None] = lambda: None,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.config = config
        self.wall = wall
        self._on_keys = on_keys
        self._on_events = on_events
        self._lock = threading.Lock()
        # Enrolled hosts have the PAM hook: an accepted attempt's event waits for its PAM
        # account and session phases, so they join it instead of making events of their own.
        ident = config.identity
        self.merger = AuthMerger(
            config.host_id,
            wait_for_session=ident is not None,
            wait_for_log=ident is not None and ident.sshd_log != "off",
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.refresher: Refresher | None = None

    # -- observations ---------------------------------------------------------------------

    def observe(self, obs: Observation) -> None:
        with self._lock:
            done = self.merger.add(obs)
        self._queue(done)

    def _log_line(self, line: LogLine) -> None:
        obs = parse_line(line.message, line.time or self.wall(), line.pid)
        if obs is not None:
            self.observe(obs)

    def trust_cas(self, fingerprints: list[str]) -> None:
        """The CA fingerprints sshd trusts: an unknown CA is then named as such."""
        with self._lock:
            self.merger.set_trusted_cas(fingerprints)

    def _queue(self, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        try:
            queue_auth_events(self.config.spool_dir, events)
        except OSError as exc:
            log.error("cannot queue %d authentication events: %s", len(events), exc)
            return
        for e in events:
            log.info(
                "auth %s: user=%r from=%s method=%s %s",
                "allowed" if e.get("allowed") else "denied",
                e.get("unix_user"),
                e.get("ip_address"),
                e.get("method"),
                e.get("reason", ""),
            )
        self._on_events()

    def _flush_loop(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL):
            with self._lock:
                done = self.merger.tick(self.wall())
            self._queue(done)

    # -- threads --------------------------------------------------------------------------

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def start(self) -> IdentityService:
        self._spawn("sshaudit-auth-flush", self._flush_loop)
        ident, coll = self.config.identity, self.config.collector
        if ident is None:
            return self
        try:
            self.trust_cas(ca_fingerprints(ident.ca_keys_file.read_text().splitlines()))
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("cannot read %s: %s", ident.ca_keys_file, exc)
        if coll is not None:
            credential = load_credential(coll.credential_file)
            transport = HttpTransport(coll.url, coll.fingerprint, credential)
            refresher = Refresher(
                self.config,
                transport,
                on_keys=self._on_keys,
                on_applied=lambda settings: self.trust_cas(ca_fingerprints(settings.ca_keys)),
            )
            self.refresher = refresher
            self._spawn("sshaudit-refresh", lambda: refresher.run(self._stop))
        if ident.sshd_log == "journal":
            self._spawn(
                "sshaudit-journal",
                lambda: follow_journal(self._log_line, self._stop, argv=JOURNAL_ARGV),
            )
        elif ident.sshd_log != "off":
            path = Path(ident.sshd_log)
            self._spawn("sshaudit-sshd-log", lambda: follow_file(path, self._log_line, self._stop))
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        with self._lock:
            done = self.merger.flush()
        self._queue(done)
