"""Shared pieces of the recorded end-to-end tests (tests/test_e2e_*.py): a real agent daemon
(tests/agent_harness.py) behind a real sshd, its recordings decrypted with the auditor key,
and "planted" user code that leaves evidence of where in the process tree it ran.

Invariants: an agent made here is stopped after its test (its log is printed then, shown by
pytest when the test failed); a recording is read only once its record left ``recording``,
so what is checked is what the daemon sealed to the end.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_harness import PY, Agent
from daemon_helpers import decrypt
from sshd_harness import SshdServer, client_env
from sshd_host import UnixUser

from sshaudit.asciicast import Code, Event, Header, decode_all
from sshaudit.sealed import Completeness, ReadResult, SignatureStatus

AgentFactory = Callable[..., Agent]
Record = dict[str, Any]


@contextmanager
def agents(work: Path) -> Iterator[AgentFactory]:
    """Make (at most one per ``work`` directory) started agents; stop them afterwards."""
    made: list[Agent] = []

    def make(**policy: Any) -> Agent:
        a = Agent(work, **policy).start()
        made.append(a)
        return a

    try:
        yield make
    finally:
        for a in made:
            a.stop()
            print(f"--- agent daemon log:\n{a.log.read_text()[-6000:]}")


@dataclass(frozen=True)
class Recording:
    """One session's record and its recording, decrypted and parsed."""

    record: Record
    plain: bytes
    result: ReadResult
    header: Header
    events: list[Event]

    def text(self, *codes: Code) -> str:
        return "".join(e.data for e in self.events if e.code in codes)

    @property
    def output(self) -> str:
        return self.text(Code.OUTPUT)

    @property
    def input(self) -> str:
        return self.text(Code.INPUT)

    @property
    def markers(self) -> list[str]:
        return [e.data for e in self.events if e.code is Code.MARKER]

    @property
    def sealed_to_the_end(self) -> bool:
        return (
            self.result.completeness is Completeness.COMPLETE
            and self.result.signature is SignatureStatus.VALID
        )


def read_recording(a: Agent, record: Record) -> Recording:
    plain, result = decrypt(
        (a.spool / f"{record['session_id']}.sealed").read_bytes(), a.keys.auditor
    )
    header, events = decode_all(plain)
    return Recording(record, plain, result, header, events)


def finished(a: Agent, count: int, timeout: float = 60.0) -> list[Record]:
    """The spool's records once there are ``count`` and none is still ``recording``.

    The deadline is generous (the machine is shared: with its cores busy, 50 sessions'
    fsyncs take a while); the wait ends as soon as the records are there."""
    deadline = time.monotonic() + timeout
    while True:
        recs = a.records()
        if len(recs) == count and all(r["recording_status"] != "recording" for r in recs):
            return recs
        if time.monotonic() > deadline:
            states = [(r["session_id"][:8], r["recording_status"]) for r in recs]
            raise AssertionError(f"want {count} finished records, have {states}")
        time.sleep(0.1)


def only_recording(a: Agent) -> Recording:
    (record,) = finished(a, 1)
    return read_recording(a, record)


def ssh_with_token(server: SshdServer, user: UnixUser, command: str) -> bytes:
    """Run ``command`` with ``LC_SSHAUDIT_TEST`` sent (sshd accepts LC_*): planted files
    act only for connections that carry this run's token, not for tests running beside."""
    opts = ("-o", "SendEnv=LC_SSHAUDIT_TEST")
    argv = [*server.ssh_argv(user, opts), "-T", server.host, command]
    env = {**client_env(), "LC_SSHAUDIT_TEST": token()}
    done = subprocess.run(
        argv, env=env, capture_output=True, timeout=30, stdin=subprocess.DEVNULL, check=False
    )
    assert done.returncode == 0, (done.stdout, done.stderr, server.log()[-3000:])
    return done.stdout


def token() -> str:
    return f"e2e-{os.getpid()}"


def evidence_script(marker: Path) -> str:
    """Shell code that appends to ``marker`` one line per run: the command lines of its
    process and of every ancestor (from /proc), so a test can tell whether it ran under
    the recorder or before it."""
    return (
        'p=$$; chain=; while [ "$p" -gt 1 ]; do '
        # Non-printable bytes (NUL separators, newlines, non-UTF-8) become spaces and
        # each command line is capped: ancestors above sshd (CI harnesses) can hold
        # anything, and one marker line must stay one text line.
        "c=$(LC_ALL=C tr -c '[:print:]' ' ' < /proc/$p/cmdline 2>/dev/null | head -c 512); "
        'chain="$chain<$c>"; '
        "p=$(sed -n 's/^PPid:[[:space:]]*//p' /proc/$p/status 2>/dev/null); "
        '[ -n "$p" ] || break; done; '
        # printf, not echo: dash's echo expands backslash escapes found in the text
        f'printf "%s\\n" "$(date +%s.%N) $$ $chain" >> {shlex.quote(str(marker))}\n'
    )


def guarded(script: str) -> str:
    """``script`` run only for this test run's connections (see :func:`ssh_with_token`)."""
    return f'if [ "${{LC_SSHAUDIT_TEST-}}" = {token()} ]; then\n{script}fi\n'


def evidence(marker: Path) -> list[str]:
    """The ancestry lines the planted code wrote (none if it never ran)."""
    return marker.read_text(errors="replace").splitlines() if marker.exists() else []


def under_recorder(line: str, a: Agent) -> bool:
    """Did the run that wrote ``line`` descend from this agent's recorder: the interpreter
    running the launcher (not the ``$SHELL -c "<launcher> ..."`` sshd starts it through)?"""
    chain = line.split(" ", 2)[2] if line.count(" ") >= 2 else ""
    for process in chain.removeprefix("<").removesuffix(">").split("><"):
        argv = process.split()
        if argv and argv[0] == PY and str(a.launcher) in argv:
            return True
    return False


@contextmanager
def planted(user: UnixUser, relative: str, text: str, mode: int = 0o644) -> Iterator[Path]:
    """A file in the user's home, owned by them, restored (or removed) afterwards."""
    path = user.home / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = path.read_bytes() if path.exists() else None
    path.write_bytes(text.encode() + (saved or b""))  # first: Debian's .bashrc returns early
    os.chown(path, user.uid, user.gid)
    path.chmod(mode)
    try:
        yield path
    finally:
        if saved is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(saved)
