"""The collector's built-in user CA: ``ca init [--rotate]`` and ``POST /v1/certificates``,
through ``sshaudit-collector serve`` (a real uvicorn) on loopback with TLS and the pinned
client. The certificates are read back with OpenSSH's own ``ssh-keygen -L``, not with the
library that made them; a real sshd accepting them is tests/test_login.py."""

from __future__ import annotations

import base64
import json
import re
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from collector_helpers import Server, cli, cli_ok, local_collector, start_server
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from sshaudit.collector import admin, tokens, user_ca
from sshaudit.collector.problems import UnprocessableError
from sshaudit.collector.storage import TokenKind

pytestmark = pytest.mark.slow
EMAIL = "jdoe@example.com"


def keygen(*args: str) -> str:
    done = subprocess.run(["ssh-keygen", *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def ssh_key(tmp: Path, kind: str = "ed25519", bits: int | None = None) -> str:
    path = tmp / f"id_{kind}_{bits or 0}_{time.monotonic_ns()}"
    keygen("-q", "-t", kind, *(["-b", str(bits)] if bits else []), "-N", "", "-f", str(path))
    return Path(str(path) + ".pub").read_text().strip()


def openssh_line(public_key: Any) -> str:
    return str(public_key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode())


@dataclass
class Cert:
    """``ssh-keygen -L`` of a certificate, the fields by name."""

    text: str

    def field(self, name: str) -> str:
        m = re.search(rf"^\s*{name}: ?(.*)$", self.text, re.MULTILINE)
        assert m is not None, (name, self.text)
        return m.group(1).strip()

    def block(self, name: str) -> list[str]:
        """The indented lines under ``name:`` (Principals, Extensions...)."""
        lines = self.text.splitlines()
        at = next(i for i, x in enumerate(lines) if x.strip().startswith(f"{name}:"))
        if lines[at].split(":", 1)[1].strip() == "(none)":
            return []
        out = []
        for line in lines[at + 1 :]:
            if not line.startswith(" " * 16):
                break
            out.append(line.strip())
        return out


def inspect(tmp: Path, certificate: str) -> Cert:
    path = tmp / f"c{time.monotonic_ns()}-cert.pub"
    path.write_text(certificate + "\n")
    return Cert(keygen("-L", "-f", str(path)))


class World:
    def __init__(self, server: Server, tmp: Path) -> None:
        self.server = server
        self.tmp = tmp
        self.user = self.token("user", "--email", EMAIL)

    @property
    def data(self) -> Path:
        return self.server.data

    def token(self, role: str, *extra: str) -> str:
        out = cli_ok("token", "create", "--data", str(self.data), "--role", role, *extra)
        return out.strip().splitlines()[-1]

    def post(self, token: str | None, **body: Any) -> requests.Response:
        return self.server.client(token).post(self.server.url + "/v1/certificates", json=body)

    def issue(self, **body: Any) -> dict[str, Any]:
        body.setdefault("public_key", ssh_key(self.tmp))
        resp = self.post(self.user, **body)
        assert resp.status_code == 200, resp.text
        doc: dict[str, Any] = resp.json()
        return doc

    def set_policy(self, policy: dict[str, Any]) -> None:
        path = self.tmp / "policy.json"
        path.write_text(json.dumps(policy))
        cli_ok("policy", "set", "--data", str(self.data), str(path))


def ca_init(data: Path, *extra: str) -> tuple[str, str]:
    line, fingerprint = cli_ok("ca", "init", "--data", str(data), *extra).strip().splitlines()
    return line, fingerprint


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    data = tmp_path_factory.mktemp("collector") / "data"
    cli_ok("init", "--data", str(data))
    server = start_server(data)
    try:
        yield World(server, tmp_path_factory.mktemp("keys"))
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ca(world: World) -> tuple[str, str]:
    """The module's CA: its public key line and fingerprint as ``ca init`` printed them."""
    return ca_init(world.data)


def test_ca_init_writes_a_private_key_trusts_it_and_refuses_to_overwrite(
    world: World, ca: tuple[str, str]
) -> None:
    line, fingerprint = ca
    key_file = world.data / "user_ca_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    # OpenSSH itself reads the private key and derives the printed public key and fingerprint
    derived = keygen("-y", "-f", str(key_file)).split()[:2]
    assert line.split()[:2] == derived
    assert keygen("-l", "-f", str(key_file)).split()[1] == fingerprint
    listing = json.loads(cli_ok("ca", "list", "--data", str(world.data), "--json"))
    assert [(r["fingerprint"], r["signs"]) for r in listing] == [(fingerprint, True)]
    before = key_file.read_bytes()
    again = cli("ca", "init", "--data", str(world.data))
    assert again.returncode != 0
    assert b"a user CA exists" in again.stderr and b"--rotate" in again.stderr
    assert b"Traceback" not in again.stderr
    assert key_file.read_bytes() == before


def test_issued_certificate_as_ssh_keygen_reads_it(world: World, ca: tuple[str, str]) -> None:
    world.set_policy({})
    t0 = time.time()
    doc = world.issue()
    cert = inspect(world.tmp, doc["certificate"])
    assert cert.field("Type").startswith("ssh-ed25519-cert-v01@openssh.com user certificate")
    assert cert.field("Signing CA").split()[1] == ca[1] == doc["ca_fingerprint"]
    assert cert.field("Key ID") == f'"{EMAIL}"' and doc["key_id"] == EMAIL
    assert int(cert.field("Serial")) == doc["serial"] > 0
    assert cert.block("Principals") == ["jdoe"] == doc["principals"]
    assert cert.block("Critical Options") == []
    assert cert.block("Extensions") == ["permit-pty"] == doc["extensions"]
    after = _epoch(doc["valid_after"])
    before = _epoch(doc["valid_before"])
    assert t0 - 62 <= after <= t0 - 58  # 60 s back: a host clock a little behind accepts it
    assert before - after == 8 * 3600 + 60  # the default TTL
    # the audit log names who got which certificate
    events = world.server.client(world.token("admin")).get(
        world.server.url + "/v1/admin/audit-events", params={"limit": "1000"}
    )
    issued = [e for e in events.json() if e["action"] == "certificate_issued"]
    last = issued[-1]
    assert last["subject"] == str(doc["serial"]) and last["actor"].startswith("token:")
    assert last["detail"]["email"] == EMAIL and last["detail"]["serial"] == doc["serial"]
    assert last["detail"]["valid_before"] == doc["valid_before"]
    assert last["detail"]["ca_fingerprint"] == ca[1]


def _epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text).timestamp()


def test_ttl_is_clamped_and_the_policy_narrows_it(world: World, ca: tuple[str, str]) -> None:
    def lifetime(**body: Any) -> float:
        doc = world.issue(**body)
        return _epoch(doc["valid_before"]) - _epoch(doc["valid_after"]) - 60

    world.set_policy({})
    assert lifetime(ttl_seconds=10) == 300  # at least 5 min
    assert lifetime(ttl_seconds=3600) == 3600
    assert lifetime(ttl_seconds=30 * 86400) == 86400  # at most 24 h
    world.set_policy({"certificates": {"default_ttl_seconds": 1800, "max_ttl_seconds": 7200}})
    assert lifetime() == 1800
    assert lifetime(ttl_seconds=86400) == 7200
    world.set_policy({})
    for bad in (0, -5, "3600", 3.5, 10**12):
        resp = world.post(world.user, public_key=ssh_key(world.tmp), ttl_seconds=bad)
        assert resp.status_code == 422, (bad, resp.text)


def test_policy_extras_and_forwarding_extensions(world: World, ca: tuple[str, str]) -> None:
    world.set_policy(
        {
            "certificates": {"extra_principals": ["deploy", "jdoe", "oncall"]},
            "forwarding": {"tcp": True, "agent": False, "x11": True},
        }
    )
    try:
        doc = world.issue()
    finally:
        world.set_policy({})
    cert = inspect(world.tmp, doc["certificate"])
    assert cert.block("Principals") == ["jdoe", "deploy", "oncall"] == doc["principals"]
    assert sorted(cert.block("Extensions")) == [
        "permit-X11-forwarding",
        "permit-port-forwarding",
        "permit-pty",
    ]
    bad = world.tmp / "bad-policy.json"
    for policy in (
        {"certificates": {"extra_principals": ["a,b"]}},
        {"certificates": {"max_ttl_seconds": 10}},
        {"forwarding": {"tcp": "yes"}},
    ):
        bad.write_text(json.dumps(policy))
        proc = cli("policy", "set", "--data", str(world.data), str(bad))
        assert proc.returncode != 0 and b"the policy's" in proc.stderr, (policy, proc.stderr)


def test_roles_and_tokens(world: World, ca: tuple[str, str]) -> None:
    key = ssh_key(world.tmp)
    for role in ("admin", "auditor", "agent"):
        resp = world.post(world.token(role), public_key=key)
        assert (resp.status_code, resp.json()["error"]) == (403, "wrong_role"), role
    assert world.post(None, public_key=key).status_code == 401
    assert world.post("sa_user_" + "A" * 43, public_key=key).status_code == 401
    revoked = world.token("user", "--email", "gone@example.com")
    token_id = json.loads(cli_ok("token", "list", "--data", str(world.data), "--json"))[-1]
    assert token_id["email"] == "gone@example.com"
    cli_ok("token", "revoke", "--data", str(world.data), token_id["token_id"])
    resp = world.post(revoked, public_key=key)
    assert (resp.status_code, resp.json()["error"]) == (401, "token_revoked")


def test_user_tokens_need_a_valid_email(world: World) -> None:
    base = ("token", "create", "--data", str(world.data))
    for args, message in (
        (("--role", "user"), b"a user token needs an email"),
        (("--role", "user", "--email", "no-at-sign"), b"not an email address"),
        (("--role", "user", "--email=-x@example.com"), b"not an email address"),
        (("--role", "user", "--email", "a b@example.com"), b"not an email address"),
        (("--role", "user", "--email", "jdoe@exa_mple.com"), b"not an email address"),
        (("--role", "auditor", "--email", "jdoe@example.com"), b"only user tokens"),
    ):
        proc = cli(*base, *args)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
        assert b"Traceback" not in proc.stderr
    # the admin API makes user tokens too
    admin_token = world.token("admin")
    api = world.server.client(admin_token)
    made = api.post(
        world.server.url + "/v1/admin/tokens", json={"role": "user", "email": "ann@example.com"}
    )
    assert made.status_code == 200, made.text
    assert made.json()["token"].startswith("sa_user_")
    refused = api.post(world.server.url + "/v1/admin/tokens", json={"role": "user"})
    assert (refused.status_code, refused.json()["error"]) == (422, "missing_email")


def test_bad_keys_are_refused_precisely(world: World, ca: tuple[str, str]) -> None:
    dsa_line = ssh_key(world.tmp, "dsa")  # OpenSSH 9.2 still makes them
    rsa2048 = openssh_line(rsa.generate_private_key(65537, 2048).public_key())
    good = ssh_key(world.tmp)
    kind, b64 = good.split()[:2]
    cert_line = world.issue()["certificate"]
    cases = {
        dsa_line: ("invalid_key", "DSA"),
        rsa2048: ("weak_key", "2048-bit RSA key is too short"),
        "garbage": ("invalid_key", "not an OpenSSH public key line"),
        "ssh-ed25519 AAAA!!!": ("invalid_key", "does not parse"),
        f"ecdsa-sha2-nistp256 {b64}": ("invalid_key", "does not parse"),  # type mismatch
        cert_line: ("invalid_key", "certificate"),
        "sk-ssh-ed25519@openssh.com AAAA": ("invalid_key", "not accepted"),
    }
    for line, (code, words) in cases.items():
        resp = world.post(world.user, public_key=line)
        assert resp.status_code == 422, (line[:30], resp.text)
        assert resp.json()["error"] == code and words in resp.json()["detail"], resp.text
    for extra in ({"public_key": good, "principals": ["root"]}, {}):
        resp = world.server.client(world.user).post(
            world.server.url + "/v1/certificates", json=extra
        )
        assert resp.status_code == 422, extra  # no way to ask for other principals
    # what is accepted: ECDSA, RSA >= 3072 (with ssh-keygen's own files)
    for key in (
        ssh_key(world.tmp, "ecdsa", 384),
        ssh_key(world.tmp, "rsa", 3072),
        openssh_line(ec.generate_private_key(ec.SECP521R1()).public_key()),
    ):
        doc = world.issue(public_key=key)
        assert inspect(world.tmp, doc["certificate"]).field("Key ID") == f'"{EMAIL}"'
    assert kind == "ssh-ed25519"


def test_in_process_without_a_ca_file_and_a_user_token_without_email(tmp_path: Path) -> None:
    """An app given no CA key file answers 409; a user token that names no email (made by
    hand in the storage: admin.create_token refuses it) gets 403, not a guessed identity."""
    local = local_collector(tmp_path)
    token, _ = admin.create_token(
        local.storage, TokenKind.USER, local.clock(), actor="test", ttl=None, email=EMAIL
    )
    body = {"public_key": "ssh-ed25519 AAAA"}
    resp = local.client.post("/v1/certificates", json=body, headers=local.auth(token))
    assert (resp.status_code, resp.json()["error"]) == (409, "no_user_ca")
    anonymous, record = tokens.new_token(TokenKind.USER, local.clock(), ttl=None)
    local.storage.add_token(record)
    resp = local.client.post("/v1/certificates", json=body, headers=local.auth(anonymous))
    assert (resp.status_code, resp.json()["error"]) == (403, "no_identity")
    local.storage.close()


def test_rotation_signs_with_the_new_key_and_trusts_both(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cli_ok("init", "--data", str(data))
    server = start_server(data)
    try:
        user = cli_ok(
            "token", "create", "--data", str(data), "--role", "user", "--email", EMAIL
        ).split()[-1]
        agent = cli_ok("token", "create", "--data", str(data), "--role", "agent").split()[-1]
        resp = server.client(user).post(
            server.url + "/v1/certificates", json={"public_key": ssh_key(tmp_path)}
        )
        assert resp.status_code == 409
        assert resp.json() == {
            "error": "no_user_ca",
            "detail": "no user CA: run sshaudit-collector ca init",
        }
        old_line, old_fp = ca_init(data)  # the running server signs with it: no restart

        def signer() -> str:
            resp = server.client(user).post(
                server.url + "/v1/certificates", json={"public_key": ssh_key(tmp_path)}
            )
            assert resp.status_code == 200, resp.text
            return inspect(tmp_path, resp.json()["certificate"]).field("Signing CA").split()[1]

        assert signer() == old_fp
        proc = cli("ca", "init", "--data", str(data), "--rotate")
        assert proc.returncode == 0, proc.stderr
        new_line, new_fp = proc.stdout.decode().split("\n")[:2]
        assert new_fp != old_fp and b"stays trusted" in proc.stderr
        assert signer() == new_fp  # at once, no restart
        listing = json.loads(cli_ok("ca", "list", "--data", str(data), "--json"))
        assert {(r["fingerprint"], r["signs"]) for r in listing} == {
            (old_fp, False),
            (new_fp, True),
        }
        # hosts get both keys
        host_key = base64.b64encode(b"\x01" * 32).decode()
        enrolled = server.client(agent).post(
            server.url + "/v1/enroll", json={"hostname": "h1", "host_public_key": host_key}
        )
        assert enrolled.status_code == 200, enrolled.text
        config = server.client(enrolled.json()["credential"]).get(server.url + "/v1/host/config")
        assert sorted(config.json()["ca_keys"]) == sorted([old_line, new_line])
        # the admin retires the old one
        cli_ok("ca", "remove", "--data", str(data), old_fp)
        config = server.client(enrolled.json()["credential"]).get(server.url + "/v1/host/config")
        assert config.json()["ca_keys"] == [new_line]
        # a key file others may read is never used (nor rotated away silently)
        (data / "user_ca_key").chmod(0o640)
        resp = server.client(user).post(
            server.url + "/v1/certificates", json={"public_key": ssh_key(tmp_path)}
        )
        assert (resp.status_code, resp.json()["error"]) == (500, "user_ca_error")
        assert "mode 0600" in resp.json()["detail"]
        proc = cli("ca", "init", "--data", str(data), "--rotate")
        assert proc.returncode == 1 and b"mode 0600" in proc.stderr, proc.stderr
    finally:
        server.stop()


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.one_of(
        st.text(max_size=200),
        st.builds(
            lambda kind, blob, tail: f"{kind} {base64.b64encode(blob).decode()}{tail}",
            st.sampled_from(["ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ssh-dss", "x"]),
            st.binary(max_size=600),
            st.text(max_size=20),
        ),
    )
)
def test_any_key_text_is_a_key_or_a_422_never_a_crash(text: str) -> None:
    """The route's parser under hostile input: a PublicKey or UnprocessableError only."""
    try:
        key = user_ca.parse_user_key(text)
    except UnprocessableError as exc:
        assert exc.status == 422 and exc.code in ("invalid_key", "weak_key")
    else:
        assert key.fingerprint.startswith("SHA256:")
