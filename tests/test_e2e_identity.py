"""The session's identity comes from root, end to end (real sshd, recorder, daemon, PAM hook).

sshd writes the authenticating key or certificate to the ``SSH_USER_AUTH`` file, which the
user owns and can rewrite (one channel of a multiplexed connection can change what the
next channel's recorder reads); the PAM hook, root, sees the same text as
``SSH_AUTH_INFO_0`` and sends it with ``open_session``; the daemon records that one.

- a certificate login records the key id (``user_email``), serial, fingerprint and
  principal from root's copy, also with ``ExposeAuthInfo no`` and for an unrecorded session;
- a forged ``SSH_USER_AUTH`` (rewritten from another channel) changes nothing but a warning
  and a note in ``error``; without the hook, the same forgery works (the control);
- ``~/.pam_environment`` (Debian's ``pam_env.so user_readenv=1``) can rewrite
  ``SSH_AUTH_INFO_0`` for modules after it: with the hook first, it changes nothing; with
  the hook after pam_env, the altered value is recognised and no identity is recorded.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from agent_harness import Agent
from e2e_helpers import AgentFactory, agents, finished, planted, read_recording
from sshd_harness import SshdFactory
from sshd_host import PAM_DIR, HarnessEnv, UnixUser

from sshaudit.agent.connection import NOTE_ALTERED, NOTE_MISMATCH

pytestmark = pytest.mark.e2e
EMAIL = "alice@example.com"


@pytest.fixture
def agent(root_work_dir: Path) -> Iterator[AgentFactory]:
    with agents(root_work_dir) as make:
        yield make


def keygen(*args: str) -> str:
    done = subprocess.run(["ssh-keygen", *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def sign(ca: Path, pub: Path, key_id: str, principal: str, serial: int) -> Path:
    if not ca.exists():
        keygen("-q", "-t", "ed25519", "-N", "", "-C", "test-ca", "-f", str(ca))
    keygen("-q", "-s", str(ca), "-I", key_id, "-n", principal, "-z", str(serial), str(pub))
    return pub.with_name(pub.stem + "-cert.pub")


def auth_line(cert: Path) -> str:
    """What sshd writes to SSH_USER_AUTH for a login with ``cert``."""
    key_type, blob = cert.read_text().split()[:2]
    return f"publickey {key_type} {blob}\n"


@dataclass(frozen=True)
class Keys:
    ca_pub: Path  # TrustedUserCAKeys
    cert: Path  # alice's certificate for the harness key
    fingerprint: str  # of the harness key (the certified key), as ssh-keygen -l shows it
    forged: str  # an SSH_USER_AUTH line for a certificate of someone else, by another CA


@pytest.fixture
def keys(root_work_dir: Path, tmp_path: Path, sshd_env: HarnessEnv, alice: UnixUser) -> Keys:
    pub = tmp_path / "id.pub"  # a copy: ssh would pick up a -cert.pub beside the real key
    shutil.copy(sshd_env.key.public, pub)
    cert = sign(root_work_dir / "ca", pub, EMAIL, alice.name, 4242)
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(sshd_env.key.public, evil / "id.pub")
    forged = sign(evil / "ca", evil / "id.pub", "ceo@example.com", alice.name, 1)
    fingerprint = keygen("-l", "-f", str(pub)).split()[1]
    return Keys(root_work_dir / "ca.pub", cert, fingerprint, auth_line(forged))


def hook_before_pam_env(a: Agent) -> str:
    """Debian's sshd PAM file with the hook before its first ``pam_env.so`` session line,
    where the installer must put it (pam_module/__init__.py)."""
    lines = (PAM_DIR / "sshd").read_text().splitlines()
    at = next(i for i, x in enumerate(lines) if x.split()[:1] == ["session"] and "pam_env.so" in x)
    return "\n".join([*lines[:at], a.pam_line(), *lines[at:]]) + "\n"


def test_certificate_identity_is_recorded_from_root_s_copy(
    agent: AgentFactory, sshd_server: SshdFactory, alice: UnixUser, keys: Keys
) -> None:
    a = agent()
    ca_line = (f"TrustedUserCAKeys {keys.ca_pub}",)
    hook = hook_before_pam_env(a)
    exposed = sshd_server(force_command=a.force_command(), pam_base=hook, extra_lines=ca_line)
    hidden = sshd_server(
        force_command=a.force_command(),
        pam_base=hook,
        extra_lines=ca_line,
        expose_auth_info=False,  # the recorder then has no SSH_USER_AUTH at all
    )
    cert_opts = ("-o", f"CertificateFile={keys.cert}")
    for server in (exposed, hidden):
        done = server.ssh(alice, "echo $SSH_USER_AUTH", extra_opts=cert_opts)
        assert done.returncode == 0, done.stderr
        assert (done.stdout == b"\n") is (server is hidden)
    # a connection that runs nothing (the subsystem does not exist): unrecorded, but named
    refused = exposed.ssh(alice, "none", extra_opts=("-s", *cert_opts))
    assert refused.returncode != 0
    records = finished(a, 3)
    for r in records:
        assert (r["user_email"], r["cert_serial"], r["principal"]) == (EMAIL, 4242, alice.name), r
        assert r["cert_fingerprint"] == keys.fingerprint == r["details"]["key_fingerprint"]
        assert r["details"]["identity_source"] == "pam"
        if r["recording_status"] == "unrecorded":
            assert "closed without a recorder" in r["error"]
            continue
        assert r["recording_status"] == "complete" and r["error"] is None, r
        header = read_recording(a, r).header.extra["sshaudit"]
        assert (header["user_email"], header["cert_serial"]) == (EMAIL, 4242)
    statuses = sorted(r["recording_status"] for r in records)
    assert statuses == ["complete", "complete", "unrecorded"]


def test_a_rewritten_ssh_user_auth_file_does_not_change_the_identity(
    agent: AgentFactory, sshd_server: SshdFactory, alice: UnixUser, keys: Keys
) -> None:
    a = agent()
    with_hook = sshd_server(force_command=a.force_command(), pam_base=hook_before_pam_env(a))
    without_hook = sshd_server(force_command=a.force_command())  # the control
    forge = f'printf %s {shlex.quote(keys.forged)} > "$SSH_USER_AUTH"'
    for server in (with_hook, without_hook):
        with server.control_master(alice) as path:  # one SSH connection, two channels
            assert server.ssh(alice, forge, control_path=path).returncode == 0
            assert server.ssh(alice, "echo second", control_path=path).stdout == b"second\n"
    records = finished(a, 4)
    second = {
        port: r for r in records if r["command"] == "echo second" for port in [r["server_port"]]
    }
    guarded, control = second[with_hook.port], second[without_hook.port]
    assert guarded["details"]["identity_source"] == "pam"
    assert guarded["user_email"] == "" and guarded["cert_serial"] is None
    assert guarded["details"]["key_fingerprint"] == keys.fingerprint  # the real key
    assert NOTE_MISMATCH in guarded["error"] and guarded["recording_status"] == "complete"
    assert "ceo@example.com" not in str(read_recording(a, guarded).header.extra)
    assert NOTE_MISMATCH in a.log.read_text()
    # without root's copy, the recorder's (the user's file) is all there is: forged
    assert control["details"]["identity_source"] == "recorder"
    assert (control["user_email"], control["cert_serial"]) == ("ceo@example.com", 1)
    assert control["error"] is None


def test_pam_environment_cannot_forge_the_identity(
    agent: AgentFactory, sshd_server: SshdFactory, bob: UnixUser, keys: Keys
) -> None:
    a = agent()
    first = sshd_server(force_command=a.force_command(), pam_base=hook_before_pam_env(a))
    last = sshd_server(force_command=a.force_command(), pam_extra=(a.pam_line(),))
    # pam_env cannot write a newline: the forged value lacks sshd's final one
    forged = keys.forged.rstrip("\n")
    with planted(bob, ".pam_environment", f'SSH_AUTH_INFO_0 OVERRIDE="{forged}"\n'):
        for server in (first, last):
            assert server.ssh(bob, "echo in").stdout == b"in\n"
    records = {r["server_port"]: r for r in finished(a, 2)}
    before, after = records[first.port], records[last.port]
    for r in (before, after):
        assert r["user_email"] == "" and r["cert_serial"] is None and r["unix_user"] == bob.name
        assert r["details"]["identity_source"] == "pam"
    # hook before pam_env: sshd's own value (bob's plain key, not a certificate)
    assert before["details"]["key_fingerprint"] == keys.fingerprint and before["error"] is None
    # hook after pam_env: the rewritten value is recognised, and nobody is named
    assert after["details"]["key_fingerprint"] == "" and NOTE_ALTERED in after["error"]
