"""A real sshaudit agent for end-to-end tests and benchmarks: config, keys, launcher, daemon.

Invariants: everything lives under one root-owned 0755 directory (sshd and the recorder,
running as the test user, must read the config and launcher, never write them); the daemon
is the real ``sshaudit-agent daemon`` process with the production peer check.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon_helpers import config_doc, make_keys, toml_text

import sshaudit
from sshaudit.agent.launcher import write_launcher
from sshaudit.pam_module import hook

PY = sys.executable
AGENT = str(Path(PY).parent / "sshaudit-agent")
PACKAGE_PARENT = str(Path(sshaudit.__file__).parent.parent)  # the link tree: not resolved


class Agent:
    """Config, keys, launcher and a running daemon under a root-owned 0755 directory."""

    def __init__(self, work: Path, **policy: Any) -> None:
        self.work = work
        self.keys = make_keys(work / "keys")
        (work / "keys").chmod(0o755)
        doc = config_doc(work, self.keys, **policy)
        self.config = work / "agent.toml"
        self.config.write_text(toml_text(doc))
        self.config.chmod(0o644)
        self.socket = Path(doc["socket"])
        self.spool = Path(doc["spool_dir"])
        self.launcher = work / "record"
        write_launcher(str(self.launcher), PY, PACKAGE_PARENT)
        self.log = work / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Agent:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                [AGENT, "daemon", "--config", str(self.config)], stderr=err
            )
        deadline = time.monotonic() + 20
        while "listening on" not in self.log.read_text()[offset:]:
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "daemon did not start"
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)

    def force_command(self) -> str:
        return f"{self.launcher} --config {self.config}"

    def pam_line(self) -> str:
        return (
            f"session optional pam_exec.so quiet /usr/bin/python3 -I -S {hook.__file__} "
            f"--socket {self.socket} --spool-dir {self.spool}"
        )

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(self.spool.glob("*.json"))]


def wait_records(a: Agent, cond: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 15
    while True:
        recs = a.records()
        if cond(recs):
            return recs
        assert time.monotonic() < deadline, (recs, a.log.read_text()[-3000:])
        time.sleep(0.1)
