"""The host-side installer used by ``sshaudit-agent enroll``/``unenroll`` (standard library only).

- :mod:`.sshd_parse`: reading sshd_config(5) text the way OpenSSH's servconf.c does.
- :mod:`.sshd_edit`: the settings we write (drop-in or marked block at the top), pure.
- :mod:`.sshd_check`: existing settings we must refuse (Conflict) or merge (Note), pure.
- :mod:`.pam_edit`: the PAM hook lines, pure.
- :mod:`.files`: the backup-first, atomic, exactly reversible file transaction.
"""
