"""End to end through the collector: a real sshd whose ForceCommand is the recorder, the
real agent daemon (``sshaudit-agent daemon``) with ``[collector]`` configured and the host
enrolled, a real ``sshaudit-collector serve`` over TLS, and the auditor's ``sshaudit`` CLI.

Twenty sessions (exec, with and without a pty, and interactive shells) are recorded while
the collector is down, so the test can keep a copy of every sealed file the daemon wrote
before shipping removes it; then the collector starts and the agent ships. What must hold:
the collector has all twenty, complete and signature-verified; ``sshaudit sessions list
--json`` shows them with the record fields right; ``sshaudit download`` gives each file
byte-identical to the daemon's; ``sshaudit decrypt`` (with the host's key required) gives
the recording, in which the output the user saw appears; and the spool is emptied.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_harness import Agent
from collector_helpers import Server, cli_ok, start_server
from daemon_helpers import config_doc, toml_text, wait_for
from e2e_helpers import finished
from sshd_harness import SshdFactory
from sshd_host import UnixUser

from sshaudit.asciicast import Code, decode_all
from sshaudit.keys import encode_key_text

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
SSHAUDIT = str(Path(sys.executable).parent / "sshaudit")
# (command, exit status, with a pty): the shell computes the output, so it appears only if
# the command really ran
EXEC = [(f"echo exec-out-{i}-$(({i}*7)); exit {i % 4}", i % 4, i % 3 == 0) for i in range(17)]
SHELLS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Collector:
    """A collector on a fixed port (so it can be stopped and started again), one enrolled
    host, and an auditor token in a 0600 file."""

    def __init__(self, data: Path, work: Path, host_public: bytes) -> None:
        self.data = data
        self.port = _free_port()
        cli_ok("init", "--data", str(data))
        self.server: Server | None = self.start()
        self.token_file = work / "auditor.token"
        self.token_file.write_text(self.token("auditor") + "\n")
        self.token_file.chmod(0o600)
        with self.server.client(self.token("agent")) as c:
            resp = c.post(
                self.server.url + "/v1/enroll",
                json={
                    "hostname": "e2e-host",
                    "host_public_key": base64.b64encode(host_public).decode(),
                },
            )
        assert resp.status_code == 200, resp.text
        self.host_id: str = resp.json()["host_id"]
        self.credential: str = resp.json()["credential"]
        assert self.server.fingerprint is not None
        self.pin = self.server.fingerprint
        self.url = self.server.url

    def start(self) -> Server:
        self.server = start_server(self.data, "--listen", f"127.0.0.1:{self.port}")
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def token(self, role: str) -> str:
        return cli_ok("token", "create", "--data", str(self.data), "--role", role).split()[-1]

    def sshaudit(self, *argv: str) -> str:
        conn = ["--collector", self.url, "--token-file", str(self.token_file)]
        done = subprocess.run(
            [SSHAUDIT, *argv, *conn, "--fingerprint", self.pin],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, (argv, done.stderr.decode())
        return done.stdout.decode()

    def listed(self) -> list[dict[str, Any]]:
        out = self.sshaudit("sessions", "list", "--json", "--limit", "0", "--target", self.host_id)
        return [json.loads(line) for line in out.splitlines()]


def configure_shipping(agent: Agent, collector: Collector, work: Path) -> None:
    """Point ``agent``'s config at ``collector`` as its enrolled host (credential 0600)."""
    credential = work / "collector.token"
    credential.write_text(collector.credential + "\n")
    credential.chmod(0o600)
    doc = config_doc(work, agent.keys, frame_interval=0.2)
    doc["host_id"] = collector.host_id
    doc["collector"] = {
        "url": collector.url,
        "fingerprint": collector.pin,
        "credential_file": str(credential),
        "retry_max_seconds": 1.0,
    }
    agent.config.write_text(toml_text(doc))


@pytest.fixture
def setup(root_work_dir: Path, tmp_path: Path) -> Iterator[tuple[Agent, Collector]]:
    agent = Agent(root_work_dir, frame_interval=0.2)
    collector = Collector(
        tmp_path / "collector", tmp_path, agent.keys.host.public_key().public_bytes_raw()
    )
    configure_shipping(agent, collector, root_work_dir)
    try:
        yield agent, collector
    finally:
        agent.stop()
        collector.stop()
        print(f"--- agent daemon log:\n{agent.log.read_text()[-6000:]}")


def _interactive(server: Any, user: UnixUser, i: int) -> str:
    with server.interactive(user) as term:
        term.send(f"echo shell-{i}-ready-$((6*7))\r")
        term.read_line(f"shell-{i}-ready-42")
        term.send(f"echo shell-{i}-done-$((2+{i}))\r")
        term.read_line(f"shell-{i}-done-{2 + i}")
        term.send("exit\r")
        assert term.wait() == 0
    return f"shell-{i}-done-{2 + i}"


def test_twenty_sessions_recorded_shipped_listed_downloaded_decrypted(
    setup: tuple[Agent, Collector], sshd_server: SshdFactory, alice: UnixUser, tmp_path: Path
) -> None:
    agent, collector = setup
    collector.stop()  # down while the sessions run: the spool keeps what the daemon sealed
    agent.start()
    server = sshd_server(force_command=agent.force_command(), pam_extra=(agent.pam_line(),))
    expected: dict[tuple[str, str | None], str] = {}  # (program type, command) -> output
    for command, status, tty in EXEC:
        done = server.ssh(alice, command, tty=tty)
        assert done.returncode == status, (command, done.stderr)
        expected["exec", command] = done.stdout.decode().strip()
    shells = [_interactive(server, alice, i) for i in range(SHELLS)]
    records = finished(agent, len(EXEC) + SHELLS)
    local = {
        r["session_id"]: (agent.spool / f"{r['session_id']}.sealed").read_bytes() for r in records
    }
    assert all(data for data in local.values())

    collector.start()
    want = len(EXEC) + SHELLS

    def all_arrived() -> bool:
        items = collector.listed()
        return len(items) == want and all(
            d["recording_status"] == "complete"
            and d["recording"] is not None
            and d["recording"]["state"] == "sealed_verified"
            for d in items
        )

    wait_for(all_arrived, 180)
    wait_for(lambda: not list(agent.spool.glob("*.sealed")), 60)  # removed once confirmed
    items = collector.listed()
    starts = [d["session_start"] for d in items]
    assert starts == sorted(starts, reverse=True)  # newest first
    assert {d["session_id"] for d in items} == set(local)
    for d in items:
        assert d["unix_user"] == alice.name and d["client_address"] == "127.0.0.1"
        assert d["hostname"] == socket.gethostname() and d["target_id"] == collector.host_id
        assert d["recording"]["length"] == len(local[d["session_id"]])
    execs = [d for d in items if d["program_type"] == "exec"]
    assert sorted(d["command"] for d in execs) == sorted(c for c, _, _ in EXEC)
    for d in execs:
        assert d["exit_status"] == {c: s for c, s, _ in EXEC}[d["command"]]
    shell_items = [d for d in items if d["program_type"] == "shell"]
    assert len(shell_items) == SHELLS
    assert all(d["exit_status"] == 0 and d["command"] is None for d in shell_items)

    keys = _key_files(agent, tmp_path)
    shown: list[str] = []
    for d in items:
        sid = d["session_id"]
        sealed = tmp_path / f"{sid}.sealed"
        collector.sshaudit("download", sid, "-o", str(sealed))
        assert sealed.read_bytes() == local[sid]  # exactly what the daemon sealed
        cast = tmp_path / f"{sid}.cast"
        _run(
            [
                SSHAUDIT,
                "decrypt",
                "--key",
                keys[0],
                "--host-key",
                keys[1],
                str(sealed),
                "-o",
                str(cast),
            ]
        )
        header, events = decode_all(cast.read_bytes())
        output = "".join(e.data for e in events if e.code is Code.OUTPUT)
        if d["program_type"] == "exec":
            assert header.command == d["command"]
            assert expected["exec", d["command"]] in output
        else:
            shown.extend(s for s in shells if s in output)
    assert sorted(shown) == sorted(shells)  # each shell's output in its own recording


def _key_files(agent: Agent, tmp: Path) -> tuple[str, str]:
    key = tmp / "auditor.key"
    key.write_bytes(encode_key_text(agent.keys.auditor.raw))
    key.chmod(0o600)
    host_pub = tmp / "host.pub"
    host_pub.write_bytes(encode_key_text(agent.keys.host.public_key().public_bytes_raw()))
    return str(key), str(host_pub)


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, (argv, done.stderr.decode())
