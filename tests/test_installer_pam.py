"""Unit tests of the PAM edit: placement rules, idempotence, exact inverse (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sshaudit.errors import ConfigError
from sshaudit.installer.pam_edit import MARKER, add_hook, remove_hook
from sshaudit.installer.pam_env_edit import WAS

SESSION = "session optional pam_exec.so quiet /usr/libexec/sshaudit/pam-hook"
ACCOUNT = "account optional pam_exec.so quiet /usr/libexec/sshaudit/pam-hook"


def _edit(text: str) -> list[str]:
    return add_hook(text, SESSION, ACCOUNT).splitlines()


def test_first_in_each_stack_with_marker_above() -> None:
    text = (
        "auth required pam_unix.so\n"
        "account required pam_nologin.so\n"
        "session required pam_loginuid.so\n"
        "session required pam_env.so user_readenv=1\n"
    )
    assert _edit(text) == [
        "auth required pam_unix.so",
        MARKER,
        ACCOUNT,
        "account required pam_nologin.so",
        MARKER,
        SESSION,
        "session required pam_loginuid.so",
        WAS + "session required pam_env.so user_readenv=1",
        "session required pam_env.so user_readenv=0",
    ]


@pytest.mark.parametrize(
    "first_session",
    [
        "-session optional pam_systemd.so",
        "session include password-auth",
        "session substack system-auth",
        "Session required pam_env.so",
        "@include common-session",
        "session [success=1 default=ignore] pam_succeed_if.so quiet",
    ],
)
def test_session_hook_precedes_any_session_source(first_session: str) -> None:
    lines = _edit(f"# c\naccount required pam_nologin.so\n{first_session}\n")
    assert lines.index(SESSION) == lines.index(first_session) - 1
    assert lines[lines.index(SESSION) - 1] == MARKER


def test_includes_count_for_every_type() -> None:
    """``@include X`` may bring any type: both hooks go before the first one."""
    lines = _edit("@include common-auth\naccount required pam_nologin.so\nsession required x.so\n")
    assert lines == [
        *(MARKER, ACCOUNT, MARKER, SESSION),
        "@include common-auth",
        "account required pam_nologin.so",
        "session required x.so",
    ]


def test_leading_selinux_close_stays_first() -> None:
    text = (
        "account required a.so\n"
        "session [success=ok ignore=ignore module_unknown=ignore default=bad] "
        "pam_selinux.so close\n"
        "session required pam_selinux.so close\n"
        "session required pam_loginuid.so\n"
    )
    lines = _edit(text)
    assert lines[-3:] == [MARKER, SESSION, "session required pam_loginuid.so"]


def test_selinux_close_with_a_jump_is_not_skipped() -> None:
    close = "session [success=1 default=ignore] pam_selinux.so close"
    lines = _edit(f"account required a.so\n{close}\nsession required x.so\n")
    assert lines[-4:] == [MARKER, SESSION, close, "session required x.so"]


def test_continuation_lines_are_not_split() -> None:
    text = "account required pam_a.so \\\n  arg\nsession required pam_b.so\n"
    lines = _edit(text)
    assert lines[:4] == [MARKER, ACCOUNT, "account required pam_a.so \\", "  arg"]


@pytest.mark.parametrize(
    ("text", "expected_tail"),
    [
        ("auth required pam_unix.so\n", "\n"),
        ("auth required pam_unix.so", ""),
        ("", "\n"),
    ],
)
def test_no_stack_appends_at_end(text: str, expected_tail: str) -> None:
    edited = add_hook(text, SESSION, ACCOUNT)
    assert edited.endswith(f"{MARKER}\n{SESSION}{expected_tail}")
    assert remove_hook(edited) == text


def test_idempotent_and_replaces_an_older_hook() -> None:
    text = "account required a.so\nsession required b.so\n"
    once = add_hook(text, SESSION, ACCOUNT)
    assert add_hook(once, SESSION, ACCOUNT) == once
    newer = add_hook(once, SESSION + " --v2", ACCOUNT)
    assert newer.count(MARKER) == 2 and SESSION + " --v2" in newer
    assert remove_hook(newer) == text


@pytest.mark.parametrize(
    ("session", "account"),
    [
        (SESSION + "\nauth sufficient pam_permit.so", ACCOUNT),
        (SESSION, "session optional x.so"),
        ("session optional", ACCOUNT),
        (SESSION + "\x00", ACCOUNT),
    ],
)
def test_bad_hook_lines_refused(session: str, account: str) -> None:
    with pytest.raises(ConfigError):
        add_hook("", session, account)


def test_stray_marker_refused() -> None:
    with pytest.raises(ConfigError, match="fix by hand"):
        remove_hook(f"session required x.so\n{MARKER}")


_pieces = st.sampled_from(
    [
        "session required pam_env.so",
        "session required pam_env.so user_readenv=1 envfile=/etc/default/locale",
        "auth required /lib/security/pam_env.so user_envfile=.e # c",
        "session required pam_env.so \\",
        " user_readenv=1",
        "-session optional x.so",
        "account required a.so",
        "@include common-session",
        "session required pam_selinux.so close",
        "# comment",
        "x \\",
        "",
        "\t",
        "\f",
    ]
)
_odd = st.lists(
    st.tuples(_pieces | st.text(max_size=10), st.sampled_from(["\n", "\r\n", "", "\r"]))
).map(lambda parts: "".join(a + b for a, b in parts))


@settings(max_examples=300)
@given(_odd)
def test_hook_is_an_exact_inverse(text: str) -> None:
    if MARKER in text or WAS in text:
        return
    edited = add_hook(text, SESSION, ACCOUNT)
    assert remove_hook(edited) == text
    assert add_hook(edited, SESSION, ACCOUNT) == edited
    assert edited.count(MARKER) == 2
