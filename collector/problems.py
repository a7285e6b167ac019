"""The collector's refusals: each one an HTTP status, a stable machine code and a message.

Invariants: every class here is an :class:`~sshaudit.errors.SSHAuditError` (the project's
one tree), so the CLI and the API treat them alike; ``code`` is a stable identifier clients
may branch on (documented in docs/collector.md), ``message`` is fit to show as is and never
quotes a token or key material; ``extra`` holds machine-readable context (the current
``length`` of a recording after an offset mismatch, for example).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from sshaudit.errors import SSHAuditError


class CollectorError(SSHAuditError):
    """A request the collector refuses; :attr:`status` is the HTTP status to answer."""

    status: ClassVar[int] = 400
    default_code: ClassVar[str] = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        extra: Mapping[str, Any] | None = None,
        detail: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.extra: dict[str, Any] = dict(extra or {})
        self.detail = message if detail is None else detail
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "detail": self.detail, **self.extra}


class BadRequestError(CollectorError):
    status = 400
    default_code = "bad_request"


class UnauthorizedError(CollectorError):
    status = 401
    default_code = "unauthorized"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        # RFC 6750 section 3: a 401 names the scheme it wants.
        super().__init__(message, code=code, headers={"WWW-Authenticate": "Bearer"})


class ForbiddenError(CollectorError):
    status = 403
    default_code = "forbidden"


class NotFoundError(CollectorError):
    status = 404
    default_code = "not_found"


class ConflictError(CollectorError):
    status = 409
    default_code = "conflict"


class TooLargeError(CollectorError):
    status = 413
    default_code = "body_too_large"


class RangeNotSatisfiableError(CollectorError):
    status = 416
    default_code = "range_not_satisfiable"


class UnprocessableError(CollectorError):
    status = 422
    default_code = "invalid"


class StorageError(CollectorError):
    """The storage failed (not the client's fault): 500, and nothing was acknowledged."""

    status = 500
    default_code = "storage_error"


class StorageFullError(StorageError):
    """No space left: 507 (RFC 4918 section 11.5); the agent keeps its spool and retries."""

    status = 507
    default_code = "storage_full"
