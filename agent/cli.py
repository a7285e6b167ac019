"""``sshaudit-agent``: the agent's command line (record, principals, daemon, spool list,
enroll, unenroll, status).

Invariants:
- this module imports only argparse and sys at module level: ``sshaudit-agent record`` is
  sshd's ForceCommand and runs on every login, so the recorder (agent/record.py, standard
  library only) is imported lazily, and the daemon's heavy imports (pydantic, cryptography,
  psutil) happen only for the subcommands that need them;
- every failure the operator can cause ends with one ``sshaudit-agent: ...`` line on stderr
  and a documented exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sshaudit.agent import cli_enroll

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_CONFIG = "/etc/sshaudit/agent.toml"

EPILOG = """\
exit status:
  0  success
  1  the command failed (the daemon could not start: bad config, keys, spool or socket)
  2  usage error

`sshaudit-agent record` is sshd's ForceCommand; see `sshaudit-agent record --help`.
Every config key is documented in docs/agent-config.md.
"""


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=30)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sshaudit-agent",
        formatter_class=_formatter,
        description=(
            "The sshaudit agent on an SSH server: records every SSH session, sealed to\n"
            "the auditors' public keys, into a root-only spool."
        ),
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser(
        "record",
        help="record one SSH session (sshd's ForceCommand; runs as the user)",
        add_help=False,
    )
    sub.add_parser(
        "principals",
        help="sshd's AuthorizedPrincipalsCommand: principals allowed for %%u (see docs/policy.md)",
        add_help=False,
    )
    daemon = sub.add_parser(
        "daemon",
        help="run the agent daemon (root, foreground, logs to stderr)",
        formatter_class=_formatter,
        description=(
            "Run the agent daemon in the foreground, as root. It listens on the config's\n"
            "`socket` (mode 0666: every user's recorder connects; each peer is checked with\n"
            "SO_PEERCRED and its process ancestry), seals every session frame by frame to\n"
            "the `recipients` keys, signs with `host_key_file`, and writes the spool\n"
            "(`spool_dir`, 0700 root) with fsync. The PAM hook reports sessions to it too.\n"
            "With a [collector] table it ships the spool to the collector as it is written\n"
            "(pinned TLS, resumable) and deletes only what the collector confirmed durable.\n"
            "SIGTERM or SIGINT: stop listening, end open recordings as truncated, exit 0.\n"
            "Logs one line per event to stderr (journald under systemd)."
        ),
        epilog="example:\n  sshaudit-agent daemon --config /etc/sshaudit/agent.toml\n\n" + EPILOG,
    )
    daemon.add_argument("--config", metavar="FILE", required=True, help="the agent TOML config")
    daemon.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="least severe events logged (default: info)",
    )
    spool = sub.add_parser(
        "spool",
        help="inspect the spool",
        formatter_class=_formatter,
        description="Inspect the spool (needs root: the spool is 0700 root).",
    )
    spool_sub = spool.add_subparsers(dest="spool_command", metavar="SUBCOMMAND", required=True)
    listing = spool_sub.add_parser(
        "list",
        help="list the recordings in the spool and their state",
        formatter_class=_formatter,
        description=(
            "List every session the spool holds, oldest first: session id, unix user,\n"
            "start time, recording status (recording, complete, truncated, unrecorded,\n"
            "recorder_lost), spool state (writing, closed, dropped, none), the number of\n"
            "sealed frames, the file's size, and the bytes of it the collector confirmed\n"
            "(SHIPPED). A session leaves the spool once the collector confirmed all of it;\n"
            "with a [collector] configured, a last line sums up the backlog. Reads no key:\n"
            "nothing is decrypted."
        ),
        epilog=(
            "examples:\n  sshaudit-agent spool list\n"
            "  sshaudit-agent spool list --json | jq 'select(.recording_status != \"complete\")'"
        ),
    )
    listing.add_argument(
        "--config", metavar="FILE", default=DEFAULT_CONFIG, help=f"(default: {DEFAULT_CONFIG})"
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    cli_enroll.add_parsers(sub, _formatter)
    return parser


def _fail(message: str) -> int:
    sys.stderr.write(f"sshaudit-agent: {message}\n")
    return EXIT_FAILED


def _daemon(args: argparse.Namespace) -> int:
    from sshaudit.agent.daemon import run_daemon
    from sshaudit.errors import SSHAuditError

    try:
        return run_daemon(args.config, args.log_level)
    except SSHAuditError as exc:
        return _fail(str(exc))


def _spool_list(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from sshaudit.agent.config import load_config
    from sshaudit.agent.ship_files import read_ship_state
    from sshaudit.agent.spool import list_spool
    from sshaudit.errors import SSHAuditError

    try:
        config = load_config(args.config)
    except SSHAuditError as exc:
        return _fail(str(exc))
    spool_dir = Path(config.spool_dir)
    try:
        entries = list_spool(spool_dir)
    except OSError as exc:
        hint = " (run as root)" if isinstance(exc, PermissionError) else ""
        return _fail(f"cannot read the spool {config.spool_dir}: {exc.strerror}{hint}")
    # What the collector confirmed of each (agent/shipper.py); a shipped session is gone.
    states = {e.session_id: read_ship_state(spool_dir, e.session_id) for e in entries}
    shipped = {sid: s.acked if s else 0 for sid, s in states.items()}
    if args.json:
        for entry in entries:
            state = states[entry.session_id]
            doc = {
                **entry.to_json(),
                "shipped_bytes": shipped[entry.session_id],
                "ship_error": state.error if state else "",
            }
            sys.stdout.write(json.dumps(doc) + "\n")
        return EXIT_OK
    row = "{:<36}  {:<16}  {:<20}  {:<13}  {:<7}  {:>6}  {:>12}  {:>12}\n"
    sys.stdout.write(
        row.format("SESSION", "USER", "START", "STATUS", "SPOOL", "FRAMES", "BYTES", "SHIPPED")
    )
    for e in entries:
        sys.stdout.write(
            row.format(
                e.session_id,
                e.unix_user[:16],
                e.session_start,
                e.recording_status,
                e.spool_state,
                e.frames,
                e.bytes,
                shipped[e.session_id],
            )
        )
    if config.collector is not None:
        backlog = sum(max(0, e.bytes - shipped[e.session_id]) for e in entries)
        sys.stdout.write(
            f"backlog: {len(entries)} sessions, {backlog} bytes not yet confirmed by "
            f"{config.collector.url}\n"
        )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "principals":
        # sshd's AuthorizedPrincipalsCommand (the lean launcher is faster; this also works)
        from sshaudit.agent.principals import main as principals_main

        return principals_main(args_list[1:])
    if args_list and args_list[0] == "record":
        # sshd's ForceCommand: straight to the recorder, which parses its own options.
        from sshaudit.agent.record import main as record_main

        return record_main(args_list[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    if args.command == "daemon":
        return _daemon(args)
    if args.command in ("enroll", "unenroll", "status"):
        return cli_enroll.run(args)
    return _spool_list(args)  # argparse allows no other command


if __name__ == "__main__":
    raise SystemExit(main())
