"""``sshaudit``: the auditor's command line (keygen, seal, decrypt, info, play, export; and
sessions, download, auth-events against the collector, in auditor/remote_cli.py; login,
the user's certificate from the collector's CA, in auditor/login.py).

Invariants:
- every failure the user can cause ends with one ``sshaudit: ...`` line on stderr and a
  documented exit status, never a traceback;
- keys come from files only; no message quotes key material;
- nothing is written from a sealed file that failed verification (see auditor/files.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sshaudit import __version__
from sshaudit.errors import SSHAuditError, UsageError

if TYPE_CHECKING:
    from sshaudit.auditor.files import Policy

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

EXIT_STATUS = """\
exit status:
  0  success
  1  the recording failed verification: tampered with, reordered, truncated (without
     --allow-truncated), not readable by the given key, or its signature absent or
     invalid where --host-key requires one
  2  usage error: bad arguments, unreadable or malformed files or keys
"""

Handler = Callable[[argparse.Namespace], int]


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _add(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    summary: str,
    description: str,
    examples: str,
    exit_status: str = EXIT_STATUS,
) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=summary,
        description=f"{summary}\n\n{description}",
        epilog=f"examples:\n{examples}\n{exit_status}",
        formatter_class=_formatter,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sshaudit",
        formatter_class=_formatter,
        description=(
            "Read, verify and replay sealed SSH session recordings.\n\n"
            "Recordings are asciicast v2 files sealed (FORMAT.md, HPKE RFC 9180) to the\n"
            "auditors' X25519 public keys; only a holder of one of the private keys can\n"
            "read them. Key files hold 32 raw bytes in base64, as ssh-log-cli writes them."
        ),
        epilog=EXIT_STATUS,
    )
    parser.add_argument("--version", action="version", version=f"sshaudit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _keygen_parser(sub)
    _seal_parser(sub)
    _decrypt_parser(sub)
    _info_parser(sub)
    _play_parser(sub)
    _export_parser(sub)
    from sshaudit.auditor.remote_cli import add_remote_parsers  # argparse only: fast

    add_remote_parsers(sub, _add)
    from sshaudit.auditor.login import add_login_parser  # argparse only: fast

    add_login_parser(sub, _add)
    return parser


def _keygen_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = _add(
        sub,
        "keygen",
        "make an auditor key pair",
        "Writes the private key to PATH (mode 0600) and the public key to PATH.pub.\n"
        "Give PATH.pub to whoever enrolls servers; keep PATH secret and backed up:\n"
        "recordings sealed to it cannot be read without it.",
        "  sshaudit keygen -o ~/.sshaudit/auditor.key",
    )
    p.add_argument("-o", "--output", required=True, metavar="PATH", help="private key file")
    p.add_argument("--force", action="store_true", help="overwrite existing key files")
    p.set_defaults(handler=cmd_keygen)


def _seal_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = _add(
        sub,
        "seal",
        "seal an asciicast v2 file to auditor public keys",
        "Checks that IN is a valid asciicast v2 file, then seals it frame by frame to\n"
        "every --to key (and signs it with --sign). Use it to import existing asciinema\n"
        "recordings into the archive.",
        "  sshaudit seal --to alice.pub --to bob.pub session.cast -o session.sealed",
    )
    p.add_argument("input", metavar="IN.cast", help="asciicast v2 file ('-' for stdin)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="sealed file to write")
    p.add_argument(
        "--to", action="append", required=True, metavar="PUB", help="recipient public key file"
    )
    p.add_argument("--sign", metavar="HOSTKEY", help="Ed25519 private key file to sign with")
    p.add_argument("--session-id", help="session id (default: from the file, else a new UUID)")
    p.add_argument("--host-id", help="host id (default: from the file, else 'imported')")
    p.add_argument(
        "--frame-size",
        type=int,
        default=64 * 1024,
        metavar="BYTES",
        help="plaintext bytes per frame (1..1048576, default 65536)",
    )
    p.set_defaults(handler=cmd_seal)


def _key_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "-k",
        "--key",
        action="append",
        required=required,
        metavar="KEY",
        help="auditor private key file (repeat to try several)",
    )


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-truncated",
        action="store_true",
        help="accept a recording without its last frame (a cut-off session)",
    )
    p.add_argument(
        "--host-key",
        metavar="PUB",
        help="require a valid signature by this Ed25519 host public key file",
    )


def _decrypt_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = _add(
        sub,
        "decrypt",
        "verify and decrypt a sealed recording",
        "Checks every frame first; writes the asciicast v2 plaintext only if the whole\n"
        "file verifies. A truncated file is refused unless --allow-truncated; a tampered\n"
        "or reordered file is refused with the number of the frame that failed.",
        "  sshaudit decrypt --key auditor.key session.sealed -o session.cast\n"
        "  sshaudit decrypt --key auditor.key --host-key web-1.pub session.sealed | less -R",
    )
    p.add_argument("input", metavar="IN", help="sealed file ('-' for stdin)")
    p.add_argument("-o", "--output", metavar="OUT.cast", help="output file (default: stdout)")
    _key_args(p, required=True)
    _verify_args(p)
    p.set_defaults(handler=cmd_decrypt)


def _info_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = _add(
        sub,
        "info",
        "show a sealed recording's cleartext header",
        "No key is needed: the header (session and host ids, creation time, recipients'\n"
        "key ids, host signing key) is not secret.",
        "  sshaudit info session.sealed\n  sshaudit info --json session.sealed | jq .recipients",
    )
    p.add_argument("input", metavar="IN", help="sealed file ('-' for stdin)")
    p.add_argument("--json", action="store_true", help="print the header as JSON")
    p.set_defaults(handler=cmd_info)


def _replay_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="IN", help="sealed file or asciicast v2 .cast file")
    _key_args(p, required=False)
    _verify_args(p)


def _play_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = _add(
        sub,
        "play",
        "replay a recording in this terminal",
        "Replays the output as the user saw it. Escape sequences that could act on your\n"
        "terminal (clipboard writes, title and status reports, DCS/APC strings, mouse\n"
        "reporting) are removed. Keys: space pauses and resumes, '.' steps while paused,\n"
        "q quits.",
        "  sshaudit play --key auditor.key session.sealed --speed 2 --idle-limit 1",
    )
    _replay_args(p)
    p.add_argument("--speed", type=float, default=1.0, help="playback speed factor (default 1)")
    p.add_argument(
        "--idle-limit", type=float, metavar="SECONDS", help="cap pauses at this many seconds"
    )
    p.set_defaults(handler=cmd_play)


def _export_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = _add(
        sub,
        "export",
        "export a recording as asciicast or as a text transcript",
        "cast: the asciicast v2 file. txt: a readable transcript of what the terminal\n"
        "showed, escape sequences removed.",
        "  sshaudit export --key auditor.key session.sealed --format txt -o session.txt",
    )
    _replay_args(p)
    p.add_argument("--format", choices=["cast", "txt"], required=True, help="output format")
    p.add_argument("-o", "--output", metavar="OUT", help="output file (default: stdout)")
    p.set_defaults(handler=cmd_export)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except SSHAuditError as exc:
        return _fail(str(exc), _status_for(exc))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BrokenPipeError:
        return EXIT_OK  # the reader (a pager, head) went away: nothing is wrong with the file


def _status_for(exc: SSHAuditError) -> int:
    from sshaudit.errors import AsciicastError, KeyFileError, NoRecipientError

    if isinstance(exc, NoRecipientError):
        return EXIT_FAILED
    if isinstance(exc, KeyFileError | AsciicastError):
        return EXIT_USAGE
    return EXIT_FAILED


def _fail(message: str, status: int) -> int:
    print(f"sshaudit: {message}", file=sys.stderr)
    return status


# The handlers import what they need lazily, so `sshaudit --help` starts fast.


def cmd_keygen(args: argparse.Namespace) -> int:
    from sshaudit.auditor.commands import keygen

    keygen(args.output, force=args.force)
    print(f"wrote {args.output} (private, 0600) and {args.output}.pub", file=sys.stderr)
    return EXIT_OK


def cmd_seal(args: argparse.Namespace) -> int:
    from sshaudit.auditor.commands import SealRequest, seal

    if not 1 <= args.frame_size <= 1 << 20:
        raise UsageError("--frame-size must be between 1 and 1048576")
    request = SealRequest(
        input=args.input,
        output=args.output,
        recipients=tuple(args.to),
        sign=args.sign,
        session_id=args.session_id,
        host_id=args.host_id,
        frame_size=args.frame_size,
        now=datetime.now(UTC),
        new_id=lambda: str(uuid.uuid4()),
    )
    frames = seal(request)
    print(f"sealed {args.input} to {len(args.to)} key(s): {frames} frames", file=sys.stderr)
    return EXIT_OK


def cmd_decrypt(args: argparse.Namespace) -> int:
    from sshaudit.auditor.commands import decrypt

    result = decrypt(args.input, args.output, args.key, _policy(args), warn=_warn)
    if result.completeness.value == "truncated":
        _warn(f"warning: {args.input} is truncated after {result.frames} frames")
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    from sshaudit.auditor.commands import info

    doc = info(args.input)
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return EXIT_OK
    for key, value in doc.items():
        if key == "recipients":
            value = ", ".join(r.get("kid", "?") for r in value if isinstance(r, dict))
        print(f"{key + ':':<14}{value}")
    return EXIT_OK


def cmd_play(args: argparse.Namespace) -> int:
    from sshaudit.auditor.commands import load_events
    from sshaudit.auditor.play import play_terminal

    if args.speed <= 0 or (args.idle_limit is not None and args.idle_limit <= 0):
        raise UsageError("--speed and --idle-limit must be positive")
    header, events = load_events(args.input, args.key, _policy(args), warn=_warn)
    # As asciinema play does: the recording's own idle_time_limit applies unless overridden.
    idle = args.idle_limit if args.idle_limit is not None else header.idle_time_limit
    play_terminal(events, speed=args.speed, idle_limit=idle)
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from sshaudit.auditor.commands import export

    export(args.input, args.output, args.format, args.key, _policy(args), warn=_warn)
    return EXIT_OK


def _policy(args: argparse.Namespace) -> Policy:
    from sshaudit.auditor.files import Policy, load_raw_key

    host_key = load_raw_key(args.host_key, "host public key") if args.host_key else None
    return Policy(allow_truncated=args.allow_truncated, host_key=host_key)


def _warn(message: str) -> None:
    print(f"sshaudit: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
