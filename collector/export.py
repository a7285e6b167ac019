"""The SIEM export: session records and authentication events as JSON lines (DESIGN.md
"The collector", export), sans-IO: the storage, the sink, the clock's sleep are passed in.

Each line is one JSON object with DESIGN.md's field names plus ``record_type`` (``session``
or ``auth_event``). Sessions are exported once they are final (``recording_status`` other
than ``recording``), since only then do they stop changing; events as they arrive.

Invariants: lines leave in the storage's ``seq`` order (the order changes were stored), and
the position reached (the last ``seq``) is reported after every batch the sink accepted, so
a follower restarted from that position sends nothing twice and skips nothing; a sink
failure stops the export before the position moves past the failed batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sshaudit.collector.models import AuthEvent, SessionRecord, parse_time, to_us
from sshaudit.collector.storage import Change, Storage

BATCH = 500

Sink = Callable[[Sequence[str]], None]


@dataclass(frozen=True)
class ExportOptions:
    since_us: int | None = None
    after_seq: int = 0
    follow: bool = False
    interval: float = 1.0


def session_line(record: SessionRecord) -> dict[str, Any]:
    doc = record.model_dump(mode="json")
    doc.pop("details", None)
    return {"record_type": "session", **doc}


def auth_event_line(event: AuthEvent) -> dict[str, Any]:
    return {"record_type": "auth_event", **event.model_dump(mode="json")}


def change_line(change: Change, since_us: int | None) -> str | None:
    """The JSON line for one change, or None when it is not exported (yet)."""
    if change.session is not None:
        record = change.session.record
        if record.recording_status.value == "recording":
            return None
        when, doc = record.session_start, session_line(record)
    elif change.auth_event is not None:
        event = change.auth_event.event
        when, doc = event.created_at, auth_event_line(event)
    else:
        return None
    if since_us is not None and to_us(parse_time(when)) < since_us:
        return None
    return json.dumps(doc, separators=(",", ":"), sort_keys=False)


def run_export(
    storage: Storage,
    sink: Sink,
    options: ExportOptions,
    *,
    sleep: Callable[[float], None],
    position: Callable[[int], None] = lambda seq: None,
    keep_going: Callable[[], bool] = lambda: True,
) -> int:
    """Export from ``options.after_seq`` on; with ``follow``, poll for more until
    ``keep_going()`` says stop. Returns the last ``seq`` reached."""
    seq = options.after_seq
    while True:
        changes = storage.changes(seq, BATCH)
        if changes:
            lines = [line for c in changes if (line := change_line(c, options.since_us))]
            if lines:
                sink(lines)
            seq = changes[-1].seq
            position(seq)
            continue
        if not options.follow or not keep_going():
            return seq
        sleep(options.interval)
        if not keep_going():
            return seq
