"""``sshaudit login`` against a real collector (uvicorn, TLS, pinned) with its built-in CA,
and the certificate it writes used by the real ssh client against a real sshd that trusts
the collector's CA keys (TrustedUserCAKeys from the host configuration, as an enrolled host
gets it), before and after a CA rotation."""

from __future__ import annotations

import base64
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from collector_helpers import Server, cli_ok, start_server
from sshd_harness import HOST, SshdFactory, SshdServer, client_env
from sshd_host import UnixUser

from sshaudit.auditor import login
from sshaudit.errors import SSHAuditError, UsageError

pytestmark = pytest.mark.slow
SSHAUDIT = str(Path(sys.executable).parent / "sshaudit")
EMAIL = "jdoe@example.com"


def keygen(*args: str) -> str:
    done = subprocess.run(["ssh-keygen", *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def make_key(path: Path, kind: str = "ed25519") -> Path:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    keygen("-q", "-t", kind, "-N", "", "-C", "test", "-f", str(path))
    return path


@dataclass
class Collector:
    server: Server
    ca_fingerprint: str
    tmp: Path

    def token_file(self, role: str, *extra: str) -> Path:
        data = str(self.server.data)
        token = cli_ok("token", "create", "--data", data, "--role", role, *extra).split()[-1]
        path = self.tmp / f"{role}-{len(list(self.tmp.iterdir()))}.token"
        path.write_text(token + "\n")
        path.chmod(0o600)
        return path

    def login(
        self, token: Path, *args: str, home: Path, tz: str = "UTC"
    ) -> subprocess.CompletedProcess[str]:
        argv = [SSHAUDIT, "login", "--collector", self.server.url, "--token-file", str(token)]
        argv += ["--fingerprint", str(self.server.fingerprint), *args]
        env = {"PATH": os.environ["PATH"], "HOME": str(home), "TZ": tz}
        env["XDG_CONFIG_HOME"] = str(home / ".config")  # no stray auditor.toml
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Collector]:
    data = tmp_path_factory.mktemp("collector") / "data"
    cli_ok("init", "--data", str(data))
    fingerprint = cli_ok("ca", "init", "--data", str(data)).split()[-1]
    server = start_server(data)
    try:
        yield Collector(server, fingerprint, tmp_path_factory.mktemp("tokens"))
    finally:
        server.stop()


def test_login_writes_the_certificate_where_ssh_looks(collector: Collector, tmp_path: Path) -> None:
    key = make_key(tmp_path / ".ssh" / "id_ed25519")
    token = collector.token_file("user", "--email", EMAIL)
    done = collector.login(token, "--ttl", "2h", home=tmp_path, tz="XYZ-3")  # POSIX TZ: UTC+3
    assert done.returncode == 0, done.stderr
    cert = tmp_path / ".ssh" / "id_ed25519-cert.pub"  # found by the default --key
    assert stat.S_IMODE(cert.stat().st_mode) == 0o644
    shown = keygen("-L", "-f", str(cert))
    assert f'Key ID: "{EMAIL}"' in shown
    assert re.search(r"Principals: \n\s+jdoe\n", shown), shown
    assert f"Signing CA: ED25519 {collector.ca_fingerprint}" in shown
    # the certificate is for this very key (ssh-keygen: the public key inside is ours)
    assert keygen("-l", "-f", str(cert)).split()[1] == keygen("-l", "-f", str(key)).split()[1]
    out = done.stdout
    assert f"key id:     {EMAIL}" in out and "principals: jdoe" in out
    assert re.search(r"expires in: (1 h 59|2 h 0) min \(at \d\d:\d\d XYZ\)", out), out
    assert out.count("XYZ") == 3  # local time, not UTC
    serial = int(re.search(r"serial:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    assert f"Serial: {serial}" in shown
    # again: replaced atomically, a new serial, nothing left beside it
    again = collector.login(token, "--key", str(key) + ".pub", home=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"Serial: {serial}" not in keygen("-L", "-f", str(cert))
    assert sorted(p.name for p in cert.parent.iterdir()) == [
        "id_ed25519",
        "id_ed25519-cert.pub",
        "id_ed25519.pub",
    ]


def test_login_failures_are_one_clear_line_and_write_nothing(
    collector: Collector, tmp_path: Path
) -> None:
    user = collector.token_file("user", "--email", EMAIL)
    nokey = collector.login(user, "--key", str(tmp_path / "none"), home=tmp_path)
    assert nokey.returncode == 2 and "ssh-keygen -t ed25519" in nokey.stderr, nokey.stderr
    key = make_key(tmp_path / "k" / "id_ed25519")
    auditor = collector.token_file("auditor")
    wrong = collector.login(auditor, "--key", str(key), home=tmp_path)
    assert wrong.returncode == 1 and "use a user token" in wrong.stderr, wrong.stderr
    dsa = make_key(tmp_path / "k" / "id_dsa", "dsa")
    refused = collector.login(user, "--key", str(dsa), home=tmp_path)
    assert refused.returncode == 1 and "DSA keys are refused" in refused.stderr, refused.stderr
    assert "invalid_key" in refused.stderr
    bad_ttl = collector.login(user, "--key", str(key), "--ttl", "8 hours", home=tmp_path)
    assert bad_ttl.returncode == 2 and "--ttl" in bad_ttl.stderr
    argv = [SSHAUDIT, "login", "--collector", collector.server.url, "--token-file", str(user)]
    pin = subprocess.run(
        [*argv, "--fingerprint", "SHA256:" + "00" * 32, "--key", str(key)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
    )
    assert pin.returncode == 1 and "pinned" in pin.stderr, pin.stderr
    for proc in (nokey, wrong, refused, bad_ttl, pin):
        assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not list(tmp_path.rglob("*-cert.pub"))


def test_the_client_checks_the_answer_and_parses_its_flags(tmp_path: Path) -> None:
    assert login.parse_ttl("8h") == 28800 and login.parse_ttl("90m") == 5400
    for bad in ("8", "h", "0h", "-1h", "1y"):
        with pytest.raises(UsageError):
            login.parse_ttl(bad)
    pub, cert = login.key_files(str(tmp_path / "id_ecdsa.pub"))
    assert (pub.name, cert.name) == ("id_ecdsa.pub", "id_ecdsa-cert.pub")
    # a certificate for another key, signed by a CA the test makes with ssh-keygen
    ours = make_key(tmp_path / "ours")
    theirs = make_key(tmp_path / "theirs")
    ca = make_key(tmp_path / "ca")
    keygen("-q", "-s", str(ca), "-I", EMAIL, "-n", "jdoe", f"{theirs}.pub")
    other = (tmp_path / "theirs-cert.pub").read_text()
    mine = Path(f"{ours}.pub").read_text()
    with pytest.raises(SSHAuditError, match="not a user certificate for this key"):
        login.check_certificate(other, mine)
    with pytest.raises(SSHAuditError, match="not a valid SSH certificate"):
        login.check_certificate(mine, mine)  # a plain key is no certificate
    tampered = other.split()
    blob = bytearray(base64.b64decode(tampered[1]))
    blob[-10] ^= 1  # inside the signature
    tampered[1] = base64.b64encode(bytes(blob)).decode()
    with pytest.raises(SSHAuditError, match="not a valid SSH certificate"):
        login.check_certificate(" ".join(tampered), (tmp_path / "theirs.pub").read_text())
    assert login.check_certificate(other, (tmp_path / "theirs.pub").read_text()).serial == 0


# --- a real sshd


def ssh_with(server: SshdServer, user: UnixUser, key: Path) -> subprocess.CompletedProcess[bytes]:
    """The real ssh with ``key`` as the only identity (ssh adds ``key``-cert.pub itself)."""
    argv = [
        f"IdentityFile={key}" if a.startswith("IdentityFile=") else a for a in server.ssh_argv(user)
    ]
    return subprocess.run(
        [*argv, "-T", HOST, "id -un"],
        capture_output=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        env=client_env(),
        check=False,
    )


def trusted_ca_file(collector: Collector, path: Path) -> Path:
    """TrustedUserCAKeys as an enrolled host gets it: HostConfig.ca_keys."""
    agent = collector.token_file("agent").read_text().strip()
    host_key = base64.b64encode(os.urandom(32)).decode()
    http = collector.server.client(agent)
    enrolled = http.post(
        collector.server.url + "/v1/enroll", json={"hostname": "h", "host_public_key": host_key}
    )
    assert enrolled.status_code == 200, enrolled.text
    config = collector.server.client(enrolled.json()["credential"]).get(
        collector.server.url + "/v1/host/config"
    )
    path.write_text("".join(line + "\n" for line in config.json()["ca_keys"]))
    path.chmod(0o644)
    return path


@pytest.mark.e2e
def test_a_real_sshd_accepts_the_certificate_before_and_after_rotation(
    tmp_path_factory: pytest.TempPathFactory,
    sshd_server: SshdFactory,
    alice: UnixUser,
    bob: UnixUser,
) -> None:
    tmp = tmp_path_factory.mktemp("login-sshd")
    data = tmp / "data"
    cli_ok("init", "--data", str(data))
    fingerprint = cli_ok("ca", "init", "--data", str(data)).split()[-1]
    server = start_server(data)
    try:
        coll = Collector(server, fingerprint, tmp / "tokens")
        coll.tmp.mkdir()
        key = make_key(tmp / "home" / ".ssh" / "id_ed25519")  # in nobody's authorized_keys
        token = coll.token_file("user", "--email", f"{alice.name}@example.com")
        ca_file = trusted_ca_file(coll, tmp / "ca1.pub")
        sshd = sshd_server(extra_lines=(f"TrustedUserCAKeys {ca_file}",))
        before = ssh_with(sshd, alice, key)
        assert before.returncode != 0  # the control: the key alone gets nowhere
        done = coll.login(token, "--key", str(key), home=tmp / "home")
        assert done.returncode == 0, done.stderr
        serial = re.search(r"serial:\s+(\d+)", done.stdout).group(1)  # type: ignore[union-attr]
        ok = ssh_with(sshd, alice, key)
        assert (ok.returncode, ok.stdout) == (0, f"{alice.name}\n".encode()), ok.stderr
        accepted = (
            f"Accepted publickey for {alice.name} from {re.escape(HOST)} port \\d+ ssh2: "
            f"ED25519-CERT \\S+ "
            f"ID {alice.name}@example.com \\(serial {serial}\\) CA ED25519 {re.escape(fingerprint)}"
        )
        assert re.search(accepted, sshd.log()), sshd.log()
        assert ssh_with(sshd, bob, key).returncode != 0  # principal sshaudit-alice is not bob
        old_cert = (tmp / "home" / ".ssh" / "id_ed25519-cert.pub").read_text()
        # rotation: a host that refreshed trusts both; new certificates come from the new key
        new_fp = cli_ok("ca", "init", "--data", str(data), "--rotate").split()[-1]
        ca_both = trusted_ca_file(coll, tmp / "ca2.pub")
        rotated = sshd_server(extra_lines=(f"TrustedUserCAKeys {ca_both}",))
        assert ssh_with(rotated, alice, key).returncode == 0  # the old certificate still works
        done = coll.login(token, "--key", str(key), home=tmp / "home")
        assert done.returncode == 0, done.stderr
        assert (tmp / "home" / ".ssh" / "id_ed25519-cert.pub").read_text() != old_cert
        ok = ssh_with(rotated, alice, key)
        assert ok.returncode == 0, ok.stderr
        assert f"CA ED25519 {new_fp}\n" in rotated.log()
        # the first sshd, still trusting only the old key, refuses the new certificate
        assert ssh_with(sshd, alice, key).returncode != 0
    finally:
        server.stop()


def test_summary_is_in_local_time(tmp_path: Path) -> None:
    cert = login.Certificate(
        tmp_path / "k-cert.pub",
        EMAIL,
        7,
        ("jdoe", "deploy"),
        datetime(2026, 11, 22, 8, 59, tzinfo=UTC),
        datetime(2026, 11, 22, 17, 0, tzinfo=UTC),
    )
    text = login.summary(cert, datetime(2026, 11, 22, 9, 0, tzinfo=UTC))
    assert "principals: jdoe, deploy" in text and "expires in: 8 h 0 min" in text
