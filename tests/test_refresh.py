"""agent/refresh.py: apply_settings writes the identity files 0644, atomically and only when
they change, removing old auditor keys only after the new ones are written; Refresher
(with a fake Transport) keeps the cache on every kind of failure and says why in
refresh.json, and calls its hooks only when it should."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sshaudit.agent.config import AgentConfig, parse_config
from sshaudit.agent.hostconfig import HostSettings, parse_host_config
from sshaudit.agent.refresh import STATUS_FILE, IdentityPaths, Refresher, apply_settings
from sshaudit.agent.ship_http import Reply, ShipError
from sshaudit.errors import ConfigError
from sshaudit.keys import AuditorPrivateKey, encode_key_text

# A real ed25519 public key line (ssh-keygen), so the CA check accepts it.
CA1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDp/Lc3oUOTrYRl19vbc8gU73ZBt1pwqAbCdEfGhIjKl"
CA2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFm0jHqNYbS0y2+GXwSRL3Gx7nQ6YtC0Z8Pq3mN1oR2s"
T0 = datetime(2026, 11, 22, 5, 0, 0, tzinfo=UTC)


def auditor() -> str:
    return encode_key_text(AuditorPrivateKey.generate().public.raw).decode()


A1, A2 = auditor(), auditor()


def host_doc(
    auditors: tuple[str, ...] = (A1,), cas: tuple[str, ...] = (CA1,), **over: Any
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "host_id": "web-1",
        "auditor_keys": [{"public_key": a} for a in auditors],
        "ca_keys": list(cas),
        "policy": {"refresh_seconds": 60},
        "policy_version": 1,
    }
    doc.update(over)
    return doc


def settings(**kw: Any) -> HostSettings:
    return parse_host_config(host_doc(**kw))


@pytest.fixture
def paths(tmp_path: Path) -> IdentityPaths:
    return IdentityPaths(
        tmp_path / "etc" / "ca.pub", tmp_path / "lib" / "policy.json", tmp_path / "lib" / "auditors"
    )


def snapshot(root: Path) -> dict[str, tuple[bytes, int, int, int]]:
    """Every file under ``root``: content, inode, mtime (ns), mode."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (p.read_bytes(), st.st_ino, st.st_mtime_ns, st.st_mode)
    return out


def test_apply_writes_every_file_0644(paths: IdentityPaths, tmp_path: Path) -> None:
    os.umask(0o077)  # the mode must not depend on the umask
    try:
        s = settings(auditors=(A1, A2), cas=(CA2, CA1))
        changed = apply_settings(paths, s, T0)
    finally:
        os.umask(0o022)
    assert changed == ["user CA keys (2)", "auditor keys (2)", "policy (version 1)"]
    files = snapshot(tmp_path)
    assert {n: stat.S_IMODE(v[3]) for n, v in files.items()} == dict.fromkeys(files, 0o644)
    assert paths.ca_keys_file.read_text().splitlines()[1:] == sorted([CA1, CA2])
    assert sorted(p.read_bytes() for p in paths.recipients_dir.glob("*.pub")) == sorted(
        [A1.encode(), A2.encode()]
    )
    cache = json.loads(paths.policy_file.read_text())
    assert (
        cache["policy"] == {"refresh_seconds": 60} and cache["fetched_at"] == "2026-11-22T05:00:00Z"
    )
    assert not [p for p in tmp_path.rglob(".*.tmp")]  # no temporary file left behind


def test_unchanged_settings_rewrite_nothing(paths: IdentityPaths, tmp_path: Path) -> None:
    apply_settings(paths, settings(), T0)
    before = snapshot(tmp_path)
    # a later fetch of the same configuration (only the fetch time differs)
    assert apply_settings(paths, settings(), T0 + timedelta(hours=1)) == []
    assert snapshot(tmp_path) == before


def test_a_changed_file_is_replaced_not_rewritten_in_place(
    paths: IdentityPaths, tmp_path: Path
) -> None:
    apply_settings(paths, settings(), T0)
    before = snapshot(tmp_path)
    assert apply_settings(paths, settings(cas=(CA1, CA2)), T0) == ["user CA keys (2)"]
    after = snapshot(tmp_path)
    name = "etc/ca.pub"
    assert after[name][1] != before[name][1]  # a new inode: rename(2), readers never see half
    assert {k: v for k, v in after.items() if k != name} == {
        k: v for k, v in before.items() if k != name
    }


def test_policy_change_is_written(paths: IdentityPaths) -> None:
    apply_settings(paths, settings(), T0)
    changed = apply_settings(paths, settings(policy={"x": 1}, policy_version=2), T0)
    assert changed == ["policy (version 2)"]
    assert json.loads(paths.policy_file.read_text())["policy"] == {"x": 1}


def test_old_auditor_keys_go_only_after_the_new_ones_are_written(paths: IdentityPaths) -> None:
    apply_settings(paths, settings(auditors=(A1,)), T0)
    (old,) = paths.recipients_dir.glob("*.pub")
    new = parse_host_config(host_doc(auditors=(A2,)))
    (new_name,) = [f"{k.kid}.pub" for k in new.auditor_keys]
    # The new key cannot be written (a directory squats its name): the old key must stay.
    (paths.recipients_dir / new_name).mkdir()
    with pytest.raises(OSError):
        apply_settings(paths, new, T0)
    assert old.read_bytes() == A1.encode()
    (paths.recipients_dir / new_name).rmdir()
    assert apply_settings(paths, new, T0) == ["auditor keys (1)"]
    assert [p.name for p in paths.recipients_dir.glob("*.pub")] == [new_name]


# -- Refresher ------------------------------------------------------------------------


class FakeTransport:
    """The Transport protocol (agent/ship_http.py): answers from a list, records requests."""

    def __init__(self, *answers: Reply | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[tuple[str, str]] = []

    def send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        json_body: Any = None,
    ) -> Reply:
        self.requests.append((method, path))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def close(self) -> None:
        pass


def agent_config(tmp_path: Path) -> AgentConfig:
    return parse_config(
        {
            "host_id": "web-1",
            "spool_dir": str(tmp_path / "spool"),
            "recipients_dir": str(tmp_path / "lib" / "auditors"),
            "collector": {
                "url": "https://collector.example:8443",
                "fingerprint": "SHA256:" + "ab" * 32,
                "refresh_seconds": 7,
            },
            "identity": {
                "ca_keys_file": str(tmp_path / "etc" / "ca.pub"),
                "policy_file": str(tmp_path / "lib" / "policy.json"),
            },
        }
    )


class Hooks:
    def __init__(self) -> None:
        self.keys = 0
        self.applied: list[HostSettings] = []

    def on_keys(self) -> None:
        self.keys += 1

    def on_applied(self, s: HostSettings) -> None:
        self.applied.append(s)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


def refresher(tmp_path: Path, transport: FakeTransport, hooks: Hooks) -> Refresher:
    return Refresher(
        agent_config(tmp_path),
        transport,
        wall=Clock(),
        on_keys=hooks.on_keys,
        on_applied=hooks.on_applied,
    )


def status(tmp_path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((tmp_path / "lib" / STATUS_FILE).read_text())
    return doc


def test_identity_paths_need_the_identity_table(tmp_path: Path) -> None:
    cfg = parse_config({"host_id": "h", "recipients_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="identity"):
        IdentityPaths.of(cfg)
    assert IdentityPaths.of(agent_config(tmp_path)).policy_file == tmp_path / "lib" / "policy.json"


def test_run_once_applies_and_calls_hooks(tmp_path: Path) -> None:
    hooks = Hooks()
    t = FakeTransport(
        Reply(200, host_doc()),
        Reply(200, host_doc()),
        Reply(200, host_doc(cas=(CA1, CA2))),
        Reply(200, host_doc(auditors=(A2,))),
    )
    r = refresher(tmp_path, t, hooks)
    assert r.interval == 7
    assert r.run_once() is True
    assert t.requests == [("GET", "/v1/host/config")]
    assert hooks.keys == 1 and hooks.applied == [settings()]
    doc = status(tmp_path)
    assert doc["last_error"] == "" and doc["last_success"] == "2026-11-22T05:00:02Z"
    assert doc["last_attempt"] == "2026-11-22T05:00:03Z"
    assert stat.S_IMODE((tmp_path / "lib" / STATUS_FILE).stat().st_mode) == 0o644

    assert r.run_once() is True  # the same configuration: no key change
    assert hooks.keys == 1 and len(hooks.applied) == 2
    assert r.run_once() is True  # CA keys only
    assert hooks.keys == 1 and len(hooks.applied) == 3
    assert r.run_once() is True  # auditor keys changed
    assert (
        hooks.keys == 2 and hooks.applied[-1].auditor_keys == settings(auditors=(A2,)).auditor_keys
    )


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (Reply(200, host_doc(auditors=())), "no auditor public key"),
        (Reply(200, host_doc(host_id="web-2")), "'web-2', not 'web-1'"),
        (Reply(500, {"detail": "boom"}), "collector answered 500"),
        (ShipError("collector https://x: cannot connect"), "cannot connect"),
        (Reply(200, host_doc(cas=("ssh-ed25519 !!",))), "base64"),
        (Reply(200, {}), "host_id"),
    ],
)
def test_a_refused_refresh_keeps_the_cache(
    tmp_path: Path, answer: Reply | Exception, error: str
) -> None:
    hooks = Hooks()
    r = refresher(tmp_path, FakeTransport(Reply(200, host_doc()), answer), hooks)
    assert r.run_once() is True
    cache = {k: v for k, v in snapshot(tmp_path).items() if k != f"lib/{STATUS_FILE}"}
    first_success = status(tmp_path)["last_success"]
    assert r.run_once() is False
    assert {k: v for k, v in snapshot(tmp_path).items() if k != f"lib/{STATUS_FILE}"} == cache
    doc = status(tmp_path)
    assert error in doc["last_error"] and error in r.last_error
    assert doc["last_success"] == first_success  # still the earlier one
    assert doc["last_attempt"] > first_success
    assert hooks.keys == 1 and len(hooks.applied) == 1
