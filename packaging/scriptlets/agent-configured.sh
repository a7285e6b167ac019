# Never enrolls (only `sshaudit-agent enroll` edits sshd). On an upgrade of an enrolled host
# the launchers in /usr/libexec/sshaudit are this package's files, rewritten by the package
# manager for the new venv; the PAM hook's path is the venv's, stable while the venv's Python
# (3.11) is. Warn if an older layout left sshd's PAM file pointing at a file that is gone.
if [ -e /var/lib/sshaudit/enrollment.json ]; then
    pam=$(sed -n 's/.*"pam_file": *"\([^"]*\)".*/\1/p' /var/lib/sshaudit/enrollment.json)
    hook=$(grep -o '/opt/sshaudit/agent/[^ ]*hook\.py' "${pam:-/etc/pam.d/sshd}" 2>/dev/null | head -n 1 || true)
    if [ -n "$hook" ] && [ ! -e "$hook" ]; then
        echo "sshaudit-agent: WARNING: ${pam:-/etc/pam.d/sshd} runs $hook, which no longer exists;" >&2
        echo "sshaudit-agent: run 'sshaudit-agent enroll' again (same collector: it re-applies)." >&2
    fi
    # The running daemon is not restarted: a restart ends the recording of every session in
    # progress, and with on_daemon_down = "deny" the sessions themselves (agent/record.py).
    echo "sshaudit-agent: the running agent daemon keeps the previous version until it restarts" >&2
    echo "sshaudit-agent: (systemctl restart sshaudit-agent at a quiet time, or the next boot)." >&2
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
