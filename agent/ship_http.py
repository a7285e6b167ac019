"""The shipper's way to the collector: one pinned HTTPS session (collector/pinning.py) with
the host credential, behind the small :class:`Transport` interface the shipper's loop takes
(tests pass a fake one).

Invariants:
- the collector's certificate is trusted by its pinned SHA-256 fingerprint alone, checked
  after the handshake and before a byte of the request (and so the credential) is sent;
- the credential is read from its own file, which must be a regular file owned by the
  daemon's user and closed to group and others (0600), and is never logged or put in an
  error message; every ``requests`` failure becomes a :class:`ShipError` here;
- every response body is read whole, so the connection is kept for the next request.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import requests

from sshaudit.collector.pinning import pinned_session
from sshaudit.errors import ConfigError, SSHAuditError

MAX_CREDENTIAL_FILE = 4096
MAX_REPLY = 1 << 20
# A host credential as collector/tokens.py makes it: sa_host_ + 32 bytes in base64url.
_CREDENTIAL_RE = re.compile(r"sa_host_[A-Za-z0-9_-]{43}")
TIMEOUT = (10.0, 120.0)  # connect, read (a chunk's answer waits for the collector's fsync)


class ShipError(SSHAuditError):
    """The collector could not be reached (network, TLS, pin mismatch, timeout)."""


@dataclass(frozen=True)
class Reply:
    """An HTTP answer: the status and the JSON object of the body ({} when it has none)."""

    status: int
    body: Mapping[str, Any] = field(default_factory=dict)


class Transport(Protocol):
    def send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        json_body: Any = None,
    ) -> Reply:
        """Send one request to the collector; raises :class:`ShipError` when it is not
        reached (an HTTP error status is a :class:`Reply`, not an exception)."""
        ...

    def close(self) -> None:
        """Release the connections (the shipper is stopping)."""
        ...


def load_credential(path: Path) -> str:
    """The host credential (``sa_host_...``) from ``path``: a regular file owned by this
    user, mode 0600 or stricter. Messages name the file, never its content."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"collector.credential_file {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"collector.credential_file {path}: not a regular file")
        if st.st_uid != os.geteuid():
            raise ConfigError(
                f"collector.credential_file {path}: owned by uid {st.st_uid}, must be "
                f"uid {os.geteuid()}"
            )
        if st.st_mode & 0o077:
            raise ConfigError(
                f"collector.credential_file {path}: mode {stat.S_IMODE(st.st_mode):04o} lets "
                "others read it; chmod 600 it"
            )
        data = os.read(fd, MAX_CREDENTIAL_FILE + 1)
    finally:
        os.close(fd)
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        token = ""
    if len(data) > MAX_CREDENTIAL_FILE or not _CREDENTIAL_RE.fullmatch(token):
        raise ConfigError(
            f"collector.credential_file {path}: not a host credential (sa_host_..., as "
            "enrollment returns it)"
        )
    return token


def _reason(exc: requests.RequestException) -> str:
    text = str(exc)
    if isinstance(exc, requests.exceptions.SSLError) and "ingerprint" in text:
        return "TLS: the collector's certificate is not the pinned one (collector.fingerprint)"
    if isinstance(exc, requests.exceptions.Timeout):
        return "timed out"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return f"cannot connect: {text[:300]}"
    return f"{type(exc).__name__}: {text[:300]}"


class HttpTransport:
    """:class:`Transport` over HTTPS, pinned, with ``Authorization: Bearer <credential>``."""

    def __init__(
        self,
        url: str,
        fingerprint: str,
        credential: str,
        *,
        timeout: tuple[float, float] = TIMEOUT,
    ) -> None:
        self.url = url.rstrip("/")
        self._timeout = timeout
        self._session = pinned_session(fingerprint)
        self._session.headers["Authorization"] = f"Bearer {credential}"
        self._session.headers["User-Agent"] = "sshaudit-agent"

    def send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        json_body: Any = None,
    ) -> Reply:
        headers = {"Content-Type": "application/octet-stream"} if content is not None else {}
        try:
            resp = self._session.request(
                method,
                self.url + path,
                params=params,
                data=content,
                json=json_body,
                headers=headers,
                timeout=self._timeout,
            )
            raw = resp.content[: MAX_REPLY + 1]
        except requests.RequestException as exc:
            raise ShipError(f"collector {self.url}: {_reason(exc)}") from exc
        return Reply(resp.status_code, _json_object(raw))

    def close(self) -> None:
        self._session.close()


def _json_object(raw: bytes) -> Mapping[str, Any]:
    if len(raw) > MAX_REPLY:
        return {}
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    return doc if isinstance(doc, dict) else {}
