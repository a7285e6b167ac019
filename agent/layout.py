"""Where an enrolled host keeps sshaudit's files (docs/enroll.md), in one frozen value.

Invariants:
- by default the FHS paths a package installs (``/etc/sshaudit``, ``/var/lib/sshaudit``,
  ``/var/spool/sshaudit``, ``/run/sshaudit``, ``/usr/libexec/sshaudit``); with
  ``--state-dir S`` everything sshaudit owns lives under ``S`` instead (tests, the demo,
  a private sshd), while sshd's own files are named by their own flags;
- every path is absolute; the directories sshd checks (the principals command's and its
  parents: "Unsafe AuthorizedPrincipalsCommand" in sshd(8)) are made root-owned 0755;
- secrets (host key, credential) and the unenroll backups are 0600 / 0700.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_SSHD_CONFIG = Path("/etc/ssh/sshd_config")
DEFAULT_PAM_DIR = Path("/etc/pam.d")
DEFAULT_SSHD = Path("/usr/sbin/sshd")


@dataclass(frozen=True)
class Layout:
    etc: Path  # agent.toml, host.key, collector.token, user_ca_keys.pub
    lib: Path  # policy.json, refresh.json, auditors/, enroll/ (backups and manifest)
    spool: Path
    run: Path
    libexec: Path  # record, principals launchers

    @classmethod
    def under(cls, state_dir: Path | None) -> Layout:
        if state_dir is None:
            return cls(
                etc=Path("/etc/sshaudit"),
                lib=Path("/var/lib/sshaudit"),
                spool=Path("/var/spool/sshaudit"),
                run=Path("/run/sshaudit"),
                libexec=Path("/usr/libexec/sshaudit"),
            )
        s = state_dir.absolute()
        return cls(s / "etc", s / "lib", s / "spool", s / "run", s / "libexec")

    @property
    def config(self) -> Path:
        return self.etc / "agent.toml"

    @property
    def host_key(self) -> Path:
        return self.etc / "host.key"

    @property
    def credential(self) -> Path:
        return self.etc / "collector.token"

    @property
    def ca_keys(self) -> Path:
        return self.etc / "user_ca_keys.pub"

    @property
    def policy(self) -> Path:
        return self.lib / "policy.json"

    @property
    def auditors(self) -> Path:
        return self.lib / "auditors"

    @property
    def backups(self) -> Path:
        return self.lib / "enroll"

    @property
    def enrollment(self) -> Path:
        """What enroll did (collector, host id, files it created): JSON, 0600."""
        return self.lib / "enrollment.json"

    @property
    def socket(self) -> Path:
        return self.run / "agent.sock"

    @property
    def daemon_pid(self) -> Path:
        return self.run / "daemon.pid"

    @property
    def daemon_log(self) -> Path:
        return self.lib / "daemon.log"

    @property
    def recorder(self) -> Path:
        return self.libexec / "record"

    @property
    def principals(self) -> Path:
        return self.libexec / "principals"
