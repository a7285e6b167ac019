"""``sshaudit sessions list|show``, ``sshaudit download``, ``sshaudit auth-events``: the
auditor's commands against the collector (auditor/remote.py does the HTTP).

Invariants:
- what the collector sends is data, never terminal control: tables and ``show`` replace
  every non-printable character with an escape (a command line or a hostname can hold
  ECMA-48 sequences); ``--json`` output is ASCII (``json.dumps`` escapes the rest);
- ``--json`` listings print JSON lines, one object per line as the collector sent it,
  newest first, so ``jq`` and ``head`` work on them as they stream;
- the progress bar goes to stderr, and only when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sshaudit.auditor.remote import Collector

    Sub = argparse._SubParsersAction[argparse.ArgumentParser]

Adder = Callable[..., argparse.ArgumentParser]

EXIT_STATUS = """\
exit status:
  0  success
  1  the collector refused the request (the error code is shown), could not be reached,
     or its certificate is not the pinned one; a download did not verify
  2  usage error: bad arguments, unreadable config or token file
"""
CONNECTION_HELP = """\
connection: --collector, --token-file and --fingerprint, or the keys collector, token_file
and fingerprint of ~/.config/sshaudit/auditor.toml ($XDG_CONFIG_HOME; --config to name
another file); flags override the file. The token is read from its file only."""

SESSION_FIELDS = (
    "session_id", "user_email", "unix_user", "target_id", "hostname", "client_address",
    "client_port", "server_address", "server_port", "session_start", "session_finish",
    "program_type", "command", "exit_status", "error", "recording_status", "bytes_in",
    "bytes_out", "cert_serial", "cert_fingerprint", "principal", "received_at", "updated_at",
)  # fmt: skip
# (query parameter, flags, help)
Filter = tuple[str, tuple[str, ...], str]
SESSION_FILTERS: tuple[Filter, ...] = (
    ("user_email", ("--user-email",), "certificate key id (email)"),
    ("unix_user", ("--unix-user",), "unix account"),
    ("target_id", ("--target", "--target-id"), "enrolled host id"),
    ("hostname", ("--hostname",), "host name"),
    ("client_address", ("--client-address",), "client IP address"),
    ("program_type", ("--program-type",), "program type: shell, exec or subsystem"),
    (
        "recording_status",
        ("--status", "--recording-status"),
        "recording status: recording, complete, truncated, unrecorded, recorder_lost",
    ),
)
EVENT_FILTERS: tuple[Filter, ...] = (
    ("user_email", ("--user-email",), "certificate key id (email)"),
    ("unix_user", ("--unix-user",), "unix account"),
    ("target_id", ("--target", "--target-id"), "enrolled host id"),
    ("ip_address", ("--ip-address",), "client IP address"),
    ("method", ("--method",), "method: certificate, publickey, password, ..."),
)


def _connection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--collector", metavar="URL", help="https://collector.example.com:8443")
    g.add_argument("--token-file", metavar="FILE", help="file holding an auditor token")
    g.add_argument("--fingerprint", metavar="SHA256:HEX", help="the collector certificate's pin")
    g.add_argument("--config", metavar="FILE", help="config file (default: auditor.toml)")


def _listing_args(p: argparse.ArgumentParser, filters: Sequence[Filter]) -> None:
    for name, flags, what in filters:
        p.add_argument(*flags, dest=name, metavar="VALUE", help=f"only this {what}")
    p.add_argument(
        "--since", metavar="TIME", help="at or after this RFC 3339 time (UTC if no zone)"
    )
    p.add_argument("--until", metavar="TIME", help="before this time")
    p.add_argument(
        "--limit", type=int, default=100, metavar="N", help="at most N, newest first (0: all)"
    )
    p.add_argument("--json", action="store_true", help="JSON lines, one object per line")
    _connection_args(p)


def add_remote_parsers(sub: Sub, add: Adder) -> None:
    """Add ``sessions``, ``download`` and ``auth-events`` to the ``sshaudit`` parser."""
    sessions = add(
        sub,
        "sessions",
        "list or show session records held by the collector",
        CONNECTION_HELP,
        "  sshaudit sessions list --unix-user root --since 2026-11-01\n"
        "  sshaudit sessions list --json --limit 0 | jq -r .session_id\n"
        "  sshaudit sessions show 0d6c1f5e-...",
        EXIT_STATUS,
    )
    ssub = sessions.add_subparsers(dest="sessions_command", metavar="ACTION", required=True)
    p = ssub.add_parser(
        "list",
        help="list sessions, newest first",
        description="List session records, newest first: a table, or with --json one JSON\n"
        "object per line (JSON lines) with every field the collector holds.\n\n" + CONNECTION_HELP,
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _listing_args(p, SESSION_FILTERS)
    p.set_defaults(handler=cmd_sessions_list)
    p = ssub.add_parser(
        "show",
        help="show one session's record",
        description="Every field of one session record, its recording's state and details.\n\n"
        + CONNECTION_HELP,
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("session_id", metavar="ID")
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    _connection_args(p)
    p.set_defaults(handler=cmd_sessions_show)
    p = add(
        sub,
        "download",
        "download a session's sealed recording",
        "Streams the recording into FILE.part, resumes it if that exists (HTTP Range),\n"
        "checks its length against Content-Length and the ETag and its sealed header,\n"
        "then renames it to FILE. Read it with `sshaudit decrypt`, `play` or `export`.\n\n"
        + CONNECTION_HELP,
        "  sshaudit download 0d6c1f5e-... -o session.sealed\n"
        "  sshaudit decrypt --key auditor.key session.sealed | less -R",
        EXIT_STATUS,
    )
    p.add_argument("session_id", metavar="ID")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="file to write")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _connection_args(p)
    p.set_defaults(handler=cmd_download)
    p = add(
        sub,
        "auth-events",
        "list authentication events held by the collector",
        CONNECTION_HELP,
        "  sshaudit auth-events --allowed no --since 2026-11-21T00:00:00Z",
        EXIT_STATUS,
    )
    _listing_args(p, EVENT_FILTERS)
    p.add_argument("--allowed", choices=["yes", "no"], help="only allowed or only denied")
    p.set_defaults(handler=cmd_auth_events)


# --- handlers


def _warn(message: str) -> None:
    print(f"sshaudit: {message}", file=sys.stderr)


def _connect(args: argparse.Namespace) -> Collector:
    from sshaudit.auditor.remote import Collector, load_settings

    flags = {
        "collector": args.collector,
        "token_file": args.token_file,
        "fingerprint": args.fingerprint,
    }
    return Collector.connect(load_settings(flags, args.config, os.environ), _warn)


def _filters(args: argparse.Namespace, names: Iterable[str]) -> dict[str, str]:
    from sshaudit.auditor.remote import iso_time
    from sshaudit.errors import UsageError

    if args.limit < 0:
        raise UsageError("--limit must be 0 (all) or more")
    out = {n: getattr(args, n) for n in names if getattr(args, n, None)}
    for name in ("since", "until"):
        if getattr(args, name):
            out[name] = iso_time(getattr(args, name), f"--{name}")
    return out


def cmd_sessions_list(args: argparse.Namespace) -> int:
    filters = _filters(args, [n for n, _, _ in SESSION_FILTERS])
    with _connect(args) as collector:
        items = collector.sessions(filters, args.limit)
        if args.json:
            _json_lines(items)
        else:
            _table(items, SESSION_COLUMNS)
    return 0


def cmd_auth_events(args: argparse.Namespace) -> int:
    filters = _filters(args, [n for n, _, _ in EVENT_FILTERS])
    if args.allowed:
        filters["allowed"] = "true" if args.allowed == "yes" else "false"
    with _connect(args) as collector:
        items = collector.auth_events(filters, args.limit)
        if args.json:
            _json_lines(items)
        else:
            _table(items, EVENT_COLUMNS)
    return 0


def cmd_sessions_show(args: argparse.Namespace) -> int:
    with _connect(args) as collector:
        doc = collector.session(args.session_id)
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    for name in SESSION_FIELDS:
        print(f"{name + ':':<18}{clean(_text(doc.get(name)))}")
    rec = doc.get("recording")
    if isinstance(rec, dict):
        for name in ("length", "frames", "state", "verified_at"):
            print(f"{'recording.' + name + ':':<18}{clean(_text(rec.get(name)))}")
    else:
        print(f"{'recording:':<18}none")
    if doc.get("details"):
        print(f"{'details:':<18}{json.dumps(doc['details'], sort_keys=True)}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    show = not args.quiet and sys.stderr.isatty()
    bar = ProgressBar(sys.stderr.write, time.monotonic) if show else None
    with _connect(args) as collector:
        try:
            result = collector.download(
                args.session_id, args.output, bar.update if bar else _nothing, _warn
            )
        finally:
            if bar:
                bar.finish()
    if result.state == "open":
        _warn(f"warning: {args.session_id}'s recording is still open (running or cut off)")
    how = f" (resumed at byte {result.resumed_from})" if result.resumed_from else ""
    print(f"wrote {args.output}: {result.length} bytes{how}", file=sys.stderr)
    return 0


def _nothing(done: int, total: int | None) -> None:
    return None


# --- output


Column = tuple[str, Callable[[dict[str, Any]], object], int]  # title, value, max width

SESSION_COLUMNS: tuple[Column, ...] = (
    ("START", lambda d: d.get("session_start"), 24),
    ("USER", lambda d: d.get("user_email") or "-", 32),
    ("UNIX", lambda d: d.get("unix_user"), 16),
    ("HOST", lambda d: d.get("hostname"), 24),
    ("CLIENT", lambda d: d.get("client_address"), 39),
    ("TYPE", lambda d: d.get("program_type"), 9),
    ("STATUS", lambda d: d.get("recording_status"), 13),
    ("EXIT", lambda d: d.get("exit_status"), 5),
    ("ID", lambda d: d.get("session_id"), 36),
    ("COMMAND", lambda d: d.get("command"), 60),
)
EVENT_COLUMNS: tuple[Column, ...] = (
    ("TIME", lambda d: d.get("created_at"), 24),
    ("ALLOWED", lambda d: "yes" if d.get("allowed") else "no", 7),
    ("METHOD", lambda d: d.get("method"), 12),
    ("USER", lambda d: d.get("user_email") or "-", 32),
    ("UNIX", lambda d: d.get("unix_user"), 16),
    ("IP", lambda d: d.get("ip_address"), 39),
    ("TARGET", lambda d: d.get("target_id"), 36),
    ("REASON", lambda d: d.get("reason"), 60),
)


def _text(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def clean(text: str) -> str:
    """``text`` with every non-printable character (C0, C1, DEL, format characters)
    shown as a Python escape, so nothing a host sent can act on the terminal (ECMA-48)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _cell(value: object, width: int) -> str:
    text = clean(_text(value))
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(items: Iterable[dict[str, Any]], columns: Sequence[Column]) -> None:
    rows = [[_cell(get(item), width) for _, get, width in columns] for item in items]
    if not rows:
        print("(none)", file=sys.stderr)
        return
    widths = [max(len(t), *(len(r[i]) for r in rows)) for i, (t, _, _) in enumerate(columns)]
    for row in [[t for t, _, _ in columns], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _json_lines(items: Iterable[dict[str, Any]]) -> None:
    for item in items:
        print(json.dumps(item, sort_keys=True), flush=True)


class ProgressBar:
    """``[#####.....]  45%  1.2 of 2.6 MiB`` redrawn in place, at most 10 times a second."""

    def __init__(self, write: Callable[[str], object], clock: Callable[[], float]) -> None:
        self._write = write
        self._clock = clock
        self._last = -1.0
        self._drawn = False

    def update(self, done: int, total: int | None) -> None:
        now = self._clock()
        if now - self._last < 0.1 and done != total:
            return
        self._last = now
        mib = f"{done / 2**20:.1f}"
        if total:
            filled = 30 * done // total
            line = f"[{'#' * filled}{'.' * (30 - filled)}] {100 * done // total:3d}%  "
            line += f"{mib} of {total / 2**20:.1f} MiB"
        else:
            line = f"{mib} MiB"
        self._write(f"\r{line}\x1b[K")  # EL (ECMA-48 8.3.41): clear what a longer line left
        self._drawn = True

    def finish(self) -> None:
        if self._drawn:
            self._write("\n")
