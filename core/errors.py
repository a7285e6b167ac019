"""The one exception tree of sshaudit.

Every error a user can cause (bad files, bad keys, bad input) is a subclass of
:class:`SSHAuditError`, carries a message fit to show as is, and never contains key
material. Third-party exceptions are translated at the boundary (``raise ... from exc``).
Standard library only: the per-login processes import this module.
"""

from __future__ import annotations


class SSHAuditError(Exception):
    """Base of every error sshaudit raises on purpose."""


class UsageError(SSHAuditError):
    """The command line or a configuration value is wrong."""


class FormatError(SSHAuditError):
    """Input data is not in the format it claims to be."""


class AsciicastError(FormatError):
    """A malformed asciicast v2 file; ``line`` is 1-based, 0 when not known."""

    def __init__(self, line: int, reason: str) -> None:
        self.line = line
        self.reason = reason
        where = f"line {line}: " if line else ""
        super().__init__(f"asciicast: {where}{reason}")


class SealedFormatError(FormatError):
    """A sealed file that does not follow FORMAT.md (bad magic, lengths, header)."""


class TamperedError(SealedFormatError):
    """A frame (or the header) failed authentication: the file was altered or reordered."""

    def __init__(self, message: str, frame: int | None = None) -> None:
        self.frame = frame
        super().__init__(message)


class KeyFileError(SSHAuditError):
    """A key file is unreadable or malformed, or no key fits the file."""


class NoRecipientError(KeyFileError):
    """None of the given private keys has an entry in the file's recipients."""


class SignatureError(SSHAuditError):
    """The signature trailer is absent or invalid where one was required."""


class TruncatedError(SSHAuditError):
    """The recording has no last frame, and a complete one was required."""


class ConfigError(SSHAuditError):
    """A configuration file is missing, unreadable or invalid."""
