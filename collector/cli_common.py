"""Pieces every ``sshaudit-collector`` subcommand shares: help layout, the state directory.

Invariants: a state directory is a real directory (not a symlink) of mode 0700 owned by the
user running the command: the database's WAL files it creates must stay usable by the
service's user, and nobody else may read token hashes or recordings. A command other than
``init`` refuses a directory ``init`` did not make.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from sshaudit.collector.storage import Storage, open_storage
from sshaudit.collector.storage_pg_config import CONFIG_NAME
from sshaudit.collector.storage_sqlite import DB_NAME
from sshaudit.errors import UsageError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

EXIT_STATUS = """\
exit status:
  0  success
  1  the collector refused or failed (storage error, unknown id, disk full, ...)
  2  usage error: bad arguments, a missing or invalid state directory, a bad key or file
"""

FILES = """\
files (in the state directory DATA, mode 0700, owned by the collector's user):
  collector.sqlite3   metadata: hosts, token hashes, keys, policy, sessions, events
  recordings/         sealed recordings: recordings/<host_id>/<session_id>.sealed (0600)
  collector.toml      optional (0600, written before init): PostgreSQL + S3 storage instead
                      of the two above (docs/collector.md "Storage for a fleet")
  tls/cert.pem        the TLS certificate (self-signed by init unless you bring one)
  tls/key.pem         its private key (0600)
"""

if TYPE_CHECKING:  # only the stubs make the class generic
    Sub = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Sub = argparse._SubParsersAction


def formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def add_command(
    sub: Sub, name: str, summary: str, description: str, examples: str
) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=summary,
        description=f"{summary}\n\n{description}",
        epilog=(f"examples:\n{examples}\n\n" if examples else "") + EXIT_STATUS,
        formatter_class=formatter,
    )


def add_group(sub: Sub, name: str, summary: str) -> Sub:
    parser = sub.add_parser(name, help=summary, description=summary, formatter_class=formatter)
    return parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)


def add_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", required=True, metavar="DIR", help="the collector's state directory"
    )


def state_dir(path: str, *, create: bool = False) -> Path:
    """The checked state directory (created 0700 when ``create``)."""
    directory = Path(path)
    if create:
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700, parents=True)
    try:
        st = directory.lstat()
    except OSError as exc:
        raise UsageError(
            f"{path}: {exc.strerror} (make it with `sshaudit-collector init`)"
        ) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path}: not a directory (a symlink is refused)")
    if st.st_uid != os.geteuid():
        raise UsageError(
            f"{path}: owned by uid {st.st_uid}; run this as the user that owns it "
            "(e.g. sudo -u sshaudit-collector ...)"
        )
    if st.st_mode & 0o077:
        if not create:
            raise UsageError(f"{path}: must be mode 0700 (chmod 700 {path})")
        directory.chmod(0o700)
    marker = (directory / DB_NAME).is_file() or (directory / CONFIG_NAME).is_file()
    if not create and not marker:
        raise UsageError(f"{path}: not a collector state directory (run `sshaudit-collector init`)")
    return directory


def open_data(path: str) -> Storage:
    return open_storage(state_dir(path))
