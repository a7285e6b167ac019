"""The packages of issue 6, proven on a clean system (docs/packaging.md).

Built by ``scripts/package`` (version V, and V+pkgtest2 for the upgrade). The .deb is
installed with apt into a debootstrapped Debian 12 chroot (apt resolves the dependencies),
the host is enrolled with a real collector running outside, and a certificate login to the
chroot's own sshd (a free loopback port) is recorded, shipped and decrypted with the auditor
key. An upgrade to V+pkgtest2 while an interactive session is open keeps the session and its
recording; a purge unenrolls first: sshd_config and the PAM file come back byte for byte and
a plain key logs in without any ForceCommand. The .rpm's layout, scriptlets, modes and owners
are checked by installing it into a scratch root with ``rpm --root``.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from chroot_helpers import Chroot, ok, run
from collector_helpers import Server, cli_ok, start_server

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(1500)]
REPO = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
V2 = VERSION + "+pkgtest2"
USER = "pkguser"

if os.geteuid() != 0:
    _WHY = "PACKAGE TESTS NOT RUN: they need root (chroot, mounts, rpm --root)"
    if os.environ.get("CI"):
        pytest.fail(_WHY, pytrace=False)
    pytest.skip(_WHY, allow_module_level=True)


@pytest.fixture(scope="module")
def dist() -> Iterator[Path]:
    prebuilt = os.environ.get("SSHAUDIT_TEST_DIST")  # packages already built (development)
    if prebuilt:
        yield Path(prebuilt)
        return
    out = Path(tempfile.mkdtemp(prefix="sshaudit-dist-", dir="/var/tmp"))
    try:
        t0 = time.monotonic()
        ok([str(REPO / "scripts/package"), "--out", str(out)], 1200)
        print(f"scripts/package (both packages, both formats): {time.monotonic() - t0:.0f} s")
        yield out
    finally:
        ok(["rm", "-rf", str(out)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(cond: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


class Fleet:
    """The collector outside, the chroot host, the user's keys and the auditor's."""

    def __init__(self, tmp: Path, chroot: Chroot, server: Server) -> None:
        self.tmp, self.c, self.server = tmp, chroot, server
        self.port = free_port()
        self.sshd_log = "/var/log/sshd-pkgtest.log"
        assert server.fingerprint is not None
        self.fp = server.fingerprint

    def ssh(self, *argv: str, cert: bool = True, **kw: Any) -> list[str]:
        opts = ["-o", f"CertificateFile={self.tmp / 'usercert.pub'}"] if cert else []
        return [
            "ssh", "-p", str(self.port), "-i", str(self.tmp / "user"), *opts,
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            f"{USER}@127.0.0.1", *argv,
        ]  # fmt: skip

    def auditor(self, *argv: str) -> str:
        conn = ["--collector", self.server.url, "--token-file", "/root/auditor.token"]
        return self.c.ok("sshaudit", *argv, *conn, "--fingerprint", self.fp, timeout=120)

    def sessions(self) -> list[dict[str, Any]]:
        out = self.auditor("sessions", "list", "--json")
        return [json.loads(line) for line in out.splitlines()]

    def cast_of(self, session_id: str) -> str:
        self.auditor("download", session_id, "-o", f"/root/{session_id}.sealed")
        self.c.ok(
            "sshaudit", "decrypt", "-k", "/root/auditor.key",
            "-o", f"/root/{session_id}.cast", f"/root/{session_id}.sealed",
        )  # fmt: skip
        return self.c.path(f"/root/{session_id}.cast").read_text()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    t0 = time.monotonic()
    chroot = Chroot.create()
    print(f"chroot from the cached debootstrap: {time.monotonic() - t0:.0f} s")
    server = None
    try:
        data = tmp_path / "collector"
        cli_ok("init", "--data", str(data))
        server = start_server(data)
        yield Fleet(tmp_path, chroot, server)
    finally:
        try:
            log = chroot.path("/var/lib/sshaudit/daemon.log")
            if log.exists():
                print("--- agent daemon log:\n" + log.read_text()[-4000:])
        finally:
            chroot.destroy()
            if server is not None:
                server.stop()


def _prepare(f: Fleet, dist: Path) -> None:
    """apt installs the .deb; keys, CA, tokens; the user; sshd on a free loopback port."""
    c, tmp = f.c, f.tmp
    deb = dist / f"sshaudit-agent_{VERSION}_amd64.deb"
    ok(["cp", str(deb), str(c.path("/root/"))])
    t0 = time.monotonic()
    c.ok("apt-get", "update", "-qq", timeout=300)
    c.ok("apt-get", "install", "-y", "-qq", "--no-install-recommends", f"/root/{deb.name}")
    print(f"apt-get install of the .deb with its dependencies: {time.monotonic() - t0:.0f} s")
    assert "install ok installed" in c.ok("dpkg-query", "-W", "-f=${Status}", "sshaudit-agent")
    c.ok("getent", "passwd", "sshaudit-principals")
    assert (c.path("/var/spool/sshaudit").stat().st_mode & 0o777) == 0o700
    # the auditor key pair, made by the packaged CLI; the collector seals to its public half
    c.ok("sshaudit", "keygen", "-o", "/root/auditor.key")
    cli_ok("keys", "add", "--data", str(f.server.data), str(c.path("/root/auditor.key.pub")))
    ok(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "ca")])
    cli_ok("ca", "add", "--data", str(f.server.data), str(tmp / "ca.pub"))
    data = str(f.server.data)
    for name, role in (("auditor.token", "auditor"), ("enroll.token", "agent")):
        token = cli_ok("token", "create", "--data", data, "--role", role).split()[-1]
        path = c.path(f"/root/{name}")
        path.write_text(token + "\n")
        path.chmod(0o600)
    c.ok("useradd", "-m", "-s", "/bin/bash", USER)
    ok(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "user")])
    ssh_dir = c.path(f"/home/{USER}/.ssh")
    ssh_dir.mkdir(mode=0o700)
    (ssh_dir / "authorized_keys").write_text((tmp / "user.pub").read_text())
    c.ok("chown", "-R", f"{USER}:{USER}", f"/home/{USER}/.ssh")
    ok(["cp", str(tmp / "user.pub"), str(tmp / "usercert-key.pub")])
    ok([
        "ssh-keygen", "-q", "-s", str(tmp / "ca"), "-I", f"{USER}@example.com", "-n", USER,
        "-V", "+1h", str(tmp / "usercert-key.pub"),
    ])  # fmt: skip
    (tmp / "usercert-key-cert.pub").rename(tmp / "usercert.pub")
    c.ok("/usr/sbin/sshd", "-p", str(f.port), "-o", "ListenAddress=127.0.0.1", "-E", f.sshd_log)
    wait_until(lambda: _listening(f.port), "the chroot's sshd", 15)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _enroll(f: Fleet) -> None:
    t0 = time.monotonic()
    out = f.c.ok(
        "sshaudit-agent", "enroll", "--collector", f.server.url,
        "--token-file", "/root/enroll.token", "--ca-fingerprint", f.fp,
        "--sshd-log", f.sshd_log, "--principals-user", "sshaudit-principals",
        "--hostname", "pkgtest-chroot", "--refresh-seconds", "2",
    )  # fmt: skip
    print(f"enroll: {time.monotonic() - t0:.1f} s\n{out}")
    assert "enrolled at" in out and "reloaded" in out, out


def _upgrade_mid_session(f: Fleet, dist2: Path) -> str:
    """An interactive session stays open across ``apt-get install`` of V2."""
    proc = subprocess.Popen(
        f.ssh("-tt"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdin is not None and proc.stdout is not None
    seen = bytearray()

    def expect(marker: bytes, timeout: float = 30) -> None:
        os.set_blocking(proc.stdout.fileno(), False)  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        while marker not in seen:
            chunk = proc.stdout.read(65536)  # type: ignore[union-attr]
            if chunk:
                seen.extend(chunk)
            elif proc.poll() is not None:
                raise AssertionError(f"session ended early: {bytes(seen)!r}")
            else:
                assert time.monotonic() < deadline, f"no {marker!r} in {bytes(seen)!r}"
                time.sleep(0.1)

    try:
        proc.stdin.write(b"echo before-$((20+1))\n")
        proc.stdin.flush()
        expect(b"before-21")
        deb = dist2 / f"sshaudit-agent_{V2}_amd64.deb"
        ok(["cp", str(deb), str(f.c.path("/root/"))])
        t0 = time.monotonic()
        upgrade = f.c.run("apt-get", "install", "-y", "-qq", f"/root/{deb.name}")
        print(f"upgrade to {V2}: {time.monotonic() - t0:.1f} s\n{upgrade.stdout}{upgrade.stderr}")
        assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
        assert proc.poll() is None, "the session ended during the upgrade"
        proc.stdin.write(b"echo after-$((40+2))\n")
        proc.stdin.flush()
        expect(b"after-42")
        proc.stdin.write(b"exit\n")
        proc.stdin.flush()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return upgrade.stdout + upgrade.stderr  # dpkg's maintainer scripts write to apt's stdout


def test_deb_install_enroll_record_upgrade_mid_session_purge(
    fleet: Fleet, dist: Path, tmp_path: Path
) -> None:
    f, c = fleet, fleet.c
    t0 = time.monotonic()
    ok([str(REPO / "scripts/package"), "--only", "deb", "--package", "agent",
        "--version", V2, "--out", str(tmp_path / "dist2")], 900)  # fmt: skip
    print(f"scripts/package --package agent --only deb (V2): {time.monotonic() - t0:.0f} s")
    _prepare(f, dist)
    sshd_config, pam = c.path("/etc/ssh/sshd_config"), c.path("/etc/pam.d/sshd")
    before = {p: p.read_bytes() for p in (sshd_config, pam)}
    plain = run(f.ssh("echo plain-$((1+1))", cert=False), 60)
    assert plain.stdout == "plain-2\n", plain.stderr

    _enroll(f)
    dropins = c.path("/etc/ssh/sshd_config.d")
    assert [p.name for p in dropins.glob("*sshaudit*")] == ["00-sshaudit.conf"]
    assert c.ok("sshaudit-agent", "status", "--json")
    # enroll rewrote the launchers with the very bytes the package ships (docs/packaging.md)
    verify = c.run("dpkg", "--verify", "sshaudit-agent")
    assert verify.returncode == 0 and verify.stdout == "", verify.stdout
    assert run(f.ssh("true", cert=False), 60).returncode == 255  # certificate-only now
    done = run(f.ssh("echo recorded-$((6*7))"), 60)
    assert done.returncode == 0 and done.stdout == "recorded-42\n", done.stderr
    (first,) = wait_until(f.sessions, "the first session at the collector")
    assert first["unix_user"] == USER and first["program_type"] == "exec"
    assert "recorded-42" in wait_until(lambda: _final_cast(f, first["session_id"]), "its cast")

    daemon_pid = c.path("/run/sshaudit/daemon.pid").read_text().strip()
    said = _upgrade_mid_session(f, tmp_path / "dist2")
    assert "keeps the previous version" in said, said
    assert V2 in c.ok("dpkg-query", "-W", "-f=${Version}", "sshaudit-agent")
    assert c.path("/run/sshaudit/daemon.pid").read_text().strip() == daemon_pid  # not restarted

    def shell_session() -> list[dict[str, Any]]:
        return [s for s in f.sessions() if s["program_type"] == "shell"]

    (shell,) = wait_until(shell_session, "the session that spanned the upgrade")
    cast = wait_until(lambda: _final_cast(f, shell["session_id"]), "the upgrade session's cast")
    assert "before-21" in cast and "after-42" in cast
    after = run(f.ssh("echo new-launcher"), 60)  # the upgraded recorder, the running daemon
    assert after.returncode == 0 and after.stdout == "new-launcher\n", after.stderr

    _removal_refused_when_unenroll_fails(f)
    t0 = time.monotonic()
    purge = c.run("apt-get", "purge", "-y", "-qq", "sshaudit-agent")
    print(f"purge: {time.monotonic() - t0:.1f} s\n{purge.stdout}{purge.stderr}")
    assert purge.returncode == 0, purge.stdout + purge.stderr
    assert {p: p.read_bytes() for p in before} == before  # byte for byte
    assert not list(dropins.glob("*sshaudit*"))
    for gone in ("/opt/sshaudit", "/usr/libexec/sshaudit", "/etc/sshaudit", "/var/spool/sshaudit"):
        assert not c.path(gone).exists(), gone
    assert not any(_cmdline(pid).startswith("/opt/sshaudit") for pid in c.pids())
    back = run(f.ssh('echo "plain-again:${SSH_ORIGINAL_COMMAND-none}"', cert=False), 60)
    assert back.returncode == 0 and back.stdout == "plain-again:none\n", back.stderr
    _collector_deb(f, dist)


def _removal_refused_when_unenroll_fails(f: Fleet) -> None:
    """A removal whose unenroll fails stops, and the host keeps recording: sshd is not left
    with a ForceCommand pointing at nothing."""
    c = f.c
    record = c.path("/var/lib/sshaudit/enrollment.json")
    saved = record.read_bytes()
    record.write_text("{not json")
    try:
        refused = c.run("apt-get", "remove", "-y", "-qq", "sshaudit-agent")
        assert refused.returncode != 0, refused.stdout
        assert "unenroll failed: the package stays" in refused.stdout + refused.stderr
        assert "install ok installed" in c.ok("dpkg-query", "-W", "-f=${Status}", "sshaudit-agent")
        still = run(f.ssh("echo still-recorded"), 60)
        assert still.returncode == 0 and still.stdout == "still-recorded\n", still.stderr
    finally:
        record.write_bytes(saved)


def _collector_deb(f: Fleet, dist: Path) -> None:
    """The collector's .deb: its user, its 0700 state directory, init as that user, and a
    purge that keeps the recordings."""
    c = f.c
    deb = dist / f"sshaudit-collector_{VERSION}_amd64.deb"
    ok(["cp", str(deb), str(c.path("/root/"))])
    c.ok("apt-get", "install", "-y", "-qq", "--no-install-recommends", f"/root/{deb.name}")
    assert "/usr/sbin/nologin" in c.ok("getent", "passwd", "sshaudit")
    state = c.path("/var/lib/sshaudit-collector")
    st = state.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert c.ok("stat", "-c", "%U:%G", "/var/lib/sshaudit-collector").strip() == "sshaudit:sshaudit"
    c.ok("su", "-s", "/bin/sh", "-c",
         "sshaudit-collector init --data /var/lib/sshaudit-collector", "sshaudit")  # fmt: skip
    assert (state / "tls/cert.pem").exists()
    c.ok("apt-get", "purge", "-y", "-qq", "sshaudit-collector")
    assert not c.path("/opt/sshaudit").exists()
    assert (state / "tls/cert.pem").exists()  # the audit archive outlives a purge


def _final_cast(f: Fleet, session_id: str) -> str:
    """The decrypted cast once the collector holds the whole recording ('' before)."""
    (rec,) = [s for s in f.sessions() if s["session_id"] == session_id]
    status = rec.get("recording_status")
    if status == "recording":
        return ""
    assert status == "complete", rec  # not truncated, not recorder_lost
    return f.cast_of(session_id)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# -- the .rpm ------------------------------------------------------------------------------

AGENT_RPM = f"sshaudit-agent-{VERSION}-1.x86_64.rpm"
COLLECTOR_RPM = f"sshaudit-collector-{VERSION}-1.x86_64.rpm"


def _rpm_q(*argv: str) -> str:
    return ok(["rpm", "-q", *argv])


def test_rpm_layout_requires_and_scriptlets(dist: Path) -> None:
    files = set(_rpm_q("-lp", str(dist / AGENT_RPM)).split())
    for path in (
        "/usr/bin/sshaudit-agent", "/usr/bin/sshaudit", "/usr/libexec/sshaudit/record",
        "/usr/libexec/sshaudit/principals", "/usr/lib/systemd/system/sshaudit-agent.service",
        "/opt/sshaudit/agent/bin/python3", "/opt/sshaudit/agent/pyvenv.cfg",
        "/etc/sshaudit", "/var/lib/sshaudit", "/var/spool/sshaudit",
        "/usr/share/man/man8/sshaudit-agent.8.gz", "/usr/share/man/man1/sshaudit.1.gz",
        "/opt/sshaudit/agent/lib/python3.11/site-packages/sshaudit/pam_module/hook.py",
    ):  # fmt: skip
        assert path in files, path
    # system directories belong to the base system, not to us
    assert not files & {"/usr", "/usr/bin", "/etc", "/var/lib", "/opt", "/usr/libexec"}
    allowed = (
        "/opt/sshaudit",
        "/usr/",
        "/etc/sshaudit",
        "/var/lib/sshaudit",
        "/var/spool/sshaudit",
    )
    assert all(p.startswith(allowed) for p in files), sorted(files)[:20]
    requires = _rpm_q("-p", "--requires", str(dist / AGENT_RPM))
    for dep in ("openssh-server", "python3.11", "pam", "shadow-utils"):
        assert dep in requires, requires

    scripts = _rpm_q("-p", "--scripts", str(dist / AGENT_RPM))
    pre, post, preun = (
        _scriptlet(scripts, s) for s in ("preinstall", "postinstall", "preuninstall")
    )
    assert "useradd --system" in pre and "sshaudit-principals" in pre and "nologin" in pre
    # never enrolls: no command line of any scriptlet runs enroll
    code = [ln.strip() for ln in scripts.splitlines() if not ln.strip().startswith(("#", "echo"))]
    assert not [ln for ln in code if " enroll" in ln], code
    assert '"$1" -eq 0' in preun  # erase only, not upgrade
    assert "/var/lib/sshaudit/enrollment.json" in preun and "unenroll --force" in preun
    assert preun.index("unenroll --force") < preun.index("systemctl stop")
    assert "exit 1" in preun  # a failed unenroll keeps the package (and sshd working)
    post_code = [ln for ln in post.splitlines() if ln.strip() and ln.strip()[0] != "#"]
    assert not [ln for ln in post_code if "restart" in ln and "echo" not in ln]  # keeps sessions
    cscripts = _rpm_q("-p", "--scripts", str(dist / COLLECTOR_RPM))
    assert "useradd --system" in cscripts and "sshaudit-collector" in cscripts


def _scriptlet(scripts: str, name: str) -> str:
    start = scripts.index(f"{name} scriptlet")
    rest = scripts[start + 1 :]
    ends = [
        rest.find(f"\n{n} scriptlet")
        for n in ("preinstall", "postinstall", "preuninstall", "postuninstall")
    ]
    end = min([e for e in ends if e >= 0], default=len(rest))
    return rest[:end]


def test_rpm_scratch_root_files_modes_and_owners(dist: Path, tmp_path: Path) -> None:
    root = tmp_path / "scratch"
    (root / "etc").mkdir(parents=True)
    # rpm resolves %attr owners in the target root's own user database
    (root / "etc/passwd").write_text(
        "root:x:0:0::/root:/bin/sh\nsshaudit:x:990:990::/:/sbin/nologin\n"
    )
    (root / "etc/group").write_text("root:x:0:\nsshaudit:x:990:\n")
    ok(["rpm", "--root", str(root), "--initdb"])
    ok(["rpm", "--root", str(root), "--nodeps", "--noscripts", "-i",
        str(dist / AGENT_RPM), str(dist / COLLECTOR_RPM)])  # fmt: skip

    def mode(p: str) -> tuple[int, int, int]:
        st = (root / p.lstrip("/")).lstat()
        return st.st_mode & 0o7777, st.st_uid, st.st_gid

    assert mode("/var/spool/sshaudit") == (0o700, 0, 0)
    assert mode("/var/lib/sshaudit-collector") == (0o700, 990, 990)
    assert mode("/etc/sshaudit") == (0o755, 0, 0)
    for launcher in ("record", "principals"):
        assert mode(f"/usr/libexec/sshaudit/{launcher}") == (0o755, 0, 0)
    for d in ("/usr/libexec/sshaudit", "/opt/sshaudit", "/opt/sshaudit/agent"):
        assert mode(d) == (0o755, 0, 0)  # sshd refuses a principals command in a writable dir
    from sshaudit.agent.launcher import render

    site = "/opt/sshaudit/agent/lib/python3.11/site-packages"
    record = (root / "usr/libexec/sshaudit/record").read_text()
    assert record == render("/opt/sshaudit/agent/bin/python3", site)  # what enroll writes
    assert os.readlink(root / "opt/sshaudit/agent/bin/python3.11") == "/usr/bin/python3.11"
    for dirpath, dirnames, filenames in os.walk(root / "opt"):
        for name in dirnames + filenames:
            st = (Path(dirpath) / name).lstat()
            assert st.st_uid == 0 and st.st_gid == 0, (dirpath, name)
            if not stat.S_ISLNK(st.st_mode):  # a link's own mode means nothing
                assert not st.st_mode & 0o6002, (
                    dirpath,
                    name,
                )  # setuid/gid, world-writable  # no setuid/gid, not world-writable
    # the packaged venvs run: their interpreter link leads to this host's python3.11
    agent_py = root / "opt/sshaudit/agent/bin/python3"
    out = ok([str(agent_py), "-c", "import sshaudit.agent.daemon, sys; print(sys.prefix)"])
    assert out.strip() == str(root / "opt/sshaudit/agent")
    coll_py = root / "opt/sshaudit/collector/bin/python3"
    ok([str(coll_py), "-c", "import sshaudit.collector.app, uvicorn, uvloop, psycopg, boto3"])


def test_lint_findings_are_fixed_or_overridden(dist: Path) -> None:
    """Every lintian and rpmlint finding left is overridden with a reason (docs/packaging.md)."""
    debs = sorted(str(p) for p in dist.glob(f"sshaudit-*_{VERSION}_amd64.deb"))
    lintian = run(["lintian", "--tag-display-limit", "0", *debs], 900)
    findings = [ln for ln in lintian.stdout.splitlines() if ln[:2] in ("E:", "W:")]
    assert not findings, "\n".join(findings)
    rpms = [str(dist / AGENT_RPM), str(dist / COLLECTOR_RPM)]
    rc = str(REPO / "packaging/rpm/sshaudit.rpmlintrc")
    rpmlint = run(["rpmlint", "-r", rc, *rpms], 900)
    findings = [ln for ln in rpmlint.stdout.splitlines() if ": E: " in ln or ": W: " in ln]
    assert not findings, "\n".join(findings)


def test_builds_are_reproducible(tmp_path: Path) -> None:
    """Two builds of the same tree give the same bytes (SOURCE_DATE_EPOCH, sorted, hashed pycs)."""
    digests = []
    for n in (1, 2):
        out = tmp_path / f"build{n}"
        ok(
            [
                str(REPO / "scripts/package"),
                "--only",
                "deb",
                "--package",
                "agent",
                "--out",
                str(out),
            ]
        )
        digests.append(
            ok(["sha256sum", str(out / f"sshaudit-agent_{VERSION}_amd64.deb")]).split()[0]
        )
    assert digests[0] == digests[1]
