# Before the files go: an enrolled host's sshd runs the recorder from this package
# (ForceCommand), so removing it without unenrolling would lock every user out.
if [ -e /var/lib/sshaudit/enrollment.json ]; then
    echo "sshaudit-agent: unenrolling first: sshd and PAM files restored, daemon stopped" >&2
    if ! sshaudit-agent unenroll --force; then
        echo "sshaudit-agent: unenroll failed: the package stays, or sshd would be left with a" >&2
        echo "sshaudit-agent: ForceCommand pointing at nothing. Fix the error above, run" >&2
        echo "sshaudit-agent: 'sshaudit-agent unenroll', then remove the package again." >&2
        exit 1
    fi
fi
if [ -d /run/systemd/system ]; then
    systemctl stop sshaudit-agent.service >/dev/null 2>&1 || true
    systemctl disable sshaudit-agent.service >/dev/null 2>&1 || true
fi
