# BEGIN sshaudit recorder handover (managed by sshaudit-agent enroll; do not edit)
# sshd runs the ForceCommand as `fish -c "<ForceCommand>"` (sshd_config(5)). fish reads
# /usr/share/fish/config.fish, then conf.d snippets (the user's
# ~/.config/fish/conf.d/*.fish FIRST), then this file, then ~/.config/fish/config.fish:
# this starts the recorder before the user's config.fish, not before their conf.d
# snippets (docs/sshd-setup.md).
builtin set -l sshaudit_argv (builtin string split0 < /proc/$fish_pid/cmdline)
if builtin test (builtin count $sshaudit_argv) -eq 3; and builtin test "x$sshaudit_argv[2]" = x-c; and builtin test "x$sshaudit_argv[3]" = 'x/usr/libexec/sshaudit/record --config /etc/sshaudit/agent.toml'
    exec /usr/libexec/sshaudit/record --config /etc/sshaudit/agent.toml
end
# END sshaudit recorder handover
# Put system-wide fish configuration entries here
# or in .fish files in conf.d/
# Files in conf.d can be overridden by the user
# by files with the same name in $XDG_CONFIG_HOME/fish/conf.d

# This file is run by all fish instances.
# To include configuration only for login shells, use
# if status is-login
#    ...
# end
# To include configuration only for interactive shells, use
# if status is-interactive
#   ...
# end
