"""The few agent-config keys the recorder needs, read with the standard library only.

The recorder runs as the logged-in user on every session, so it must start fast and
must not import the daemon's pydantic model (agent/config.py validates the whole file).
This reader takes the same TOML file and looks only at ``socket`` and
``[policy] on_daemon_down`` / ``break_glass_users``.

Invariants: a missing key takes the documented default (docs/agent-config.md); a key that
is present with a wrong type or value is an error (:class:`ConfigError`), never a silent
default, so a typo cannot turn ``deny`` into ``allow``.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from enum import Enum

from sshaudit.errors import ConfigError

# typing costs start time at every login: it is imported for the type checker only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


DEFAULT_CONFIG = "/etc/sshaudit/agent.toml"
DEFAULT_SOCKET = "/run/sshaudit/agent.sock"
_MAX_CONFIG = 1 << 20  # no agent config is anywhere near 1 MiB


class DownPolicy(Enum):
    """What a session does when the daemon cannot be reached (DESIGN.md "The recorder")."""

    DENY = "deny"
    ALLOW = "allow"


@dataclass(frozen=True)
class RecorderConfig:
    socket: str = DEFAULT_SOCKET
    on_daemon_down: DownPolicy = DownPolicy.DENY
    break_glass_users: frozenset[str] = frozenset()

    def may_run_unrecorded(self, user: str) -> bool:
        """Whether ``user`` gets a session when recording is impossible."""
        return self.on_daemon_down is DownPolicy.ALLOW or user in self.break_glass_users


def parse(text: str, source: str = "config") -> RecorderConfig:
    """The recorder's view of an agent config document."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    sock = doc.get("socket", DEFAULT_SOCKET)
    if not isinstance(sock, str) or not sock.startswith("/") or "\0" in sock:
        raise ConfigError(f"{source}: socket must be an absolute path")
    policy: Any = doc.get("policy", {})
    if not isinstance(policy, dict):
        raise ConfigError(f"{source}: [policy] must be a table")
    down = policy.get("on_daemon_down", DownPolicy.DENY.value)
    try:
        on_down = DownPolicy(down)
    except ValueError:
        raise ConfigError(
            f'{source}: policy.on_daemon_down must be "deny" or "allow", not {down!r}'
        ) from None
    users = policy.get("break_glass_users", [])
    if not isinstance(users, list) or not all(isinstance(u, str) and u for u in users):
        raise ConfigError(f"{source}: policy.break_glass_users must be a list of user names")
    return RecorderConfig(sock, on_down, frozenset(users))


def load(path: str) -> RecorderConfig:
    """Read and parse the config file at ``path``."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(_MAX_CONFIG + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(raw) > _MAX_CONFIG:
        raise ConfigError(f"{path}: larger than {_MAX_CONFIG} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8") from exc
    return parse(text, path)
