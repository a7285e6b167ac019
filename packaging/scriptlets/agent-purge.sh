# Purge: enroll's leftovers and the spool go. Sessions not yet shipped are lost: say so.
if [ -d /var/spool/sshaudit ] && [ -n "$(ls -A /var/spool/sshaudit 2>/dev/null)" ]; then
    echo "sshaudit-agent: purging /var/spool/sshaudit with files not yet shipped" >&2
fi
rm -rf /etc/sshaudit /var/lib/sshaudit /var/spool/sshaudit /run/sshaudit
