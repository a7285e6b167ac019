"""Identifiers the collector accepts, and the one place they are checked.

Invariants: a session id is a canonical lowercase UUID (what the agent makes with
``uuid.uuid4()``); a host id is 1-253 characters of letters, digits and ``. _ : @ -``
starting with a letter or digit (the agent's ``host_id`` rule, docs/agent-config.md). Neither
can contain ``/``, NUL or start with ``.``, so both are safe as one path component: the file
backend still checks them again before it builds a path (defence in depth).
"""

from __future__ import annotations

import re

from sshaudit.collector.problems import BadRequestError

SESSION_ID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
HOST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,252}$"
EVENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
TOKEN_ID_PATTERN = r"^[0-9a-f]{16}$"  # noqa: S105 - a token *id*, not a secret
HOLD_ID_PATTERN = r"^[0-9a-f]{16}$"
KID_PATTERN = r"^[0-9a-f]{16}$"
CA_KEY_ID_PATTERN = r"^[0-9a-f]{64}$"

_SESSION_RE = re.compile(SESSION_ID_PATTERN)
_HOST_RE = re.compile(HOST_ID_PATTERN)


def is_session_id(value: str) -> bool:
    # The patterns carry ^...$ for the OpenAPI description (JSON Schema patterns are not
    # anchored); fullmatch is what makes the check exact here ("$" alone allows a "\n").
    return _SESSION_RE.fullmatch(value) is not None


def is_host_id(value: str) -> bool:
    return _HOST_RE.fullmatch(value) is not None


def check_session_id(value: str) -> str:
    if not is_session_id(value):
        raise BadRequestError("not a session id (a lowercase UUID)", code="invalid_session_id")
    return value


def check_host_id(value: str) -> str:
    if not is_host_id(value):
        raise BadRequestError("not a host id", code="invalid_host_id")
    return value
