"""Keeping a host's identity material fresh (issue 5 "Freshness", DESIGN.md "Identity"):
the user CA keys sshd trusts, the auditor keys recordings are sealed to, and the policy the
principals command reads, fetched from the collector every ``refresh_seconds``.

Invariants:
- a file is rewritten only when its content changes, atomically (readers such as sshd see
  the old or the new file, never a torn one), root-owned, 0644 (public keys and policy:
  sshd, the principals user and the recorder read them; none is a secret);
- a failed fetch or a refused configuration changes nothing: sshd and the principals
  command keep working from the cache while the collector is away;
- auditor key files no longer listed are removed only after the new ones are written, so
  there is never a moment without a recipient;
- I/O comes in as parameters (transport, clock), so tests drive it without a network.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sshaudit.agent.config import AgentConfig
from sshaudit.agent.hostconfig import (
    HostSettings,
    auditor_files,
    ca_keys_text,
    parse_host_config,
    policy_doc,
    policy_text,
)
from sshaudit.agent.ship_files import write_atomic
from sshaudit.agent.ship_http import ShipError, Transport
from sshaudit.errors import ConfigError

log = logging.getLogger("sshaudit.agent.refresh")
PUBLIC = 0o644
STATUS_FILE = "refresh.json"


def _rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class IdentityPaths:
    ca_keys_file: Path
    policy_file: Path
    recipients_dir: Path

    @classmethod
    def of(cls, config: AgentConfig) -> IdentityPaths:
        if config.identity is None or config.recipients_dir is None:
            raise ConfigError("the config has no [identity] table or recipients_dir")
        i = config.identity
        return cls(i.ca_keys_file, i.policy_file, config.recipients_dir)


def _replace_if_changed(path: Path, data: bytes) -> bool:
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path.parent, path.name, data, PUBLIC)
    return True


def apply_settings(paths: IdentityPaths, settings: HostSettings, now: datetime) -> list[str]:
    """Write what changed; returns a description of each change (empty: nothing did)."""
    changed = []
    if _replace_if_changed(paths.ca_keys_file, ca_keys_text(settings).encode()):
        changed.append(f"user CA keys ({len(settings.ca_keys)})")
    wanted = auditor_files(settings)
    paths.recipients_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    keys_changed = False
    for name, data in wanted.items():
        keys_changed |= _replace_if_changed(paths.recipients_dir / name, data)
    for old in paths.recipients_dir.glob("*.pub"):
        if old.name not in wanted:
            old.unlink()
            keys_changed = True
    if keys_changed:
        changed.append(f"auditor keys ({len(wanted)})")
    if _policy_changed(paths.policy_file, settings):
        _replace_if_changed(paths.policy_file, policy_text(settings, now).encode())
        changed.append(f"policy (version {settings.policy_version})")
    return changed


def _policy_changed(path: Path, settings: HostSettings) -> bool:
    """The cache carries its fetch time; compare everything but that."""
    try:
        old = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return True
    if not isinstance(old, dict):
        return True
    old.pop("fetched_at", None)
    return bool(old != policy_doc(settings))


class Refresher:
    """One fetch-and-apply step (:meth:`run_once`) and the loop around it."""

    def __init__(
        self,
        config: AgentConfig,
        transport: Transport,
        *,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_keys: Callable[[], None] = lambda: None,
        on_applied: Callable[[HostSettings], None] = lambda settings: None,
    ) -> None:
        assert config.collector is not None
        self.paths = IdentityPaths.of(config)
        self.host_id = config.host_id
        self.interval = config.collector.refresh_seconds
        self.transport = transport
        self.wall = wall
        self.on_keys = on_keys
        self.on_applied = on_applied
        self.last_success: datetime | None = None
        self.last_error = ""

    def run_once(self) -> bool:
        """Fetch and apply; False (and the cache kept) when that failed. Either way the
        outcome goes to ``refresh.json`` beside the policy (``sshaudit-agent status``)."""
        ok = self._fetch_and_apply()
        doc = {
            "last_attempt": _rfc3339(self.wall()),
            "last_success": _rfc3339(self.last_success) if self.last_success else None,
            "last_error": self.last_error,
        }
        status = self.paths.policy_file.parent / STATUS_FILE
        try:
            write_atomic(status.parent, status.name, json.dumps(doc).encode() + b"\n", PUBLIC)
        except OSError as exc:
            log.warning("cannot write %s: %s", status, exc.strerror)
        return ok

    def _fetch_and_apply(self) -> bool:
        try:
            reply = self.transport.send("GET", "/v1/host/config")
            if reply.status != 200:
                raise ConfigError(f"collector answered {reply.status}: {dict(reply.body)}")
            settings = parse_host_config(reply.body)
            if settings.host_id != self.host_id:
                raise ConfigError(f"collector says host {settings.host_id!r}, not {self.host_id!r}")
            changed = apply_settings(self.paths, settings, self.wall())
        except (ShipError, ConfigError, OSError) as exc:
            self.last_error = str(exc)
            log.warning("refresh failed (keeping the cached keys and policy): %s", exc)
            return False
        self.last_success, self.last_error = self.wall(), ""
        self.on_applied(settings)
        if changed:
            log.info("refreshed from the collector: %s", ", ".join(changed))
            if any(c.startswith("auditor keys") for c in changed):
                self.on_keys()
        return True

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.run_once()
            stop.wait(self.interval)


def start_refreshing(
    config: AgentConfig, transport: Transport, on_keys: Callable[[], None]
) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    refresher = Refresher(config, transport, on_keys=on_keys)
    thread = threading.Thread(target=refresher.run, args=(stop,), name="sshaudit-refresh")
    thread.daemon = True
    thread.start()
    return thread, stop
