"""``sshaudit-agent enroll`` and ``unenroll`` (issue 5, DESIGN.md "Installing on a server").

Enroll: exchange a one-time token for a host credential at the pinned collector, write the
agent's files, edit sshd_config and sshd's PAM file (installer/, pure edits applied as one
transaction with backups), validate with ``sshd -t``, start the daemon, reload sshd.
Unenroll: put sshd's files back byte for byte, reload sshd, stop the daemon, remove what
enroll created (the spool stays while it holds anything unshipped).

Invariants:
- nothing is half done: sshd's files change only after the agent's files are in place and
  the daemon listens, and a failed ``sshd -t`` (or any error after the edit) rolls every
  edited file back before the error is shown;
- the order keeps logins working: the daemon runs before sshd is told about the
  ForceCommand, and on unenroll sshd forgets the ForceCommand before the daemon stops;
- idempotent: a second enroll against the same collector reuses the credential (an
  enrollment token works once) and changes nothing that is already right;
- secrets (host key, credential) are written 0600 and never printed.
"""

from __future__ import annotations

import json
import shutil
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sshaudit.agent import enroll_proc, enroll_sshd
from sshaudit.agent.config import load_config, parse_config
from sshaudit.agent.hostconfig import HostSettings, parse_host_config
from sshaudit.agent.layout import Layout
from sshaudit.agent.refresh import IdentityPaths, apply_settings
from sshaudit.agent.ship_files import write_atomic
from sshaudit.agent.ship_http import HttpTransport, load_credential
from sshaudit.collector.pinning import pinned_session
from sshaudit.errors import ConfigError, SSHAuditError, UsageError
from sshaudit.keys import ed25519_private_from_text, ed25519_private_text

Say = Callable[[str], None]


@dataclass(frozen=True)
class EnrollOptions:
    collector: str
    token: str
    fingerprint: str
    layout: Layout
    sshd: enroll_sshd.SshdTarget
    hostname: str = ""
    sshd_log: str = "journal"
    principals_user: str = "sshaudit-principals"
    dry_run: bool = False
    start: bool = True
    refresh_seconds: float = 300.0


def _toml_string(value: str) -> str:
    """A TOML 1.0 basic string. JSON's escapes are TOML's, except that TOML has no
    surrogate-pair escapes (``\\ud83d\\ude00``, which ``ensure_ascii`` makes of a character
    beyond U+FFFF) and needs U+007F escaped: so non-ASCII is written as UTF-8, DEL escaped."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ConfigError(f"not UTF-8 text (cannot go in agent.toml): {value!r}") from None
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml(doc: dict[str, Any]) -> str:
    """TOML for the flat agent config (JSON strings are TOML basic strings)."""
    lines, tables = [], []
    for key, value in doc.items():
        (tables.append((key, value)) if isinstance(value, dict) else lines.append((key, value)))

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return _toml_string(v) if isinstance(v, str) else json.dumps(v)

    out = ["# sshaudit agent configuration (written by sshaudit-agent enroll)"]
    out += [f"{k} = {val(v)}" for k, v in lines]
    for name, table in tables:
        out += ["", f"[{name}]", *(f"{k} = {val(v)}" for k, v in table.items())]
    return "\n".join(out) + "\n"


def agent_config_text(opts: EnrollOptions, host_id: str) -> str:
    lay = opts.layout
    doc: dict[str, Any] = {
        "socket": str(lay.socket),
        "spool_dir": str(lay.spool),
        "host_id": host_id,
        "host_key_file": str(lay.host_key),
        "recipients_dir": str(lay.auditors),
        "collector": {
            "url": opts.collector.rstrip("/"),
            "fingerprint": opts.fingerprint,
            "credential_file": str(lay.credential),
            "refresh_seconds": opts.refresh_seconds,
        },
        "identity": {
            "ca_keys_file": str(lay.ca_keys),
            "policy_file": str(lay.policy),
            "sshd_log": opts.sshd_log,
            "principals_user": opts.principals_user,
        },
    }
    return _toml(doc)


# -- the collector --------------------------------------------------------------------


def _post_enroll(opts: EnrollOptions, host_key: Ed25519PrivateKey) -> dict[str, Any]:
    import base64

    public = host_key.public_key().public_bytes_raw()
    body = {
        "hostname": opts.hostname or socket.gethostname(),
        "host_public_key": base64.b64encode(public).decode(),
    }
    session = pinned_session(opts.fingerprint)
    try:
        resp = session.post(
            opts.collector.rstrip("/") + "/v1/enroll",
            json=body,
            headers={"Authorization": f"Bearer {opts.token}"},
            timeout=(10, 60),
        )
        doc = resp.json() if resp.content else {}
    except (requests.RequestException, ValueError) as exc:
        raise SSHAuditError(f"cannot enroll at {opts.collector}: {exc}") from exc
    finally:
        session.close()
    if resp.status_code != 200 or not isinstance(doc, dict):
        detail = doc.get("detail", doc) if isinstance(doc, dict) else resp.text[:300]
        raise SSHAuditError(f"the collector refused enrollment ({resp.status_code}): {detail}")
    return doc


def _previous(opts: EnrollOptions) -> dict[str, Any] | None:
    """The earlier enrollment with this collector, if its credential is still here."""
    try:
        doc = json.loads(opts.layout.enrollment.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("collector") != opts.collector.rstrip("/"):
        return None
    return doc if opts.layout.credential.exists() else None


def _host_key(layout: Layout) -> Ed25519PrivateKey:
    if layout.host_key.exists():
        return ed25519_private_from_text(layout.host_key.read_bytes())
    key = Ed25519PrivateKey.generate()
    layout.etc.mkdir(parents=True, exist_ok=True, mode=0o755)
    write_atomic(layout.etc, layout.host_key.name, ed25519_private_text(key), 0o600)
    return key


# -- enroll ---------------------------------------------------------------------------


def _make_dirs(layout: Layout) -> None:
    for d in (layout.etc, layout.lib, layout.libexec, layout.run):
        d.mkdir(parents=True, exist_ok=True, mode=0o755)
    layout.backups.mkdir(parents=True, exist_ok=True, mode=0o700)


def _fetch_settings(opts: EnrollOptions, say: Say) -> tuple[HostSettings, bool]:
    """(settings, new_enrollment)."""
    lay = opts.layout
    previous = _previous(opts)
    if previous is not None:
        say(f"already enrolled at {opts.collector} as host {previous['host_id']}: re-applying")
        transport = HttpTransport(opts.collector, opts.fingerprint, load_credential(lay.credential))
        try:
            reply = transport.send("GET", "/v1/host/config")
        finally:
            transport.close()
        if reply.status != 200:
            raise SSHAuditError(f"collector answered {reply.status} for this host's config")
        return parse_host_config(reply.body), False
    key = _host_key(lay)
    doc = _post_enroll(opts, key)
    settings = parse_host_config(doc)  # checked before anything is written from it
    credential = doc.get("credential")
    if not isinstance(credential, str):
        raise SSHAuditError("the collector's answer has no credential")
    write_atomic(lay.etc, lay.credential.name, credential.encode() + b"\n", 0o600)
    say(f"enrolled at {opts.collector} as host {settings.host_id}")
    return settings, True


def _write_agent_files(opts: EnrollOptions, settings: HostSettings) -> None:
    lay = opts.layout
    enroll_sshd.write_launchers(lay)
    write_atomic(
        lay.etc, lay.config.name, agent_config_text(opts, settings.host_id).encode(), 0o644
    )
    load_config(lay.config)  # what we wrote must be what the daemon accepts
    paths = IdentityPaths(lay.ca_keys, lay.policy, lay.auditors)
    apply_settings(paths, settings, datetime.now(UTC))


def enroll(opts: EnrollOptions, say: Say = print) -> int:
    lay = opts.layout
    if opts.dry_run:
        plan = enroll_sshd.plan(opts.sshd, lay, opts.principals_user, {})
        say(plan.diff or "sshd and PAM: nothing to change")
        for note in plan.notes:
            say(f"note: {note}")
        return 0
    # Every option must make a valid config before the one-time token is spent.
    parse_config(tomllib.loads(agent_config_text(opts, "pending")), "the options")
    _make_dirs(lay)
    settings, new = _fetch_settings(opts, say)
    _write_agent_files(opts, settings)
    record = {
        "collector": opts.collector.rstrip("/"),
        "fingerprint": opts.fingerprint,
        "host_id": settings.host_id,
        "enrolled_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "sshd_config": str(opts.sshd.config),
        "pam_file": str(opts.sshd.pam_file),
        "sshd": str(opts.sshd.binary),
    }
    if new or not lay.enrollment.exists():
        write_atomic(lay.lib, lay.enrollment.name, json.dumps(record, indent=1).encode(), 0o600)
    if opts.start:
        say(enroll_proc.start_daemon(lay))
    try:
        changed = enroll_sshd.apply(opts.sshd, lay, opts.principals_user, settings.policy, say)
    except BaseException:
        # sshd's files are back as they were: no daemon either. The credential stays, so
        # running enroll again after fixing the cause needs no new token.
        if opts.start:
            say(enroll_proc.stop_daemon(lay))
        raise
    if changed:
        say(enroll_proc.sshd_reload(opts.sshd.binary, opts.sshd.config))
    else:
        say("sshd and PAM already set up: nothing changed")
    say(f"done: host {settings.host_id} is recorded; `sshaudit-agent status` checks it")
    return 0


# -- unenroll -------------------------------------------------------------------------


def unenroll(layout: Layout, say: Say = print, *, force: bool = False) -> int:
    try:
        record = json.loads(layout.enrollment.read_text())
    except FileNotFoundError:
        raise UsageError(f"not enrolled: {layout.enrollment} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{layout.enrollment}: {exc}") from exc
    target = enroll_sshd.SshdTarget(
        Path(record["sshd_config"]), Path(record["pam_file"]), Path(record["sshd"])
    )
    for path in enroll_sshd.restore(target, layout, force=force):
        say(f"restored {path}")
    say(enroll_proc.sshd_reload(target.binary, target.config))
    say(enroll_proc.stop_daemon(layout))
    for path in enroll_sshd.created_files(layout):
        path.unlink(missing_ok=True)
    for d in (layout.auditors, layout.backups, layout.libexec):
        shutil.rmtree(d, ignore_errors=True)
    leftover = [p for p in layout.spool.glob("*")] if layout.spool.exists() else []
    if leftover:
        say(f"kept {layout.spool}: {len(leftover)} files not yet shipped")
    say(f"unenrolled host {record.get('host_id', '?')}: sshd runs as before enrollment")
    return 0
