"""``sshaudit-collector token|keys|ca|policy|hosts|hold``: administration on the state
directory itself (whoever can read it is the collector's administrator).

Invariants: every change goes through collector/admin.py, as the admin API's does, and is
logged in the audit log with actor ``cli``; ``token create`` prints the token alone on the
last stdout line (and nowhere else: it is not stored); listings print a table, or JSON with
``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sshaudit.collector import admin, tokens
from sshaudit.collector.cli_common import (
    EXIT_OK,
    Sub,
    add_command,
    add_data,
    add_group,
    open_data,
    state_dir,
)
from sshaudit.collector.models import format_time
from sshaudit.collector.models_admin import ca_key_out, hold_out, host_out, token_out
from sshaudit.collector.storage import HoldKind, TokenKind
from sshaudit.errors import UsageError

ACTOR = "cli"
MAX_FILE = 1 << 20


def _now() -> datetime:
    return datetime.now(UTC)


def _read(path: str) -> str:
    try:
        raw = sys.stdin.buffer.read(MAX_FILE + 1) if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from exc
    if len(raw) > MAX_FILE:
        raise UsageError(f"{path}: larger than 1 MiB")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text") from exc


def _print(rows: Sequence[dict[str, Any]], as_json: bool, columns: Sequence[str]) -> None:
    if as_json:
        print(json.dumps(list(rows), indent=2))
        return
    for row in rows:
        print("  ".join(str(row.get(c) if row.get(c) is not None else "-") for c in columns))


def _listing(sub: Sub, name: str, summary: str, handler: Any) -> None:
    p = add_command(sub, name, summary, "One line per entry; --json for JSON.", "")
    add_data(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=handler)


def add_parsers(sub: Sub) -> None:
    _token_parsers(add_group(sub, "token", "make, list and revoke API tokens"))
    _keys_parsers(add_group(sub, "keys", "manage the auditor public keys recordings seal to"))
    _ca_parsers(add_group(sub, "ca", "the built-in user CA and the trusted user CA keys"))
    _policy_parsers(add_group(sub, "policy", "show or replace the policy sent to agents"))
    hosts = add_group(sub, "hosts", "list enrolled hosts")
    _listing(hosts, "list", "list enrolled hosts and their reported backlog", cmd_hosts_list)
    _hold_parsers(add_group(sub, "hold", "manage legal holds (they suspend retention)"))


def _token_parsers(sub: Sub) -> None:
    p = add_command(
        sub,
        "create",
        "make a token",
        "Roles: agent (a one-time enrollment token: `sshaudit-agent enroll` exchanges it for\n"
        "a host credential), auditor (query and download), admin (the /v1/admin API),\n"
        "user (with --email: `sshaudit login` gets SSH certificates from the user CA).\n"
        "Default lifetimes: agent 1d, auditor 90d, admin 30d, user 30d. The token is printed\n"
        "once, alone on the last line of stdout; only its SHA-256 is stored.",
        "  sshaudit-collector token create --data DIR --role agent --ttl 2h\n"
        "  sshaudit-collector token create --data DIR --role user --email jdoe@example.com\n"
        "  TOKEN=$(sshaudit-collector token create --data DIR --role auditor | tail -n1)",
    )
    add_data(p)
    p.add_argument(
        "--role",
        required=True,
        choices=("agent", "auditor", "admin", "user"),
        help="what it may do",
    )
    p.add_argument("--email", help="role user: whose token (the certificates' key id)")
    p.add_argument("--ttl", metavar="TTL", help="lifetime: 45m, 12h, 30d, 2w or never")
    p.add_argument("--comment", default="", help="who or what it is for (printable ASCII)")
    p.set_defaults(handler=cmd_token_create)
    _listing(sub, "list", "list tokens (ids, roles, states; never the tokens)", cmd_token_list)
    p = add_command(
        sub,
        "revoke",
        "revoke a token",
        "Takes effect on the next request. Revoking a host's credential cuts the host off.",
        "  sshaudit-collector token revoke --data DIR 40f653583baf1c8a",
    )
    add_data(p)
    p.add_argument("token_id", metavar="TOKEN_ID", help="as `token list` shows it")
    p.set_defaults(handler=cmd_token_revoke)


def cmd_token_create(args: argparse.Namespace) -> int:
    kind = TokenKind(args.role)
    ttl = tokens.DEFAULT_TTL[kind] if args.ttl is None else tokens.parse_ttl(args.ttl)
    storage = open_data(args.data)
    try:
        token, record = admin.create_token(
            storage, kind, _now(), actor=ACTOR, ttl=ttl, comment=args.comment, email=args.email
        )
    finally:
        storage.close()
    expires = "never" if record.expires_at is None else format_time(record.expires_at)
    print(f"{kind.value} token {record.token_id}, expires {expires}:", file=sys.stderr)
    print(token)
    return EXIT_OK


def cmd_token_list(args: argparse.Namespace) -> int:
    storage = open_data(args.data)
    now = _now()
    try:
        rows = [
            token_out(t, tokens.token_state(t, now)).model_dump() for t in storage.list_tokens()
        ]
    finally:
        storage.close()
    cols = ("token_id", "role", "state", "created_at", "expires_at", "host_id", "email", "comment")
    _print(rows, args.json, cols)
    return EXIT_OK


def cmd_token_revoke(args: argparse.Namespace) -> int:
    storage = open_data(args.data)
    try:
        admin.revoke_token(storage, args.token_id, _now(), actor=ACTOR)
    finally:
        storage.close()
    print(f"revoked token {args.token_id}", file=sys.stderr)
    return EXIT_OK


def _keys_parsers(sub: Sub) -> None:
    p = add_command(
        sub,
        "add",
        "add an auditor public key",
        "FILE holds an X25519 public key as `sshaudit keygen` writes it (32 bytes, base64).\n"
        "Agents seal new recordings to every key listed here from their next refresh.",
        "  sshaudit-collector keys add --data DIR alice.pub --comment 'Alice (audit team)'",
    )
    add_data(p)
    p.add_argument("file", metavar="FILE", help="public key file ('-' for stdin)")
    p.add_argument("--comment", default="", help="whose key it is")
    p.set_defaults(handler=cmd_keys_add)
    _listing(sub, "list", "list auditor public keys", cmd_keys_list)
    p = add_command(
        sub,
        "remove",
        "stop sealing to a key",
        "Recordings already sealed to it stay readable with it.",
        "  sshaudit-collector keys remove --data DIR 1f2e3d4c5b6a7988",
    )
    add_data(p)
    p.add_argument("kid", metavar="KID", help="the key id (16 hex digits)")
    p.set_defaults(handler=cmd_keys_remove)


def cmd_keys_add(args: argparse.Namespace) -> int:
    text = _read(args.file)
    storage = open_data(args.data)
    try:
        key = admin.add_auditor_key(storage, text, args.comment, _now(), actor=ACTOR)
    finally:
        storage.close()
    print(key.kid)
    return EXIT_OK


def cmd_keys_list(args: argparse.Namespace) -> int:
    storage = open_data(args.data)
    try:
        rows = [admin.auditor_key_out(k).model_dump() for k in storage.list_auditor_keys()]
    finally:
        storage.close()
    _print(rows, args.json, ("kid", "public_key", "added_at", "comment"))
    return EXIT_OK


def cmd_keys_remove(args: argparse.Namespace) -> int:
    storage = open_data(args.data)
    try:
        admin.remove_auditor_key(storage, args.kid, _now(), actor=ACTOR)
    finally:
        storage.close()
    return EXIT_OK


def _ca_parsers(sub: Sub) -> None:
    p = add_command(
        sub,
        "init",
        "make the built-in user CA (an Ed25519 key that signs `sshaudit login` certificates)",
        "Writes DATA/user_ca_key (0600, OpenSSH format), trusts its public key (as `ca add`\n"
        "would: hosts get it at their next refresh), prints the public key line and its\n"
        "fingerprint. Refuses when a CA exists, unless --rotate: a new key signs from now on,\n"
        "the old one stays trusted (certificates it signed keep working) until you\n"
        "`ca remove` it, at the earliest once they expired (24 h at most).",
        "  sshaudit-collector ca init --data DIR\n  sshaudit-collector ca init --data DIR --rotate",
    )
    add_data(p)
    p.add_argument("--rotate", action="store_true", help="replace the signing key")
    p.set_defaults(handler=cmd_ca_init)
    p = add_command(
        sub,
        "add",
        "trust user CA public keys",
        "FILE holds OpenSSH public key lines (type base64 [comment]), as ssh-keygen writes\n"
        "them; blank lines and # comments are skipped. Enrolled hosts put them in the file\n"
        "named by sshd's TrustedUserCAKeys.",
        "  sshaudit-collector ca add --data DIR user_ca.pub",
    )
    add_data(p)
    p.add_argument("file", metavar="FILE", help="public key file ('-' for stdin)")
    p.set_defaults(handler=cmd_ca_add)
    _listing(sub, "list", "list trusted user CA keys", cmd_ca_list)
    p = add_command(
        sub,
        "remove",
        "stop trusting a user CA key",
        "ID is the key_id (64 hex digits) or the SHA256:... fingerprint `ca list` shows.",
        "  sshaudit-collector ca remove --data DIR SHA256:uL3x...",
    )
    add_data(p)
    p.add_argument("key", metavar="ID", help="key id or fingerprint")
    p.set_defaults(handler=cmd_ca_remove)


def cmd_ca_add(args: argparse.Namespace) -> int:
    lines = [
        line
        for line in _read(args.file).splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines:
        raise UsageError(f"{args.file}: no public key line")
    now = _now()
    keys = [admin.parse_ca_line(line, now) for line in lines]  # all valid, or none added
    storage = open_data(args.data)
    try:
        for key in keys:
            admin.add_ca_key(storage, key.line, now, actor=ACTOR)
            print(key.fingerprint)
    finally:
        storage.close()
    return EXIT_OK


def cmd_ca_init(args: argparse.Namespace) -> int:
    from sshaudit.collector.user_ca_store import init_ca

    data = state_dir(args.data)
    storage = open_data(args.data)
    try:
        change = init_ca(storage, data, _now(), rotate=args.rotate, actor=ACTOR)
    finally:
        storage.close()
    if change.previous is not None:
        print(
            f"rotated: {change.key.fingerprint} signs from now on; {change.previous.fingerprint}"
            " stays trusted until `ca remove`",
            file=sys.stderr,
        )
    print(change.key.line)
    print(change.key.fingerprint)
    return EXIT_OK


def cmd_ca_list(args: argparse.Namespace) -> int:
    from sshaudit.collector.user_ca_store import key_path, signer_key_id

    signing = signer_key_id(key_path(state_dir(args.data)))
    storage = open_data(args.data)
    try:
        rows = [ca_key_out(k).model_dump() for k in storage.list_ca_keys()]
    finally:
        storage.close()
    for row in rows:  # "signs": this is the built-in CA's current key (user_ca_store.py)
        row["signs"] = "signs" if row["key_id"] == signing else None
        if args.json:
            row["signs"] = row["signs"] is not None
    _print(rows, args.json, ("key_id", "fingerprint", "signs", "added_at", "line"))
    return EXIT_OK


def cmd_ca_remove(args: argparse.Namespace) -> int:
    storage = open_data(args.data)
    try:
        match = [k for k in storage.list_ca_keys() if args.key in (k.key_id, k.fingerprint)]
        if not match:
            raise UsageError(f"no trusted CA key {args.key}")
        admin.remove_ca_key(storage, match[0].key_id, _now(), actor=ACTOR)
    finally:
        storage.close()
    return EXIT_OK


def _policy_parsers(sub: Sub) -> None:
    p = add_command(sub, "show", "print the policy (JSON)", "With its version.", "")
    add_data(p)
    p.set_defaults(handler=cmd_policy_show)
    p = add_command(
        sub,
        "set",
        "replace the policy",
        "FILE is a JSON object of the agent's [policy] keys (docs/agent-config.md); agents\n"
        "pick it up at their next refresh. Prints the new version.",
        "  sshaudit-collector policy set --data DIR policy.json",
    )
    add_data(p)
    p.add_argument("file", metavar="FILE", help="JSON file ('-' for stdin)")
    p.set_defaults(handler=cmd_policy_set)


def cmd_policy_show(args: argparse.Namespace) -> int:
    storage = open_data(args.data)
    try:
        policy = storage.get_policy()
    finally:
        storage.close()
    print(json.dumps({"policy": dict(policy.document), "version": policy.version}, indent=2))
    return EXIT_OK


def cmd_policy_set(args: argparse.Namespace) -> int:
    try:
        doc = json.loads(_read(args.file))
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"{args.file}: not JSON") from exc
    if not isinstance(doc, dict):
        raise UsageError(f"{args.file}: the policy must be a JSON object")
    storage = open_data(args.data)
    try:
        version = admin.set_policy(storage, doc, _now(), actor=ACTOR)
    finally:
        storage.close()
    print(version)
    return EXIT_OK


def cmd_hosts_list(args: argparse.Namespace) -> int:
    storage = open_data(args.data)
    try:
        rows = [host_out(h).model_dump() for h in storage.list_hosts()]
    finally:
        storage.close()
    _print(rows, args.json, ("host_id", "hostname", "enrolled_at", "backlog_bytes", "last_seen"))
    return EXIT_OK


def _hold_parsers(sub: Sub) -> None:
    p = add_command(
        sub,
        "add",
        "put a legal hold on a session, a user or a host",
        "Retention never deletes what a hold names while it stands.",
        "  sshaudit-collector hold add --data DIR --user jdoe@example.com --reason case-42",
    )
    add_data(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--session", metavar="SESSION_ID")
    which.add_argument("--user", metavar="USER_EMAIL")
    which.add_argument("--target", metavar="HOST_ID")
    p.add_argument("--reason", default="", help="why (printable ASCII)")
    p.set_defaults(handler=cmd_hold_add)
    _listing(sub, "list", "list legal holds", cmd_hold_list)
    p = add_command(sub, "remove", "lift a legal hold", "Deletes no data.", "")
    add_data(p)
    p.add_argument("hold_id", metavar="HOLD_ID")
    p.set_defaults(handler=cmd_hold_remove)


def cmd_hold_add(args: argparse.Namespace) -> int:
    kind, value = next(
        (k, v)
        for k, v in (
            (HoldKind.SESSION, args.session),
            (HoldKind.USER, args.user),
            (HoldKind.TARGET, args.target),
        )
        if v is not None
    )
    storage = open_data(args.data)
    try:
        hold = admin.add_hold(storage, kind, value, args.reason, _now(), actor=ACTOR)
    finally:
        storage.close()
    print(hold.hold_id)
    return EXIT_OK


def cmd_hold_list(args: argparse.Namespace) -> int:
    storage = open_data(args.data)
    try:
        rows = [hold_out(h).model_dump() for h in storage.list_holds()]
    finally:
        storage.close()
    _print(rows, args.json, ("hold_id", "kind", "value", "created_at", "reason"))
    return EXIT_OK


def cmd_hold_remove(args: argparse.Namespace) -> int:
    storage = open_data(args.data)
    try:
        admin.remove_hold(storage, args.hold_id, _now(), actor=ACTOR)
    finally:
        storage.close()
    return EXIT_OK
