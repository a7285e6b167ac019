"""Enrollment's parts on their own: agent/enroll_sshd.py (plan / apply / restore on a temporary
sshd_config and PAM file, with a fake ``sshd`` script as the validator), agent/enroll.py's
agent config text, and agent/cli_enroll.py's command line (help, usage errors, status on a
host that is not enrolled, enroll refused to a non-root user)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from sshaudit.agent import cli, cli_enroll, enroll_proc
from sshaudit.agent.config import load_config, parse_config
from sshaudit.agent.enroll import EnrollOptions, _toml, agent_config_text
from sshaudit.agent.enroll_sshd import SshdTarget, apply, plan, restore
from sshaudit.agent.layout import Layout
from sshaudit.errors import ConfigError, SSHAuditError
from sshaudit.installer import shell_edit
from sshaudit.installer.sshd_edit import BLOCK_BEGIN, DROPIN_NAME

AGENT = str(Path(sys.executable).parent / "sshaudit-agent")
FINGERPRINT = "SHA256:" + "0f" * 32
SSHD_CONFIG = """\
# a plain sshd_config
Port 22
UsePAM yes
PasswordAuthentication yes
Subsystem sftp /usr/lib/openssh/sftp-server
"""
PAM = """\
# PAM for sshd
@include common-auth
account    required     pam_nologin.so
@include common-account
session    required     pam_loginuid.so
@include common-session
"""


class Host:
    """A temporary sshd_config, PAM file and state dir, with a fake sshd that logs its
    arguments and answers ``-t`` with ``status`` (and ``message`` on stderr)."""

    def __init__(self, tmp: Path, config_text: str = SSHD_CONFIG) -> None:
        self.tmp = tmp
        self.config = tmp / "sshd_config"
        self.config.write_text(config_text)
        self.config.chmod(0o600)
        self.pam = tmp / "pam.d" / "sshd-test"
        self.pam.parent.mkdir()
        self.pam.write_text(PAM)
        self.calls = tmp / "sshd-calls"
        self.binary = tmp / "sshd"
        self.sshd_answers(0)
        self.layout = Layout.under(tmp / "state")
        self.layout.backups.mkdir(parents=True, mode=0o700)
        self.target = SshdTarget(self.config, self.pam, self.binary)

    def sshd_answers(self, status: int, message: str = "") -> None:
        self.binary.write_text(
            f'#!/bin/sh\necho "$@" >> {self.calls}\n'
            f'[ "$1" = -t ] && {{ printf "%s" "{message}" >&2; exit {status}; }}\nexit 3\n'
        )
        self.binary.chmod(0o755)

    def files(self) -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in (self.config, self.pam)}

    def plan(self, policy: dict[str, Any] | None = None) -> Any:
        return plan(self.target, self.layout, "nobody", policy or {})

    def apply(self, policy: dict[str, Any] | None = None) -> tuple[bool, list[str]]:
        said: list[str] = []
        return apply(self.target, self.layout, "nobody", policy or {}, said.append), said


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def test_apply_edits_validates_and_restore_puts_bytes_back(host: Host) -> None:
    before = host.files()
    p = host.plan()
    assert [c.path for c in p.changes] == [host.config, host.pam]
    assert "+ForceCommand " in p.diff and "pam_exec.so" in p.diff
    assert host.files() == before  # planning changes nothing

    changed, said = host.apply()
    assert changed and f"changed {host.config}" in said
    text = host.config.read_text()
    assert text.startswith(BLOCK_BEGIN) and text.endswith(SSHD_CONFIG)
    assert f"ForceCommand {host.layout.recorder} --config {host.layout.config}" in text
    assert f"TrustedUserCAKeys {host.layout.ca_keys}" in text
    assert "AuthorizedPrincipalsCommandUser nobody" in text
    assert "AllowTcpForwarding no" in text
    assert stat.S_IMODE(host.config.stat().st_mode) == 0o600  # the file keeps its mode
    assert str(host.layout.socket) in host.pam.read_text()
    assert host.calls.read_text().splitlines() == [f"-t -f {host.config}"]

    assert host.plan().changes == ()  # idempotent
    assert host.apply() == (False, [])

    assert sorted(restore(host.target, host.layout)) == sorted(before)
    assert host.files() == before


def test_policy_forwarding_flags_reach_sshd_config(host: Host) -> None:
    host.apply({"forwarding": {"tcp": True, "agent": "yes"}})
    text = host.config.read_text()
    assert "AllowTcpForwarding yes" in text
    assert "AllowAgentForwarding no" in text  # only a JSON true enables it


def test_a_failing_sshd_t_rolls_everything_back(host: Host) -> None:
    before = host.files()
    host.sshd_answers(255, "line 3: Bad configuration option: Frobnicate")
    with pytest.raises(ConfigError, match="sshd -t refused") as err:
        host.apply()
    assert "Bad configuration option: Frobnicate" in str(err.value)
    assert host.files() == before
    assert not (host.layout.backups / "manifest.json").exists()
    assert stat.S_IMODE(host.config.stat().st_mode) == 0o600
    host.sshd_answers(0)  # and a later enroll still works from the same state
    assert host.apply()[0] is True


def test_a_missing_sshd_binary_rolls_back_too(host: Host) -> None:
    before = host.files()
    host.binary.unlink()
    with pytest.raises(SSHAuditError, match="cannot run"):
        host.apply()
    assert host.files() == before


@pytest.mark.parametrize(
    ("extra", "line_no", "words"),
    [
        ("ForceCommand /usr/local/bin/menu\n", 6, "ForceCommand /usr/local/bin/menu"),
        ("Match User deploy\n    ForceCommand /bin/deploy\n", 7, "ForceCommand /bin/deploy"),
        ("AcceptEnv LANG BASH_ENV\n", 6, "AcceptEnv LANG BASH_ENV"),
    ],
)
def test_conflicts_name_the_line_and_change_nothing(
    tmp_path: Path, extra: str, line_no: int, words: str
) -> None:
    host = Host(tmp_path, SSHD_CONFIG + extra)
    before = host.files()
    with pytest.raises(ConfigError, match="conflicts with recording") as err:
        host.apply()
    assert f"{host.config}:{line_no}:" in str(err.value) and words in str(err.value)
    assert host.files() == before and not host.calls.exists()


def test_use_pam_off_is_a_conflict(tmp_path: Path) -> None:
    host = Host(tmp_path, SSHD_CONFIG.replace("UsePAM yes", "UsePAM no"))
    with pytest.raises(ConfigError, match=r"sshd_config:3: without UsePAM yes"):
        host.plan()


def test_dropin_mode_when_the_config_includes_a_directory(tmp_path: Path) -> None:
    conf_d = tmp_path / "sshd_config.d"
    conf_d.mkdir()
    (conf_d / "50-site.conf").write_text("ClientAliveInterval 60\n")
    # an absolute Include: relative ones are resolved against /etc/ssh (servconf.c SSHDIR)
    host = Host(tmp_path, f"Include {conf_d}/*.conf\n" + SSHD_CONFIG)
    before = host.files()
    changed, _ = host.apply()
    assert changed
    dropin = conf_d / DROPIN_NAME
    assert host.config.read_bytes() == before[host.config]  # the main file is not touched
    assert "ForceCommand " in dropin.read_text()
    assert stat.S_IMODE(dropin.stat().st_mode) == 0o644
    assert host.plan().changes == ()
    restore(host.target, host.layout)
    assert host.files() == before and not dropin.exists()
    assert (conf_d / "50-site.conf").read_text() == "ClientAliveInterval 60\n"


def test_a_dropin_read_before_ours_that_sets_our_keyword_conflicts(tmp_path: Path) -> None:
    conf_d = tmp_path / "sshd_config.d"
    conf_d.mkdir()
    (conf_d / "00-aaa.conf").write_text("PermitUserRC yes\n")
    host = Host(tmp_path, f"Include {conf_d}/*.conf\n" + SSHD_CONFIG)
    with pytest.raises(ConfigError, match=re.escape("00-aaa.conf:1: read before 00-sshaudit.conf")):
        host.plan()


GOLDEN_SHELLS = Path(__file__).parent / "golden" / "shells" / "debian12"


def test_pam_env_and_shell_startup_files_change_in_the_same_transaction(tmp_path: Path) -> None:
    """Issue 9 point 3: pam_env's user_readenv=1 becomes 0, each installed shell's system
    start-up file gets the hand-over block, all shown by the plan's diff (``--dry-run``) and
    put back byte for byte (a file that did not exist is removed again)."""
    host = Host(tmp_path)
    host.pam.write_text(PAM + "session required pam_env.so user_readenv=1 envfile=/etc/x\n")
    etc = tmp_path / "etc"
    (etc / "zsh").mkdir(parents=True)
    (etc / "zsh" / "zshenv").write_bytes((GOLDEN_SHELLS / "zsh-zshenv").read_bytes())
    (etc / "csh.cshrc").write_bytes((GOLDEN_SHELLS / "tcsh-csh.cshrc").read_bytes())
    (etc / "csh.cshrc").chmod(0o640)
    (etc / "fish").mkdir()  # fish installed, no config.fish yet
    host.target = dataclasses.replace(host.target, shell_etc=etc)
    shells = [etc / "zsh" / "zshenv", etc / "csh.cshrc", etc / "fish" / "config.fish"]
    before = {p: p.read_bytes() for p in [host.config, host.pam, *shells[:2]]}
    p = host.plan()
    assert [c.path for c in p.changes] == [host.config, host.pam, *shells]
    assert "+session required pam_env.so user_readenv=0 envfile=/etc/x" in p.diff
    assert "+PermitUserEnvironment no" in p.diff
    command = f"{host.layout.recorder} --config {host.layout.config}"
    for shell in shells:
        assert f"+++ b/{str(shell).lstrip('/')}" in p.diff
    assert p.diff.count(f"+    exec {command}") == 1  # fish
    assert p.diff.count(f"+  exec {command}") == 1  # zsh
    changed, _ = host.apply()
    assert changed and shells[2].read_text().startswith(shell_edit.BEGIN)
    assert shells[0].read_text().endswith(before[shells[0]].decode())
    assert stat.S_IMODE(shells[1].stat().st_mode) == 0o640
    assert host.plan().changes == ()  # idempotent
    restore(host.target, host.layout)
    assert {p: p.read_bytes() for p in before} == before and not shells[2].exists()


def test_no_shell_directory_no_shell_change(host: Host, tmp_path: Path) -> None:
    host.target = dataclasses.replace(host.target, shell_etc=tmp_path / "empty-etc")
    (tmp_path / "empty-etc").mkdir()
    assert [c.path for c in host.plan().changes] == [host.config, host.pam]


def test_missing_files_are_named(host: Host) -> None:
    host.pam.unlink()
    with pytest.raises(ConfigError, match=f"{host.pam} does not exist"):
        host.plan()


# -- the agent config -------------------------------------------------------------------


def options(tmp_path: Path, **over: Any) -> EnrollOptions:
    base: dict[str, Any] = {
        "collector": "https://collector.example:8443/",
        "token": "secret-token",
        "fingerprint": FINGERPRINT,
        "layout": Layout.under(tmp_path / "state"),
        "sshd": SshdTarget(tmp_path / "c", tmp_path / "p", tmp_path / "s"),
        "sshd_log": str(tmp_path / "sshd.log"),
        "principals_user": "nobody",
        "refresh_seconds": 30.0,
    }
    base.update(over)
    return EnrollOptions(**base)


def test_agent_config_text_is_what_load_config_accepts(tmp_path: Path) -> None:
    opts = options(tmp_path)
    text = agent_config_text(opts, "web-1.example")
    assert "secret-token" not in text  # the enrollment token never lands in the config
    path = tmp_path / "agent.toml"
    path.write_text(text)
    cfg = load_config(path)
    lay = opts.layout
    assert cfg.host_id == "web-1.example" and cfg.socket == lay.socket
    assert cfg.spool_dir == lay.spool and cfg.recipients_dir == lay.auditors
    assert cfg.host_key_file == lay.host_key
    assert cfg.collector is not None and cfg.identity is not None
    assert cfg.collector.url == "https://collector.example:8443"  # no trailing slash
    assert cfg.collector.fingerprint == FINGERPRINT
    assert cfg.collector.credential_file == lay.credential
    assert cfg.collector.refresh_seconds == 30.0
    assert cfg.identity.ca_keys_file == lay.ca_keys and cfg.identity.policy_file == lay.policy
    assert cfg.identity.sshd_log == str(tmp_path / "sshd.log")
    assert cfg.identity.principals_user == "nobody"
    assert parse_config(tomllib.loads(text)) == cfg


ODD = [
    'quote " and \\ backslash',
    "tab\tnewline\nreturn\r",
    "nul \x00 bell \x07 esc \x1b del \x7f",
    "unicode é ü 漢字",
    "astral 😀 𝄞",
    "' single ''' triple",
    "[table] = # not a comment",
]


@pytest.mark.parametrize("value", ODD)
def test_toml_strings_round_trip(value: str) -> None:
    doc = {"a": value, "n": 3, "f": 0.5, "b": True, "l": [value, "x"], "t": {"k": value}}
    assert tomllib.loads(_toml(doc)) == doc


def test_toml_refuses_text_that_is_not_utf8() -> None:
    with pytest.raises(ConfigError, match="not UTF-8"):
        _toml({"a": "/var/log/\udcff"})  # a surrogate-escaped byte from a file name


@pytest.mark.parametrize("value", ODD[-4:])
def test_an_odd_log_path_survives_the_config(tmp_path: Path, value: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(agent_config_text(options(tmp_path, sshd_log="/var/log/" + value), "h"))
    cfg = load_config(path)
    assert cfg.identity is not None and cfg.identity.sshd_log == "/var/log/" + value


# -- the command line -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "words"),
    [
        (
            "enroll",
            [
                "--collector URL",
                "--token-file FILE",
                "--ca-fingerprint",
                "--dry-run",
                "sshd -t",
                "unenroll",
                "examples:",
                "exit status",
            ],
        ),
        ("unenroll", ["--force", "exactly as it was", "--state-dir DIR"]),
        ("status", ["--json", "sshd -T", "Exit status 1"]),
    ],
)
def test_help(capsys: pytest.CaptureFixture[str], command: str, words: list[str]) -> None:
    assert cli.main([command, "--help"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"usage: sshaudit-agent {command}") and err == ""
    for word in words:
        assert word in out, word
    assert max(len(line) for line in out.splitlines()) <= 100  # reads on a terminal


@pytest.mark.parametrize(
    ("argv", "missing"),
    [
        (["enroll"], "--collector, --ca-fingerprint"),
        (["enroll", "--collector", "https://c", "--ca-fingerprint", "x"], "--token --token-file"),
        (
            [
                "enroll",
                "--collector",
                "https://c",
                "--token",
                "t",
                "--token-file",
                "f",
                "--ca-fingerprint",
                "x",
            ],
            "not allowed with",
        ),
        (["status", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_exit_2_with_one_error_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], missing: str
) -> None:
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if "error:" in line]
    assert out == "" and len(errors) == 1, err
    assert errors[0].startswith("sshaudit-agent") and missing in errors[0]
    assert "Traceback" not in err


def run_agent(*argv: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    prefix = ["runuser", "-u", user, "--"] if user else []
    return subprocess.run(
        [*prefix, AGENT, *argv], capture_output=True, text=True, timeout=60, check=False, cwd="/"
    )


def test_status_of_a_host_not_enrolled(tmp_path: Path) -> None:
    done = run_agent("status", "--state-dir", str(tmp_path))
    assert done.returncode == 1 and done.stderr == ""
    (line,) = done.stdout.splitlines()
    assert line.startswith("FAIL") and "not enrolled" in line
    assert str(tmp_path / "lib" / "enrollment.json") in line
    done = run_agent("status", "--json", "--state-dir", str(tmp_path))
    doc = json.loads(done.stdout)
    assert done.returncode == 1 and doc["ok"] is False
    assert [(c["name"], c["state"]) for c in doc["checks"]] == [("enrolled", "fail")]


def test_enroll_and_unenroll_refuse_a_non_root_user(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("NOT RUN: needs root and runuser(1) to run the CLI as nobody")
    state = tmp_path / "state"
    tmp_path.chmod(0o755)
    argv = [
        "enroll",
        "--collector",
        "https://c.example",
        "--token",
        "t",
        "--ca-fingerprint",
        FINGERPRINT,
        "--state-dir",
        str(state),
    ]
    done = run_agent(*argv, user="nobody")
    assert done.returncode == 2, done.stderr
    assert done.stderr == "sshaudit-agent enroll: enroll changes sshd and must run as root\n"
    assert not state.exists()  # refused before anything was made
    done = run_agent("unenroll", "--state-dir", str(state), user="nobody")
    assert done.returncode == 2 and "must run as root" in done.stderr


def test_enroll_refusal_in_process(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The same check through cli_enroll.run, whoever runs the tests: a bad fingerprint is a
    usage error with one line (as root), or the root check comes first (as another user)."""
    args = cli.build_parser().parse_args(
        [
            "enroll",
            "--collector",
            "https://c.example",
            "--token",
            "t",
            "--ca-fingerprint",
            "SHA256:nothex",
            "--state-dir",
            str(tmp_path / "s"),
        ]
    )
    assert cli_enroll.run(args) == 2
    (line,) = capsys.readouterr().err.splitlines()
    want = "--ca-fingerprint" if os.geteuid() == 0 else "must run as root"
    assert line.startswith("sshaudit-agent enroll: ") and want in line
    assert not (tmp_path / "s").exists()


# -- layout and sshd processes -----------------------------------------------------------


def test_layout_under_a_state_dir_is_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no seam for the working directory: Path.absolute reads it
    lay = Layout.under(Path("rel"))
    assert lay.etc == tmp_path / "rel" / "etc" and lay.config == tmp_path / "rel/etc/agent.toml"
    for p in (
        lay.host_key,
        lay.credential,
        lay.ca_keys,
        lay.policy,
        lay.auditors,
        lay.backups,
        lay.enrollment,
        lay.socket,
        lay.daemon_pid,
        lay.recorder,
        lay.principals,
    ):
        assert p.is_absolute() and p.is_relative_to(tmp_path / "rel"), p
    default = Layout.under(None)
    assert default.config == Path("/etc/sshaudit/agent.toml")
    assert default.policy == Path("/var/lib/sshaudit/policy.json")
    assert default.principals == Path("/usr/libexec/sshaudit/principals")


def test_sshd_effective_and_check_with_a_fake_sshd(host: Host) -> None:
    out = host.tmp / "T.txt"
    out.write_text("Port 22\nforcecommand /x/record --config /y\nsetenv A=1\nsetenv B=2\n")
    host.binary.write_text(f'#!/bin/sh\necho "$@" >> {host.calls}\ncat {out}\n')
    assert enroll_proc.sshd_effective(host.binary, host.config) == {
        "port": ["22"],
        "forcecommand": ["/x/record --config /y"],
        "setenv": ["A=1", "B=2"],
    }
    assert enroll_proc.sshd_check(host.binary, host.config) is None
    calls = host.calls.read_text().splitlines()
    assert calls[0].startswith(f"-T -f {host.config} -C user=root,") and calls[1] == (
        f"-t -f {host.config}"
    )
    host.sshd_answers(1, "")
    assert enroll_proc.sshd_check(host.binary, host.config) == "sshd -t exited 1"
    with pytest.raises(ConfigError, match="sshd -T"):
        enroll_proc.sshd_effective(host.binary, host.config)
