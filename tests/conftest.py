"""Shared fixtures. The end-to-end ones run a real OpenSSH sshd (tests/sshd_harness.py).

Invariants:
- the sshd fixtures need root; elsewhere they skip loudly, but where the environment says
  ``CI`` they fail instead, since CI runs as root and a skip there would hide a broken suite;
- users and the client key are per test session; servers and work dirs are per test, and
  are torn down even when the test fails (when it fails, the sshd log is printed too).
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sshd_harness import SshdConfig, SshdFactory, SshdServer
from sshd_host import HarnessEnv, UnixUser, harness_env, unavailable_reason, work_dir

TEST_USERS = ("sshaudit-alice", "sshaudit-bob")
_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call" and report.failed:
        item.stash[_FAILED] = True
    return report


@pytest.fixture(scope="session")
def sshd_env() -> Iterator[HarnessEnv]:
    """The test users (created if needed) with a fresh client key authorized for each."""
    reason = unavailable_reason()
    if reason is not None:
        message = f"END-TO-END SSHD TESTS NOT RUN: {reason}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with harness_env(TEST_USERS) as env:
        yield env


@pytest.fixture
def alice(sshd_env: HarnessEnv) -> UnixUser:
    return sshd_env.user("sshaudit-alice")


@pytest.fixture
def bob(sshd_env: HarnessEnv) -> UnixUser:
    return sshd_env.user("sshaudit-bob")


@pytest.fixture
def root_work_dir(sshd_env: HarnessEnv) -> Iterator[Path]:
    """A root-owned 0755 directory sshd accepts for commands (ForceCommand, hooks)."""
    with work_dir() as path:
        yield path


@pytest.fixture
def sshd_server(request: pytest.FixtureRequest, sshd_env: HarnessEnv) -> Iterator[SshdFactory]:
    """A factory of test sshds; ``AllowUsers`` defaults to the test users."""
    servers: list[SshdServer] = []

    def start(config: SshdConfig | None = None, **fields: Any) -> SshdServer:
        cfg = replace(config or SshdConfig(), **fields)
        if not cfg.allow_users:
            cfg = replace(cfg, allow_users=tuple(u.name for u in sshd_env.users))
        server = SshdServer.start(cfg, sshd_env)
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
        if request.node.stash.get(_FAILED, False):
            for server in servers:
                print(f"--- sshd log of {server.pam_service} (port {server.port}):\n{server.log()}")
