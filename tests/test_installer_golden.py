"""Golden-file tests of the installer's config transforms, checked by the real sshd.

Each folder of tests/golden/installer/ is one real-world case: ``sshd_config`` (the main
config), optional ``*.conf`` drop-ins that sit in its Include directory, optional
``pam.d-sshd``. The expected outputs live in ``<case>/expected/``:
``00-sshaudit.conf`` (drop-in mode) or ``sshd_config`` (block mode), ``pam.d-sshd`` and
``review.txt`` (the mode, conflicts and notes enroll would show).

Regenerate the expected files after an intended change with
``SSHAUDIT_REGEN_GOLDEN=1 .venv/bin/pytest tests/test_installer_golden.py`` and review the
git diff: the test then rewrites them and fails, so a regeneration never passes silently.

Inputs: debian12/ is Debian 12's stock sshd_config (/usr/share/openssh/sshd_config) and
/etc/pam.d/sshd, copied from openssh-server 1:9.2p1; rhel9/ is RHEL 9's (openssh-8.7p1)
sshd_config, sshd_config.d/50-redhat.conf and /etc/pam.d/sshd, written from the packages'
contents; match/, existing/ and acceptenv/ are hand-written hosts that must give conflicts
and notes (acceptenv/: AcceptEnv and PermitUserEnvironment that pass LD_*, PYTHON*, BASH_ENV).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sshaudit.installer.pam_edit import add_hook, remove_hook
from sshaudit.installer.sshd_check import (
    existing_ca_files,
    existing_setenv,
    review,
    sorts_before_ours,
)
from sshaudit.installer.sshd_edit import (
    DROPIN_NAME,
    SshdSettings,
    add_block,
    dropin_text,
    find_dropin_dir,
    remove_block,
)

GOLDEN = Path(__file__).parent / "golden" / "installer"
CASES = sorted(p.name for p in GOLDEN.iterdir() if p.is_dir())
REGEN = os.environ.get("SSHAUDIT_REGEN_GOLDEN") == "1"
SSHD = Path("/usr/sbin/sshd")

SETTINGS = SshdSettings(
    force_command="/usr/libexec/sshaudit/record --config /etc/sshaudit/agent.toml",
    trusted_ca_file="/etc/sshaudit/user_ca_keys.pub",
    principals_command=(
        "/usr/libexec/sshaudit/principals --policy /var/lib/sshaudit/policy.json"
        " --socket /run/sshaudit/agent.sock %u %t %k %i %s %f %C"
    ),
    principals_user="nobody",
)
HOOK = "pam_exec.so quiet /usr/bin/python3 -I -S /usr/libexec/sshaudit/pam-hook"
SESSION_LINE = f"session optional {HOOK} --config /etc/sshaudit/agent.toml"
ACCOUNT_LINE = f"account optional {HOOK} --config /etc/sshaudit/agent.toml"


def _inputs(case: Path) -> tuple[str, dict[str, str]]:
    main = (case / "sshd_config").read_text()
    dropins = {p.name: p.read_text() for p in sorted(case.glob("*.conf"))}
    return main, dropins


def _outputs(case: Path) -> dict[str, str]:
    """What enroll would write for this case, plus its review."""
    main, dropins = _inputs(case)
    texts = {"sshd_config": main, **{f"sshd_config.d/{n}": t for n, t in dropins.items()}}
    first = [f"sshd_config.d/{n}" for n in dropins if sorts_before_ours(n)]
    settings = dataclasses.replace(SETTINGS, setenv=tuple(existing_setenv(texts)))
    result = review(texts, settings, first)
    dropin_dir = find_dropin_dir(main)
    lines = [f"mode: {f'drop-in {dropin_dir}/{DROPIN_NAME}' if dropin_dir else 'block'}"]
    lines += [f"conflict: {c}" for c in result.conflicts]
    lines += [f"note: {n}" for n in result.notes]
    lines += [f"merge CA keys from: {f}" for f in existing_ca_files(texts)]
    out = {"review.txt": "\n".join(lines) + "\n"}
    if dropin_dir is not None:
        out[DROPIN_NAME] = dropin_text(settings)
    else:
        out["sshd_config"] = add_block(main, settings)
    pam = case / "pam.d-sshd"
    if pam.exists():
        out["pam.d-sshd"] = add_hook(pam.read_text(), SESSION_LINE, ACCOUNT_LINE)
    return out


@pytest.mark.parametrize("case", CASES)
def test_golden_outputs(case: str) -> None:
    outputs = _outputs(GOLDEN / case)
    expected_dir = GOLDEN / case / "expected"
    if REGEN:
        shutil.rmtree(expected_dir, ignore_errors=True)
        expected_dir.mkdir()
        for name, text in outputs.items():
            (expected_dir / name).write_text(text)
        pytest.fail(f"SSHAUDIT_REGEN_GOLDEN=1: rewrote {expected_dir}; review the diff, rerun")
    assert sorted(p.name for p in expected_dir.iterdir()) == sorted(outputs)
    for name, text in outputs.items():
        assert text == (expected_dir / name).read_text(), f"{case}/expected/{name} differs"


@pytest.mark.parametrize("case", CASES)
def test_golden_edits_undo_exactly(case: str) -> None:
    outputs = _outputs(GOLDEN / case)
    main, _ = _inputs(GOLDEN / case)
    if "sshd_config" in outputs:
        assert remove_block(outputs["sshd_config"]) == main
        assert add_block(outputs["sshd_config"], SETTINGS) == add_block(main, SETTINGS)
    if "pam.d-sshd" in outputs:
        original = (GOLDEN / case / "pam.d-sshd").read_text()
        assert remove_hook(outputs["pam.d-sshd"]) == original
        assert add_hook(outputs["pam.d-sshd"], SESSION_LINE, ACCOUNT_LINE) == outputs["pam.d-sshd"]


def test_golden_cases_cover_the_acceptance() -> None:
    """The issue asks for Debian, RHEL, Match blocks and existing ForceCommand/CA lines."""
    reviews = {case: _outputs(GOLDEN / case)["review.txt"] for case in CASES}
    assert {"debian12", "rhel9", "match", "existing"} <= set(reviews)
    assert "conflict:" not in reviews["debian12"] and "conflict:" not in reviews["rhel9"]
    assert re.search(r"conflict: .*ForceCommand inside a Match", reviews["match"])
    assert "conflict: sshd_config:7: an existing ForceCommand" in reviews["existing"]
    assert "merge CA keys from: /etc/ssh/ca_user_keys.pub" in reviews["existing"]
    # issue 9: no client-set variable runs code before the recorder, named by file:line
    accept = reviews["acceptenv"]
    assert "conflict: sshd_config:6: AcceptEnv lets the client set LD_*" in accept
    assert "conflict: sshd_config:7: AcceptEnv lets the client set PYTHON*" in accept
    assert re.search(
        r"conflict: sshd_config:11: AcceptEnv lets the client set BASH_ENV, ENV", accept
    )
    assert "note: sshd_config:8: overridden by sshaudit's value" in accept
    assert "conflict: sshd_config:5" not in accept  # Debian's LANG LC_* is safe
    pam = _outputs(GOLDEN / "debian12")["pam.d-sshd"]
    readenv = [line for line in pam.splitlines() if "user_readenv" in line]
    assert [line.startswith("#") for line in readenv] == [True, False], readenv
    assert "pam_env.so user_readenv=0 envfile=/etc/default/locale" in readenv[1]


# --- the real sshd reads every output as we mean it -------------------------------------


def _sshd_unavailable() -> str | None:
    if not SSHD.exists():
        return f"{SSHD} missing (apt-get install openssh-server)"
    if shutil.which("ssh-keygen") is None:
        return "ssh-keygen missing (apt-get install openssh-client)"
    if not Path("/run/sshd").is_dir():
        return "/run/sshd missing: sshd -t needs its privilege separation directory"
    return None


def _private_config(case: Path, outputs: dict[str, str], tmp: Path) -> Path:
    """The case's output as a config of its own: a temporary host key first, the Include
    pointed at a temporary directory holding the case's drop-ins and ours."""
    key = tmp / "host_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    main, dropins = _inputs(case)
    text = outputs.get("sshd_config", main)
    conf_d = tmp / "sshd_config.d"
    conf_d.mkdir()
    for name, dropin in dropins.items():
        (conf_d / name).write_text(dropin)
    if DROPIN_NAME in outputs:
        (conf_d / DROPIN_NAME).write_text(outputs[DROPIN_NAME])
        text = text.replace("Include /etc/ssh/sshd_config.d/*.conf", f"Include {conf_d}/*.conf")
        assert str(conf_d) in text
    config = tmp / "sshd_config"
    config.write_text(f"HostKey {key}\n{text}")
    return config


def _effective(config: Path) -> dict[str, str]:
    spec = "user=nobody,host=client.example,addr=192.0.2.7"
    done = subprocess.run(
        [str(SSHD), "-T", "-f", str(config), "-C", spec], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    pairs = (line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    return {key: value for key, value in pairs}


@pytest.mark.parametrize("case", CASES)
def test_golden_outputs_pass_sshd(case: str, tmp_path: Path) -> None:
    reason = _sshd_unavailable()
    if reason:
        pytest.skip(f"CANNOT VALIDATE WITH THE REAL SSHD: {reason}")
    outputs = _outputs(GOLDEN / case)
    config = _private_config(GOLDEN / case, outputs, tmp_path)
    checked = subprocess.run([str(SSHD), "-t", "-f", str(config)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    effective = _effective(config)
    if "conflict:" in outputs["review.txt"]:
        return  # enroll refuses these hosts; the block must still parse
    assert effective["forcecommand"] == SETTINGS.force_command
    assert effective["trustedusercakeys"] == SETTINGS.trusted_ca_file
    assert effective["authorizedprincipalscommand"] == SETTINGS.principals_command
    assert effective["authorizedprincipalscommanduser"] == "nobody"
    assert effective["exposeauthinfo"] == "yes"
    assert effective["permituserrc"] == "no"
    assert effective["permituserenvironment"] == "no"
    assert effective["setenv"].split()[0] == "SHLVL=1"
    for keyword in ("allowtcpforwarding", "allowstreamlocalforwarding", "allowagentforwarding"):
        assert effective[keyword] == "no", keyword
    assert effective["x11forwarding"] == "no"  # Debian and RHEL say yes: ours comes first
    assert effective["permittunnel"] == "no"


def test_sshd_validation_can_fail(tmp_path: Path) -> None:
    """The checks above mean something: without our drop-in, Debian's own values are effective,
    and a line sshd cannot parse fails ``sshd -t``."""
    reason = _sshd_unavailable()
    if reason:
        pytest.skip(f"CANNOT VALIDATE WITH THE REAL SSHD: {reason}")
    config = _private_config(GOLDEN / "debian12", {}, tmp_path)
    effective = _effective(config)
    assert effective["x11forwarding"] == "yes"
    assert effective["forcecommand"] == "none"
    config.write_text(config.read_text() + 'ForceCommand "unbalanced\n')
    checked = subprocess.run([str(SSHD), "-t", "-f", str(config)], capture_output=True, text=True)
    assert checked.returncode != 0


def test_quoting_matches_sshd(tmp_path: Path) -> None:
    """Values that need quoting come back from the real sshd exactly as meant."""
    reason = _sshd_unavailable()
    if reason:
        pytest.skip(f"CANNOT VALIDATE WITH THE REAL SSHD: {reason}")
    odd = dataclasses.replace(
        SETTINGS,
        trusted_ca_file='/etc/my ca/"k".pub',
        setenv=("TZ=UTC", "A=b c\\d", "Q='x'"),
        force_command="/usr/libexec/sshaudit/record --label 'a b' # not a comment to sshd",
    )
    config = _private_config(GOLDEN / "match", {"sshd_config": add_block("", odd)}, tmp_path)
    effective = _effective(config)
    assert effective["trustedusercakeys"] == odd.trusted_ca_file
    assert effective["forcecommand"] == odd.force_command
    done = subprocess.run(
        [str(SSHD), "-T", "-f", str(config), "-C", "user=nobody,host=h,addr=192.0.2.7"],
        capture_output=True,
        text=True,
        check=True,
    )
    setenv = [
        line.split(" ", 1)[1] for line in done.stdout.splitlines() if line.startswith("setenv ")
    ]
    assert setenv == ["SHLVL=1", *odd.setenv]
