"""The auditor's client of the collector (docs/collector.md "Querying and downloading"):
connection settings, listings with cursor paging, one session, and resumable downloads.

Invariants:
- the collector is reached only through ``pinned_session`` (collector/pinning.py): TLS with
  exactly the pinned certificate, before the token is sent; plain ``http://`` is refused;
- the token is read from its file only, sent only as ``Authorization: Bearer`` (RFC 6750),
  and never appears in a message, not even in an error;
- every HTTP or network failure becomes one :class:`SSHAuditError` whose message names the
  collector's ``error`` code; third-party exceptions never escape;
- a download lands at ``FILE`` only whole: it grows in ``FILE.part`` (resumed with an RFC 9110
  ``Range`` request when that exists), its size is checked against ``Content-Length``,
  ``Content-Range`` and the ``ETag``, its sealed header must parse and name the session, and
  only then is it fsynced and renamed over ``FILE``.
"""

from __future__ import annotations

import re
import stat
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from sshaudit.errors import SSHAuditError, UsageError

CONFIG_KEYS = ("collector", "token_file", "fingerprint")
TIMEOUT = (10.0, 60.0)  # connect, read (seconds)
CHUNK = 256 * 1024
PAGE_MAX = 1000  # the collector's largest ``limit``
Progress = Callable[[int, int | None], object]  # bytes held so far, total if known
Warn = Callable[[str], object]


@dataclass(frozen=True)
class Settings:
    """Where the collector is and how to trust and authenticate to it."""

    collector: str
    token_file: str
    fingerprint: str


def default_config_path(env: Mapping[str, str]) -> Path:
    """``$XDG_CONFIG_HOME/sshaudit/auditor.toml`` (XDG Base Directory spec), else ~/.config."""
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".config")
    return Path(base) / "sshaudit" / "auditor.toml"


def _read_config(path: Path, explicit: bool) -> dict[str, str]:
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise UsageError(f"{path}: no such config file") from None
        return {}
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from exc
    unknown = sorted(set(doc) - set(CONFIG_KEYS))
    if unknown:
        raise UsageError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(CONFIG_KEYS)})")
    for key, value in doc.items():
        if not isinstance(value, str) or not value:
            raise UsageError(f"{path}: {key} must be a non-empty string")
    return dict(doc)


def load_settings(
    flags: Mapping[str, str | None], config: str | None, env: Mapping[str, str]
) -> Settings:
    """Flags (``collector``, ``token_file``, ``fingerprint``) override the config file."""
    path = Path(config) if config else default_config_path(env)
    values = _read_config(path, explicit=config is not None)
    for key in CONFIG_KEYS:
        if flags.get(key):
            values[key] = str(flags[key])
    missing = [k for k in CONFIG_KEYS if not values.get(k)]
    if missing:
        flag = "--" + missing[0].replace("_", "-")
        raise UsageError(f"no {missing[0]}: give {flag} or set it in {path}")
    url = values["collector"].rstrip("/")
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise UsageError(f"collector {url!r}: must be an https:// URL")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise UsageError("collector URL: no user, password, query or fragment (tokens have a file)")
    token_file = str(Path(values["token_file"]).expanduser())
    return Settings(url, token_file, values["fingerprint"])


_TOKEN_RE = re.compile(r"^[\x21-\x7e]{1,512}$")  # RFC 6750 b64token is a subset of this


def read_token(path: str, warn: Warn) -> str:
    try:
        st = Path(path).stat()
        with Path(path).open(encoding="ascii") as f:
            text = f.read(4096)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not ASCII text"
        raise UsageError(f"{path}: cannot read the token file: {reason}") from exc
    token = text.strip()
    if not _TOKEN_RE.match(token):
        raise UsageError(f"{path}: the token file must hold one token on one line")
    if stat.S_IMODE(st.st_mode) & 0o077:
        warn(f"warning: {path} is readable by others; chmod 600 it")
    return token


def iso_time(value: str, flag: str) -> str:
    """An RFC 3339 time for a filter; a time without a zone is taken as UTC."""
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{flag}: {value!r} is not a time like 2026-11-22T09:00:00Z") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _detail(doc: Any) -> str:
    detail = doc.get("detail") if isinstance(doc, dict) else None
    if isinstance(detail, list):  # 422 invalid_request: [{"loc", "msg", "type"}]
        return "; ".join(str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail)
    return str(detail) if detail else ""


def http_error(resp: requests.Response, action: str) -> SSHAuditError:
    """One line for a refused request: what failed and the collector's ``error`` code."""
    try:
        doc = resp.json()
    except ValueError:
        doc = None
    code = doc.get("error") if isinstance(doc, dict) else None
    code = str(code) if code else f"HTTP {resp.status_code}"
    detail = _detail(doc)
    if resp.status_code == 401:
        return SSHAuditError(
            f"token rejected by the collector ({code}): {detail or 'log in again'}"
        )
    if resp.status_code == 403 and code == "wrong_role":
        return SSHAuditError(f"this token's role may not {action} ({code}); use an auditor token")
    text = f"collector refused to {action}: {code}"
    return SSHAuditError(f"{text}: {detail}" if detail else text)


class Collector:
    """The collector's query API for an auditor token, over a given requests session."""

    def __init__(self, url: str, token: str, session: requests.Session) -> None:
        self.url = url.rstrip("/")
        self._http = session
        self.page_size = PAGE_MAX
        self._http.headers["Authorization"] = f"Bearer {token}"

    @classmethod
    def connect(cls, settings: Settings, warn: Warn) -> Collector:
        from sshaudit.collector.pinning import pinned_session

        try:
            session = pinned_session(settings.fingerprint)
        except (ValueError, SSHAuditError) as exc:
            raise UsageError(f"fingerprint: {exc}") from exc
        return cls(settings.collector, read_token(settings.token_file, warn), session)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(
        self, path: str, action: str, params: Mapping[str, str] | None = None, **kw: Any
    ) -> requests.Response:
        try:
            return self._http.get(self.url + path, params=params, timeout=TIMEOUT, **kw)
        except requests.exceptions.SSLError as exc:
            raise SSHAuditError(
                f"TLS with {self.url} failed: its certificate is not the pinned one "
                "(check --fingerprint) or TLS did not complete"
            ) from exc
        except requests.exceptions.InvalidSchema as exc:
            raise UsageError(str(exc)) from exc
        except requests.exceptions.RequestException as exc:
            raise SSHAuditError(f"cannot reach the collector at {self.url}: {_why(exc)}") from exc

    def get_json(self, path: str, action: str, params: Mapping[str, str] | None = None) -> Any:
        resp = self._get(path, action, params)
        if resp.status_code != 200:
            raise http_error(resp, action)
        try:
            return resp.json()
        except ValueError as exc:
            raise SSHAuditError(f"the collector sent no JSON for {path}") from exc

    def pages(
        self, path: str, action: str, filters: Mapping[str, str], limit: int
    ) -> Iterator[dict[str, Any]]:
        """Items of ``path`` newest first, following ``next_cursor``; ``limit`` 0 is all."""
        cursor: str | None = None
        left = limit
        while True:
            params = dict(filters)
            params["limit"] = str(min(left, self.page_size) if limit else self.page_size)
            if cursor:
                params["cursor"] = cursor
            doc = self.get_json(path, action, params)
            items = doc.get("items") if isinstance(doc, dict) else None
            if not isinstance(items, list):
                raise SSHAuditError(f"the collector's answer for {path} has no items")
            yield from items
            left -= len(items)
            cursor = doc.get("next_cursor")
            if not cursor or not items or (limit and left <= 0):
                return

    def sessions(self, filters: Mapping[str, str], limit: int) -> Iterator[dict[str, Any]]:
        return self.pages("/v1/sessions", "list sessions", filters, limit)

    def auth_events(self, filters: Mapping[str, str], limit: int) -> Iterator[dict[str, Any]]:
        return self.pages("/v1/auth-events", "list authentication events", filters, limit)

    def session(self, session_id: str) -> dict[str, Any]:
        doc = self.get_json(f"/v1/sessions/{_segment(session_id)}", "read sessions")
        if not isinstance(doc, dict):
            raise SSHAuditError("the collector's session record is not an object")
        return doc

    def download(
        self, session_id: str, output: str, progress: Progress, warn: Warn
    ) -> DownloadResult:
        from sshaudit.auditor.remote_download import download

        return download(self, session_id, output, progress, warn)

    def open_recording(self, session_id: str, headers: Mapping[str, str]) -> requests.Response:
        path = f"/v1/sessions/{_segment(session_id)}/recording"
        return self._get(path, "download recordings", headers=dict(headers), stream=True)


@dataclass(frozen=True)
class DownloadResult:
    length: int
    resumed_from: int
    state: str  # X-Sshaudit-Recording-State: "open" or "sealed_verified"


_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")


def _segment(value: str) -> str:
    """A session id as one URL path segment: refused when it could be anything else."""
    if not _SEGMENT_RE.match(value) or value in (".", ".."):
        raise UsageError(f"{value!r} is not a session id")
    return quote(value, safe="")


def _why(exc: requests.exceptions.RequestException) -> str:
    if isinstance(exc, requests.exceptions.Timeout):
        return "timed out"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return "connection failed"
    return type(exc).__name__
