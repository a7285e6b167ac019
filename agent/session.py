"""One recording as the daemon builds it, sans-IO: protocol values in, sealed bytes out.

A :class:`RecordingSession` holds an asciicast v2 :class:`~sshaudit.asciicast.Encoder` and a
:class:`~sshaudit.sealed.SealedWriter` (every auditor recipient, signed by the host key).
Each method takes the daemon's monotonic ``now`` and returns the bytes to append to the
spool file (often none): the caller moves them to disk and never reorders them.

Invariants:
- the first frame (cut by :meth:`RecordingSession.start`) holds the asciicast header line,
  so even a session killed at once leaves a readable, attributable recording;
- plaintext is cut into a frame as soon as ``frame_max_bytes`` of it is pending, or when
  ``frame_interval`` has passed since the oldest pending byte arrived (DESIGN.md "Sealing":
  a killed session loses at most about one interval); :meth:`RecordingSession.deadline`
  says when the next cut is due, and :meth:`RecordingSession.tick` cuts it;
- event times in the file never decrease, even if the recorder's messages do (stdout and
  stderr are read separately); stdout and stderr have separate UTF-8 decoders, so a
  character split across reads of one stream is never glued to bytes of the other;
- with ``record_input`` off, INPUT data is counted but never written, whatever the recorder
  sent; after :meth:`RecordingSession.end` or :meth:`RecordingSession.abandon` nothing more
  is accepted.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from enum import Enum
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sshaudit.agent import protocol
from sshaudit.agent.protocol import Data, Marker, Message, MsgType, ProtocolError, Resize, Stream
from sshaudit.agent.spool import RecordingStatus, SessionRecord, SpoolState
from sshaudit.agent.sshcert import AuthInfo
from sshaudit.asciicast import Encoder, Header
from sshaudit.keys import AuditorPublicKey
from sshaudit.sealed import SealedWriter, rfc3339

MAX_TEXT = 4096
MAX_COMMAND = 256 * 1024
MAX_USER_AUTH = 64 * 1024
DEFAULT_SIZE = (80, 24)


class ProgramType(Enum):
    SHELL = "shell"
    EXEC = "exec"
    SUBSYSTEM = "subsystem"


def _opt_str(doc: Mapping[str, Any], name: str, limit: int = MAX_TEXT) -> str | None:
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise ProtocolError(f"HELLO: {name} must be a string of at most {limit} characters")
    return value


def _size(doc: Mapping[str, Any], name: str, default: int) -> int:
    value = doc.get(name)
    if value is None or value == 0:
        return default  # no pty: asciicast still needs a positive size
    if type(value) is not int or not 1 <= value <= 0xFFFF:
        raise ProtocolError(f"HELLO: {name} must be an integer in 1..65535")
    return value


@dataclass(frozen=True)
class Hello:
    """A checked HELLO (what sshd told the ForceCommand). All of it comes from a process
    the user owns: it describes the session, it proves nothing about who the user is."""

    program_type: ProgramType
    command: str | None
    term: str
    shell: str
    width: int
    height: int
    ssh_connection: str
    ssh_user_auth: str
    tty: str | None
    pty: bool

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Hello:
        if doc.get("version") != 1 or type(doc.get("version")) is not int:
            raise ProtocolError(f"HELLO: unsupported version {doc.get('version')!r}")
        try:
            program_type = ProgramType(doc.get("program_type"))
        except ValueError:
            raise ProtocolError("HELLO: program_type must be shell, exec or subsystem") from None
        pty = doc.get("pty", False)
        if not isinstance(pty, bool):
            raise ProtocolError("HELLO: pty must be a boolean")
        return cls(
            program_type=program_type,
            command=_opt_str(doc, "command", MAX_COMMAND),
            term=_opt_str(doc, "term") or "",
            shell=_opt_str(doc, "shell") or "",
            width=_size(doc, "width", DEFAULT_SIZE[0]),
            height=_size(doc, "height", DEFAULT_SIZE[1]),
            ssh_connection=_opt_str(doc, "ssh_connection") or "",
            ssh_user_auth=_opt_str(doc, "ssh_user_auth", MAX_USER_AUTH) or "",
            tty=_opt_str(doc, "tty"),
            pty=pty,
        )


@dataclass(frozen=True)
class Endpoints:
    """``SSH_CONNECTION``: client address and port, server address and port."""

    client_address: str = ""
    client_port: int | None = None
    server_address: str = ""
    server_port: int | None = None

    @classmethod
    def parse(cls, text: str) -> Endpoints:
        words = text.split()
        if len(words) != 4 or not (words[1].isdigit() and words[3].isdigit()):
            return cls()
        return cls(words[0], int(words[1]), words[2], int(words[3]))


def _count(doc: Mapping[str, Any], name: str) -> int | None:
    value = doc.get(name)
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise ProtocolError(f"END: {name} must be a non-negative integer")
    return value


@dataclass(frozen=True)
class EndInfo:
    """A checked END: how the session ended, as the recorder saw it."""

    exit_status: int | None
    signal: int | None
    bytes_in: int | None
    bytes_out: int | None
    bytes_err: int | None
    streams: Mapping[str, Mapping[str, Any]]
    error: str | None

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> EndInfo:
        for name in ("exit_status", "signal"):
            value = doc.get(name)
            if value is not None and (type(value) is not int or not -1 <= value <= 0xFFFF):
                raise ProtocolError(f"END: {name} must be a small integer or null")
        streams = doc.get("streams")
        streams = {} if streams is None else streams
        if not isinstance(streams, dict) or not all(
            k in ("stdin", "stdout", "stderr") and isinstance(v, dict) for k, v in streams.items()
        ):
            raise ProtocolError("END: streams must map stdin/stdout/stderr to objects")
        error = doc.get("error")
        if error is not None and not isinstance(error, str):
            raise ProtocolError("END: error must be a string or null")
        return cls(
            exit_status=doc.get("exit_status"),
            signal=doc.get("signal"),
            bytes_in=_count(doc, "bytes_in"),
            bytes_out=_count(doc, "bytes_out"),
            bytes_err=_count(doc, "bytes_err"),
            streams={k: _stream_info(k, v) for k, v in streams.items()},
            error=error[:MAX_TEXT] if error else None,
        )


def _stream_info(name: str, doc: Mapping[str, Any]) -> dict[str, Any]:
    digest = doc.get("sha256")
    if digest is not None and not (
        isinstance(digest, str)
        and len(digest) == 64
        and all(c in "0123456789abcdef" for c in digest)
    ):
        raise ProtocolError(f"END: streams.{name}.sha256 must be 64 lowercase hex digits")
    return {"bytes": _count(doc, "bytes"), "captured": _count(doc, "captured"), "sha256": digest}


@dataclass(frozen=True)
class SessionMeta:
    """Who and what a recording is about (the DESIGN.md session fields known at start)."""

    session_id: str
    target_id: str
    hostname: str
    unix_user: str
    uid: int
    priv_pid: int | None
    started_at: datetime
    hello: Hello
    auth: AuthInfo | None

    @property
    def endpoints(self) -> Endpoints:
        return Endpoints.parse(self.hello.ssh_connection)

    def sshaudit_fields(self) -> dict[str, Any]:
        """The ``sshaudit`` object of the asciicast header."""
        cert = self.auth.certificate if self.auth else None
        ends = self.endpoints
        return {
            "session_id": self.session_id,
            "target_id": self.target_id,
            "hostname": self.hostname,
            "unix_user": self.unix_user,
            "uid": self.uid,
            "user_email": self.auth.user_email if self.auth else "",
            "principal": self.auth.principal_for(self.unix_user) if self.auth else "",
            "principals": list(cert.principals) if cert else [],
            "cert_serial": cert.serial if cert else None,
            "cert_fingerprint": cert.fingerprint if cert else "",
            "ca_fingerprint": cert.ca_fingerprint if cert else "",
            "key_fingerprint": self.auth.key_fingerprint if self.auth else "",
            "client_address": ends.client_address,
            "client_port": ends.client_port,
            "server_address": ends.server_address,
            "server_port": ends.server_port,
            "program_type": self.hello.program_type.value,
            "command": self.hello.command,
            "pty": self.hello.pty,
            "tty": self.hello.tty,
            "session_start": rfc3339(self.started_at),
        }

    def record(self) -> SessionRecord:
        """The session's record as it starts (``recording``); :func:`final_record` ends it."""
        f = self.sshaudit_fields()
        return SessionRecord(
            session_id=self.session_id,
            user_email=f["user_email"],
            unix_user=self.unix_user,
            target_id=self.target_id,
            hostname=self.hostname,
            client_address=f["client_address"],
            client_port=f["client_port"],
            server_address=f["server_address"],
            server_port=f["server_port"],
            session_start=f["session_start"],
            program_type=f["program_type"],
            command=self.hello.command,
            recording_status=RecordingStatus.RECORDING,
            cert_serial=f["cert_serial"],
            cert_fingerprint=f["cert_fingerprint"],
            principal=f["principal"],
            spool_state=SpoolState.WRITING,
            priv_pid=self.priv_pid,
            details={k: f[k] for k in ("uid", "ca_fingerprint", "key_fingerprint", "pty", "tty")},
        )

    def asciicast_header(self) -> Header:
        env = {k: v for k, v in (("TERM", self.hello.term), ("SHELL", self.hello.shell)) if v}
        exec_like = self.hello.program_type is not ProgramType.SHELL
        return Header(
            width=self.hello.width,
            height=self.hello.height,
            timestamp=int(self.started_at.timestamp()),
            env=env,
            command=self.hello.command if exec_like else None,
            title=f"{self.unix_user}@{self.hostname}",
            extra={"sshaudit": self.sshaudit_fields()},
        )


class RecordingSession:
    """The sealed asciicast file of one session, built as its messages arrive."""

    def __init__(
        self,
        meta: SessionMeta,
        *,
        recipients: tuple[AuditorPublicKey, ...],
        host_key: Ed25519PrivateKey,
        frame_max_bytes: int,
        frame_interval: float,
        record_input: bool,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.meta = meta
        self._encoder = Encoder(meta.asciicast_header())
        self._stderr = Encoder(meta.asciicast_header())  # its own UTF-8 decoder
        self._writer = SealedWriter(
            recipients=recipients,
            session_id=meta.session_id,
            host_id=meta.target_id,
            created_at=meta.started_at,
            host_key=host_key,
            random_bytes=random_bytes,
        )
        self._max = frame_max_bytes
        self._interval = frame_interval
        self._record_input = record_input
        # Lines wait as a list, joined once per frame: a growing buffer reallocated at
        # every append fragments the heap badly with hundreds of sessions.
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._oldest: float | None = None
        self._last_t = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.sealed_bytes = 0
        self.finished = False

    @property
    def frames(self) -> int:
        return self._writer.frames

    @property
    def deadline(self) -> float | None:
        """When the pending plaintext must be cut (daemon clock), or None if none is."""
        return None if self._oldest is None else self._oldest + self._interval

    def _out(self, data: bytes | bytearray) -> bytes:
        self.sealed_bytes += len(data)
        return bytes(data)

    def start(self, now: float) -> bytes:
        """The file's magic and header, and a first frame holding the asciicast header."""
        del now  # the header frame is cut at once, whatever the clock says
        head = self._writer.start() + self._writer.write(self._encoder.header_line())
        return self._out(head)

    def _time(self, t: float) -> float:
        self._last_t = max(self._last_t, t)
        return self._last_t

    def _append(self, lines: bytes, now: float) -> bytes:
        if self.finished:
            raise ProtocolError("message after the end of the session")
        if lines:
            if self._oldest is None:
                self._oldest = now
            self._pending.append(lines)
            self._pending_bytes += len(lines)
            if self._pending_bytes >= self._max:
                return self._cut()
        return self.tick(now)

    def _cut(self) -> bytes:
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        self._oldest = None
        return self._out(self._writer.write(data))

    def tick(self, now: float) -> bytes:
        """Cut the pending plaintext if it has waited ``frame_interval``."""
        due = self.deadline
        return self._cut() if due is not None and now >= due else b""

    def data(self, msg: Data, now: float) -> bytes:
        t = self._time(msg.time)
        if msg.stream is Stream.INPUT:
            self.bytes_in += len(msg.data)
            lines = self._encoder.input(t, msg.data) if self._record_input else b""
        elif msg.stream is Stream.ERROR:
            self.bytes_out += len(msg.data)
            lines = self._stderr.output(t, msg.data)
        else:
            self.bytes_out += len(msg.data)
            lines = self._encoder.output(t, msg.data)
        return self._append(lines, now)

    def resize(self, msg: Resize, now: float) -> bytes:
        return self._append(self._encoder.resize(self._time(msg.time), msg.cols, msg.rows), now)

    def marker(self, msg: Marker, now: float) -> bytes:
        return self._append(self._encoder.marker(self._time(msg.time), msg.label), now)

    def feed(self, msg: Message, now: float) -> bytes:
        """Dispatch a DATA, RESIZE or MARKER message."""
        if msg.type is MsgType.DATA:
            return self.data(protocol.parse_data(msg.payload), now)
        if msg.type is MsgType.RESIZE:
            return self.resize(protocol.parse_resize(msg.payload), now)
        if msg.type is MsgType.MARKER:
            return self.marker(protocol.parse_marker(msg.payload), now)
        raise ProtocolError(f"{msg.type.name} is not a session event")

    def end(self, info: EndInfo, now: float) -> bytes:
        """Close the recording: what the decoders held, an end marker, the last frame and
        the signature trailer."""
        if self.finished:
            raise ProtocolError("END after the end of the session")
        t = self._last_t
        lines = self._encoder.flush(t) + self._stderr.flush(t)
        for label in _end_labels(info):
            lines += self._encoder.marker(t, label)
        data = b"".join([*self._pending, lines])
        self._pending.clear()
        self._pending_bytes = 0
        self._oldest = None
        self.finished = True
        del now
        return self._out(self._writer.close(data))

    def abandon(self) -> bytes:
        """The recorder is gone (or the daemon stops): seal what is pending as an ordinary
        frame and write no last frame, so the file reads as truncated (FORMAT.md)."""
        if self.finished:
            return b""
        self.finished = True
        return self._cut() if self._pending else b""


def _end_labels(info: EndInfo) -> list[str]:
    labels = []
    for name in ("stdin", "stdout", "stderr"):
        s = info.streams.get(name)
        if s and None not in (s.get("bytes"), s.get("captured")) and s["captured"] < s["bytes"]:
            digest = f", sha256 {s['sha256']}" if s.get("sha256") else ""
            labels.append(
                f"sshaudit: {name}: {s['bytes']} bytes, first {s['captured']} recorded{digest}"
            )
    if info.signal is not None:
        labels.append(f"sshaudit: killed by signal {info.signal}")
    elif info.exit_status is not None:
        labels.append(f"sshaudit: exit status {info.exit_status}")
    if info.error:
        labels.append(f"sshaudit: error: {info.error}")
    return labels


def final_record(
    start: SessionRecord,
    session: RecordingSession,
    *,
    status: RecordingStatus,
    error: str | None,
    end: EndInfo | None,
    finished_at: datetime,
) -> SessionRecord:
    """The record once the recording is over (complete, truncated or recorder_lost): the
    recorder's own byte counts when it sent END (they include what the capture cap left
    out), else what reached the daemon."""
    bytes_in, bytes_out = session.bytes_in, session.bytes_out
    details = dict(start.details)
    exit_status = None
    if end is not None:
        if end.bytes_in is not None:
            bytes_in = end.bytes_in
        if end.bytes_out is not None:
            bytes_out = end.bytes_out + (end.bytes_err or 0)
        exit_status = end.exit_status
        if end.signal is not None:
            details["signal"] = end.signal
        if end.streams:
            details["streams"] = {k: dict(v) for k, v in end.streams.items()}
        error = error or end.error
    return replace(
        start,
        session_finish=rfc3339(finished_at),
        exit_status=exit_status,
        error=error,
        recording_status=status,
        bytes_in=bytes_in,
        bytes_out=bytes_out,
        spool_state=SpoolState.CLOSED,
        frames=session.frames,
        sealed_bytes=session.sealed_bytes,
        details=details,
    )
