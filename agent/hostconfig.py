"""What the collector tells a host to run with (``HostConfig``: ``POST /v1/enroll`` and
``GET /v1/host/config``), checked, and the files made from it. Sans-IO: JSON in, values
and file contents out.

Invariants:
- nothing unchecked reaches sshd or the sealer: every CA key line is one OpenSSH public key
  (type and base64 blob whose inner type matches), every auditor key decodes as an X25519
  key (FORMAT.md "Keys"), the policy is a JSON object; anything else is a
  :class:`~sshaudit.errors.ConfigError` and the caller keeps what it had;
- a host configuration without any auditor key is refused: recordings would be sealed to
  nobody (or the daemon would stop recording);
- the rendered files are deterministic (sorted, one key per line, trailing newline), so an
  unchanged configuration rewrites nothing.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sshaudit.agent.sshcert import fingerprint
from sshaudit.errors import ConfigError, KeyFileError
from sshaudit.keys import AuditorPublicKey, encode_key_text

MAX_CA_KEYS = 64
MAX_AUDITOR_KEYS = 256
# Key types sshd accepts as a CA (sshd_config(5) CASignatureAlgorithms, OpenSSH 9.2).
CA_KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "ssh-rsa",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)
# How many SSH strings (RFC 4251 section 5: string/mpint) each public key blob holds, type
# name included (RFC 8709 ed25519, RFC 5656 ecdsa, RFC 4253 rsa, OpenSSH PROTOCOL.u2f sk-*).
_BLOB_FIELDS = {
    "ssh-ed25519": 2,
    "ecdsa-sha2-nistp256": 3,
    "ecdsa-sha2-nistp384": 3,
    "ecdsa-sha2-nistp521": 3,
    "ssh-rsa": 3,
    "sk-ssh-ed25519@openssh.com": 3,
    "sk-ecdsa-sha2-nistp256@openssh.com": 4,
}


@dataclass(frozen=True)
class HostSettings:
    """One checked host configuration."""

    host_id: str
    auditor_keys: tuple[AuditorPublicKey, ...]
    ca_keys: tuple[str, ...]  # "type base64" lines, sorted
    policy: Mapping[str, Any]
    policy_version: int


def _ca_line(line: object) -> str:
    if not isinstance(line, str) or len(line) > 16384:
        raise ConfigError("ca_keys: every entry must be an OpenSSH public key line")
    words = line.split()
    if len(words) < 2 or words[0] not in CA_KEY_TYPES:
        raise ConfigError(f"ca_keys: {line[:60]!r} is not a supported OpenSSH CA public key")
    try:
        blob = base64.b64decode(words[1], validate=True)
    except binascii.Error as exc:
        raise ConfigError(f"ca_keys: {words[0]} key is not valid base64") from exc
    # RFC 4253 section 6.6: the blob starts with the key type as an SSH string.
    if len(blob) < 4:
        raise ConfigError(f"ca_keys: {words[0]} key blob is truncated")
    (n,) = struct.unpack(">I", blob[:4])
    if blob[4 : 4 + n] != words[0].encode():
        raise ConfigError(f"ca_keys: {words[0]} key blob names another key type")
    if _ssh_strings(blob) != _BLOB_FIELDS[words[0]]:
        raise ConfigError(f"ca_keys: {words[0]} key blob is truncated or has extra bytes")
    return f"{words[0]} {words[1]}"


def _ssh_strings(blob: bytes) -> int:
    """How many complete SSH strings ``blob`` is made of; -1 when it ends inside one."""
    count, at = 0, 0
    while at < len(blob):
        if at + 4 > len(blob):
            return -1
        (n,) = struct.unpack(">I", blob[at : at + 4])
        at += 4 + n
        if at > len(blob):
            return -1
        count += 1
    return count


def _auditor_key(item: object) -> AuditorPublicKey:
    if not isinstance(item, Mapping) or not isinstance(item.get("public_key"), str):
        raise ConfigError("auditor_keys: every entry must have a public_key")
    try:
        return AuditorPublicKey.from_text(item["public_key"].encode())
    except (KeyFileError, ValueError) as exc:
        raise ConfigError("auditor_keys: a public_key is not an X25519 public key") from exc


def parse_host_config(doc: Mapping[str, Any]) -> HostSettings:
    """Check a ``HostConfig`` document (collector/models.py)."""
    host_id = doc.get("host_id")
    if not isinstance(host_id, str) or not host_id:
        raise ConfigError("host configuration: no host_id")
    keys_in, ca_in = doc.get("auditor_keys"), doc.get("ca_keys")
    if not isinstance(keys_in, list) or not isinstance(ca_in, list):
        raise ConfigError("host configuration: auditor_keys and ca_keys must be lists")
    if len(keys_in) > MAX_AUDITOR_KEYS or len(ca_in) > MAX_CA_KEYS:
        raise ConfigError("host configuration: too many keys")
    auditors = {k.kid: k for k in map(_auditor_key, keys_in)}
    if not auditors:
        raise ConfigError(
            "host configuration lists no auditor public key: recordings could be read by "
            "nobody (add one with sshaudit-collector keys add)"
        )
    policy, version = doc.get("policy", {}), doc.get("policy_version", 0)
    if not isinstance(policy, dict) or not isinstance(version, int):
        raise ConfigError("host configuration: policy must be an object")
    return HostSettings(
        host_id=host_id,
        auditor_keys=tuple(auditors[k] for k in sorted(auditors)),
        ca_keys=tuple(sorted(set(map(_ca_line, ca_in)))),
        policy=policy,
        policy_version=version,
    )


def ca_keys_text(settings: HostSettings) -> str:
    """TrustedUserCAKeys (sshd(8) AUTHORIZED_KEYS FILE FORMAT, one key per line). No key
    at all is written as a comment only: sshd then trusts no CA, which is what it says."""
    head = "# sshaudit: user CA keys from the collector (rewritten by sshaudit-agent)\n"
    return head + "".join(line + "\n" for line in settings.ca_keys)


def auditor_files(settings: HostSettings) -> dict[str, bytes]:
    """``<kid>.pub`` -> the key file (FORMAT.md "Keys") for ``recipients_dir``."""
    return {f"{k.kid}.pub": encode_key_text(k.raw) for k in settings.auditor_keys}


def policy_doc(settings: HostSettings) -> dict[str, Any]:
    """The policy cache's content but its fetch time (which changes at every refresh)."""
    return {
        "version": settings.policy_version,
        "host_id": settings.host_id,
        "policy": settings.policy,
    }


def policy_text(settings: HostSettings, fetched_at: datetime) -> str:
    """The cache the principals command reads (docs/agent-config.md "[identity]")."""
    doc = {**policy_doc(settings), "fetched_at": fetched_at.isoformat().replace("+00:00", "Z")}
    return json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=True) + "\n"


def ca_fingerprints(lines: list[str] | tuple[str, ...]) -> list[str]:
    """OpenSSH fingerprints (``SHA256:`` + unpadded base64 of the blob's SHA-256) of CA key
    lines; lines that are not keys are skipped."""
    out = []
    for line in lines:
        words = line.split()
        if len(words) < 2 or line.startswith("#"):
            continue
        try:
            blob = base64.b64decode(words[1], validate=True)
        except binascii.Error:
            continue
        out.append(fingerprint(blob))
    return out
