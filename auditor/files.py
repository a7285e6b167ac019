"""File handling for the auditor CLI: key files, sealed files, atomic output.

Invariants:
- keys are read from files only, and no message ever quotes a key file's content;
- an output file appears whole or not at all: it is written to a 0600 temporary file in
  the same directory, fsynced, then renamed over the target (``os.replace``);
- a sealed file is verified entirely (every frame, the signature) before any plaintext is
  written anywhere, so a tampered file never leaves a partial output behind.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sshaudit.errors import (
    KeyFileError,
    SealedFormatError,
    SignatureError,
    TamperedError,
    TruncatedError,
    UsageError,
)
from sshaudit.keys import AuditorPrivateKey, AuditorPublicKey, decode_key_text
from sshaudit.sealed import (
    MAGIC,
    Completeness,
    ReadResult,
    SealedReader,
    SignatureStatus,
)

CHUNK = 1 << 20
MAX_STDIN = 1 << 30  # a sealed file piped on stdin is held in memory for the two passes


def read_small(path: str, what: str, limit: int = 4096) -> bytes:
    """Read a small file (a key), with errors that name the file and never its content."""
    try:
        with Path(path).open("rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from exc
    if len(data) > limit:
        raise KeyFileError(f"{what} {path}: too large to be a key file")
    return data


def load_private_key(path: str, warn: Callable[[str], object] | None = None) -> AuditorPrivateKey:
    data = read_small(path, "auditor private key")
    with contextlib.suppress(OSError):
        if Path(path).stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO) and warn is not None:
            warn(f"warning: private key {path} is readable by others; chmod 600 it")
    try:
        return AuditorPrivateKey.from_text(data)
    except KeyFileError as exc:
        raise KeyFileError(f"{path}: {exc}") from None


def load_public_key(path: str) -> AuditorPublicKey:
    try:
        return AuditorPublicKey.from_text(read_small(path, "auditor public key"))
    except KeyFileError as exc:
        raise KeyFileError(f"{path}: {exc}") from None


def load_raw_key(path: str, what: str) -> bytes:
    try:
        return decode_key_text(read_small(path, what), what)
    except KeyFileError as exc:
        raise KeyFileError(f"{path}: {exc}") from None


class Source:
    """An input file (or ``-`` for stdin) that can be read more than once."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._data: bytes | None = None
        if path == "-":
            self._data = sys.stdin.buffer.read(MAX_STDIN + 1)
            if len(self._data) > MAX_STDIN:
                raise UsageError("stdin input larger than 1 GiB: pass a file name instead")

    def chunks(self) -> Iterator[bytes]:
        if self._data is not None:
            view = memoryview(self._data)
            for i in range(0, len(view), CHUNK):
                yield bytes(view[i : i + CHUNK])
            return
        try:
            with Path(self.path).open("rb") as f:
                while chunk := f.read(CHUNK):
                    yield chunk
        except OSError as exc:
            raise UsageError(f"cannot read {self.path}: {exc.strerror}") from exc

    def head(self, n: int) -> bytes:
        for chunk in self.chunks():
            return chunk[:n]
        return b""

    def is_sealed(self) -> bool:
        return self.head(len(MAGIC)) == MAGIC

    def read_all(self) -> bytes:
        return b"".join(self.chunks())


@dataclass(frozen=True)
class Policy:
    """What the caller accepts of a sealed file."""

    allow_truncated: bool = False
    host_key: bytes | None = None  # when set, a valid signature by exactly this key is required


def _stream(
    source: Source,
    keys: list[AuditorPrivateKey],
    sink: Callable[[bytes | bytearray], object],
    check_signature: bool = True,
) -> ReadResult:
    reader = SealedReader(keys, check_signature=check_signature)
    try:
        for chunk in source.chunks():
            plain = reader.feed(chunk)
            if plain:
                sink(plain)
        return reader.finish()
    except TamperedError as exc:
        raise TamperedError(f"{source.path}: {exc}", exc.frame) from None
    except SealedFormatError as exc:
        raise SealedFormatError(f"{source.path}: {exc}") from None


def _judge(result: ReadResult, policy: Policy, path: str) -> None:
    if result.completeness is Completeness.TRUNCATED and not policy.allow_truncated:
        how = "a torn last frame" if result.torn else "no last frame"
        raise TruncatedError(
            f"{path}: recording is truncated after {result.frames} frames ({how}); "
            "pass --allow-truncated to accept what is there"
        )
    if policy.host_key is None:
        return
    header = result.header
    if result.signature is not SignatureStatus.VALID:
        raise SignatureError(
            f"{path}: signature is {result.signature.value}, a valid one is required"
        )
    if header.host_key != policy.host_key:
        raise SignatureError(f"{path}: signed by a different host key than the one given")


def verify(source: Source, keys: list[AuditorPrivateKey], policy: Policy) -> ReadResult:
    """Pass one: check every frame and the signature, keep no plaintext."""
    result = _stream(source, keys, lambda _plain: None)
    _judge(result, policy, source.path)
    return result


def decrypt_to(
    source: Source, keys: list[AuditorPrivateKey], sink: Callable[[bytes | bytearray], object]
) -> ReadResult:
    """Pass two (after :func:`verify`): stream the plaintext into ``sink``. The signature
    was checked in pass one; frames are still authenticated (the file could change)."""
    return _stream(source, keys, sink, check_signature=False)


def decrypt_bytes(
    source: Source, keys: list[AuditorPrivateKey], policy: Policy
) -> tuple[bytes, ReadResult]:
    parts: list[bytes | bytearray] = []
    result = _stream(source, keys, parts.append)
    _judge(result, policy, source.path)
    return b"".join(parts), result


@contextlib.contextmanager
def atomic_output(path: str, mode: int = 0o600) -> Iterator[BinaryIO]:
    """Write ``path`` whole or not at all (temp file + fsync + rename)."""
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or Path())
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()
        raise


def open_sink(path: str | None) -> contextlib.AbstractContextManager[BinaryIO]:
    if path is None or path == "-":
        return contextlib.nullcontext(sys.stdout.buffer)
    return atomic_output(path)
