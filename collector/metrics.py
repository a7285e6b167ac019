"""Prometheus metrics in the text exposition format (version 0.0.4), without a dependency.

Invariants: counters only grow, per collector instance (each instance is scraped on its own;
the worker processes of one ``serve --workers N`` share their counts through small files in
a directory of their own: every worker writes its counts there at most every second, and a
scrape answered by any worker sums them all);
the per-host backlog gauges come from the storage (what each agent last reported), so they
are the same from every instance; label values are escaped as the format requires
(backslash, double quote, newline), so no host-controlled value can forge a sample line.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from sshaudit.collector.storage import Host

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_COUNTERS = {
    "sshaudit_collector_uploads_total": "Accepted uploads, by kind (prefix, chunk, session, "
    "auth_events); replays included.",
    "sshaudit_collector_upload_bytes_total": "Recording bytes appended (replays excluded).",
    "sshaudit_collector_frames_total": "Sealed frames appended.",
    "sshaudit_collector_recordings_verified_total": "Recordings whose signature verified.",
    "sshaudit_collector_auth_events_total": "Authentication events stored (duplicates excluded).",
    "sshaudit_collector_errors_total": "Refused or failed requests, by HTTP status and code.",
}

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


SHARE_INTERVAL = 1.0


class Metrics:
    def __init__(self, share: Path | None = None) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, Labels], int] = {}
        self._share = share
        self._written: dict[tuple[str, Labels], int] = {}
        if share is not None:
            threading.Thread(target=self._share_loop, name="metrics-share", daemon=True).start()

    def _share_loop(self) -> None:
        stop = threading.Event()
        while not stop.wait(SHARE_INTERVAL):
            self.share_now()

    def share_now(self) -> None:
        """Write this process's counts for the other workers (atomically, when changed)."""
        if self._share is None:
            return
        with self._lock:
            values = dict(self._values)
        if values == self._written:
            return
        doc = [[name, [list(kv) for kv in labels], v] for (name, labels), v in values.items()]
        tmp = self._share / f".{os.getpid()}.tmp"
        try:
            tmp.write_text(json.dumps(doc))
            tmp.replace(self._share / f"{os.getpid()}.json")
        except OSError:
            return  # a scrape then misses this worker's latest second; nothing is lost
        self._written = values

    def _peers(self) -> dict[tuple[str, Labels], int]:
        """The other workers' counts, as they last wrote them."""
        total: dict[tuple[str, Labels], int] = {}
        if self._share is None:
            return total
        own = f"{os.getpid()}.json"
        for path in self._share.glob("*.json"):
            if path.name == own:
                continue
            try:
                doc = json.loads(path.read_text())
                for name, labels, v in doc:
                    key = (str(name), tuple((str(k), str(x)) for k, x in labels))
                    total[key] = total.get(key, 0) + int(v)
            except (OSError, ValueError, TypeError):
                continue
        return total

    def inc(self, name: str, by: int = 1, **labels: str) -> None:
        if name not in _COUNTERS:
            raise ValueError(f"unknown metric {name}")
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0) + by

    def value(self, name: str, **labels: str) -> int:
        with self._lock:
            return self._values.get((name, tuple(sorted(labels.items()))), 0)

    def render(self, hosts: Sequence[Host]) -> str:
        values = self._peers()
        with self._lock:
            for key, v in self._values.items():
                values[key] = values.get(key, 0) + v
        lines: list[str] = []
        for name, help_text in _COUNTERS.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
            samples = sorted((k[1], v) for k, v in values.items() if k[0] == name)
            lines += [f"{name}{_labels(labels)} {v}" for labels, v in samples] or [f"{name} 0"]
        lines += [
            "# HELP sshaudit_collector_hosts Enrolled hosts.",
            "# TYPE sshaudit_collector_hosts gauge",
            f"sshaudit_collector_hosts {len(hosts)}",
        ]
        for field, unit in (("backlog_bytes", "bytes"), ("backlog_sessions", "sessions")):
            name = f"sshaudit_collector_host_{field}"
            lines += [
                f"# HELP {name} The {unit} waiting in a host's spool, as it last reported.",
                f"# TYPE {name} gauge",
            ]
            for host in hosts:
                labels = (("host_id", host.host_id), ("hostname", host.hostname))
                lines.append(f"{name}{_labels(labels)} {getattr(host, field)}")
        return "\n".join(lines) + "\n"
