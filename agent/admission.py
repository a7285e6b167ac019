"""Who may hold a connection to the daemon's socket, decided at accept (issue 9, point 5).

The socket is 0666: every local user can connect to it. Unlimited, one user could hold
thousands of connections (file descriptors, buffers, peer checks) and starve the daemon, so
that another user's login finds no room. This module holds what the daemon needs to turn
such a flood away cheaply, before it reads a byte of it:

- :class:`Admission`: concurrent connections per uid, counted from SO_PEERCRED at accept.
  Past the cap a connection is closed at once. Root (the PAM hook, root's own logins) is
  not capped: root can stop the daemon anyway, and a PAM event must never be turned away;
- :class:`RefusalLog`: at most one log line per uid per interval, carrying the count of
  refusals since the last line, so a flood of connections is not a flood of log lines;
- :func:`read_first`: the first message, bounded in bytes and in time, read with nothing
  else buffered: an unchecked peer can make the daemon hold at most ``first_message_limit``
  bytes, for at most the first-message timeout;
- :func:`raise_nofile`: the soft RLIMIT_NOFILE raised to the hard limit at start (the unit
  sets the hard limit: LimitNOFILE).

Invariants: ``Admission.held(uid)`` is the number of admitted, not yet released connections
of ``uid``, never more than the cap for a capped uid; the counters only change on the event
loop's thread; nothing here blocks.
"""

from __future__ import annotations

import asyncio
import logging
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

from sshaudit.agent.protocol import HEADER_LEN, MAX_PAYLOAD, Message, MsgType, ProtocolError

# The first message of a non-root peer, whole: a HELLO's command is sshd's
# SSH_ORIGINAL_COMMAND, an environment string, which Linux caps at 128 KiB (MAX_ARG_STRLEN);
# with its JSON quoting and the rest of the HELLO it stays under this. PAM and AUTH
# messages are far smaller.
FIRST_MESSAGE_MAX = 160 * 1024
FIRST_TYPES = frozenset({MsgType.HELLO, MsgType.PAM, MsgType.AUTH})
UNCAPPED_UIDS = frozenset({0})
REFUSAL_LOG_INTERVAL = 10.0


@dataclass(frozen=True)
class AdmissionStats:
    """A snapshot: connections held now (all uids), and refused since the start."""

    held: int
    refused: int


class Admission:
    """Concurrent connections per uid, with a cap for every uid but root's."""

    def __init__(self, cap: int, uncapped: frozenset[int] = UNCAPPED_UIDS) -> None:
        if cap < 1:
            raise ValueError("the connection cap must be at least 1")
        self.cap = cap
        self._uncapped = uncapped
        self._held: dict[int, int] = {}
        self.refused = 0

    def admit(self, uid: int) -> bool:
        """Count one more connection of ``uid``; False (and nothing counted) past the cap."""
        n = self._held.get(uid, 0)
        if n >= self.cap and uid not in self._uncapped:
            self.refused += 1
            return False
        self._held[uid] = n + 1
        return True

    def release(self, uid: int) -> None:
        """One admitted connection of ``uid`` ended (call once per successful admit)."""
        n = self._held.get(uid, 0) - 1
        if n > 0:
            self._held[uid] = n
        else:
            self._held.pop(uid, None)  # the table holds only uids with connections

    def held(self, uid: int) -> int:
        return self._held.get(uid, 0)

    def stats(self) -> AdmissionStats:
        return AdmissionStats(held=sum(self._held.values()), refused=self.refused)


class RefusalLog:
    """Refused connections, logged per uid at most once per ``interval`` seconds.

    The first refusal of a uid is logged at once; later ones are counted and reported by
    the next line for that uid (a refusal after the interval, or :meth:`flush`)."""

    def __init__(
        self,
        log: logging.Logger,
        cap: int,
        interval: float = REFUSAL_LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._cap = cap
        self._interval = interval
        self._clock = clock
        self._last: dict[int, float] = {}  # uid -> when its last line was written
        self._unlogged: dict[int, int] = {}  # uid -> refusals since that line

    def refused(self, uid: int, pid: int) -> None:
        now = self._clock()
        self._unlogged[uid] = self._unlogged.get(uid, 0) + 1
        if now - self._last.get(uid, -math.inf) >= self._interval:
            self._line(uid, now, f"last pid {pid}")

    def flush(self) -> None:
        """Report the refusals counted but not logged yet, for uids past their interval;
        forget uids that have been quiet for an interval (the table stays small)."""
        now = self._clock()
        for uid in list(self._last):
            if now - self._last[uid] < self._interval:
                continue
            if self._unlogged.get(uid):
                self._line(uid, now, "since the last report")
            else:
                del self._last[uid]

    def _line(self, uid: int, now: float, note: str) -> None:
        count = self._unlogged.pop(uid, 0)
        self._last[uid] = now
        self._log.warning(
            "connections refused: uid %d holds %d connections to the socket (the cap per "
            "user): %d refused (%s)",
            uid,
            self._cap,
            count,
            note,
        )


async def read_first(
    reader: asyncio.StreamReader, deadline: float, limit: int = FIRST_MESSAGE_MAX
) -> Message | None:
    """The peer's first message, read whole by ``deadline`` (loop time) and at most
    ``limit`` payload bytes; None when the peer said nothing in time or hung up.

    Only HELLO, PAM and AUTH may come first; anything else, or a longer message, raises
    :class:`ProtocolError` once its 5-byte header is read, before its payload is."""
    try:
        async with asyncio.timeout_at(deadline):
            head = await reader.readexactly(HEADER_LEN)
            code, length = head[0], int.from_bytes(head[1:], "big")
            try:
                msg_type = MsgType(code)
            except ValueError:
                raise ProtocolError(f"unknown message type {code}") from None
            if msg_type not in FIRST_TYPES:
                raise ProtocolError(f"began with {msg_type.name}")
            if length > min(limit, MAX_PAYLOAD):
                raise ProtocolError(
                    f"{msg_type.name}: a first message of {length} bytes (the limit is {limit})"
                )
            payload = await reader.readexactly(length)
    except (TimeoutError, asyncio.IncompleteReadError):
        return None
    return Message(msg_type, payload)


def first_message_limit(uid: int) -> int:
    """Root's PAM hook may send sshd's whole auth info (64 KiB and more): root is not
    limited below the protocol's own bound; everyone else to :data:`FIRST_MESSAGE_MAX`."""
    return MAX_PAYLOAD if uid in UNCAPPED_UIDS else FIRST_MESSAGE_MAX


def raise_nofile() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit; returns (soft, hard) after.

    Every connection is a file descriptor: the soft limit (often 1024) would otherwise be
    reached long before the per-user caps matter, and accept would fail for everyone."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # a hard limit of infinity may be refused: keep it
            pass
    return soft, hard
