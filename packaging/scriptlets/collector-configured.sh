# The state directory belongs to the collector's user (not recursively: an admin may have
# made files in it on purpose). Not enabled or started: `sshaudit-collector init` first.
if [ "$(stat -c %U /var/lib/sshaudit-collector)" = root ]; then
    chown sshaudit:sshaudit /var/lib/sshaudit-collector
fi
chmod 0700 /var/lib/sshaudit-collector
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
