"""``sshaudit-agent status``: is each piece of an enrolled host in place and healthy, in one
screen (or ``--json``).

Invariants: it only reads (files, ``sshd -T``, the daemon's pid, one pinned request to the
collector's ``/healthz``); every check yields a :class:`Check` with a state and a short
detail, and one failing check never hides the others. Exit status 0 when all are OK, 1
when any is FAIL (WARN does not fail: a collector away for a while is what the cache is for).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

import requests

from sshaudit.agent import enroll_proc
from sshaudit.agent.config import AgentConfig, load_config
from sshaudit.agent.layout import Layout
from sshaudit.collector.pinning import pinned_session
from sshaudit.errors import SSHAuditError


class State(Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    name: str
    state: State
    detail: str


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _sshd(record: dict[str, Any], layout: Layout) -> Check:
    try:
        eff = enroll_proc.sshd_effective(Path(record["sshd"]), Path(record["sshd_config"]))
    except (SSHAuditError, KeyError) as exc:
        return Check("sshd settings", State.FAIL, str(exc))
    want = {
        "forcecommand": str(layout.recorder),
        "exposeauthinfo": "yes",
        "permituserrc": "no",
        "trustedusercakeys": str(layout.ca_keys),
        "authorizedprincipalscommand": str(layout.principals),
    }
    wrong = [k for k, v in want.items() if not any(x.split(" ")[0] == v for x in eff.get(k, []))]
    if wrong:
        return Check("sshd settings", State.FAIL, "not in effect: " + ", ".join(wrong))
    return Check("sshd settings", State.OK, "ForceCommand, CA keys, principals command in effect")


def _collector(config: AgentConfig) -> Check:
    c = config.collector
    if c is None:
        return Check("collector", State.FAIL, "no [collector] table")
    session = pinned_session(c.fingerprint)
    try:
        resp = session.get(c.url + "/healthz", timeout=(5, 10))
        ok = resp.status_code == 200
    except requests.RequestException as exc:
        return Check("collector", State.WARN, f"{c.url} unreachable: {str(exc)[:200]}")
    finally:
        session.close()
    return Check(
        "collector", State.OK if ok else State.WARN, f"{c.url} answered {resp.status_code}"
    )


def _freshness(config: AgentConfig, now: datetime) -> Check:
    assert config.identity is not None
    status = config.identity.policy_file.parent / "refresh.json"
    try:
        doc = json.loads(status.read_text())
        last = datetime.fromisoformat(doc["last_success"].replace("Z", "+00:00"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return Check("CA keys and policy", State.WARN, "never refreshed by the daemon yet")
    age = (now - last).total_seconds()
    stale = config.collector is not None and age > 3 * config.collector.refresh_seconds
    try:
        text = config.identity.ca_keys_file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        # sshd trusts no CA without it: no certificate login works
        detail = getattr(exc, "strerror", None) or str(exc)
        return Check("CA keys and policy", State.FAIL, f"{config.identity.ca_keys_file}: {detail}")
    n = sum(1 for line in text.splitlines() if line[:1] != "#")
    detail = f"{n} CA keys, refreshed {_age(age)} ago"
    if doc.get("last_error"):
        detail += f"; last attempt failed: {doc['last_error'][:150]}"
    return Check("CA keys and policy", State.WARN if stale else State.OK, detail)


def _spool(config: AgentConfig) -> Check:
    try:
        names = [p.name for p in config.spool_dir.iterdir()]
        size = sum(p.stat().st_size for p in config.spool_dir.iterdir() if p.is_file())
    except OSError as exc:
        return Check("spool backlog", State.FAIL, f"{config.spool_dir}: {exc.strerror}")
    sessions = {n.split(".")[0] for n in names if n.endswith(".json") and not n.startswith(".")}
    cap = config.policy.spool_max_bytes
    state = State.WARN if size > cap * 0.8 else State.OK
    return Check("spool backlog", state, f"{len(sessions)} sessions, {size} bytes (cap {cap})")


def _last_upload(config: AgentConfig, now: datetime) -> Check:
    ships = sorted(config.spool_dir.glob("*.ship"), key=lambda p: p.stat().st_mtime)
    if not ships:
        return Check("last upload", State.OK, "nothing waiting to ship")
    age = now.timestamp() - ships[-1].stat().st_mtime
    return Check("last upload", State.OK, f"{_age(age)} ago")


def _record(layout: Layout) -> dict[str, Any] | Check:
    """What enroll recorded, or the failed "enrolled" check."""
    try:
        record = json.loads(layout.enrollment.read_text())
    except FileNotFoundError:
        return Check("enrolled", State.FAIL, f"not enrolled ({layout.enrollment} missing)")
    except OSError as exc:
        return Check("enrolled", State.FAIL, f"{layout.enrollment}: {exc.strerror}")
    except ValueError:
        record = None
    if not isinstance(record, dict):
        return Check("enrolled", State.FAIL, f"{layout.enrollment}: damaged (not a JSON object)")
    return record


def checks(layout: Layout, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> list[Check]:
    out = []
    record = _record(layout)
    if isinstance(record, Check):
        return [record]
    out.append(
        Check("enrolled", State.OK, f"host {record.get('host_id')} at {record.get('collector')}")
    )
    try:
        config = load_config(layout.config)
    except SSHAuditError as exc:
        return [*out, Check("config", State.FAIL, str(exc))]
    out.append(Check("config", State.OK, str(layout.config)))
    out.append(_sshd(record, layout))
    pid = enroll_proc.daemon_pid(layout)
    up = pid is not None and config.socket.exists()
    out.append(
        Check("daemon", State.OK if up else State.FAIL, f"pid {pid}" if up else "not running")
    )
    out.append(_collector(config))
    if config.identity is not None:
        out.append(_freshness(config, now()))
    out.append(_spool(config))
    out.append(_last_upload(config, now()))
    return out


def render(results: list[Check], as_json: bool) -> str:
    if as_json:
        doc = [dict(asdict(c), state=c.state.value) for c in results]
        return json.dumps(
            {"ok": all(c.state is not State.FAIL for c in results), "checks": doc}, indent=1
        )
    width = max(len(c.name) for c in results)
    return "\n".join(f"{c.state.value.upper():4}  {c.name:<{width}}  {c.detail}" for c in results)


def exit_status(results: list[Check]) -> int:
    return 1 if any(c.state is State.FAIL for c in results) else 0
