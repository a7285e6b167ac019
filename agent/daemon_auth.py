"""From the daemon's messages to authentication observations (agent/authlog.py
``Observation``): the principals command's AUTH message and the PAM hook's phases.

Invariants: every field from a message is type- and size-checked here (the principals
command runs as an unprivileged user: its message is a claim about one attempt, checked
for origin by agent/peer.py, and bounded here); the attempt is tied to sshd's monitor
process (``pid``), the same one the PAM hook reports as ``priv_pid``, and to the client's
address and port, which is how agent/authmerge.py joins the sources of one attempt.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import psutil

from sshaudit.agent.authlog import Kind, Observation, Source
from sshaudit.agent.reconcile import PamEvent, PamPhase
from sshaudit.agent.sshcert import parse_user_auth
from sshaudit.errors import FormatError


def _text(doc: Mapping[str, Any], name: str, limit: int) -> str:
    value = doc.get(name, "")
    return value[:limit] if isinstance(value, str) else ""


def _int(value: object, high: int) -> int | None:
    return value if type(value) is int and 0 <= value <= high else None


def _address(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return ""


def principals_observation(doc: Mapping[str, Any], monitor_pid: int) -> Observation:
    when = doc.get("time")
    at = (
        datetime.fromtimestamp(when, UTC)
        if isinstance(when, float | int) and 0 < when < 1 << 40
        else datetime.now(UTC)
    )
    allowed = doc.get("allowed")
    address, port = _address(_text(doc, "client_address", 64)), _int(doc.get("client_port"), 65535)
    if not address or port is None:
        address, port = _peer_of(monitor_pid)  # sshd gives the command no %C (9.2)
    return Observation(
        source=Source.PRINCIPALS,
        time=at,
        kind=Kind.DECISION,
        client_address=address,
        client_port=port,
        unix_user=_text(doc, "unix_user", 64),
        method="certificate",
        allowed=allowed if isinstance(allowed, bool) else False,
        reason=_text(doc, "reason", 1024),
        user_email=_text(doc, "user_email", 320),
        cert_serial=_int(doc.get("cert_serial"), (1 << 64) - 1),
        cert_fingerprint=_text(doc, "cert_fingerprint", 128),
        pid=monitor_pid,
        rule=_text(doc, "rule", 64),
    )


def _peer_of(pid: int) -> tuple[str, int | None]:
    """The client end of the SSH connection sshd's monitor ``pid`` holds (it keeps the TCP
    socket open across privilege separation)."""
    try:
        for conn in psutil.Process(pid).net_connections(kind="tcp"):
            if conn.raddr and conn.status == psutil.CONN_ESTABLISHED:
                return str(conn.raddr.ip), int(conn.raddr.port)
    except psutil.Error:
        pass
    return "", None


def session_observation(priv_pid: int, session_id: str, user: str, at: datetime) -> Observation:
    """A recorder started for the connection of sshd monitor ``priv_pid``: this is what
    completes the login's event, so it carries the session id (DESIGN.md: ``session_id``,
    when a session followed). A login whose recorder never comes is completed by the
    merger's settle time instead, without one."""
    return Observation(
        source=Source.PAM,
        time=at,
        kind=Kind.SESSION_OPEN,
        unix_user=user,
        allowed=True,
        pid=priv_pid,
        session_id=session_id,
    )


def pam_observation(event: PamEvent) -> Observation | None:
    """``account`` (sshd's pam_acct_mgmt passed) and ``open_session`` (both "allowed so
    far": the recorder's start completes the login, :func:`session_observation`); None for
    the rest."""
    kinds = {PamPhase.ACCOUNT: Kind.ACCOUNT, PamPhase.OPEN: Kind.ACCOUNT}
    kind = kinds.get(event.phase)
    if kind is None or event.queued:
        return None
    address, port = _peer_of(event.priv_pid)
    method, email, serial, fingerprint = "", "", None, ""
    try:
        info = parse_user_auth(event.auth_info) if event.auth_info else None
    except FormatError:
        info = None
    if info is not None and info.certificate is not None:
        method, email = "certificate", info.certificate.key_id
        serial, fingerprint = info.certificate.serial, info.key_fingerprint
    elif info is not None:
        method, fingerprint = "publickey", info.key_fingerprint
    return Observation(
        source=Source.PAM,
        time=event.at,
        kind=kind,
        client_address=address or _address(event.rhost),
        client_port=port,
        unix_user=event.user,
        method=method,
        allowed=True,
        reason="",
        user_email=email,
        cert_serial=serial,
        cert_fingerprint=fingerprint,
        pid=event.priv_pid,
    )
