"""agent/connection.py building blocks: the spool sink (order, group commit, backpressure,
errors) and the inbox (whole messages, deadlines, EOF), on asyncio without sockets."""

from __future__ import annotations

import asyncio

import pytest

from sshaudit.agent import protocol
from sshaudit.agent.connection import Inbox, SpoolSink
from sshaudit.agent.protocol import MsgType, ProtocolError


class SlowDisk:
    def __init__(self, fail_after: int | None = None) -> None:
        self.writes: list[bytes] = []
        self.fail_after = fail_after
        self.busy = False

    async def append(self, data: bytes) -> None:
        assert not self.busy, "two writes of one file at once"
        self.busy = True
        try:
            await asyncio.sleep(0.01)  # the fsync
            if self.fail_after is not None and len(self.writes) >= self.fail_after:
                raise OSError(28, "No space left on device")
            self.writes.append(data)
        finally:
            self.busy = False


def test_sink_keeps_order_and_groups_writes() -> None:
    disk = SlowDisk()

    async def main() -> None:
        sink = SpoolSink(disk.append, limit=1 << 20)
        for i in range(100):
            await sink.write(f"frame {i};".encode())
            await asyncio.sleep(0.001)  # the next read and seal, while the disk works
        await sink.flush()

    asyncio.run(main())
    assert b"".join(disk.writes) == b"".join(f"frame {i};".encode() for i in range(100))
    assert 1 < len(disk.writes) < 100  # frames sealed during an fsync went out together


def test_sink_backpressure_bounds_what_waits() -> None:
    disk = SlowDisk()
    waiting: list[int] = []

    async def main() -> None:
        sink = SpoolSink(disk.append, limit=1000)
        for _ in range(50):
            await sink.write(b"x" * 300)
            waiting.append(sink._queued)
        await sink.flush()

    asyncio.run(main())
    assert max(waiting) < 1000
    assert sum(map(len, disk.writes)) == 50 * 300


def test_sink_errors_surface_on_the_next_write_or_flush() -> None:
    disk = SlowDisk(fail_after=1)

    async def main() -> None:
        sink = SpoolSink(disk.append, limit=1 << 20)
        await sink.write(b"first")
        await sink.flush()
        await sink.write(b"second")
        with pytest.raises(OSError, match="No space"):
            await sink.flush()
        with pytest.raises(OSError, match="No space"):
            await sink.write(b"third")

    asyncio.run(main())
    assert disk.writes == [b"first"]


def test_inbox_returns_whole_messages_deadlines_and_eof() -> None:
    async def main() -> None:
        reader = asyncio.StreamReader()
        inbox = Inbox(reader)
        loop = asyncio.get_running_loop()
        assert await inbox.batch(loop.time() + 0.05) == []  # nothing yet: the deadline
        raw = protocol.encode_json(MsgType.HELLO, {"a": 1}) + protocol.encode_marker(1.0, "m")
        reader.feed_data(raw[:3])
        assert await inbox.batch(loop.time() + 0.05) == []  # half a header is no message
        reader.feed_data(raw[3:])
        msgs = await inbox.batch()
        assert [m.type for m in msgs] == [MsgType.HELLO, MsgType.MARKER]
        reader.feed_eof()
        assert await inbox.batch() == [] and inbox.eof
        bad = Inbox(asyncio.StreamReader())
        bad._reader.feed_data(b"\xff\x00\x00\x00\x00")
        with pytest.raises(ProtocolError):
            await bad.batch()

    asyncio.run(main())
