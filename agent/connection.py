"""One recorder's conversation with the daemon, HELLO to DONE (agent/protocol.py).

Invariants:
- the :class:`RecorderConnection` coroutine alone seals its session's frames, and its
  :class:`SpoolSink` alone appends them, in the order the sealed writer numbered them;
  write+fsync runs in the daemon's thread pool while the next frames are sealed (group
  commit), with at most ``SINK_LIMIT`` bytes waiting (backpressure on the recorder);
- ACCEPT is sent only once the file's header and first frame are durable, DONE only once the
  last frame and the signature trailer are;
- whatever ends the conversation (END, EOF, a protocol error, a disk error, the daemon
  stopping, a bug), the file is closed and the record written with the matching status:
  ``complete``, ``recorder_lost`` or ``truncated``;
- the identity (certificate key id, serial, fingerprints) comes from root's copy of sshd's
  auth info, sent by the PAM hook, whenever the connection's PAM open carried one; the
  recorder's copy (the user-owned SSH_USER_AUTH file) only when none did. A disagreement is
  logged and noted in the record's ``error`` (:func:`choose_identity`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from enum import Enum
from typing import Any, Protocol, TypeVar

from sshaudit.agent import protocol, quota
from sshaudit.agent.authlog import Observation
from sshaudit.agent.config import AgentConfig, PolicyConfig, SealingKeys
from sshaudit.agent.daemon_auth import session_observation
from sshaudit.agent.peer import Lineage, PeerCred, PeerError
from sshaudit.agent.protocol import Message, MsgType, ProtocolError
from sshaudit.agent.reconcile import Finding, Reconciler
from sshaudit.agent.session import EndInfo, Hello, RecordingSession, SessionMeta, final_record
from sshaudit.agent.spool import RecordingStatus, SessionRecord, Spool, SpoolFile
from sshaudit.agent.sshcert import AuthInfo, parse_user_auth
from sshaudit.errors import FormatError, SSHAuditError

log = logging.getLogger("sshaudit.agent")

READ_SIZE = 64 * 1024
SINK_LIMIT = 256 * 1024  # sealed bytes a session may have waiting for the disk
REFUSE_FULL = "the recording spool is full"
REFUSE_PEER = "this process may not open a recording (not started by sshd for this user)"
REFUSE_ERROR = "the recording service failed to start a recording"
REFUSE_PROTOCOL = "the recorder and the recording service do not understand each other"
NOTE_MISMATCH = (
    "identity: the recorder's SSH_USER_AUTH differs from sshd's (PAM); sshd's is recorded"
)
NOTE_ALTERED = (
    "identity: sshd's auth info was altered before the PAM hook saw it "
    "(a pam_env line before the hook?); no identity recorded"
)
T = TypeVar("T")


class IdentitySource(Enum):
    PAM = "pam"  # SSH_AUTH_INFO_0, passed on by the PAM hook (root)
    RECORDER = "recorder"  # the SSH_USER_AUTH file, read by the recorder (the user)


@dataclass(frozen=True)
class Identity:
    auth: AuthInfo | None
    source: IdentitySource
    note: str | None  # for the record's error field: why the identity is in doubt
    problem: str | None = None  # for the daemon's log: what was unreadable


def _parse_auth(text: str) -> tuple[AuthInfo | None, str | None]:
    try:
        return parse_user_auth(text), None
    except FormatError as exc:
        return None, str(exc)


def choose_identity(pam_text: str | None, recorder_text: str) -> Identity:
    """The session's identity, sans-IO: root's copy when the PAM open carried one.

    sshd ends every method line of its auth info with a newline (auth2.c,
    auth2_update_session_info) and pam_env(8) cannot write one, so a non-empty PAM value
    without it was rewritten (or cut at 64 KiB) by a module before the hook: it names
    nobody, and the recorder's copy is not trusted either. The recorder's copy is compared
    only when it is non-empty (it is empty with ``ExposeAuthInfo no``).
    """
    recorder, recorder_err = _parse_auth(recorder_text)
    if pam_text is None:
        return Identity(recorder, IdentitySource.RECORDER, None, recorder_err)
    if pam_text and not pam_text.endswith("\n"):
        return Identity(None, IdentitySource.PAM, NOTE_ALTERED, "SSH_AUTH_INFO_0 altered")
    pam, pam_err = _parse_auth(pam_text)
    if not recorder_text:
        agree = True
    elif pam_err is None and recorder_err is None:
        agree = pam == recorder
    else:
        agree = pam_text.strip() == recorder_text.strip()
    return Identity(pam, IdentitySource.PAM, None if agree else NOTE_MISMATCH, pam_err)


class Daemon(Protocol):
    """What a connection needs from the daemon (agent/daemon.py's AgentDaemon)."""

    config: AgentConfig
    policy: PolicyConfig
    keys: SealingKeys
    hostname: str
    spool: Spool
    quota: quota.SpoolQuota
    reconciler: Reconciler | None
    stopping: bool
    wall: Callable[[], datetime]

    async def io(self, fn: Callable[..., T], *args: Any) -> T: ...
    async def append(self, file: SpoolFile, data: bytes) -> None: ...
    async def write_record(self, record: SessionRecord) -> None: ...
    async def check_peer(self, cred: PeerCred) -> Lineage: ...
    async def make_room(self) -> bool: ...
    async def handle_findings(self, findings: list[Finding]) -> None: ...
    async def observe_auth(self, obs: Observation) -> None: ...


class Inbox:
    """Whole protocol messages from a stream, a read's worth at a time."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._decoder = protocol.Decoder()
        self.eof = False

    async def batch(self, deadline: float | None = None) -> list[Message]:
        """The messages of the next read; [] when ``deadline`` (loop time) passed first or
        at EOF (then :attr:`eof` is set). Malformed input raises ProtocolError."""
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    data = await self._reader.read(READ_SIZE)
            except TimeoutError:
                return []
            if not data:
                self.eof = True
                return []
            messages = self._decoder.feed(data)
            if messages:
                return messages


class SpoolSink:
    """A session's bytes on their way to its spool file, in order, off the event loop.

    While one write+fsync runs in the daemon's thread pool, the connection goes on sealing
    the next frames; they gather and go out together in the next write+fsync (a group
    commit). At most ``limit`` bytes wait: past that, :meth:`write` waits for the disk,
    which stops the connection reading and so slows the recorder (backpressure)."""

    def __init__(self, append: Callable[[bytes], Awaitable[None]], limit: int) -> None:
        self._append = append
        self._limit = limit
        self._queue: list[bytes] = []
        self._queued = 0
        self._flusher: asyncio.Task[None] | None = None
        self._error: OSError | None = None

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    async def write(self, data: bytes) -> None:
        self._check()
        self._queue.append(data)
        self._queued += len(data)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._run())
        if self._queued >= self._limit:
            await self.flush()

    async def _run(self) -> None:
        while self._queue and self._error is None:
            data = b"".join(self._queue)
            self._queue.clear()
            self._queued = 0
            try:
                await self._append(data)
            except OSError as exc:
                self._error = exc

    async def flush(self) -> None:
        """Wait until everything written so far is on disk (fsynced); raise its error."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)
        self._check()


class RecorderConnection:
    """One recorder's conversation, HELLO to DONE."""

    def __init__(
        self,
        daemon: Daemon,
        cred: PeerCred,
        inbox: Inbox,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.d = daemon
        self.cred = cred
        self.inbox = inbox
        self.writer = writer
        self.session: RecordingSession | None = None
        self.file: SpoolFile | None = None
        self.sink: SpoolSink | None = None
        self.lineage: Lineage | None = None
        self.identity: Identity | None = None
        self.spool_error: str | None = None

    async def _send(self, msg_type: MsgType, doc: dict[str, Any]) -> None:
        self.writer.write(protocol.encode_json(msg_type, doc))
        await self.writer.drain()

    async def _refuse(self, reason: str, why: str) -> None:
        log.warning("pid %d uid %d refused: %s", self.cred.pid, self.cred.uid, why)
        with contextlib.suppress(OSError):
            await self._send(MsgType.REFUSE, {"reason": reason})

    async def run(self, hello_msg: Message, rest: list[Message]) -> None:
        try:
            hello = Hello.from_json(hello_msg.json())
        except ProtocolError as exc:
            return await self._refuse(REFUSE_PROTOCOL, str(exc))
        try:
            self.lineage = await self.d.check_peer(self.cred)
        except PeerError as exc:
            return await self._refuse(REFUSE_PEER, str(exc))
        if self.d.stopping:
            return await self._refuse(REFUSE_ERROR, "the daemon is stopping")
        if not await self.d.make_room():
            return await self._refuse(REFUSE_FULL, "the spool is full (on_spool_full=refuse)")
        try:
            start = await self._open(hello)
        except OSError as exc:
            return await self._refuse(REFUSE_ERROR, f"cannot create the recording: {exc}")
        await self._record(start, rest)

    def _identity(self, hello: Hello, session_id: str) -> Identity:
        assert self.lineage is not None and self.d.reconciler is not None
        pam_text = self.d.reconciler.auth_info(self.lineage.priv_pid)
        ident = choose_identity(pam_text, hello.ssh_user_auth)
        if ident.problem:
            log.warning(
                "session %s: %s auth info unreadable: %s",
                session_id,
                ident.source.value,
                ident.problem,
            )
        if ident.note:
            log.warning(
                "session %s: pid %d priv_pid %d: %s; PAM gave %r, the recorder %r",
                session_id,
                self.cred.pid,
                self.lineage.priv_pid,
                ident.note,
                (pam_text or "")[:300],
                hello.ssh_user_auth[:300],
            )
        return ident

    def _meta(self, hello: Hello) -> SessionMeta:
        assert self.lineage is not None
        session_id = str(uuid.uuid4())
        self.identity = self._identity(hello, session_id)
        return SessionMeta(
            session_id=session_id,
            target_id=self.d.config.host_id,
            hostname=self.d.hostname,
            unix_user=self.lineage.user,
            uid=self.lineage.uid,
            priv_pid=self.lineage.priv_pid,
            started_at=self.d.wall(),
            hello=hello,
            auth=self.identity.auth,
        )

    async def _open(self, hello: Hello) -> SessionRecord:
        meta = self._meta(hello)
        policy = self.d.policy
        self.session = RecordingSession(
            meta,
            recipients=self.d.keys.recipients,
            host_key=self.d.keys.host_key,
            frame_max_bytes=policy.frame_max_bytes,
            frame_interval=policy.frame_interval,
            record_input=policy.record_input,
        )
        self.file = file = await self.d.io(self.d.spool.create_recording, meta.session_id)
        try:
            await self.d.append(file, self.session.start(asyncio.get_running_loop().time()))
            record = self._with_identity(meta.record())
            await self.d.write_record(record)
        except OSError:
            file.close()  # the header-only file stays: the next start closes it as truncated
            raise
        self.sink = SpoolSink(lambda data: self.d.append(file, data), SINK_LIMIT)
        return record

    def _with_identity(self, record: SessionRecord) -> SessionRecord:
        """The identity's source in the details, its doubt (if any) in ``error``."""
        assert self.identity is not None
        note = self.identity.note
        details = {**record.details, "identity_source": self.identity.source.value}
        error = "; ".join(e for e in (record.error, note) if e) or None
        return replace(record, details=details, error=error)

    async def _record(self, start: SessionRecord, pending: list[Message]) -> None:
        assert self.session is not None and self.lineage is not None
        d, session, sid = self.d, self.session, start.session_id
        accept = {
            "session_id": sid,
            "record_input": d.policy.record_input,
            "exec_capture_cap": d.policy.exec_capture_cap,
            "exec_hash": d.policy.exec_hash,
        }
        assert d.reconciler is not None
        try:
            await d.handle_findings(d.reconciler.recorder_started(self.lineage.priv_pid, sid))
        except (OSError, SSHAuditError) as exc:  # a note on another record: not this one's
            log.error("session %s: updating an unrecorded record failed: %s", sid, exc)
        # the login's authentication event names its session
        await d.observe_auth(
            session_observation(self.lineage.priv_pid, sid, self.lineage.user, d.wall())
        )
        log.info(
            "session %s accepted: user=%r uid=%d pid=%d priv_pid=%d program=%s command=%r",
            sid,
            self.lineage.user,
            self.cred.uid,
            self.cred.pid,
            self.lineage.priv_pid,
            session.meta.hello.program_type.value,
            (session.meta.hello.command or "")[:200],
        )
        end: EndInfo | None = None
        error: str | None = None
        try:
            await self._send(MsgType.ACCEPT, accept)
            end = await self._stream(pending)
        except ProtocolError as exc:
            error = f"protocol error: {exc}"
        except (OSError, ConnectionError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a bug must still leave a closed file and a record
            log.exception("session %s: internal error", sid)
            error = f"internal error in the agent daemon: {type(exc).__name__}"
        await self._finish(start, end, error)

    async def _stream(self, batch: list[Message]) -> EndInfo | None:
        """Messages into the recording until END (its info) or the connection ends (None)."""
        assert self.session is not None and self.file is not None
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            frames: list[bytes] = []
            end: EndInfo | None = None
            for msg in batch:
                if msg.type is MsgType.END:
                    end = EndInfo.from_json(msg.json())
                    frames.append(self.session.end(end, now))
                    break
                frames.append(self.session.feed(msg, now))
            frames.append(self.session.tick(now))
            # Let the messages go before waiting for the disk: with hundreds of busy
            # sessions, batches held across the fsync would dominate the daemon's memory.
            batch.clear()
            data = b"".join(frames)
            frames.clear()
            if data:
                await self._write(data)
            del data
            if end is not None:
                await self._flush()  # DONE promises the last frame is on disk
                return end
            if self.inbox.eof:
                return None
            batch = await self.inbox.batch(self._deadline())

    async def _write(self, data: bytes) -> None:
        assert self.sink is not None and self.session is not None
        try:
            await self.sink.write(data)
            # Quotas hold on every append (agent/quota.py): a session over one ends with a
            # marker, is recorded truncated, and the daemon hangs up on the recorder.
            sid, uid = self.session.meta.session_id, self.cred.uid
            cut = await self.d.quota.charge(sid, uid, self.session.sealed_bytes)
            if cut is not None and not self.session.finished:
                self.spool_error = cut.message
                now = asyncio.get_running_loop().time()
                await self.sink.write(quota.cut_tail(self.session, cut, now))
                await self.sink.flush()
                raise quota.QuotaExceededError(cut)
        except OSError as exc:
            raise self._spool_failed(exc) from None

    async def _flush(self) -> None:
        assert self.sink is not None
        try:
            await self.sink.flush()
        except OSError as exc:
            raise self._spool_failed(exc) from None

    def _spool_failed(self, exc: OSError) -> OSError:
        """Disk full, I/O error: the recording cannot go on; say so once, in the log."""
        if self.spool_error is None:
            assert self.file is not None
            self.spool_error = f"writing the spool failed: {exc.strerror or exc}"
            log.error("session %s: %s", self.file.path.stem, self.spool_error)
        return exc

    def _deadline(self) -> float | None:
        assert self.session is not None
        return self.session.deadline

    async def _finish(self, start: SessionRecord, end: EndInfo | None, error: str | None) -> None:
        assert self.session is not None and self.file is not None and self.lineage is not None
        d, session = self.d, self.session
        assert d.reconciler is not None
        outcome = d.reconciler.recorder_ended(
            self.lineage.priv_pid, start.session_id, end is not None
        )
        status, detail = outcome.status, outcome.detail
        if end is None:
            with contextlib.suppress(OSError):
                await self._flush()  # what was sealed before the end still goes to disk
            if self.spool_error:
                status, detail, error = RecordingStatus.TRUNCATED, self.spool_error, None
            elif d.stopping:
                status, detail = RecordingStatus.TRUNCATED, "the agent daemon stopped"
            with contextlib.suppress(OSError):
                tail = session.abandon()
                if tail and not self.spool_error:
                    await d.append(self.file, tail)
        await d.io(self.file.close)
        record = final_record(
            start,
            session,
            status=status,
            error="; ".join(e for e in (error, detail) if e) or None,
            end=end,
            finished_at=d.wall(),
        )
        record = self._with_identity(record)
        try:
            await d.write_record(record)
        except OSError as exc:
            log.error("session %s: writing its record failed: %s", start.session_id, exc)
        if end is not None:
            with contextlib.suppress(OSError, ConnectionError):
                await self._send(MsgType.DONE, {"session_id": start.session_id})
        log.info(
            "session %s %s: frames=%d sealed_bytes=%d exit=%s%s",
            start.session_id,
            record.recording_status.value,
            record.frames,
            record.sealed_bytes,
            record.exit_status,
            f" error={record.error!r}" if record.error else "",
        )
