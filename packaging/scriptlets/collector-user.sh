# The collector's own unprivileged account; its state directory is its home.
if ! getent passwd sshaudit >/dev/null; then
    useradd --system --user-group --no-create-home --home-dir /var/lib/sshaudit-collector \
        --shell /usr/sbin/nologin --comment "sshaudit collector" sshaudit
fi
