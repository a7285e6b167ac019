if [ -d /run/systemd/system ]; then
    systemctl stop sshaudit-collector.service >/dev/null 2>&1 || true
    systemctl disable sshaudit-collector.service >/dev/null 2>&1 || true
fi
