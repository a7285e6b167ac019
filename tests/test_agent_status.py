"""agent/status.py against a layout in a temporary directory: a host not enrolled, enrolled
with a broken config, and enrolled with each piece present or missing (a fake ``sshd``
script answers ``-T``; a real process with ``daemon`` in its command line plays the daemon;
the collector is a closed loopback port). Text and JSON rendering, exit status."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sshaudit.agent.enroll import EnrollOptions, agent_config_text
from sshaudit.agent.enroll_sshd import SshdTarget
from sshaudit.agent.layout import Layout
from sshaudit.agent.status import Check, State, checks, exit_status, render

NOW = datetime(2026, 11, 22, 5, 0, 0, tzinfo=UTC)
CA = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDp/Lc3oUOTrYRl19vbc8gU73ZBt1pwqAbCdEfGhIjKl"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class Host:
    def __init__(self, tmp: Path) -> None:
        self.lay = Layout.under(tmp / "state")
        self.sshd = tmp / "sshd"
        self.url = f"https://127.0.0.1:{closed_port()}"

    def enroll(self, *, refresh: float = 60.0) -> Host:
        lay = self.lay
        for d in (lay.etc, lay.lib, lay.spool, lay.run):
            d.mkdir(parents=True, exist_ok=True)
        opts = EnrollOptions(
            collector=self.url,
            token="t",
            fingerprint="SHA256:" + "ab" * 32,
            layout=lay,
            sshd=SshdTarget(lay.etc / "sshd_config", lay.etc / "pam", self.sshd),
            sshd_log="off",
            refresh_seconds=refresh,
        )
        lay.config.write_text(agent_config_text(opts, "web-1"))
        record = {"collector": self.url, "host_id": "web-1", "sshd": str(self.sshd),
                  "sshd_config": str(lay.etc / "sshd_config")}  # fmt: skip
        lay.enrollment.write_text(json.dumps(record))
        lay.ca_keys.write_text("# header\n" + CA + "\n")
        self.sshd_says(self.effective())
        return self

    def effective(self) -> str:
        lay = self.lay
        return (
            f"forcecommand {lay.recorder} --config {lay.config}\nexposeauthinfo yes\n"
            f"permituserrc no\ntrustedusercakeys {lay.ca_keys}\n"
            f"authorizedprincipalscommand {lay.principals} --policy {lay.policy} %u\n"
            "pidfile /nonexistent/sshd.pid\n"
        )

    def sshd_says(self, text: str, status: int = 0) -> None:
        out = self.lay.lib / "sshd-T.txt"
        out.write_text(text)
        self.sshd.write_text(
            f'#!/bin/sh\n[ "$1" = -T ] || exit 9\ncat {out}\n'
            f'[ {status} = 0 ] || echo "line 1: Bad option" >&2\nexit {status}\n'
        )
        self.sshd.chmod(0o755)

    def refreshed(self, ago: float, error: str = "") -> None:
        at = (NOW - timedelta(seconds=ago)).isoformat().replace("+00:00", "Z")
        doc = {"last_attempt": at, "last_success": at, "last_error": error}
        (self.lay.lib / "refresh.json").write_text(json.dumps(doc))

    def checks(self) -> dict[str, Check]:
        return {c.name: c for c in checks(self.lay, now=lambda: NOW)}


@pytest.fixture
def daemon() -> Iterator[int]:
    """A process whose command line has the word ``daemon``, as the agent daemon's has."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "daemon"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_not_enrolled(tmp_path: Path) -> None:
    lay = Layout.under(tmp_path)
    results = checks(lay)
    assert [(c.name, c.state) for c in results] == [("enrolled", State.FAIL)]
    assert str(lay.enrollment) in results[0].detail and "not enrolled" in results[0].detail
    assert exit_status(results) == 1
    assert render(results, False) == f"FAIL  enrolled  {results[0].detail}"
    doc = json.loads(render(results, True))
    assert doc == {"ok": False, "checks": [
        {"name": "enrolled", "state": "fail", "detail": results[0].detail}
    ]}  # fmt: skip


@pytest.mark.parametrize("record", ["{not json", "[]", '"text"', "null"])
def test_a_damaged_enrollment_record(tmp_path: Path, record: str) -> None:
    lay = Layout.under(tmp_path)
    lay.lib.mkdir(parents=True)
    lay.enrollment.write_text(record)
    (result,) = checks(lay)
    assert result.name == "enrolled" and result.state is State.FAIL
    assert result.detail == f"{lay.enrollment}: damaged (not a JSON object)"


def test_enrolled_but_the_config_is_broken(tmp_path: Path) -> None:
    host = Host(tmp_path).enroll()
    host.lay.config.write_text("host_id = [broken\n")
    results = checks(host.lay)
    assert [(c.name, c.state) for c in results] == [
        ("enrolled", State.OK),
        ("config", State.FAIL),
    ]
    assert "web-1" in results[0].detail and host.url in results[0].detail
    assert str(host.lay.config) in results[1].detail and "TOML" in results[1].detail
    assert exit_status(results) == 1


def test_every_piece_in_place(tmp_path: Path, daemon: int) -> None:
    host = Host(tmp_path).enroll()
    host.lay.daemon_pid.write_text(f"{daemon}\n")
    host.lay.socket.touch()
    host.refreshed(ago=30)
    ship = host.lay.spool / "s1.ship"
    ship.write_text("{}")
    os.utime(ship, (NOW.timestamp() - 600, NOW.timestamp() - 600))
    got = host.checks()
    assert list(got) == ["enrolled", "config", "sshd settings", "daemon", "collector",
                         "CA keys and policy", "spool backlog", "last upload"]  # fmt: skip
    assert {n: c.state for n, c in got.items()} == {
        **dict.fromkeys(got, State.OK),
        "collector": State.WARN,  # nothing listens there: the cache is for that
    }
    assert got["daemon"].detail == f"pid {daemon}"
    assert host.url in got["collector"].detail and "unreachable" in got["collector"].detail
    assert got["CA keys and policy"].detail == "1 CA keys, refreshed 30 s ago"
    assert got["last upload"].detail == "10 min ago"
    results = list(got.values())
    assert exit_status(results) == 0  # WARN does not fail

    lines = render(results, False).splitlines()
    assert len(lines) == 8
    column = lines[0].index("web-1") - len("host ")
    assert all(len(line) > column and line[column - 2 : column] == "  " for line in lines)
    assert lines[4].startswith("WARN  collector ")
    doc = json.loads(render(results, True))
    assert doc["ok"] is True and [c["state"] for c in doc["checks"]].count("warn") == 1


def test_sshd_settings_not_in_effect(tmp_path: Path) -> None:
    host = Host(tmp_path).enroll()
    host.sshd_says(host.effective().replace("exposeauthinfo yes", "exposeauthinfo no")
                   .replace("forcecommand", "forcecommand /bin/other #"))  # fmt: skip
    check = host.checks()["sshd settings"]
    assert check.state is State.FAIL
    assert check.detail == "not in effect: forcecommand, exposeauthinfo"


def test_sshd_t_failing(tmp_path: Path) -> None:
    host = Host(tmp_path).enroll()
    host.sshd_says("", status=255)
    check = host.checks()["sshd settings"]
    assert check.state is State.FAIL and "Bad option" in check.detail


def test_daemon_down_and_spool_missing(tmp_path: Path) -> None:
    host = Host(tmp_path).enroll()
    host.lay.daemon_pid.write_text(f"{os.getpid()}\n")  # alive, but not the daemon
    host.lay.spool.rmdir()
    got = host.checks()
    assert got["daemon"].state is State.FAIL and got["daemon"].detail == "not running"
    assert got["spool backlog"].state is State.FAIL
    assert str(host.lay.spool) in got["spool backlog"].detail
    assert exit_status(list(got.values())) == 1


def test_freshness(tmp_path: Path) -> None:
    host = Host(tmp_path).enroll(refresh=60)
    assert host.checks()["CA keys and policy"].state is State.WARN  # never refreshed
    assert "never refreshed" in host.checks()["CA keys and policy"].detail
    host.refreshed(ago=3 * 3600, error="collector answered 500: {}")
    check = host.checks()["CA keys and policy"]
    assert check.state is State.WARN  # older than 3 refresh intervals
    assert (
        "3.0 h ago" in check.detail
        and "last attempt failed: collector answered 500" in check.detail
    )
    host.refreshed(ago=90)
    assert host.checks()["CA keys and policy"].state is State.OK


def test_missing_ca_file_does_not_hide_the_other_checks(tmp_path: Path) -> None:
    host = Host(tmp_path).enroll()
    host.refreshed(ago=5)
    host.lay.ca_keys.unlink()
    got = host.checks()
    assert got["CA keys and policy"].state is State.FAIL
    assert str(host.lay.ca_keys) in got["CA keys and policy"].detail
    assert "spool backlog" in got and "last upload" in got


def test_spool_near_its_cap_warns(tmp_path: Path) -> None:
    host = Host(tmp_path).enroll()
    (host.lay.spool / "a.json").write_text("{}")
    (host.lay.spool / "a.sealed").write_bytes(b"\0" * 900 * 1024)
    cfg_text = host.lay.config.read_text()
    host.lay.config.write_text(cfg_text + "\n[policy]\nspool_max_bytes = 1048576\n")
    check = host.checks()["spool backlog"]
    assert check.state is State.WARN, check
    assert check.detail.startswith("1 sessions, ")
