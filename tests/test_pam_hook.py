"""pam_module/hook.py: its framing agrees with agent/protocol.py, its JSON is JSON, it never
takes more than its timeout nor exits non-zero, it queues events when the daemon is down,
and it starts fast (``python3 -I -S``, a handful of standard modules)."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sshaudit.agent import protocol
from sshaudit.pam_module import hook

HOOK = hook.__file__
ENV = {
    "PAM_TYPE": "open_session",
    "PAM_USER": "jdoe",
    "PAM_RHOST": "192.0.2.44",
    "PAM_SERVICE": "sshd",
    "PAM_TTY": "ssh",
    "SSH_AUTH_INFO_0": "publickey ssh-ed25519 AAAAC3NzaC1lZDI1NTE5\n",
}


def test_framing_matches_the_protocol_module() -> None:
    assert hook.MSG_PAM == protocol.MsgType.PAM
    assert hook.MSG_DONE == protocol.MsgType.DONE
    assert hook.HEAD.format == ">BI" and hook.HEAD.size == protocol.HEADER_LEN
    payload = hook.encode_event(hook.build_event(ENV, 1234, 0.0))
    framed = hook.HEAD.pack(hook.MSG_PAM, len(payload)) + payload
    (msg,) = protocol.Decoder().feed(framed)
    assert msg.type is protocol.MsgType.PAM
    assert msg.json() == {
        "phase": "open_session",
        "user": "jdoe",
        "rhost": "192.0.2.44",
        "service": "sshd",
        "tty": "ssh",
        "priv_pid": 1234,
        "time": "1970-01-01T00:00:00Z",
        "auth_info": "publickey ssh-ed25519 AAAAC3NzaC1lZDI1NTE5\n",
    }


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_json_string_is_json(text: str) -> None:
    encoded = hook.json_string(text)
    assert json.loads(encoded) == text
    encoded.encode("utf-8")  # lone surrogates are escaped, so this never fails


def test_long_fields_are_cut_and_missing_ones_empty() -> None:
    event = hook.build_event({"PAM_TYPE": "close_session", "PAM_USER": "x" * 5000}, 1, 0.0)
    assert len(str(event["user"])) == hook.MAX_FIELD and event["rhost"] == ""
    assert "auth_info" not in event  # root's copy of the identity: at open_session only
    event = hook.build_event({"PAM_TYPE": "open_session", "SSH_AUTH_INFO_0": "y" * 70000}, 1, 0)
    assert event["auth_info"] == "y" * hook.MAX_AUTH_INFO
    assert hook.build_event({"PAM_TYPE": "open_session"}, 1, 0)["auth_info"] == ""


def test_parse_args() -> None:
    assert hook.parse_args(["--socket", "/s", "--spool-dir=/d"]) == {
        "socket": "/s",
        "spool-dir": "/d",
    }
    assert hook.parse_args(["--help"]) is None
    assert hook.parse_args(["--bogus"]) is None


class FakeDaemon:
    """A socket that records what it receives and answers DONE (or stays silent)."""

    def __init__(self, path: Path, answer: bool = True) -> None:
        self.path = path
        self.answer = answer
        self.received: list[protocol.Message] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                decoder = protocol.Decoder()
                conn.settimeout(5)
                while not self.received or len(self.received) < 1:
                    data = conn.recv(65536)
                    if not data:
                        break
                    self.received.extend(decoder.feed(data))
                if self.answer:
                    conn.sendall(protocol.encode_json(protocol.MsgType.DONE, {}))
                else:
                    time.sleep(3)

    def close(self) -> None:
        self.sock.close()


def test_run_sends_the_event(tmp_path: Path) -> None:
    daemon = FakeDaemon(tmp_path / "s.sock")
    try:
        rc = hook.run(["--socket", str(daemon.path)], ENV, priv_pid=77, wall_time=60.0)
    finally:
        daemon.close()
    assert rc == 0
    (msg,) = daemon.received
    assert msg.json()["priv_pid"] == 77 and msg.json()["time"] == "1970-01-01T00:01:00Z"


def test_run_reads_socket_and_spool_from_the_config(tmp_path: Path) -> None:
    daemon = FakeDaemon(tmp_path / "s.sock")
    config = tmp_path / "agent.toml"
    config.write_text(f'socket = "{daemon.path}"\nspool_dir = "{tmp_path}"\n[policy]\n')
    try:
        assert hook.run(["--config", str(config)], ENV, priv_pid=5) == 0
    finally:
        daemon.close()
    assert len(daemon.received) == 1


def test_other_pam_types_send_nothing(tmp_path: Path) -> None:
    daemon = FakeDaemon(tmp_path / "s.sock")
    try:
        env = dict(ENV, PAM_TYPE="password")
        assert hook.run(["--socket", str(daemon.path)], env, priv_pid=5) == 0
        time.sleep(0.1)
    finally:
        daemon.close()
    assert daemon.received == []


def spool_dir(tmp_path: Path) -> Path:
    d = tmp_path / "spool"
    d.mkdir(mode=0o700)
    return d


def test_daemon_down_queues_the_event(tmp_path: Path) -> None:
    spool = spool_dir(tmp_path)
    args = ["--socket", str(tmp_path / "none.sock"), "--spool-dir", str(spool)]
    started = time.monotonic()
    assert hook.run(args, ENV, priv_pid=9, wall_time=0.0) == 0
    assert hook.run(args, dict(ENV, PAM_TYPE="close_session"), priv_pid=9) == 0
    assert hook.run(args, dict(ENV, PAM_TYPE="account"), priv_pid=9) == 0  # not queued
    assert time.monotonic() - started < 3.0  # no daemon: no waiting (generous: loaded CI)
    queue = spool / hook.PAM_QUEUE_NAME
    lines = [json.loads(line) for line in queue.read_text().splitlines()]
    assert [x["phase"] for x in lines] == ["open_session", "close_session"]
    assert lines[0]["priv_pid"] == 9 and lines[0]["user"] == "jdoe"
    assert oct(queue.stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("mode", [0o755, 0o777])
def test_a_loose_spool_dir_gets_no_queue(tmp_path: Path, mode: int) -> None:
    spool = spool_dir(tmp_path)
    spool.chmod(mode)
    args = ["--socket", str(tmp_path / "none.sock"), "--spool-dir", str(spool)]
    assert hook.run(args, ENV, priv_pid=9) == 0
    assert not (spool / hook.PAM_QUEUE_NAME).exists()


def test_a_symlinked_queue_is_not_followed(tmp_path: Path) -> None:
    spool = spool_dir(tmp_path)
    target = tmp_path / "target"
    (spool / hook.PAM_QUEUE_NAME).symlink_to(target)
    args = ["--socket", str(tmp_path / "none.sock"), "--spool-dir", str(spool)]
    assert hook.run(args, ENV, priv_pid=9) == 0
    assert not target.exists()


def test_a_silent_daemon_costs_at_most_the_timeout(tmp_path: Path) -> None:
    daemon = FakeDaemon(tmp_path / "s.sock", answer=False)
    spool = spool_dir(tmp_path)
    try:
        started = time.monotonic()
        args = ["--socket", str(daemon.path), "--spool-dir", str(spool), "--timeout", "0.3"]
        assert hook.run(args, ENV, priv_pid=5) == 0
        assert time.monotonic() - started < 2.0  # the 0.3 s timeout, not forever
    finally:
        daemon.close()
    assert len(daemon.received) == 1
    assert not (spool / hook.PAM_QUEUE_NAME).exists()  # delivered: not queued twice


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/usr/bin/python3", "-I", "-S", HOOK, *args],
        env=env if env is not None else dict(ENV),
        capture_output=True,
        text=True,
        timeout=10,
    )


def test_as_a_script_it_always_exits_0(tmp_path: Path) -> None:
    r = run_script("--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    r = run_script("--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 0 and r.stderr == ""
    (tmp_path / "bad.toml").write_text("socket = [")
    assert run_script("--config", str(tmp_path / "bad.toml")).returncode == 0
    assert run_script("--timeout", "soon").returncode == 0
    r = run_script("--help")
    assert r.returncode == 0 and "pam_exec" in r.stderr
    assert run_script(env={}).returncode == 0


def imported(*argv: str) -> set[str]:
    r = subprocess.run(
        ["/usr/bin/python3", "-I", "-S", "-X", "importtime", *argv],
        env={},
        capture_output=True,
        text=True,
        timeout=10,
    )
    return {
        line.split("|")[-1].strip()
        for line in r.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def test_the_script_imports_only_a_few_standard_modules() -> None:
    loaded = imported(HOOK, "--socket", "/nonexistent") - imported("-c", "pass")
    assert {"_socket", "struct"} <= loaded  # the check can see what the hook imports
    heavy = {"json", "re", "sshaudit", "dataclasses", "tomllib", "argparse", "typing"}
    heavy |= {"socket", "collections", "enum"}
    assert not loaded & heavy, loaded & heavy
