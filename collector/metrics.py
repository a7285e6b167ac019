"""Prometheus metrics in the text exposition format (version 0.0.4), without a dependency.

Invariants: counters only grow, per process (each collector instance is scraped on its own);
the per-host backlog gauges come from the storage (what each agent last reported), so they
are the same from every instance; label values are escaped as the format requires
(backslash, double quote, newline), so no host-controlled value can forge a sample line.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

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


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, Labels], int] = {}

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
        with self._lock:
            values = dict(self._values)
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
