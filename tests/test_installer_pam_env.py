"""Unit tests of the pam_env edit (installer/pam_env_edit.py): which lines change and how,
exact inverse and idempotence (hypothesis), read as Linux-PAM reads lines."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sshaudit.errors import ConfigError
from sshaudit.installer.pam_env_edit import WAS, neutralise_user_env, restore_user_env

DEBIAN = "session    required     pam_env.so user_readenv=1 envfile=/etc/default/locale\n"


def test_debian_line_gets_user_readenv_0_and_keeps_the_old_line_in_a_comment() -> None:
    edited = neutralise_user_env(f"# x\n{DEBIAN}session required pam_limits.so\n")
    assert edited == (
        "# x\n"
        f"{WAS}{DEBIAN}"
        "session    required     pam_env.so user_readenv=0 envfile=/etc/default/locale\n"
        "session required pam_limits.so\n"
    )
    assert restore_user_env(edited) == f"# x\n{DEBIAN}session required pam_limits.so\n"
    assert neutralise_user_env(edited) == edited


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        # user_envfile without user_readenv: user_readenv=0 right after the module
        (
            "auth required /lib/security/pam_env.so user_envfile=.env # [1]\n",
            "auth required /lib/security/pam_env.so user_readenv=0 user_envfile=.env # [1]\n",
        ),
        (
            "-session [success=ok default=bad] pam_env.so readenv=1 user_readenv=1\r\n",
            "-session [success=ok default=bad] pam_env.so readenv=1 user_readenv=0\r\n",
        ),
        (
            "session required pam_env.so user_readenv=1 user_readenv=yes",
            "session required pam_env.so user_readenv=0 user_readenv=0",
        ),
    ],
)
def test_rewrites(line: str, expected: str) -> None:
    edited = neutralise_user_env(line)
    assert edited == WAS + line.rstrip("\n") + "\n" + expected
    assert restore_user_env(edited) == line


@pytest.mark.parametrize(
    "text",
    [
        "session required pam_env.so\n",  # pam_env(8): user_readenv defaults to 0
        "session required pam_env.so readenv=1 envfile=/etc/default/locale\n",
        "# session required pam_env.so user_readenv=1\n",
        "session required pam_env.so # user_readenv=1\n",  # after '#': a comment to PAM
        "session required pam_limits.so user_readenv=1\n",  # not pam_env
        "session required pam_env.so.bak user_readenv=1\n",
    ],
)
def test_untouched(text: str) -> None:
    assert neutralise_user_env(text) == text


def test_continued_line_is_rewritten_where_the_option_is() -> None:
    """A ``\\``-continued line: the comment goes right above the changed physical line,
    which Linux-PAM skips inside a continuation (pam_handlers.c _pam_assemble_line)."""
    text = "session required pam_env.so \\\n  # note\n  user_readenv=1 \\\n  envfile=a\n"
    assert neutralise_user_env(text) == (
        "session required pam_env.so \\\n  # note\n"
        f"{WAS}  user_readenv=1 \\\n  user_readenv=0 \\\n  envfile=a\n"
    )


def test_stray_comment_refused() -> None:
    with pytest.raises(ConfigError, match="fix by hand"):
        restore_user_env(f"session required x.so\n{WAS}session required pam_env.so")


_pieces = st.sampled_from(
    [
        DEBIAN.rstrip("\n"),
        "auth required pam_env.so user_envfile=.e",
        "session required pam_env.so \\",
        "  user_readenv=1 \\",
        "session [default=1] pam_env.so user_readenv=1 # c",
        "# comment",
        "pam_env.so user_readenv=1",
        "",
        "\t",
    ]
)
_odd = st.lists(
    st.tuples(_pieces | st.text(max_size=10), st.sampled_from(["\n", "\r\n", "", "\r"]))
).map(lambda parts: "".join(a + b for a, b in parts))


@settings(max_examples=300)
@given(_odd)
def test_exact_inverse_and_idempotent(text: str) -> None:
    if WAS in text:
        return
    edited = neutralise_user_env(text)
    assert restore_user_env(edited) == text
    assert neutralise_user_env(edited) == edited
