"""Unit tests of the sshd_config transforms: parsing like servconf.c, rendering, drop-in
detection, the marked block (hypothesis: exact inverse on odd texts) and the conflict checks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sshaudit.errors import ConfigError
from sshaudit.installer.sshd_check import (
    check_conflicts,
    existing_ca_files,
    existing_setenv,
    review,
    sorts_before_ours,
)
from sshaudit.installer.sshd_edit import (
    BLOCK_BEGIN,
    BLOCK_END,
    SshdSettings,
    add_block,
    find_dropin_dir,
    remove_block,
    render_settings,
)
from sshaudit.installer.sshd_parse import (
    iter_directives,
    match_pattern,
    split_args,
    split_directive,
)

S = SshdSettings(
    force_command="/usr/libexec/sshaudit/record --config /etc/sshaudit/agent.toml",
    trusted_ca_file="/etc/sshaudit/user_ca_keys.pub",
    principals_command="/usr/libexec/sshaudit/principals %u %t %k %i %s %f %C",
    principals_user="sshaudit-principals",
)


# --- parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("Port 22", ("Port", "22")),
        ("  port=22", ("port", "22")),
        ("Port = 22  \t", ("Port", "22")),
        ("Port\t=\t22", ("Port", "22")),
        ("# Port 22", None),
        ("   ", None),
        ("ForceCommand /bin/x 'a b'", ("ForceCommand", "/bin/x 'a b'")),
    ],
)
def test_split_directive(line: str, expected: tuple[str, str] | None) -> None:
    assert split_directive(line) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a b\tc", ["a", "b", "c"]),
        ('"a b" c', ["a b", "c"]),
        ("'a \"b' c", ['a "b', "c"]),
        (r"a\ b", ["a b"]),
        (r'"a\"b"', ['a"b']),
        ("a #comment", ["a"]),
        ("a#b", ["a#b"]),
        (r"a\x", [r"a\x"]),
    ],
)
def test_split_args_like_argv_split(text: str, expected: list[str]) -> None:
    assert split_args(text) == expected


def test_split_args_refuses_unbalanced_quote() -> None:
    with pytest.raises(ConfigError, match="unbalanced"):
        split_args('"abc')


def test_iter_directives_tracks_match_and_case() -> None:
    text = "PORT 22\r\nmatch User x\n  forcecommand  /bin/true\nAcceptEnv=A B\n"
    found = [(d.line_no, d.keyword, d.args, d.in_match) for d in iter_directives(text)]
    assert found == [
        (1, "port", ("22",), False),
        (2, "match", ("User", "x"), True),
        (3, "forcecommand", ("/bin/true",), True),
        (4, "acceptenv", ("A", "B"), True),
    ]


@pytest.mark.parametrize(
    ("text", "pattern", "hit"),
    [
        ("BASH_ENV", "BASH_*", True),
        ("BASH_ENV", "*", True),
        ("ENV", "E?V", True),
        ("ENV", "LC_*", False),
        ("BASH_ENV", "BASH_EN", False),
        ("BASH_ENV", "[B]ASH_ENV", False),  # no character classes in match.c
        ("", "*", True),
        ("ENV", "*E*N*V*", True),
    ],
)
def test_match_pattern(text: str, pattern: str, hit: bool) -> None:
    assert match_pattern(text, pattern) is hit


# --- rendering -----------------------------------------------------------------------------


def test_render_settings_lines_and_flags() -> None:
    text = render_settings(dataclasses.replace(S, tcp=True, x11=True, setenv=("A=1", "SHLVL=5")))
    directives = {d.keyword: d.rest for d in iter_directives(text)}
    assert directives["forcecommand"] == S.force_command
    assert directives["authorizedprincipalscommand"] == S.principals_command
    assert directives["allowtcpforwarding"] == "yes"
    assert directives["x11forwarding"] == "yes"
    assert directives["allowagentforwarding"] == "no"
    assert directives["setenv"] == "SHLVL=1 A=1"  # their SHLVL would undo ours
    lines = text.splitlines()
    assert directives["permituserenvironment"] == "no"  # ~/.ssh/environment: BASH_ENV, LD_*
    assert len(lines) == 26  # each of the 13 directives after its "# why" line
    assert all(line.startswith("# ") for line in lines[0::2])
    assert not any(line.startswith("#") for line in lines[1::2])


def test_render_quotes_paths_with_spaces() -> None:
    text = render_settings(dataclasses.replace(S, trusted_ca_file='/etc/my ca/"k".pub'))
    (ca,) = (d for d in iter_directives(text) if d.keyword == "trustedusercakeys")
    assert ca.args == ('/etc/my ca/"k".pub',)


@pytest.mark.parametrize(
    "change",
    [
        {"force_command": "/bin/rec\nPermitRootLogin yes"},
        {"force_command": "/bin/rec\x00"},
        {"force_command": '/bin/rec "unbalanced'},
        {"force_command": " /bin/rec"},
        {"principals_command": "principals %u"},
        {"principals_user": "no body"},
        {"principals_user": "-x"},
        {"trusted_ca_file": "relative.pub"},
        {"trusted_ca_file": "/etc/ca\r.pub"},
        {"setenv": ("NOEQUALS",)},
        {"setenv": ("1BAD=x",)},
    ],
)
def test_render_refuses_bad_values(change: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        render_settings(dataclasses.replace(S, **change))  # type: ignore[arg-type]


# --- drop-in detection ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Include /etc/ssh/sshd_config.d/*.conf\n", Path("/etc/ssh/sshd_config.d")),
        ("include=sshd_config.d/*.conf\n", Path("/etc/ssh/sshd_config.d")),
        ("Include /a/x.conf /srv/d/*.conf\n", Path("/srv/d")),
        ("Include /etc/ssh/sshd_config.d/*\n", None),
        ("Include /etc/*/x/*.conf\n", None),
        ("Match User x\nInclude /etc/ssh/sshd_config.d/*.conf\n", None),
        ("X11Forwarding yes\nInclude /etc/ssh/sshd_config.d/*.conf\n", None),
        (
            "Port 22\nInclude /etc/ssh/sshd_config.d/*.conf\nX11Forwarding yes\n",
            Path("/etc/ssh/sshd_config.d"),
        ),
        ("# Include /etc/ssh/sshd_config.d/*.conf\n", None),
        ("", None),
    ],
)
def test_find_dropin_dir(text: str, expected: Path | None) -> None:
    assert find_dropin_dir(text) == expected


def test_find_dropin_dir_relative_to_sshdir() -> None:
    assert find_dropin_dir("Include d/*.conf", Path("/opt/ssh")) == Path("/opt/ssh/d")


# --- block mode ----------------------------------------------------------------------------


def test_add_block_goes_first_and_replaces() -> None:
    text = "# comment\nPort 22\n"
    once = add_block(text, S)
    assert once.startswith(BLOCK_BEGIN + "\n") and once.endswith(BLOCK_END + "\n" + text)
    other = add_block(once, dataclasses.replace(S, tcp=True))
    assert other.count(BLOCK_BEGIN) == 1 and "AllowTcpForwarding yes" in other
    assert remove_block(other) == text


@pytest.mark.parametrize(
    "text",
    [
        f"{BLOCK_BEGIN}\nPort 1\n",
        f"Port 1\n{BLOCK_END}\n",
        f"{BLOCK_BEGIN}\n{BLOCK_BEGIN}\n{BLOCK_END}\n",
    ],
)
def test_half_blocks_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="fix by hand"):
        remove_block(text)
    with pytest.raises(ConfigError):
        add_block(text, S)


_pieces = st.sampled_from(
    [
        "Port 22",
        "# c",
        "",
        " ",
        "\t",
        "Match User x",
        "  ForceCommand y",
        "=",
        '"',
        "é",
        "\f",
        "\x00",
    ]
)
_odd_texts = st.lists(
    st.tuples(_pieces | st.text(max_size=12), st.sampled_from(["\n", "\r\n", "\r", ""]))
).map(lambda parts: "".join(a + b for a, b in parts))


@settings(max_examples=300)
@given(_odd_texts)
def test_block_is_an_exact_inverse(text: str) -> None:
    if BLOCK_BEGIN in text or BLOCK_END in text:
        return
    edited = add_block(text, S)
    assert remove_block(edited) == text
    assert add_block(edited, S) == edited
    assert next(iter(iter_directives(edited))).keyword == "trustedusercakeys"


# --- conflicts and notes -------------------------------------------------------------------


PAM_ON = {"pam.conf": "UsePAM yes\n"}  # the PAM check has its own test


def _messages(text: str, **kwargs: object) -> list[tuple[int, str]]:
    found = check_conflicts({**PAM_ON, "f": text}, **kwargs)  # type: ignore[arg-type]
    return [(c.line_no, c.message) for c in found]


@pytest.mark.parametrize(
    "line",
    [
        "ForceCommand internal-sftp",
        "TrustedUserCAKeys /x",
        "AuthorizedPrincipalsCommand /bin/x %u",
        "AuthorizedPrincipalsCommandUser root",
        "AuthorizedPrincipalsFile /x/%u",
        "ExposeAuthInfo no",
        "PermitUserRC yes",
        "SetEnv A=1",
        "AllowTcpForwarding local",
        "AllowStreamLocalForwarding all",
        "AllowAgentForwarding yes",
        "X11Forwarding=yes",
        "PermitTunnel point-to-point",
        "ChrootDirectory /srv",
    ],
)
def test_match_values_that_override_ours_conflict(line: str) -> None:
    assert [n for n, _ in _messages(f"Port 22\nMatch User x\n  {line}\n")] == [3]


@pytest.mark.parametrize(
    "line",
    [
        "AuthorizedPrincipalsFile none",
        "ExposeAuthInfo yes",
        "PermitUserRC no",
        "AllowTcpForwarding no",
        "PermitTunnel no",
        "X11Forwarding no",
        "PermitTTY no",
        "ChrootDirectory none",
    ],
)
def test_harmless_match_values(line: str) -> None:
    assert _messages(f"Match User x\n  {line}\n") == []


def test_match_forwarding_the_policy_allows_is_fine() -> None:
    text = "Match User x\n  AllowTcpForwarding yes\n"
    assert _messages(text, settings=dataclasses.replace(S, tcp=True)) == []
    assert len(_messages(text, settings=S)) == 1


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("ForceCommand /usr/bin/logger-wrap\n", "ForceCommand would be silently replaced"),
        ("AuthorizedPrincipalsCommand /bin/p %u\n", "AuthorizedPrincipalsCommand"),
        ("AcceptEnv LANG BASH_ENV\n", "BASH_ENV"),
        ("AcceptEnv *\n", "BASH_ENV, ENV, SHELLOPTS, BASHOPTS, PS4, LD_*, PYTHON*, BASH_FUNC_*"),
        ("AcceptEnv E?V\n", "ENV"),
        ("Match User x\n AcceptEnv BASH_*\n", "BASH_ENV"),
        ("AcceptEnv LANG LD_*\n", "LD_*"),
        ("AcceptEnv LD_PRELOAD\n", "LD_*"),
        ("AcceptEnv L?_*X\n", "LD_*"),
        ("AcceptEnv PY*\n", "PYTHON*"),
        ("AcceptEnv PYTHONSTARTUP\n", "PYTHON*"),
        ("AcceptEnv LC_* P*\n", "PS4, PYTHON*"),
        ("AcceptEnv SHELLOPTS\n", "SHELLOPTS"),
    ],
)
def test_top_level_conflicts(text: str, fragment: str) -> None:
    (found,) = check_conflicts({**PAM_ON, "sshd_config": text})
    assert fragment in found.message and found.file == "sshd_config" and found.line_no >= 1


@pytest.mark.parametrize(
    "text",
    [
        "AcceptEnv LANG LC_*\n",
        "AcceptEnv LD LDX_* PYTHO TZ ENVX XENV\n",
        "PermitUserEnvironment no\n",
    ],
)
def test_safe_env_settings(text: str) -> None:
    assert check_conflicts({**PAM_ON, "f": text}) == []


def test_top_level_permit_user_environment_is_overridden_by_ours() -> None:
    """Enroll writes ``PermitUserEnvironment no`` first, so a later global value is a note."""
    found = review({**PAM_ON, "f": "PermitUserEnvironment yes\n"})
    assert found.conflicts == ()
    (note,) = found.notes
    assert (note.file, note.line_no) == ("f", 1) and "overridden by sshaudit" in note.message


def test_dropins_read_before_ours_conflict() -> None:
    texts = {"main": "UsePAM yes\n", "d/00-aaa.conf": "X11Forwarding yes\nPort 2\n"}
    assert sorts_before_ours("00-aaa.conf") and not sorts_before_ours("50-redhat.conf")
    (found,) = check_conflicts(texts, first=["d/00-aaa.conf"])
    assert (found.file, found.line_no) == ("d/00-aaa.conf", 1)
    assert check_conflicts(texts) == []


def test_notes_and_merges() -> None:
    texts = {
        **PAM_ON,
        "main": 'TrustedUserCAKeys /etc/ssh/ca.pub\nSetEnv A=1 "B=x y"\nSetEnv C=3\n'
        "AuthorizedPrincipalsFile /p/%u\nX11Forwarding yes\nTrustedUserCAKeys none\n",
        "d/50.conf": "TrustedUserCAKeys /etc/ssh/other.pub\n",
    }
    result = review(texts)
    assert result.conflicts == ()
    assert [(n.file, n.line_no) for n in result.notes] == [
        ("main", 1),
        ("main", 2),
        ("main", 3),
        ("main", 4),
        ("main", 5),
        ("d/50.conf", 1),
    ]
    assert "merged into sshaudit's CA file" in result.notes[0].message
    assert existing_ca_files(texts) == ["/etc/ssh/ca.pub", "/etc/ssh/other.pub"]
    assert existing_setenv(texts) == ["A=1", "B=x y"]  # sshd keeps only the first SetEnv line


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        ({"main": "Port 22\n"}, [("main", 0)]),
        ({"main": "UsePAM no\n", "d.conf": "UsePAM yes\n"}, [("main", 1)]),
        ({"main": "Port 22\n", "d.conf": "usepam=yes\n"}, []),
        ({"main": "Port 22\nUsePAM no\n"}, [("main", 2)]),
    ],
)
def test_pam_must_be_on(texts: dict[str, str], expected: list[tuple[str, int]]) -> None:
    found = check_conflicts(texts)
    assert [(c.file, c.line_no) for c in found] == expected
    assert all("UsePAM yes" in c.message for c in found)
