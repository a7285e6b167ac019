"""The agent daemon (root): a Unix socket every user can reach, the spool nobody else can.

Each connection is a recorder (HELLO, see agent/protocol.py) or the PAM hook (PAM). For a
recorder the daemon checks the peer (SO_PEERCRED, then its ancestry: agent/peer.py), applies
the policy (a full spool refuses, or drops the oldest finished recordings), assigns the
session id, and streams the session into a :class:`~sshaudit.agent.session.RecordingSession`
whose sealed frames it appends to the spool with fsync. The PAM hook's events feed the
:class:`~sshaudit.agent.reconcile.Reconciler`, which writes ``unrecorded`` records.

Invariants:
- a connection is served by one coroutine that alone produces and writes its session's
  bytes, so frames reach the file in order (agent/connection.py); disk writes and fsyncs
  run in a small thread pool, so one slow disk never stalls the other sessions' sockets;
- ACCEPT is sent only once the file's header is durable, DONE only once the last frame is;
- a recorder that goes away without END leaves a truncated file (no last frame) and a
  ``recorder_lost`` record; a daemon stopping (SIGTERM) leaves ``truncated`` ones; a daemon
  killed outright leaves ``recording`` ones that the next start closes (Spool.recover);
- everything the peers send is checked (protocol.py, Hello/EndInfo/PamEvent) and anything
  they control is quoted with ``!r`` in the log, so no peer can forge a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import signal
import socket
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import psutil

from sshaudit.agent import protocol
from sshaudit.agent.admission import (
    Admission,
    RefusalLog,
    first_message_limit,
    raise_nofile,
    read_first,
)
from sshaudit.agent.authlog import Observation
from sshaudit.agent.config import AgentConfig, SealingKeys, load_config, load_sealing_keys
from sshaudit.agent.connection import Inbox, RecorderConnection, choose_identity
from sshaudit.agent.daemon_auth import pam_observation, principals_observation
from sshaudit.agent.identity_service import IdentityService
from sshaudit.agent.peer import (
    AncestryCheck,
    Lineage,
    PeerCred,
    PeerError,
    check_pam_peer,
    check_principals_peer,
    peer_cred,
)
from sshaudit.agent.protocol import Message, MsgType, ProtocolError
from sshaudit.agent.quota import SpoolQuota
from sshaudit.agent.reconcile import Finding, FindingKind, PamEvent, Reconciler
from sshaudit.agent.shipper_loop import ShipperThread, start_shipping
from sshaudit.agent.spool import RecordingStatus, SessionRecord, Spool, SpoolFile, SpoolState
from sshaudit.errors import ConfigError, SSHAuditError
from sshaudit.sealed import rfc3339

log = logging.getLogger("sshaudit.agent")
T = TypeVar("T")

# A recorder, the PAM hook and the principals command send their first message at once; an
# unchecked peer holds a connection (and its first bytes) this long at most.
HELLO_TIMEOUT = 2.0
# The PAM hook queues in the spool when it cannot reach the daemon in time (a busy daemon
# too, not only a stopped one): taken over this often while the daemon runs.
PAM_QUEUE_INTERVAL = 2.0
QUOTA_SCAN_INTERVAL = 5.0  # the shipper removes shipped files behind the quota ledger
STOP_TIMEOUT = 10.0
BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
# asyncio stops reading a connection once twice this much waits in its buffer; the rest
# waits in the kernel's socket buffer (not our memory), so 200 sessions stay cheap.
STREAM_LIMIT = 16 * 1024


class AgentDaemon:
    """The daemon. :meth:`start` binds, :meth:`stop` finishes every session as truncated."""

    def __init__(
        self,
        config: AgentConfig,
        keys: SealingKeys,
        *,
        ancestry: Callable[[PeerCred], Lineage] | None = None,
        pam_check: Callable[[PeerCred], None] = check_pam_peer,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
        hostname: str | None = None,
        alive: Callable[[int], bool] = psutil.pid_exists,
        spool_uid: int | None = None,
        reconcile_interval: float = 1.0,
        hello_timeout: float = HELLO_TIMEOUT,
    ) -> None:
        self.config = config
        self.policy = config.policy
        self.keys = keys
        self._ancestry = ancestry or AncestryCheck()
        self._pam_check = pam_check
        self.wall = wall
        self.hostname = hostname or socket.gethostname()
        self._alive = alive
        self._interval = reconcile_interval
        self._hello_timeout = hello_timeout
        self.spool = Spool(
            config.spool_dir,
            max_bytes=self.policy.spool_max_bytes,
            on_full=self.policy.on_spool_full,
            uid=spool_uid,
        )
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="spool")
        # issue 9: the socket cannot starve the daemon, one user cannot fill the spool
        self.admission = Admission(self.policy.max_connections_per_user)
        self._refusals = RefusalLog(log, self.policy.max_connections_per_user)
        self.quota = SpoolQuota(self.policy, config.spool_dir, self.io, self._make_room_for)
        self._housekeeping_task: asyncio.Task[None] | None = None
        # Peer checks read /proc: they must not queue behind the spool's fsyncs, or a
        # burst of logins waits on other sessions' disk writes before it is accepted.
        self._peer_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="peer")
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._reconcile_task: asyncio.Task[None] | None = None
        self._socket_ino: int | None = None
        self.stopping = False
        self.reconciler: Reconciler | None = None
        self.shipping: ShipperThread | None = None
        self.identity: IdentityService | None = None
        self._principals_uid = _uid_of(config.identity.principals_user) if config.identity else None

    async def io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- start and stop ------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.reconciler = Reconciler(self.policy.reconcile_grace, loop.time, self.wall)
        soft, hard = raise_nofile()
        log.info("open files: soft limit %d, hard limit %d", soft, hard)
        await self.io(self.spool.prepare)
        for record in await self.io(self.spool.recover, self.wall()):
            log.warning(
                "session %s closed after a daemon restart: status=%s frames=%d",
                record.session_id,
                record.recording_status.value,
                record.frames,
            )
        await self._take_pam_queue()
        # Shipping (agent/shipper_loop.py) runs on its own thread off the spool directory
        # alone, after recovery closed what a previous run left; none without [collector].
        self.shipping = await self.io(start_shipping, self.config)
        # Authentication events need somewhere to go: without [collector] none are made
        # (they would pile up in the spool, which nothing ships).
        if self.config.collector is not None:
            self.identity = await self.io(self._start_identity, loop)
        path = self.config.socket
        await self.io(_prepare_socket_path, path)
        # A burst of logins must queue, not fail: a recorder's connect(2) with a timeout
        # gets EAGAIN at once when the backlog is full (unix(7)); asyncio's default is 100.
        self._server = await asyncio.start_unix_server(
            self._on_connect, path=str(path), backlog=BACKLOG, limit=STREAM_LIMIT
        )
        # Every user's recorder must connect; SO_PEERCRED and the ancestry check decide.
        path.chmod(0o666)
        self._socket_ino = path.stat().st_ino
        self._reconcile_task = asyncio.create_task(self._reconcile_loop())
        await self.quota.rescan()
        self._housekeeping_task = asyncio.create_task(self._housekeeping_loop())
        log.info("listening on %s, spool %s", path, self.config.spool_dir)

    async def stop(self) -> None:
        """Stop listening, end every open session as truncated, wait for the writes."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=STOP_TIMEOUT)
        for loop_task in (self._reconcile_task, self._housekeeping_task):
            if loop_task is not None:
                loop_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop_task
        self._refusals.flush()
        if self.identity is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.identity.stop)
        if self.shipping is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.shipping.stop)
        self._pool.shutdown(wait=True)
        self._peer_pool.shutdown(wait=True)
        with contextlib.suppress(OSError):
            if self.config.socket.stat().st_ino == self._socket_ino:
                self.config.socket.unlink()
        log.info("stopped")

    async def _take_pam_queue(self) -> None:
        assert self.reconciler is not None
        for doc in await self.io(self.spool.take_pam_queue):
            try:
                event = PamEvent.from_json(doc, _parse_time(doc.get("time")) or self.wall(), True)
            except ProtocolError as exc:
                log.warning("queued PAM event skipped: %s", exc)
                continue
            log.info("queued pam %s %s", event.phase.value, _pam_desc(event))
            await self.handle_findings(self.reconciler.pam_event(event))
        await self.handle_findings(self.reconciler.poll())

    async def _housekeeping_loop(self) -> None:
        """While the daemon runs: take over the PAM hook's queue, report refused
        connections not logged yet, and rescan the spool for the quotas."""
        loop = asyncio.get_running_loop()
        next_scan = loop.time() + QUOTA_SCAN_INTERVAL
        while True:
            await asyncio.sleep(PAM_QUEUE_INTERVAL)
            self._refusals.flush()
            try:
                await self._take_pam_queue()
                if loop.time() >= next_scan:
                    next_scan = loop.time() + QUOTA_SCAN_INTERVAL
                    await self.quota.rescan()
            except (OSError, SSHAuditError) as exc:  # one bad file must not stop the loop
                log.error("spool housekeeping failed: %s", exc)

    async def _reconcile_loop(self) -> None:
        assert self.reconciler is not None
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.handle_findings(self.reconciler.poll(self._alive))
            except (OSError, SSHAuditError) as exc:  # a bad record must not stop the loop
                log.error("writing a reconciliation record failed: %s", exc)

    # -- connections ---------------------------------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The peer is known at accept (SO_PEERCRED), before a byte is read: a uid past its
        # connection cap is closed at once, and only counted (agent/admission.py).
        try:
            cred = peer_cred(writer.get_extra_info("socket"))
        except OSError as exc:
            log.warning("peer credentials unavailable: %s", exc)
            writer.transport.abort()
            return
        if not self.admission.admit(cred.uid):
            self._refusals.refused(cred.uid, cred.pid)
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self._serve(cred, reader, writer)
        except Exception:  # one connection must never take the daemon down
            log.exception("connection failed")
        finally:
            self.admission.release(cred.uid)
            self._writers.discard(writer)
            writer.close()
            self._tasks.discard(task)

    async def _serve(
        self, cred: PeerCred, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        inbox = Inbox(reader)
        loop = asyncio.get_running_loop()
        # The first message alone, bounded in bytes and time (agent/admission.py); the inbox
        # reads what follows it.
        try:
            msg = await read_first(
                reader, loop.time() + self._hello_timeout, first_message_limit(cred.uid)
            )
        except ProtocolError as exc:
            log.warning("pid %d uid %d: %s", cred.pid, cred.uid, exc)
            return
        if msg is None:
            return
        first = [msg]
        if first[0].type is MsgType.PAM:
            await self._pam(cred, first[0], writer)
        elif first[0].type is MsgType.AUTH:
            await self._auth(cred, first[0], writer)
        elif first[0].type is MsgType.HELLO:
            await RecorderConnection(self, cred, inbox, writer).run(first[0], first[1:])
        else:
            log.warning("pid %d uid %d: began with %s", cred.pid, cred.uid, first[0].type.name)

    async def _pam(self, cred: PeerCred, msg: Message, writer: asyncio.StreamWriter) -> None:
        assert self.reconciler is not None
        try:
            self._pam_check(cred)
            event = PamEvent.from_json(msg.json(), self.wall())
        except (PeerError, ProtocolError) as exc:
            log.warning("PAM message refused: %s", exc)
            return
        findings = self.reconciler.pam_event(event)
        writer.write(protocol.encode_json(MsgType.DONE, {}))  # answer first: logins wait
        with contextlib.suppress(OSError):
            await writer.drain()
        log.info("pam %s %s", event.phase.value, _pam_desc(event))
        await self.handle_findings(findings)
        if self.identity is not None:
            obs = await self.io(pam_observation, event)  # reads /proc: off the loop
            if obs is not None:
                await self.observe_auth(obs)

    async def observe_auth(self, obs: Observation) -> None:
        """Hand one authentication observation to the merger (agent/identity_service.py)."""
        if self.identity is not None:
            await self.io(self.identity.observe, obs)

    async def _auth(self, cred: PeerCred, msg: Message, writer: asyncio.StreamWriter) -> None:
        """The principals command's decision about one attempt (agent/principals.py)."""
        loop = asyncio.get_running_loop()
        try:
            monitor = await loop.run_in_executor(
                self._peer_pool, check_principals_peer, cred, self._principals_uid
            )
            obs = principals_observation(msg.json(), monitor)
        except (PeerError, ProtocolError) as exc:
            log.warning("AUTH message refused: %s", exc)
            return
        writer.write(protocol.encode_json(MsgType.DONE, {}))
        with contextlib.suppress(OSError):
            await writer.drain()
        await self.observe_auth(obs)

    def _start_identity(self, loop: asyncio.AbstractEventLoop) -> IdentityService:
        def wake() -> None:
            if self.shipping is not None:
                self.shipping.wake()

        def reload_keys() -> None:
            loop.call_soon_threadsafe(self._reload_keys)

        return IdentityService(self.config, on_keys=reload_keys, on_events=wake).start()

    def _reload_keys(self) -> None:
        """New auditor keys from the collector: sessions from now on are sealed to them."""
        try:
            self.keys = load_sealing_keys(self.config)
        except SSHAuditError as exc:
            log.error("auditor keys changed but cannot be loaded (keeping the old): %s", exc)
            return
        log.info("sealing to auditor keys %s", ",".join(r.kid for r in self.keys.recipients))

    # -- records -------------------------------------------------------------------------

    async def handle_findings(self, findings: list[Finding]) -> None:
        for f in findings:
            if f.kind is FindingKind.UNRECORDED:
                record = _with_pam_identity(
                    SessionRecord(
                        session_id=f.record_id,
                        unix_user=f.pam.user,
                        target_id=self.config.host_id,
                        hostname=self.hostname,
                        client_address=f.pam.rhost,
                        session_start=rfc3339(f.pam.at),
                        recording_status=RecordingStatus.UNRECORDED,
                        error=f.detail,
                        spool_state=SpoolState.NONE,
                        priv_pid=f.pam.priv_pid,
                        details={"pam_service": f.pam.service, "detected_at": rfc3339(f.at)},
                    ),
                    f.pam,
                )
                log.warning("session %s unrecorded: %s %s", f.record_id, f.detail, _pam_desc(f.pam))
            else:
                record = await self.io(self.spool.read_record, f.record_id)
                if f.kind is FindingKind.FINISHED:
                    record = replace(record, session_finish=rfc3339(f.at))
                else:
                    record = replace(record, error=f"{record.error}; {f.detail}")
                    log.warning("session %s: %s", f.record_id, f.detail)
            await self.io(self.spool.write_record, record)

    async def write_record(self, record: SessionRecord) -> None:
        await self.io(self.spool.write_record, record)
        if self.shipping is not None:
            self.shipping.wake()  # ship record changes now, not at the next poll

    async def append(self, file: SpoolFile, data: bytes) -> None:
        await self.io(file.append, data)

    async def check_peer(self, cred: PeerCred) -> Lineage:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._peer_pool, self._ancestry, cred)

    async def make_room(self, uid: int | None = None, need: int = 0) -> bool:
        """Room for a new recording (or ``need`` more bytes); ``drop_oldest`` removes only
        recordings the collector holds, and ``uid``'s own (None: nobody's)."""
        ok, dropped = await self.io(self.spool.make_room, uid, need)
        for sid in dropped:
            log.warning("spool full: dropped the recording of session %s (record kept)", sid)
        return ok

    async def _make_room_for(self, uid: int, need: int) -> bool:
        return await self.make_room(uid, need)


def _with_pam_identity(record: SessionRecord, pam: PamEvent) -> SessionRecord:
    """An unrecorded session still says who it was: the identity root saw at PAM open."""
    if pam.auth_info is None:
        return record
    ident = choose_identity(pam.auth_info, "")
    auth = ident.auth
    cert = auth.certificate if auth else None
    details = {
        **record.details,
        "identity_source": ident.source.value,
        "key_fingerprint": auth.key_fingerprint if auth else "",
    }
    return replace(
        record,
        user_email=auth.user_email if auth else "",
        cert_serial=cert.serial if cert else None,
        cert_fingerprint=cert.fingerprint if cert else "",
        principal=auth.principal_for(record.unix_user) if auth else "",
        error="; ".join(e for e in (record.error, ident.note) if e) or None,
        details=details,
    )


def _prepare_socket_path(path: Path) -> None:
    """The socket's directory: created 0755 root; an existing one must not be writable by
    others (who could swap the socket). A stale socket is removed, a live one refused."""
    parent = path.parent
    try:
        parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        st = parent.lstat()
    except OSError as exc:
        raise ConfigError(f"socket: cannot create {parent}: {exc.strerror}") from exc
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ConfigError(
            f"socket: {parent} must be a directory owned by uid {os.geteuid()} and not "
            "writable by group or others"
        )
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"socket: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: left by a daemon that was killed
        return
    finally:
        probe.close()
    raise ConfigError(f"socket: {path}: another agent daemon is already listening")


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def _pam_desc(event: PamEvent) -> str:
    return (
        f"user={event.user!r} rhost={event.rhost!r} service={event.service!r} "
        f"tty={event.tty!r} priv_pid={event.priv_pid}"
    )


def _configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("sshaudit")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


async def _serve_until_signalled(daemon: AgentDaemon) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await daemon.start()
    try:
        await stop.wait()
        log.info("signal received: stopping")
    finally:
        await daemon.stop()


def _uid_of(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        log.warning("principals user %r does not exist: only root may report decisions", name)
        return None


def run_daemon(
    config_path: str,
    log_level: str = "info",
    ancestry: Callable[[PeerCred], Lineage] | None = None,
) -> int:
    """``sshaudit-agent daemon``: load and check everything, then serve until SIGTERM.
    ``ancestry`` replaces the recorder peer check (tests only: the CLI never passes it)."""
    _configure_logging(log_level)
    config = load_config(config_path)
    keys = load_sealing_keys(config)
    log.info(
        "sshaudit agent daemon: host_id=%s recipients=%s",
        config.host_id,
        ",".join(r.kid for r in keys.recipients),
    )
    asyncio.run(_serve_until_signalled(AgentDaemon(config, keys, ancestry=ancestry)))
    return 0
