"""SHA-256 that overlaps with the caller: updates run on one shared worker thread.

The sealed format signs SHA-256 over every stored byte (FORMAT.md "Trailer"), which on its
own costs as much again as ChaCha20-Poly1305. hashlib releases the GIL while it hashes a
buffer larger than 2 KiB, so a worker thread hashes frame *i* on one core while the caller
encrypts or decrypts frame *i+1* on another.

Invariants: updates to one hash are applied in the order they were made (a single worker,
a FIFO queue); the queue is bounded, so a caller that outruns the worker waits instead of
piling up memory; :meth:`OverlappedSha256.digest` returns only after every earlier update.
"""

from __future__ import annotations

import hashlib
import queue
import threading

_QUEUE_DEPTH = 64  # at most 64 pending buffers (4 MiB of 64 KiB frames) per process


class _Worker:
    def __init__(self) -> None:
        self.queue: queue.Queue[tuple[hashlib._Hash, bytes | memoryview | threading.Event]] = (
            queue.Queue(_QUEUE_DEPTH)
        )
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, h: hashlib._Hash, item: bytes | memoryview | threading.Event) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(
                        target=self._run, name="sshaudit-sha256", daemon=True
                    )
                    self._thread.start()
        self.queue.put((h, item))

    def _run(self) -> None:
        while True:
            h, item = self.queue.get()
            if isinstance(item, threading.Event):
                item.set()
            else:
                h.update(item)


_WORKER = _Worker()


class OverlappedSha256:
    """A SHA-256 whose :meth:`update` returns at once; :meth:`digest` waits for the rest."""

    def __init__(self, initial: bytes = b"") -> None:
        self._h = hashlib.sha256(initial)

    def update(self, data: bytes | memoryview) -> None:
        _WORKER.submit(self._h, data)

    def digest(self) -> bytes:
        done = threading.Event()
        _WORKER.submit(self._h, done)
        done.wait()
        return self._h.digest()
