"""Reading sshd_config(5) text the way OpenSSH 9.2's servconf.c does, without I/O.

Invariants:
- A line is split like ``process_server_config_line_depth``: trailing whitespace dropped, the
  keyword ends at whitespace or at one ``=`` (``Keyword=value`` and ``Keyword = value`` are
  allowed), blank lines and lines whose first word starts with ``#`` are skipped, and the
  arguments are split like misc.c ``argv_split`` (double and single quotes, backslash escapes of
  quotes, backslash and space; a ``#`` starting a word ends the line).
- Keywords are compared lower-cased (sshd_config(5): "keywords are case-insensitive").
- Every line after a ``Match`` line belongs to that Match block, up to the next ``Match`` or the
  end of the file (sshd_config(5) "Match").
- Nothing here raises on odd input: a line with unbalanced quotes (which sshd itself refuses) is
  still reported, its arguments split on whitespace, so conflict checks never miss it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from sshaudit.errors import ConfigError

_SPACE = " \t\r\n"


@dataclass(frozen=True)
class ConfigLine:
    """One directive: ``keyword`` lower-cased, ``args`` unquoted, ``rest`` the raw argument text
    (ForceCommand and AuthorizedPrincipalsCommand take the raw rest of the line)."""

    line_no: int  # 1-based
    line: str  # the line as written, without its terminator
    keyword: str
    args: tuple[str, ...]
    rest: str
    in_match: bool


def split_args(text: str) -> list[str]:
    """Split like OpenSSH misc.c ``argv_split(s, ..., terminate_on_comment=1)``.

    Raises ConfigError on an unclosed quote, as sshd does ("invalid quotes").
    """
    args: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] in " \t":
            i += 1
            continue
        if text[i] == "#":
            break
        word: list[str] = []
        quote = ""
        while i < n:
            ch = text[i]
            if (
                ch == "\\"
                and i + 1 < n
                and (text[i + 1] in "'\"\\" or (not quote and text[i + 1] == " "))
            ):
                word.append(text[i + 1])
                i += 2
                continue
            if not quote and ch in " \t":
                break
            if not quote and ch in "'\"":
                quote = ch
            elif quote and ch == quote:
                quote = ""
            else:
                word.append(ch)
            i += 1
        if quote:
            raise ConfigError(f"unbalanced {quote} quote in {text!r}")
        args.append("".join(word))
    return args


def split_directive(line: str) -> tuple[str, str] | None:
    """``(keyword, rest)`` of one line as servconf.c's ``strdelim`` sees it, or None when the
    line is blank or a comment."""
    body = line.rstrip(_SPACE + "\f").lstrip(_SPACE)
    if not body or body.startswith("#"):
        return None
    end = 0
    while end < len(body) and body[end] not in _SPACE + "=":
        end += 1
    keyword, rest = body[:end], body[end:]
    rest = rest.lstrip(_SPACE)
    if rest.startswith("="):
        rest = rest[1:].lstrip(_SPACE)
    return keyword, rest


def iter_directives(text: str) -> Iterator[ConfigLine]:
    """Every directive of a config text, in order, with its Match scope."""
    in_match = False
    # sshd reads lines with getline(3): only "\n" ends a line ("\r" is trailing whitespace).
    for number, raw in enumerate(text.split("\n"), start=1):
        parsed = split_directive(raw)
        if parsed is None:
            continue
        keyword, rest = parsed
        try:
            args = tuple(split_args(rest))
        except ConfigError:
            args = tuple(rest.split())
        lower = keyword.lower()
        if lower == "match":
            in_match = True
        yield ConfigLine(number, raw, lower, args, rest, in_match)


def lines_keepends(text: str) -> list[str]:
    """``text`` split after each ``"\n"`` only (unlike str.splitlines, which also splits at
    form feeds and Unicode separators that sshd and PAM treat as ordinary characters)."""
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def match_pattern(text: str, pattern: str) -> bool:
    """OpenSSH match.c ``match_pattern``: ``*`` any run, ``?`` one character, nothing else is
    special (no ``[...]`` classes, unlike fnmatch)."""
    ti = pi = 0
    star_pi, star_ti = -1, 0
    while ti < len(text):
        if pi < len(pattern) and (pattern[pi] == "?" or pattern[pi] == text[ti]):
            ti += 1
            pi += 1
        elif pi < len(pattern) and pattern[pi] == "*":
            star_pi, star_ti = pi, ti
            pi += 1
        elif star_pi >= 0:
            star_ti += 1
            ti, pi = star_ti, star_pi + 1
        else:
            return False
    while pi < len(pattern) and pattern[pi] == "*":
        pi += 1
    return pi == len(pattern)
