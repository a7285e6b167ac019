# The AuthorizedPrincipalsCommandUser (sshd_config(5)): sshd runs the principals command as
# this user, so it is a system account with no login shell and no home.
if ! getent passwd sshaudit-principals >/dev/null; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin --comment "sshaudit principals command" sshaudit-principals
fi
