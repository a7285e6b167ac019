"""``sshaudit login``: get a short-lived SSH user certificate from the collector's built-in
CA for one's own key, and put it where ssh(1) looks for it.

ssh(1) loads a certificate from the identity file's name plus ``-cert.pub`` (ssh_config(5)
CertificateFile, IdentityFile), so ``~/.ssh/id_ed25519`` gets ``~/.ssh/id_ed25519-cert.pub``
and a plain ``ssh host`` uses it. Only the public key (``<key>.pub``) is read and sent.

Invariants:
- the collector is reached as every auditor command reaches it (auditor/remote.py): TLS
  pinned to its certificate before the token (a ``user`` token) is sent;
- the answer is checked before anything is written: one OpenSSH user certificate for
  exactly the key sent, with a valid CA signature; else nothing changes;
- the certificate file is replaced atomically (a temporary file beside it, fsync, rename;
  mode 0644 like the ``.pub`` files ssh-keygen writes): ssh reads the old one or the new one;
- the clock is a parameter (tests pass their own) and the output is one short summary.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sshaudit.errors import SSHAuditError, UsageError

if TYPE_CHECKING:
    import requests

    Sub = argparse._SubParsersAction[argparse.ArgumentParser]

Adder = Callable[..., argparse.ArgumentParser]
MAX_PUB = 16384
_TTL_RE = re.compile(r"([1-9][0-9]{0,5})([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
DEFAULT_KEY = "~/.ssh/id_ed25519"
TIMEOUT = (10.0, 30.0)


@dataclass(frozen=True)
class Certificate:
    """What the collector issued, as written to ``path``."""

    path: Path
    key_id: str
    serial: int
    principals: tuple[str, ...]
    valid_after: datetime
    valid_before: datetime


def parse_ttl(text: str) -> int:
    """``8h``, ``30m``, ``3600s``, ``1d``: seconds (the collector clamps to 5 min..24 h)."""
    m = _TTL_RE.fullmatch(text)
    if m is None:
        raise UsageError(f"--ttl {text!r}: use a number and a unit s, m, h or d, like 8h")
    return int(m.group(1)) * _UNITS[m.group(2)]


def key_files(key: str) -> tuple[Path, Path]:
    """The public key to send and the certificate file beside it, for a private key path
    (a ``.pub`` path is taken as its private key's)."""
    path = Path(key).expanduser()
    if path.name.endswith(".pub"):
        path = path.with_name(path.name[: -len(".pub")])
    return path.with_name(path.name + ".pub"), path.with_name(path.name + "-cert.pub")


def read_public_key(pub: Path) -> str:
    try:
        with pub.open("rb") as f:
            raw = f.read(MAX_PUB + 1)
    except FileNotFoundError:
        raise UsageError(
            f"{pub}: no such public key; make a key pair with `ssh-keygen -t ed25519` "
            "or name yours with --key"
        ) from None
    except OSError as exc:
        raise UsageError(f"{pub}: cannot read: {exc.strerror}") from exc
    try:
        lines = [ln for ln in raw.decode("ascii").splitlines() if ln.strip()]
    except UnicodeDecodeError:
        lines = []
    if len(raw) > MAX_PUB or len(lines) != 1 or len(lines[0].split()) < 2:
        raise UsageError(f"{pub}: not an OpenSSH public key file (one line: type base64 comment)")
    return lines[0].strip()


def check_certificate(line: str, public_key: str) -> Any:
    """The parsed certificate, if ``line`` is a user certificate for ``public_key`` whose
    CA signature verifies (cryptography's SSHCertificate); else SSHAuditError."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        PublicFormat,
        SSHCertificate,
        SSHCertificateType,
        load_ssh_public_identity,
        load_ssh_public_key,
    )

    try:
        cert = load_ssh_public_identity(line.encode("ascii"))
        ours = load_ssh_public_key(" ".join(public_key.split()[:2]).encode("ascii"))
        if not isinstance(cert, SSHCertificate):
            raise ValueError("not a certificate")
        cert.verify_cert_signature()
    except (ValueError, TypeError, UnicodeEncodeError, InvalidSignature) as exc:
        raise SSHAuditError("the collector's answer is not a valid SSH certificate") from exc
    fmt = (Encoding.OpenSSH, PublicFormat.OpenSSH)
    if cert.type is not SSHCertificateType.USER or (
        cert.public_key().public_bytes(*fmt) != ours.public_bytes(*fmt)
    ):
        raise SSHAuditError("the collector's certificate is not a user certificate for this key")
    return cert


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)  # not narrowed by the umask
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SSHAuditError(f"{path}: cannot write the certificate: {exc.strerror}") from exc


def request_certificate(
    http: requests.Session, url: str, public_key: str, ttl: int | None
) -> dict[str, Any]:
    """POST /v1/certificates; the collector's JSON answer, or SSHAuditError."""
    import requests

    from sshaudit.auditor.remote import http_error

    body: dict[str, Any] = {"public_key": public_key}
    if ttl is not None:
        body["ttl_seconds"] = ttl
    try:
        resp = http.post(url + "/v1/certificates", json=body, timeout=TIMEOUT)
    except requests.exceptions.SSLError as exc:
        raise SSHAuditError(
            f"TLS with {url} failed: its certificate is not the pinned one (check --fingerprint)"
        ) from exc
    except requests.exceptions.RequestException as exc:
        raise SSHAuditError(f"cannot reach the collector at {url}: {type(exc).__name__}") from exc
    if resp.status_code == 403 and _code(resp) == "wrong_role":
        raise SSHAuditError("this token may not get certificates (wrong_role): use a user token")
    if resp.status_code != 200:
        raise http_error(resp, "issue a certificate")
    try:
        doc = resp.json()
    except ValueError as exc:
        raise SSHAuditError("the collector sent no JSON") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("certificate"), str):
        raise SSHAuditError("the collector's answer has no certificate")
    return doc


def _code(resp: requests.Response) -> str | None:
    try:
        doc = resp.json()
    except ValueError:
        return None
    return str(doc.get("error")) if isinstance(doc, dict) else None


def login(http: requests.Session, url: str, key: str, ttl: int | None) -> Certificate:
    """Send ``<key>.pub``, check the certificate, write ``<key>-cert.pub``."""
    pub, cert_path = key_files(key)
    public_key = read_public_key(pub)
    doc = request_certificate(http, url, public_key, ttl)
    cert = check_certificate(doc["certificate"], public_key)
    write_atomic(cert_path, doc["certificate"].strip() + "\n")
    return Certificate(
        path=cert_path,
        key_id=cert.key_id.decode("utf-8", "replace"),
        serial=cert.serial,
        principals=tuple(p.decode("utf-8", "replace") for p in cert.valid_principals),
        valid_after=datetime.fromtimestamp(cert.valid_after, UTC),
        valid_before=datetime.fromtimestamp(cert.valid_before, UTC),
    )


def summary(cert: Certificate, now: datetime) -> str:
    """Human lines, times in the local zone (the certificate's own are UTC seconds)."""
    from sshaudit.auditor.remote_cli import clean

    left = max(0, int((cert.valid_before - now).total_seconds()))
    until = cert.valid_before.astimezone()
    return (
        f"wrote {clean(str(cert.path))}\n"
        f"  key id:     {clean(cert.key_id)}\n"
        f"  principals: {clean(', '.join(cert.principals))}\n"
        f"  serial:     {cert.serial}\n"
        f"  valid:      {cert.valid_after.astimezone():%Y-%m-%d %H:%M:%S %Z} to "
        f"{until:%Y-%m-%d %H:%M:%S %Z}\n"
        f"  expires in: {left // 3600} h {left % 3600 // 60} min (at {until:%H:%M %Z})"
    )


# --- the subcommand


def add_login_parser(sub: Sub, add: Adder) -> None:
    from sshaudit.auditor.remote_cli import CONNECTION_HELP, EXIT_STATUS, _connection_args

    p = add(
        sub,
        "login",
        "get a short-lived SSH certificate from the collector's user CA",
        "Sends your public key (KEY.pub) with your user token and writes the certificate\n"
        "to KEY-cert.pub, where ssh looks for it: then `ssh host` logs in with it. The\n"
        "token must be a user token (sshaudit-collector token create --role user\n"
        "--email you@example.com); the certificate's key id is that email and its\n"
        "principal the part before the @.\n\n" + CONNECTION_HELP,
        "  sshaudit login\n  sshaudit login --key ~/.ssh/id_ecdsa --ttl 2h",
        EXIT_STATUS,
    )
    p.add_argument("--key", default=DEFAULT_KEY, metavar="FILE", help=f"default {DEFAULT_KEY}")
    p.add_argument("--ttl", metavar="TTL", help="lifetime, e.g. 2h (default 8h; 5m to 24h)")
    _connection_args(p)
    p.set_defaults(handler=cmd_login)


def cmd_login(args: argparse.Namespace) -> int:
    from sshaudit.auditor.remote import load_settings, read_token
    from sshaudit.collector.pinning import pinned_session

    ttl = None if args.ttl is None else parse_ttl(args.ttl)
    key_files(args.key)  # a bad --key fails before any network
    flags = {"collector": args.collector, "token_file": args.token_file}
    settings = load_settings({**flags, "fingerprint": args.fingerprint}, args.config, os.environ)
    token = read_token(settings.token_file, _warn)
    try:
        http = pinned_session(settings.fingerprint)
    except (ValueError, SSHAuditError) as exc:
        raise UsageError(f"fingerprint: {exc}") from exc
    http.headers["Authorization"] = f"Bearer {token}"
    with http:
        cert = login(http, settings.collector, args.key, ttl)
    print(summary(cert, datetime.now(UTC)))
    return 0


def _warn(message: str) -> None:
    print(f"sshaudit: {message}", file=sys.stderr)
