"""The sshaudit PAM hook (:mod:`sshaudit.pam_module.hook`), used through the stock pam_exec.so.

sshd runs PAM's ``session`` stack (and ``account``) even for public-key and certificate
logins, as root, in the connection's ``sshd: USER [priv]`` process. The hook tells the agent
daemon, independently of the recorder, that a session opened and closed for user U from
address A, so the daemon can record a session that never got a recorder (``unrecorded``) or
whose recorder vanished (``recorder_lost``): never silently missing.

Add to ``/etc/pam.d/sshd`` (``sshaudit-agent enroll`` does it), as the first ``session``
line, before every ``pam_env.so`` line (Debian's ``pam_env.so user_readenv=1`` lets the user's
``~/.pam_environment`` rewrite ``SSH_AUTH_INFO_0``, the identity the hook passes on)::

    session optional pam_exec.so quiet /usr/bin/python3 -I -S HOOK \
        --socket /run/sshaudit/agent.sock --spool-dir /var/spool/sshaudit

(one line in the file; HOOK is the absolute path of ``sshaudit/pam_module/hook.py``)

and, to log the account phase of each login too (one line in the daemon's log)::

    account optional pam_exec.so quiet /usr/bin/python3 -I -S HOOK --socket /run/sshaudit/agent.sock

- ``optional``: the hook can never deny a login; it also always exits 0 within one second.
- ``quiet``: pam_exec prints nothing to the user.
- ``-I -S``: an isolated interpreter without site-packages: nothing from the environment or
  the user's files is imported, and start-up stays fast (the hook imports only a few
  standard modules). ``--config /etc/sshaudit/agent.toml`` works instead of ``--socket`` and
  ``--spool-dir`` but parses TOML on every login.
- The hook's path and every directory above it must be root-owned and not writable by others:
  it runs as root.
"""
