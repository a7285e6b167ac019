"""``sshaudit-agent enroll | unenroll | status``: the admin's commands (agent/enroll.py,
agent/status.py), their options and their help text.

Invariants: heavy modules are imported only when one of these commands runs; every
failure is one ``sshaudit-agent: ...`` line, never a traceback; the enrollment token is
read from ``--token-file`` or ``--token`` and never printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

ENROLL_DESCRIPTION = """\
Turn this host into a recorded, certificate-only SSH server (run as root).

1. Enrolls at the collector (its TLS certificate pinned by --ca-fingerprint) with a
   one-time enrollment token (`sshaudit-collector token create --role agent`), and keeps
   the host credential (0600) and a new Ed25519 host signing key (0600).
2. Writes the agent config, the trusted user CA keys, the auditor keys and the policy
   the collector returned, and the launchers sshd runs (recorder, principals command).
3. Starts the agent daemon.
4. Edits sshd: a drop-in (sshd_config.d/00-sshaudit.conf) when sshd_config includes
   sshd_config.d/*.conf, else a marked block at the top of sshd_config, with
   TrustedUserCAKeys, AuthorizedPrincipalsCommand(+User), ExposeAuthInfo yes,
   PermitUserRC no, SetEnv SHLVL=1, ForceCommand and forwarding off (unless the policy
   allows it); adds the PAM hook as the first account and session line of sshd's PAM
   file. Refuses settings it cannot safely override (a Match block with its own
   ForceCommand, AcceptEnv that passes BASH_ENV, ...) and says which line.
5. Validates with `sshd -t`; on any failure every edited file is put back. Then reloads
   sshd (SIGHUP to its PidFile).

Idempotent: run again, it re-applies without a new token. Every original file is kept
so that `sshaudit-agent unenroll` restores it byte for byte.
"""

EXAMPLES = """\
examples:
  sshaudit-agent enroll --collector https://audit.example.com:8443 \\
      --token-file /root/enroll.token --ca-fingerprint SHA256:3f0c...
  sshaudit-agent enroll ... --dry-run      # print the sshd and PAM diff, change nothing
  sshaudit-agent status
  sshaudit-agent unenroll

exit status: 0 success, 1 failure (nothing left half done), 2 usage error.
"""


def _layout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        type=Path,
        help="keep every sshaudit file under DIR instead of /etc/sshaudit, /var/lib/sshaudit, "
        "/var/spool/sshaudit, /run/sshaudit and /usr/libexec/sshaudit (tests, a private sshd)",
    )


def add_parsers(sub: Any, formatter: Any) -> None:
    e = sub.add_parser(
        "enroll",
        help="enroll this host and set sshd up for recording (root)",
        formatter_class=formatter,
        description=ENROLL_DESCRIPTION,
        epilog=EXAMPLES,
    )
    e.add_argument("--collector", required=True, metavar="URL", help="https://host:port")
    tok = e.add_mutually_exclusive_group(required=True)
    tok.add_argument("--token", metavar="TOKEN", help="the enrollment token (visible in ps)")
    tok.add_argument("--token-file", metavar="FILE", type=Path, help="file holding the token")
    e.add_argument(
        "--ca-fingerprint",
        required=True,
        metavar="SHA256:HEX",
        help="the collector TLS certificate's fingerprint (sshaudit-collector init prints it)",
    )
    e.add_argument(
        "--hostname", default="", help="name shown at the collector (default: this host's)"
    )
    e.add_argument("--sshd-config", type=Path, default=Path("/etc/ssh/sshd_config"), metavar="FILE")
    e.add_argument("--pam-dir", type=Path, default=Path("/etc/pam.d"), metavar="DIR")
    e.add_argument(
        "--pam-service", default="sshd", help="PAM file name in --pam-dir (default sshd)"
    )
    e.add_argument(
        "--shell-etc",
        type=Path,
        default=Path("/etc"),
        metavar="DIR",
        help="where zsh/zshenv, csh.cshrc and fish/config.fish live (default /etc): each "
        "installed shell hands over to the recorder there before any user file",
    )
    e.add_argument(
        "--sshd",
        type=Path,
        default=Path("/usr/sbin/sshd"),
        metavar="BINARY",
        help="for sshd -t / -T",
    )
    e.add_argument(
        "--sshd-log",
        default="journal",
        metavar="journal|off|FILE",
        help="where sshd logs, for authentication events (default journal)",
    )
    e.add_argument(
        "--principals-user",
        default="sshaudit-principals",
        help="AuthorizedPrincipalsCommandUser: an unprivileged user (default sshaudit-principals)",
    )
    e.add_argument(
        "--refresh-seconds",
        type=float,
        default=300.0,
        metavar="S",
        help="how often the daemon fetches CA keys, auditor keys and policy (default 300)",
    )
    e.add_argument("--no-start", action="store_true", help="do not start the daemon")
    e.add_argument(
        "--dry-run", action="store_true", help="print the exact sshd/PAM diff; change nothing"
    )
    _layout_args(e)
    u = sub.add_parser(
        "unenroll",
        help="undo enroll: sshd and PAM files restored byte for byte (root)",
        formatter_class=formatter,
        description=(
            "Put back every file enroll edited, exactly as it was (refused if someone edited\n"
            "them since, unless --force), reload sshd, stop the daemon and remove the files\n"
            "enroll created. The spool is kept while it holds sessions not yet shipped."
        ),
    )
    u.add_argument("--force", action="store_true", help="restore even files edited since enroll")
    _layout_args(u)
    s = sub.add_parser(
        "status",
        help="is every piece in place and healthy",
        formatter_class=formatter,
        description=(
            "One line per check: enrolled, config, sshd settings in effect (sshd -T), daemon\n"
            "up, collector reachable, CA keys and policy age, spool backlog, last upload.\n"
            "Exit status 1 when a check fails."
        ),
    )
    s.add_argument("--json", action="store_true", help="one JSON document")
    _layout_args(s)


def _token(args: argparse.Namespace) -> str:
    if args.token is not None:
        return str(args.token).strip()
    try:
        return Path(args.token_file).read_text().strip()
    except OSError as exc:
        from sshaudit.errors import UsageError

        raise UsageError(f"cannot read --token-file {args.token_file}: {exc.strerror}") from exc


def run(args: argparse.Namespace) -> int:
    from sshaudit.agent import enroll, status
    from sshaudit.agent.enroll_sshd import SshdTarget
    from sshaudit.agent.layout import Layout
    from sshaudit.errors import SSHAuditError, UsageError

    try:
        layout = Layout.under(args.state_dir)
        if args.command == "status":
            results = status.checks(layout)
            print(status.render(results, args.json))
            return status.exit_status(results)
        if os.geteuid() != 0 and not getattr(args, "dry_run", False):
            raise UsageError(f"{args.command} changes sshd and must run as root")
        if args.command == "unenroll":
            return enroll.unenroll(layout, force=args.force)
        from sshaudit.agent.config import _fingerprint

        try:
            fingerprint = _fingerprint(args.ca_fingerprint)
        except ValueError as exc:
            raise UsageError(f"--ca-fingerprint: {exc}") from None
        opts = enroll.EnrollOptions(
            collector=args.collector,
            token=_token(args),
            fingerprint=fingerprint,
            layout=layout,
            sshd=SshdTarget(
                args.sshd_config, args.pam_dir / args.pam_service, args.sshd, args.shell_etc
            ),
            hostname=args.hostname,
            sshd_log=args.sshd_log,
            principals_user=args.principals_user,
            dry_run=args.dry_run,
            start=not args.no_start,
            refresh_seconds=args.refresh_seconds,
        )
        return enroll.enroll(opts)
    except SSHAuditError as exc:
        sys.stderr.write(f"sshaudit-agent {args.command}: {exc}\n")
        return 2 if isinstance(exc, UsageError) else 1
    except OSError as exc:  # a file enroll must read or write (named in the message)
        sys.stderr.write(f"sshaudit-agent {args.command}: {exc}\n")
        return 1
