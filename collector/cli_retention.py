"""``sshaudit-collector retention run``: apply the retention policy once (retention.py).

Invariants: prints one line per session it deletes (or, with ``--dry-run``, would delete),
``deleted|would-delete|held|open|missing <session id> target=<id> user=<email> (<reason>)``,
on stdout, then a count on stderr; ``--dry-run`` changes nothing; ``--now`` (RFC 3339)
replaces the clock, for tests and for previewing a date.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime

from sshaudit.collector import retention
from sshaudit.collector.cli_common import EXIT_OK, Sub, add_command, add_data, add_group, open_data
from sshaudit.collector.models import parse_time
from sshaudit.collector.storage import DeleteOutcome
from sshaudit.errors import UsageError


def add_parsers(sub: Sub) -> None:
    group = add_group(sub, "retention", "apply the retention policy (docs/collector.md)")
    p = add_command(
        group,
        "run",
        "delete the sessions the retention policy no longer keeps",
        "Deletes every final session (and its recording) older than its target group's\n"
        'period (policy document key "retention"; default 365 days) that no legal hold\n'
        "names, logging each as a retention_delete audit event. `serve` runs the same job\n"
        "periodically (--retention-interval).",
        "  sshaudit-collector retention run --data /var/lib/sshaudit-collector --dry-run",
    )
    add_data(p)
    p.add_argument("--now", metavar="RFC3339", help="the time to judge ages at (default: now)")
    p.add_argument("--dry-run", action="store_true", help="list what would go, delete nothing")
    p.set_defaults(handler=cmd_run)


def _now(text: str | None) -> datetime:
    if text is None:
        return datetime.now(UTC)
    try:
        return parse_time(text)
    except ValueError as exc:
        raise UsageError(f"--now: {exc}") from None


def cmd_run(args: argparse.Namespace) -> int:
    now = _now(args.now)
    storage = open_data(args.data)
    try:
        results = retention.run(storage, now, dry_run=args.dry_run)
    finally:
        storage.close()
    for r in results:
        e = r.expired
        word = "would-delete" if r.outcome is None else r.outcome.value
        print(f"{word} {e.session_id} target={e.target_id} user={e.user_email} ({e.reason})")
    done = sum(r.outcome is DeleteOutcome.DELETED for r in results)
    what = f"{len(results)} would be deleted" if args.dry_run else f"{done} deleted"
    print(f"sshaudit-collector: retention: {what}", file=sys.stderr)
    return EXIT_OK
