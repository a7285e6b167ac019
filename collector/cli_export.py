"""The sinks of ``sshaudit-collector export``: stdout, a file, an HTTP(S) endpoint; and the
position file that lets a follower resume.

Invariants: a batch is written whole (file: one ``write`` then ``fsync``; HTTP: one POST
that must answer 2xx) before the position moves past it; the position file is replaced
atomically (temporary file, fsync, rename), so it never holds half a number; headers for
the endpoint come from a file, never from the command line (``ps`` would show them).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from sshaudit.collector.cli_common import EXIT_OK, open_data
from sshaudit.collector.export import ExportOptions, run_export
from sshaudit.collector.models import parse_time, to_us
from sshaudit.collector.problems import StorageError
from sshaudit.errors import UsageError

MAX_HEADER_FILE = 64 * 1024
HTTP_TIMEOUT = 30.0


def read_position(path: Path) -> int:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from exc
    if not text.isdigit():
        raise UsageError(f"{path}: not an export position (a number)")
    return int(text)


def write_position(path: Path, seq: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{seq}\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def read_headers(path: str) -> dict[str, str]:
    try:
        raw = Path(path).read_bytes()[: MAX_HEADER_FILE + 1]
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from exc
    if len(raw) > MAX_HEADER_FILE:
        raise UsageError(f"{path}: larger than {MAX_HEADER_FILE} bytes")
    headers: dict[str, str] = {}
    for n, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or any(c in line for c in "\r\x00"):
            raise UsageError(f"{path}:{n}: not a 'Name: value' header line")
        headers[name.strip()] = value.strip()
    return headers


def file_sink(path: str) -> Callable[[Sequence[str]], None]:
    def write(lines: Sequence[str]) -> None:
        data = "".join(line + "\n" for line in lines).encode()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StorageError(f"export to {path}: {exc.strerror}") from exc

    return write


def stdout_sink(lines: Sequence[str]) -> None:
    sys.stdout.write("".join(line + "\n" for line in lines))
    sys.stdout.flush()


def http_sink(url: str, headers: dict[str, str]) -> Callable[[Sequence[str]], None]:
    import requests

    session = requests.Session()
    session.headers.update(headers)

    def post(lines: Sequence[str]) -> None:
        body = "".join(line + "\n" for line in lines).encode()
        try:
            resp = session.post(
                url,
                data=body,
                headers={"Content-Type": "application/x-ndjson"},
                timeout=HTTP_TIMEOUT,
            )
        except requests.RequestException as exc:
            raise StorageError(f"export to {url}: {exc.__class__.__name__}") from exc
        if not 200 <= resp.status_code < 300:
            raise StorageError(f"export to {url}: HTTP {resp.status_code}")

    return post


def run(args: argparse.Namespace) -> int:
    since = None
    if args.since is not None:
        try:
            since = to_us(parse_time(args.since))
        except ValueError as exc:
            raise UsageError(f"--since {args.since!r}: {exc}") from exc
    if args.interval <= 0:
        raise UsageError("--interval must be positive")
    state = Path(args.state_file) if args.state_file else None
    target: str | None = args.to
    if args.to_header_file and not (target or "").startswith(("http://", "https://")):
        raise UsageError("--to-header-file goes with --to URL")
    sink: Callable[[Sequence[str]], None]
    if target is None:
        sink = stdout_sink
    elif target.startswith(("http://", "https://")):
        headers = read_headers(args.to_header_file) if args.to_header_file else {}
        sink = http_sink(target, headers)
    else:
        sink = file_sink(target)
    stopping = []

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)

    with contextlib.suppress(ValueError):  # not the main thread (tests): no handler
        signal.signal(signal.SIGTERM, stop)
    save = (lambda seq: None) if state is None else (lambda seq: write_position(state, seq))
    storage = open_data(args.data)
    try:
        run_export(
            storage,
            sink,
            ExportOptions(
                since_us=since,
                after_seq=0 if state is None else read_position(state),
                follow=args.follow,
                interval=args.interval,
            ),
            sleep=time.sleep,
            position=save,
            keep_going=lambda: not stopping,
        )
    finally:
        storage.close()
    return EXIT_OK
