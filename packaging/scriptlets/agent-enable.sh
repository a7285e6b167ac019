# Enabled at first install so the daemon starts at boot once enrolled; until then
# ConditionPathExists=/etc/sshaudit/agent.toml keeps it from starting.
if command -v systemctl >/dev/null 2>&1; then
    systemctl enable sshaudit-agent.service >/dev/null 2>&1 || true
fi
