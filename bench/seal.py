"""Seal and open throughput of the sealed format against raw ChaCha20-Poly1305.

Both sides run in one process on the same data, interleaved, median of several rounds.
The raw baseline is the cost floor: one ChaCha20-Poly1305 call per 64 KiB frame with the
same nonce and aad sizes, no framing, no HPKE, no hashing. Goal (issue 2): >= 0.8x.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section

from sshaudit.keys import AuditorPrivateKey
from sshaudit.sealed import SealedReader, SealedWriter, frame_nonce

FRAME = 64 * 1024


def seal_ours(
    chunks: list[bytes], keys: list[AuditorPrivateKey], signed: bool = True
) -> list[bytes | bytearray]:
    """Seal pre-cut frames, as the daemon does, keeping the output pieces (no join)."""
    writer = SealedWriter(
        recipients=[k.public for k in keys],
        session_id="bench",
        host_id="bench",
        created_at=datetime.now(UTC),
        host_key=Ed25519PrivateKey.generate() if signed else None,
    )
    out: list[bytes | bytearray] = [writer.start()]
    out.extend(writer.write(c) for c in chunks[:-1])
    out.append(writer.close(chunks[-1]))
    return out


def open_ours(pieces: list[bytes], keys: list[AuditorPrivateKey]) -> int:
    """Open a file fed in 1 MiB pieces, as the CLI reads it."""
    reader = SealedReader(keys[:1])
    total = sum(len(reader.feed(p)) for p in pieces)
    reader.finish()
    return total


def raw_open(cts: list[bytes], aead: ChaCha20Poly1305, aad: bytes) -> int:
    return sum(len(aead.decrypt(frame_nonce(n, False), ct, aad)) for n, ct in enumerate(cts))


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _rounds(
    args: argparse.Namespace, data: bytes, keys: list[AuditorPrivateKey]
) -> dict[str, list[float]]:
    aead, aad = ChaCha20Poly1305(os.urandom(32)), os.urandom(32)
    view = memoryview(data)
    chunks = [bytes(view[i : i + FRAME]) for i in range(0, len(data), FRAME)]
    cts = [aead.encrypt(frame_nonce(n, False), c, aad) for n, c in enumerate(chunks)]

    def mib_pieces(signed: bool) -> list[bytes]:
        whole = b"".join(seal_ours(chunks, keys, signed))
        return [whole[i : i + (1 << 20)] for i in range(0, len(whole), 1 << 20)]

    files = {signed: mib_pieces(signed) for signed in (True, False)}
    assert all(open_ours(f, keys) == len(data) for f in files.values())
    t: dict[str, list[float]] = {}
    runs: dict[str, Callable[[], object]] = {
        "raw_seal": lambda: [
            aead.encrypt(frame_nonce(n, False), c, aad) for n, c in enumerate(chunks)
        ],
        "seal_signed": lambda: seal_ours(chunks, keys, True),
        "seal_unsigned": lambda: seal_ours(chunks, keys, False),
        "raw_open": lambda: raw_open(cts, aead, aad),
        "open_signed": lambda: open_ours(files[True], keys),
        "open_unsigned": lambda: open_ours(files[False], keys),
    }
    for _ in range(args.rounds):  # interleaved, so drifts of the machine hit all alike
        for name, fn in runs.items():
            t.setdefault(name, []).append(timed(fn))
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=64, help="data size in MB (default 64)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    data = os.urandom(args.mb * 1_000_000)
    keys = [AuditorPrivateKey.generate() for _ in range(3)]
    sha = hashlib.sha256()
    sha_mbs = args.mb / timed(lambda: sha.update(data))
    mbs = {k: args.mb / statistics.median(v) for k, v in _rounds(args, data, keys).items()}

    def row(label: str, name: str, raw: str) -> str:
        return f"| {label} | {mbs[name]:.0f} | {mbs[raw]:.0f} | {mbs[name] / mbs[raw]:.2f}x |"

    rows = [
        "| operation | sshaudit MB/s | raw ChaCha20-Poly1305 MB/s | ratio |",
        "|---|---|---|---|",
        row("seal, 3 recipients, unsigned", "seal_unsigned", "raw_seal"),
        row("seal, 3 recipients, signed", "seal_signed", "raw_seal"),
        row("open (authenticate + decrypt), unsigned", "open_unsigned", "raw_open"),
        row("open + verify the signature, signed", "open_signed", "raw_open"),
    ]
    body = (
        "## Sealed format throughput (`bench/seal.py`)\n\n"
        f"{args.mb} MB of random data in 64 KiB frames; median of {args.rounds} interleaved "
        "rounds in one process.\nBaseline: one raw ChaCha20-Poly1305 call per frame (no "
        "framing, HPKE, signature hash or buffering). Goal: >= 0.8x.\n\n"
        + "\n".join(rows)
        + f"\n\nSHA-256 alone on this machine: {sha_mbs:.0f} MB/s. A signed file's "
        "signature covers SHA-256 over every stored byte (FORMAT.md), so a signed seal or a "
        "verifying open can go no faster than SHA-256, whatever the implementation; "
        "sshaudit hashes on a second core (core/hashing.py) while it encrypts or decrypts, "
        "so the signed rows approach that bound rather than the sum of both costs."
    )
    print(body)
    if not args.no_write:
        write_section("seal", body)


if __name__ == "__main__":
    main()
