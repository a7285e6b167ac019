"""``sshaudit-collector``: set up, run and administer the collector (issue 4).

Invariants:
- every failure the user can cause ends with one ``sshaudit-collector: ...`` line on stderr
  and exit status 2 (usage, configuration) or 1 (refused or failed), never a traceback;
- machine-readable output goes to stdout (a token alone on the last line, the fingerprint
  alone on the last line, ``--json`` listings), explanations to stderr;
- the state directory is 0700 and the TLS key 0600; plain HTTP is refused unless asked for,
  and then only on a loopback address.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from sshaudit import __version__
from sshaudit.collector import cli_admin, cli_retention, cli_serve
from sshaudit.collector.cli_common import EXIT_FAILED, EXIT_OK, EXIT_STATUS, EXIT_USAGE, FILES
from sshaudit.collector.cli_common import formatter as _formatter
from sshaudit.collector.problems import CollectorError
from sshaudit.errors import SSHAuditError, UsageError

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sshaudit-collector",
        formatter_class=_formatter,
        description=(
            "The sshaudit collector: the central service that enrolled hosts ship sealed SSH\n"
            "session recordings, session records and authentication events to, and that\n"
            "auditors query. It never holds a private key and never decrypts a recording.\n\n"
            "Start with `init`, make tokens with `token create`, run with `serve`.\n"
            "The HTTP API is described in docs/collector.md and /openapi.json."
        ),
        epilog=f"{FILES}\n{EXIT_STATUS}",
    )
    parser.add_argument("--version", action="version", version=f"sshaudit-collector {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cli_serve.add_parsers(sub)
    cli_admin.add_parsers(sub)
    cli_retention.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except CollectorError as exc:
        # Bad input (a malformed key, comment, id) is the caller's mistake: a usage error.
        return _fail(exc.message, EXIT_USAGE if exc.status in (400, 422) else EXIT_FAILED)
    except SSHAuditError as exc:
        return _fail(str(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BrokenPipeError:
        return EXIT_OK


def _fail(message: str, status: int) -> int:
    print(f"sshaudit-collector: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
