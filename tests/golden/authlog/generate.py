"""Regenerate the sample sshd logs in this folder from a real OpenSSH sshd (root only).

Run from the repository root: ``.venv/bin/python tests/golden/authlog/generate.py``.
Each scenario starts its own private sshd on loopback (tests/sshd_harness.py, ``sshd -E``),
makes one kind of login attempt with the real ``ssh`` client and stores the whole log as
``<scenario>.log``. Ports, fingerprints and pids differ on every run; the tests only rely on
what the scenario fixes (users, certificate key ids and serials, the kind of failure).

Invariants: nothing outside the harness's private directories and a temporary client
directory is touched, except ``sshd-password.log``, which gives sshaudit-alice a password for
the duration of the attempt and restores her ``*`` (no password) afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from sshd_harness import HOST, SshdConfig, SshdServer, client_env  # noqa: E402
from sshd_host import HarnessEnv, harness_env, run_checked  # noqa: E402

ALICE = "sshaudit-alice"
BOB = "sshaudit-bob"
PASSWORD = "correct horse battery staple 42"  # a throwaway test password


@dataclass(frozen=True)
class Client:
    """Client-side material: a CA, a user key and certificates, in a private temp dir."""

    work: Path
    authorized_line: str  # the harness key, authorized for the test users

    def key(self, name: str) -> Path:
        path = self.work / name
        if not path.exists():
            run_checked(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(path)],
                "ssh-keygen",
            )
        return path

    def cert(
        self, ca: str, user_key: str, key_id: str, principals: str, serial: int, validity: str
    ) -> Path:
        # ssh-keygen(1) CERTIFICATES: -s CA, -I key id, -n principals, -z serial, -V validity.
        key = self.key(user_key)
        run_checked(
            [
                "ssh-keygen",
                "-q",
                "-s",
                str(self.key(ca)),
                "-I",
                key_id,
                "-n",
                principals,
                "-z",
                str(serial),
                "-V",
                validity,
                str(key) + ".pub",
            ],
            "ssh-keygen -s",
        )
        return Path(str(key) + "-cert.pub")


def ssh(
    server: SshdServer,
    user: str,
    key: Path | None,
    *extra: str,
    command: tuple[str, ...] = ("true",),
    env: dict[str, str] | None = None,
    timeout: float = 20,
) -> subprocess.CompletedProcess[bytes]:
    opts = [
        "-F",
        "/dev/null",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "IdentityAgent=none",
        "-o",
        f"UserKnownHostsFile={server.known_hosts}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "ConnectTimeout=10",
    ]
    if key is not None:
        opts += ["-o", f"IdentityFile={key}"]
    argv = ["ssh", *extra, *opts, "-p", str(server.port), "-l", user, HOST, *command]
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
            env=env or client_env(),
        )
    except subprocess.TimeoutExpired:  # a refused stdio forward may leave ssh waiting
        return subprocess.CompletedProcess(argv, 255, b"", b"timed out")


def askpass_env(client: Client, password: str) -> dict[str, str]:
    # ssh(1) ENVIRONMENT: SSH_ASKPASS_REQUIRE=force makes ssh ask this program, no tty needed.
    script = client.work / "askpass"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' '{password}'\n")
    script.chmod(0o700)
    return {
        **client_env(),
        "SSH_ASKPASS": str(script),
        "SSH_ASKPASS_REQUIRE": "force",
        "DISPLAY": ":0",
    }


Scenario = Callable[[SshdServer, Client, Path], None]


def trusted_ca(client: Client) -> tuple[str, ...]:
    return (f"TrustedUserCAKeys {client.key('ca')}.pub",)


def run_scenario(
    name: str, config: SshdConfig, action: Scenario, client: Client, env: HarnessEnv
) -> None:
    server = SshdServer.start(config, env)
    try:
        action(server, client, env.key.private)
        time.sleep(0.5)  # let sshd's children write their last lines
    finally:
        server.stop()
    (HERE / f"{name}.log").write_text(server.log())
    print(f"{name}.log: {len(server.log().splitlines())} lines")


def main() -> None:
    with harness_env((ALICE, BOB)) as env, tempfile.TemporaryDirectory() as tmp:
        client = Client(Path(tmp), env.key.public_line())
        os.chmod(tmp, 0o700)
        ca_key = client.key("ca")
        base = SshdConfig(allow_users=(ALICE, BOB), extra_lines=trusted_ca(client))
        del ca_key
        only = set(sys.argv[1:])  # scenario names; none: all
        for name, config, action in scenarios(base, client):
            if only and name not in only:
                continue
            run_scenario(name, config, action, client, env)


def scenarios(base: SshdConfig, client: Client) -> list[tuple[str, SshdConfig, Scenario]]:
    good = client.cert("ca", "user", "alice@example.com", ALICE, 4242, "-5m:+1h")
    expired = client.cert("ca", "old", "alice@example.com", ALICE, 17, "20200101:20200102")
    future = client.cert("ca", "future", "alice@example.com", ALICE, 18, "+1d:+2d")
    other = client.cert("otherca", "stranger", "eve@example.com", ALICE, 99, "-5m:+1h")
    wrong = client.cert("ca", "mallory", "mallory@example.com", "mallory", 7, "-5m:+1h")
    del good, expired, future, other, wrong
    k = client.work
    info = replace(base, log_level="INFO")
    return [
        ("accepted-key", base, lambda s, c, hk: _ok(ssh(s, ALICE, hk))),
        ("accepted-key-info", info, lambda s, c, hk: _ok(ssh(s, ALICE, hk))),
        ("accepted-cert", base, lambda s, c, hk: _ok(ssh(s, ALICE, k / "user"))),
        ("expired-cert", base, lambda s, c, hk: _fail(ssh(s, ALICE, k / "old"))),
        ("expired-cert-info", info, lambda s, c, hk: _fail(ssh(s, ALICE, k / "old"))),
        ("future-cert", base, lambda s, c, hk: _fail(ssh(s, ALICE, k / "future"))),
        ("unknown-ca", base, lambda s, c, hk: _fail(ssh(s, ALICE, k / "stranger"))),
        ("principal-mismatch", base, lambda s, c, hk: _fail(ssh(s, ALICE, k / "mallory"))),
        ("unauthorized-key", base, lambda s, c, hk: _fail(ssh(s, BOB, k / "ca"))),
        ("invalid-user", base, lambda s, c, hk: _fail(ssh(s, "nosuchuser", hk))),
        ("not-allowed-user", base, lambda s, c, hk: _fail(ssh(s, "daemon", hk))),
        (
            "denied-user",
            replace(base, extra_lines=(*base.extra_lines, f"DenyUsers {BOB}")),
            lambda s, c, hk: _fail(ssh(s, BOB, hk)),
        ),
        ("refused-modes", _bad_modes(base, client), lambda s, c, hk: _fail(ssh(s, BOB, hk))),
        ("max-tries", replace(base, extra_lines=(*base.extra_lines, "MaxAuthTries 2")), _max_tries),
        ("password-off", base, _password_off),
        ("password-failed", _passwords_on(base), _password_failed),
        ("password-accepted", _passwords_on(base), _password_accepted),
        ("forwarding-refused", _no_forwarding(base), _forwarding),
        (
            "forwarding-not-permitted",
            replace(
                base,
                extra_lines=(
                    *base.extra_lines,
                    "PermitOpen 127.0.0.1:1",
                    "PermitListen 127.0.0.1:1",
                ),
            ),
            _forwarding_not_permitted,
        ),
    ]


def _ok(done: subprocess.CompletedProcess[bytes]) -> None:
    if done.returncode != 0:
        raise SystemExit(f"expected success: {done.stderr.decode(errors='replace')}")


def _fail(done: subprocess.CompletedProcess[bytes]) -> None:
    if done.returncode == 0:
        raise SystemExit("expected a denied login")


def _max_tries(s: SshdServer, c: Client, hk: Path) -> None:
    keys = [c.key(n) for n in ("t1", "t2", "t3", "t4")]
    extra = [a for key in keys for a in ("-i", str(key))]
    _fail(ssh(s, BOB, None, *extra))


def _password_off(s: SshdServer, c: Client, hk: Path) -> None:
    env = askpass_env(c, "not-the-password")
    _fail(ssh(s, ALICE, None, "-o", "PreferredAuthentications=password", env=env))


def _passwords_on(base: SshdConfig) -> SshdConfig:
    # sshd_config(5): the first value wins, and the harness already says "no"; a Match block
    # overrides it.
    return replace(base, extra_lines=(*base.extra_lines, "Match all", "PasswordAuthentication yes"))


def _password_failed(s: SshdServer, c: Client, hk: Path) -> None:
    env = askpass_env(c, "not-the-password")
    opts = ("-o", "PreferredAuthentications=password", "-o", "NumberOfPasswordPrompts=1")
    _fail(ssh(s, ALICE, None, *opts, env=env))
    _fail(ssh(s, "nosuchuser", None, *opts, env=env))


def _password_accepted(s: SshdServer, c: Client, hk: Path) -> None:
    hashed = (
        subprocess.run(
            ["openssl", "passwd", "-6", "-stdin"],
            input=PASSWORD.encode(),
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .strip()
    )
    run_checked(["usermod", "--password", hashed, ALICE], "usermod")
    try:
        env = askpass_env(c, PASSWORD)
        _ok(ssh(s, ALICE, None, "-o", "PreferredAuthentications=password", env=env))
    finally:
        run_checked(["usermod", "--password", "*", ALICE], "usermod")


def _bad_modes(base: SshdConfig, client: Client) -> SshdConfig:
    # StrictModes (sshd_config(5)) refuses keys in a world-writable directory.
    loose = client.work / "loose"
    loose.mkdir(exist_ok=True)
    loose.chmod(0o777)
    (loose / "keys").write_text(client.authorized_line + "\n")
    os.chmod(client.work, 0o755)
    return replace(
        base,
        extra_lines=(*base.extra_lines, f"Match User {BOB}", f"AuthorizedKeysFile {loose}/keys"),
    )


def _no_forwarding(base: SshdConfig) -> SshdConfig:
    return replace(
        base,
        allow_tcp_forwarding=False,
        allow_agent_forwarding=False,
        x11_forwarding=False,
        permit_tunnel=False,
        extra_lines=(*base.extra_lines, "AllowStreamLocalForwarding no"),
    )


def _forwarding(s: SshdServer, c: Client, hk: Path) -> None:
    # -W asks for a direct-tcpip channel (a local forward); -R a tcpip-forward global request;
    # -A and -X an agent / X11 channel request on the session; -w a tunnel.
    ssh(s, ALICE, hk, "-W", "127.0.0.1:9", command=())
    ssh(s, ALICE, hk, "-o", "ExitOnForwardFailure=yes", "-R", "127.0.0.1:0:127.0.0.1:9")
    ssh(s, ALICE, hk, "-W", "/run/nonexistent.sock", command=(), timeout=5)
    ssh(s, ALICE, hk, "-A", env={**client_env(), "SSH_AUTH_SOCK": "/nonexistent"})
    ssh(s, ALICE, hk, "-X", env={**client_env(), "DISPLAY": "127.0.0.1:0"})
    ssh(s, ALICE, hk, "-o", "Tunnel=point-to-point", "-w", "any", command=("true",))


def _forwarding_not_permitted(s: SshdServer, c: Client, hk: Path) -> None:
    # Forwarding on, but PermitOpen / PermitListen (sshd_config(5)) allow only port 1.
    ssh(s, ALICE, hk, "-W", "127.0.0.1:9", command=(), timeout=5)
    ssh(s, ALICE, hk, "-o", "ExitOnForwardFailure=yes", "-R", "127.0.0.1:7:127.0.0.1:9")


if __name__ == "__main__":
    main()
