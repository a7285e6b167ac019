"""``sshaudit download``: a sealed recording from the collector to a local file.

Invariants:
- bytes grow in ``FILE.part`` only; a second run resumes it with ``Range: bytes=N-``
  (RFC 9110 section 14.2) when it starts with the whole sealed header of this session. That
  is safe without ``If-Range``: the collector's recordings only ever grow (docs/collector.md
  "append-only"), so a session's first N bytes never change; a ``.part`` of anything else
  is discarded, and every frame authenticates the header (FORMAT.md) besides;
- the byte count is checked three ways: the body against ``Content-Length``, the start and
  total against ``Content-Range`` (206) and the total against the strong ``ETag``
  ``"len-<length>"``; a short body keeps ``FILE.part`` for the next run;
- ``FILE`` appears (``os.replace`` after fsync) only once the whole file is there and its
  sealed header (FORMAT.md) parses and names the session asked for.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import IO, TYPE_CHECKING

import requests
import urllib3

from sshaudit.errors import SealedFormatError, SSHAuditError, UsageError
from sshaudit.sealed import MAGIC, MAX_HEADER, parse_header

if TYPE_CHECKING:
    from sshaudit.auditor.remote import Collector, DownloadResult, Progress, Warn

CHUNK = 256 * 1024
_ETAG_RE = re.compile(r'^"len-(\d+)"$')
_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")
_UNSATISFIED_RE = re.compile(r"^bytes \*/(\d+)$")


def download(
    collector: Collector, session_id: str, output: str, progress: Progress, warn: Warn
) -> DownloadResult:
    try:
        return _download(collector, session_id, output, progress, warn)
    except OSError as exc:  # the local side: FILE.part or FILE cannot be written
        raise UsageError(f"{exc.filename or output}: {exc.strerror}") from exc


def _download(
    collector: Collector, session_id: str, output: str, progress: Progress, warn: Warn
) -> DownloadResult:
    from sshaudit.auditor.remote import DownloadResult, http_error

    part = Path(output + ".part")
    have = _usable_part(part, session_id, warn)
    resumed = have
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    with collector.open_recording(session_id, headers) as resp:
        state = resp.headers.get("X-Sshaudit-Recording-State", "")
        if resp.status_code == 416 and have:
            total = _unsatisfied_total(resp)
            if total != have:  # longer than the recording: not a piece of it
                warn(f"warning: {part} does not fit this recording; downloading it again")
                part.unlink()
                return _download(collector, session_id, output, progress, warn)
        elif resp.status_code in (200, 206):
            if resp.status_code == 200:
                have = resumed = 0  # the collector sent the whole file
            total = _receive(resp, part, have, progress)
        else:
            raise http_error(resp, "download recordings")
    _check_header(part, session_id)
    os.replace(part, output)
    _fsync_dir(Path(output).resolve().parent)
    return DownloadResult(length=total, resumed_from=resumed, state=state)


def _usable_part(part: Path, session_id: str, warn: Warn) -> int:
    """How many bytes of ``part`` to keep: all when it starts with this session's whole
    sealed header, else none (a ``.part`` of another download is not resumed)."""
    if not part.exists():
        return 0
    try:
        _check_header(part, session_id)
    except SealedFormatError as exc:
        warn(f"warning: not resuming: {exc}; downloading from the start")
        part.unlink()
        return 0
    return part.stat().st_size


def _etag_total(resp: requests.Response) -> int:
    m = _ETAG_RE.match(resp.headers.get("ETag", ""))
    if not m:
        raise SSHAuditError('the collector\'s answer has no ETag "len-N"; not downloading')
    return int(m.group(1))


def _unsatisfied_total(resp: requests.Response) -> int:
    m = _UNSATISFIED_RE.match(resp.headers.get("Content-Range", ""))
    if not m:
        raise SSHAuditError("the collector's 416 answer has no Content-Range")
    return int(m.group(1))


def _expected(resp: requests.Response, have: int) -> tuple[int, int]:
    """(body length, file total) from the headers, which must agree with each other."""
    try:
        body = int(resp.headers["Content-Length"])
    except (KeyError, ValueError):
        raise SSHAuditError("the collector's answer has no Content-Length") from None
    total = _etag_total(resp)
    if resp.status_code == 206:
        m = _RANGE_RE.match(resp.headers.get("Content-Range", ""))
        if not m or int(m.group(1)) != have or int(m.group(3)) != total:
            raise SSHAuditError("the collector's Content-Range does not match the request")
        if int(m.group(2)) - have + 1 != body:
            raise SSHAuditError("the collector's Content-Range and Content-Length disagree")
    if have + body != total:
        raise SSHAuditError(
            f"Content-Length {body} from byte {have} does not make the {total} bytes of the ETag"
        )
    return body, total


def _receive(resp: requests.Response, part: Path, have: int, progress: Progress) -> int:
    body, total = _expected(resp, have)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if have else os.O_TRUNC)
    got = 0
    with os.fdopen(os.open(part, flags, 0o600), "wb") as out:
        progress(have, total)
        try:
            got = _copy(resp, out, have, total, progress)
        finally:
            out.flush()
            os.fsync(out.fileno())
    if got != body:
        raise SSHAuditError(
            f"the download stopped after {have + got} of {total} bytes; "
            f"run the same command again to resume ({part} is kept)"
        )
    return total


def _copy(
    resp: requests.Response, out: IO[bytes], have: int, total: int, progress: Progress
) -> int:
    got = 0
    try:
        # raw: the bytes as sent, so that they count against Content-Length exactly
        for chunk in resp.raw.stream(CHUNK, decode_content=False):
            out.write(chunk)
            got += len(chunk)
            progress(have + got, total)
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError) as exc:
        raise SSHAuditError(
            f"the download broke after {have + got} of {total} bytes ({type(exc).__name__}); "
            "run the same command again to resume"
        ) from exc
    return got


def _check_header(part: Path, session_id: str) -> None:
    with part.open("rb") as f:
        head = f.read(len(MAGIC) + 4 + MAX_HEADER)
    if not head.startswith(MAGIC) or len(head) < len(MAGIC) + 4:
        raise SealedFormatError(f"{part}: the download is not a sealed recording (no magic)")
    (size,) = struct.unpack(">I", head[len(MAGIC) : len(MAGIC) + 4])
    raw = head[len(MAGIC) + 4 : len(MAGIC) + 4 + size]
    if size > MAX_HEADER or len(raw) != size:
        raise SealedFormatError(f"{part}: the sealed header is cut short")
    header = parse_header(raw)
    if header.session_id != session_id:
        raise SealedFormatError(
            f"{part}: the recording names session {header.session_id}, not {session_id}"
        )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
