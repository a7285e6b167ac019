"""Shared helpers for the agent daemon tests (test_daemon_*.py, test_session.py, test_pam_*.py):
keys and configs on disk, reading sealed recordings back, and a recorder stand-in that speaks
agent/protocol.py over a real Unix socket."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sshaudit.agent import protocol
from sshaudit.agent.config import AgentConfig, load_sealing_keys, parse_config
from sshaudit.agent.daemon import AgentDaemon
from sshaudit.agent.peer import Lineage, PeerCred
from sshaudit.agent.spool import read_record
from sshaudit.asciicast import Event, Header, decode_all
from sshaudit.keys import AuditorPrivateKey, encode_key_text
from sshaudit.sealed import ReadResult, SealedReader


@dataclass(frozen=True)
class KeySet:
    auditor: AuditorPrivateKey
    auditor_pub: Path
    host: Ed25519PrivateKey
    host_file: Path


def make_keys(directory: Path) -> KeySet:
    directory.mkdir(parents=True, exist_ok=True)
    auditor = AuditorPrivateKey.generate()
    pub = directory / "auditor.pub"
    pub.write_bytes(encode_key_text(auditor.public.raw))
    host = Ed25519PrivateKey.generate()
    host_file = directory / "host.key"
    host_file.write_bytes(encode_key_text(host.private_bytes_raw()))
    host_file.chmod(0o600)
    return KeySet(auditor, pub, host, host_file)


def config_doc(tmp: Path, keys: KeySet, **policy: Any) -> dict[str, Any]:
    return {
        "socket": str(tmp / "run" / "agent.sock"),
        "spool_dir": str(tmp / "spool"),
        "host_id": "web-1",
        "host_key_file": str(keys.host_file),
        "recipients": [str(keys.auditor_pub)],
        "policy": dict(policy),
    }


def make_config(tmp: Path, keys: KeySet, **policy: Any) -> AgentConfig:
    return parse_config(config_doc(tmp, keys, **policy))


def toml_text(doc: Mapping[str, Any]) -> str:
    """A small TOML writer for the flat config documents above (json strings are TOML)."""
    lines, tables = [], []
    for key, value in doc.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for name, table in tables:
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)


def decrypt(data: bytes, key: AuditorPrivateKey) -> tuple[bytes, ReadResult]:
    reader = SealedReader([key])
    plain = bytes(reader.feed(data))
    return plain, reader.finish()


def cast_of(plain: bytes) -> tuple[Header, list[Event]]:
    return decode_all(plain)


def hello(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": 1,
        "program_type": "shell",
        "command": None,
        "term": "xterm-256color",
        "shell": "/bin/bash",
        "width": 100,
        "height": 30,
        "ssh_connection": "192.0.2.10 50022 192.0.2.1 22",
        "ssh_user_auth": "",
        "tty": "/dev/pts/3",
        "pty": True,
    }
    doc.update(over)
    return doc


def end_doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "exit_status": 0,
        "signal": None,
        "bytes_in": 0,
        "bytes_out": 0,
        "bytes_err": 0,
        "streams": {},
        "error": None,
    }
    doc.update(over)
    return doc


class Client:
    """A blocking protocol client: the recorder stand-in (or a PAM hook stand-in)."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.decoder = protocol.Decoder()
        self.queue: list[protocol.Message] = []
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_json(self, msg_type: protocol.MsgType, doc: dict[str, Any]) -> None:
        self.send(protocol.encode_json(msg_type, doc))

    def data(self, stream: protocol.Stream, data: bytes) -> None:
        self.send(protocol.encode_data(self.now(), stream, data))

    def recv(self) -> protocol.Message | None:
        while not self.queue:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.queue.extend(self.decoder.feed(chunk))
        return self.queue.pop(0)

    def handshake(self, **over: Any) -> protocol.Message:
        self.send_json(protocol.MsgType.HELLO, hello(**over))
        reply = self.recv()
        assert reply is not None, "the daemon closed without answering HELLO"
        return reply

    def end(self, **over: Any) -> protocol.Message | None:
        self.send_json(protocol.MsgType.END, end_doc(**over))
        return self.recv()

    def close(self) -> None:
        self.sock.close()


def frame_lengths(data: bytes) -> list[int]:
    """The frame lengths of a sealed file (not decrypted), trailer excluded."""
    (n,) = struct.unpack_from(">I", data, 10)
    pos, out = 14 + n, []
    while pos + 4 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        if length == 0xFFFFFFFF:
            break
        out.append(length)
        pos += 4 + length
    return out


PRIV_PID = os.getpid()  # alive: the daemon forgets PAM sessions whose [priv] process died


def fake_ancestry(priv_pid: int = PRIV_PID) -> Callable[[PeerCred], Lineage]:
    def check(cred: PeerCred) -> Lineage:
        return Lineage(user="jdoe", uid=cred.uid, priv_pid=priv_pid, session_pid=1)

    return check


class DaemonThread:
    """The daemon on its own event loop in a thread; the test talks to it over its socket."""

    def __init__(self, config: AgentConfig, **kw: Any) -> None:
        kw.setdefault("ancestry", fake_ancestry())
        kw.setdefault("reconcile_interval", 0.05)
        self.daemon = AgentDaemon(config, load_sealing_keys(config), **kw)
        self.config = config
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self.daemon.start()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        await self.daemon.stop()

    def start(self) -> DaemonThread:
        self._thread.start()
        assert self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(20)
        assert not self._thread.is_alive()

    def client(self) -> Client:
        return Client(self.config.socket)

    def record(self, sid: str) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.config.spool_dir / f"{sid}.json").read_text())
        return doc

    def sealed(self, sid: str) -> bytes:
        return (self.config.spool_dir / f"{sid}.sealed").read_bytes()


def wait_for(cond: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = cond()
        except (OSError, ValueError, KeyError):
            value = None
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def records(d: DaemonThread) -> list[dict[str, Any]]:
    return [read_record(p).to_json() for p in sorted(d.config.spool_dir.glob("*.json"))]
