"""The agent's configuration: one TOML file (docs/agent-config.md), validated with pydantic.

Invariants:
- every value is checked before the daemon starts; a bad file gives one
  :class:`~sshaudit.errors.ConfigError` naming the file and the key (``policy.frame_interval``),
  never a traceback and never a silently ignored key (unknown keys are errors: a misspelt
  policy must not fall back to a default unnoticed);
- the models are frozen: the running daemon's view of its config never changes;
- paths are absolute (the daemon runs from ``/``, a relative path would be ambiguous);
- the optional ``[collector]`` table (shipping, DESIGN.md "Shipping") names an ``https://``
  URL and the collector certificate's pin; the credential itself lives in its own 0600 file
  (this file is world-readable: the recorder reads it as the user);
- key files are read here (:func:`load_sealing_keys`) with their modes checked: the host
  signing key must not be readable by anyone but its owner. No message quotes key material.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from sshaudit.collector.tls import parse_fingerprint
from sshaudit.errors import ConfigError, KeyFileError, UsageError
from sshaudit.keys import AuditorPublicKey, decode_key_text

DEFAULT_CONFIG = Path("/etc/sshaudit/agent.toml")
MAX_CONFIG_BYTES = 1 << 20
MAX_KEY_FILE = 4096
_HOST_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,252}")
_USER_RE = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]{0,31}\$?")
_HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
# One stored frame at its largest (FORMAT.md: u32 length + 1 MiB + 16-byte tag) must fit in
# a chunk, or a recording with such a frame could never be shipped. The collector takes
# chunks up to its --max-chunk (8 MiB by default).
MIN_UPLOAD_CHUNK = 4 + (1 << 20) + 16
MAX_UPLOAD_CHUNK = 64 << 20


class OnDaemonDown(Enum):
    """What the recorder does when the daemon cannot be reached (DESIGN.md "The recorder")."""

    DENY = "deny"
    ALLOW = "allow"


class OnSpoolFull(Enum):
    """What the daemon does when the spool is at its size cap (DESIGN.md "Shipping")."""

    REFUSE = "refuse"
    DROP_OLDEST = "drop_oldest"


def _absolute(path: Path) -> Path:
    if not path.is_absolute():
        raise ValueError("must be an absolute path")
    if "\x00" in str(path):
        raise ValueError("must not contain NUL")
    return path


def _host_id(value: str) -> str:
    if not _HOST_ID_RE.fullmatch(value):
        raise ValueError("must be 1-253 characters of letters, digits and . _ : @ - ")
    return value


def _user_names(value: tuple[str, ...]) -> tuple[str, ...]:
    for name in value:
        if not _USER_RE.fullmatch(name):
            raise ValueError(f"{name!r} is not a valid unix user name")
    return value


def _collector_url(value: str) -> str:
    """``https://host[:port][/prefix]``: no user, query or fragment; no trailing slash."""
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError for a port that is not 0-65535
    except ValueError as exc:
        raise ValueError("must be a URL like https://collector.example.com:8443") from exc
    if parts.scheme != "https":
        raise ValueError("must be an https:// URL (the collector is reached over TLS only)")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not hold a user name or password (the credential has its file)")
    if parts.query or parts.fragment or "\x00" in value or port == 0:
        raise ValueError("must be https://host[:port][/path], with no query or fragment")
    host = parts.hostname or ""
    if not _HOST_RE.fullmatch(host):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not a host name or IP address") from None
    return value.rstrip("/")


def _fingerprint(value: str) -> str:
    """Stored normalised as ``SHA256:<64 lowercase hex digits>`` (collector/tls.py)."""
    try:
        return "SHA256:" + parse_fingerprint(value)
    except UsageError as exc:
        raise ValueError(str(exc)) from None


AbsPath = Annotated[Path, AfterValidator(_absolute)]
_FROZEN = ConfigDict(frozen=True, extra="forbid", strict=True)


class PolicyConfig(BaseModel):
    """The ``[policy]`` table."""

    model_config = _FROZEN

    on_daemon_down: Annotated[OnDaemonDown, Field(strict=False)] = OnDaemonDown.DENY
    break_glass_users: Annotated[tuple[str, ...], AfterValidator(_user_names)] = Field(
        default=(), strict=False
    )
    record_input: bool = True
    exec_capture_cap: int = Field(default=1 << 20, ge=0, le=1 << 40)
    exec_hash: bool = True
    spool_max_bytes: int = Field(default=1 << 30, ge=1 << 20, le=1 << 50)
    on_spool_full: Annotated[OnSpoolFull, Field(strict=False)] = OnSpoolFull.REFUSE
    # Shares of the spool one session and one user may hold, checked on every append
    # (agent/quota.py): one user cannot fill the spool for everyone else.
    spool_session_max_bytes: int = Field(default=256 << 20, ge=1 << 20, le=1 << 50)
    spool_user_max_bytes: int = Field(default=512 << 20, ge=1 << 20, le=1 << 50)
    # Concurrent connections to the daemon's socket per non-root uid (agent/admission.py):
    # a flood from one user is closed at accept, before a byte of it is read.
    max_connections_per_user: int = Field(default=128, ge=1, le=1 << 20)
    frame_interval: float = Field(default=1.0, gt=0.0, le=60.0, strict=False)
    frame_max_bytes: int = Field(default=65536, ge=1024, le=1 << 20)
    handshake_timeout: float = Field(default=30.0, gt=0.0, le=600.0, strict=False)
    # Longer than the recorder's handshake limit (handshake_timeout): in a burst of
    # logins a recorder may wait that long to be accepted, and is not 'unrecorded' meanwhile.
    reconcile_grace: float = Field(default=35.0, gt=0.0, le=600.0, strict=False)


class CollectorConfig(BaseModel):
    """The ``[collector]`` table: where the daemon ships its spool (absent: no shipping)."""

    model_config = _FROZEN

    url: Annotated[str, Field(min_length=1, max_length=2048), AfterValidator(_collector_url)]
    fingerprint: Annotated[str, Field(max_length=200), AfterValidator(_fingerprint)]
    credential_file: Annotated[AbsPath, Field(strict=False)] = Path("/etc/sshaudit/collector.token")
    upload_chunk_bytes: int = Field(default=2 << 20, ge=MIN_UPLOAD_CHUNK, le=MAX_UPLOAD_CHUNK)
    retry_max_seconds: float = Field(default=300.0, ge=1.0, le=86400.0)
    # How often the daemon fetches CA keys, auditor keys and policy (DESIGN.md "Identity":
    # rotation reaches hosts within this); the cached copies serve meanwhile.
    refresh_seconds: float = Field(default=300.0, ge=1.0, le=86400.0)


class IdentityConfig(BaseModel):
    """The ``[identity]`` table (written by ``sshaudit-agent enroll``): where the daemon keeps
    what it fetches for sshd, and where it reads sshd's log for authentication events."""

    model_config = _FROZEN

    # TrustedUserCAKeys (sshd_config(5)): sshd reads it at every attempt, no reload needed.
    ca_keys_file: Annotated[AbsPath, Field(strict=False)] = Path("/etc/sshaudit/user_ca_keys.pub")
    # The cached policy the principals command reads (world-readable, root-owned).
    policy_file: Annotated[AbsPath, Field(strict=False)] = Path("/var/lib/sshaudit/policy.json")
    # "journal" (journalctl -o json -f), "off", or the absolute path sshd writes with -E.
    sshd_log: Annotated[str, Field(min_length=1, max_length=4096)] = "journal"
    # systemd units journalctl follows (Debian names it ssh, RHEL sshd).
    journal_units: tuple[Annotated[str, Field(pattern=r"^[A-Za-z0-9@._-]{1,128}$")], ...] = (
        "ssh.service",
        "sshd.service",
    )
    # The uid the principals command runs as (AuthorizedPrincipalsCommandUser): the only
    # non-root peer whose AUTH observations the daemon takes.
    principals_user: Annotated[str, AfterValidator(lambda v: _user_names((v,))[0])] = (
        "sshaudit-principals"
    )


class AgentConfig(BaseModel):
    """The whole file. ``host_id`` and ``recipients`` have no sensible default."""

    model_config = _FROZEN

    socket: Annotated[AbsPath, Field(strict=False)] = Path("/run/sshaudit/agent.sock")
    spool_dir: Annotated[AbsPath, Field(strict=False)] = Path("/var/spool/sshaudit")
    host_id: Annotated[str, AfterValidator(_host_id)]
    host_key_file: Annotated[AbsPath, Field(strict=False)] = Path("/etc/sshaudit/host.key")
    recipients: tuple[Annotated[AbsPath, Field(strict=False)], ...] = Field(
        default=(), max_length=256, strict=False
    )
    # Every *.pub file in it is a recipient too: the daemon keeps it in step with the
    # collector's auditor keys (rotation without editing this file).
    recipients_dir: Annotated[AbsPath | None, Field(strict=False)] = None
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    collector: CollectorConfig | None = None
    identity: IdentityConfig | None = None

    @model_validator(mode="after")
    def _some_recipient(self) -> AgentConfig:
        if not self.recipients and self.recipients_dir is None:
            raise ValueError("recipients: at least one auditor public key (or recipients_dir)")
        return self


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif not item.startswith(("function-", "model-")):
            # pydantic names validators in loc for Annotated chains: keep the key names only.
            out += f".{item}" if out else item
    return out


_MESSAGES = {
    "missing": "required key is missing",
    "extra_forbidden": "unknown key (see docs/agent-config.md)",
    "model_type": "must be a TOML table",
    "model_attributes_type": "must be a TOML table",
    "path_type": "must be a path (a string)",
    "tuple_type": "must be a list",
}


def _describe(exc: ValidationError) -> str:
    lines = []
    errors = exc.errors(include_url=False, include_input=False)
    for err in errors:
        if err["type"] == "too_short" and len(errors) > 1:
            continue  # a list whose items failed is "too short" too: say it once
        msg = _MESSAGES.get(err["type"], err["msg"]).removeprefix("Value error, ")
        where = _where(err["loc"])
        lines.append(f"{where}: {msg}" if where else msg)  # whole-file checks name their keys
    return "; ".join(dict.fromkeys(lines))


def parse_config(doc: dict[str, Any], source: str = "config") -> AgentConfig:
    """Validate a parsed TOML document."""
    try:
        return AgentConfig.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from exc


def load_config(path: Path | str) -> AgentConfig:
    """Read and validate the TOML file at ``path``."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path}: not UTF-8") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: not valid TOML: {exc}") from exc
    return parse_config(doc, f"config {path}")


@dataclass(frozen=True)
class SealingKeys:
    """What the daemon seals with: every auditor public key, and the host signing key."""

    recipients: tuple[AuditorPublicKey, ...]
    host_key: Ed25519PrivateKey

    def __repr__(self) -> str:  # never print key material
        kids = ", ".join(r.kid for r in self.recipients)
        return f"SealingKeys(recipients=[{kids}])"


def _read_key_file(path: Path, what: str, private: bool) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} {path}: not a regular file")
        if private and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{what} {path}: mode {stat.S_IMODE(st.st_mode):04o} lets others read it; "
                "chmod 600 it"
            )
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(f"{what} {path}: writable by group or others")
        data = os.read(fd, MAX_KEY_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE:
        raise ConfigError(f"{what} {path}: too large to be a key file")
    try:
        return decode_key_text(data, what)
    except KeyFileError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def recipient_files(config: AgentConfig) -> list[Path]:
    """``recipients`` then the ``*.pub`` files of ``recipients_dir`` (sorted)."""
    files = list(config.recipients)
    if config.recipients_dir is not None:
        try:
            files += sorted(config.recipients_dir.glob("*.pub"))
        except OSError as exc:
            raise ConfigError(f"recipients_dir {config.recipients_dir}: {exc.strerror}") from exc
    return files


def load_sealing_keys(config: AgentConfig) -> SealingKeys:
    """Read the recipients and ``host_key_file`` (FORMAT.md "Keys" encoding)."""
    found: dict[str, AuditorPublicKey] = {}
    for p in recipient_files(config):
        key = AuditorPublicKey(_read_key_file(p, "recipients: auditor public key", private=False))
        if key.kid in found and p.parent != config.recipients_dir:
            raise ConfigError("recipients: the same auditor public key is listed twice")
        found.setdefault(key.kid, key)
    recipients = tuple(found.values())
    if not recipients:
        raise ConfigError(f"recipients_dir {config.recipients_dir}: no auditor public key (*.pub)")
    raw = _read_key_file(config.host_key_file, "host_key_file: host key", private=True)
    return SealingKeys(recipients, Ed25519PrivateKey.from_private_bytes(raw))
