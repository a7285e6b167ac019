# BEGIN sshaudit recorder handover (managed by sshaudit-agent enroll; do not edit)
# sshd runs the ForceCommand as `tcsh -c "<ForceCommand>"` (or csh, its basename;
# sshd_config(5)); tcsh reads this file before ~/.tcshrc or ~/.cshrc (tcsh(1) Startup
# and shutdown): start the recorder now. sshd always sets SSH_CONNECTION; a -c shell
# has no prompt.
if ( $?SSH_CONNECTION && ! $?prompt ) then
  set sshaudit_argv = "`/usr/bin/tr '\0' ' ' < /proc/$$/cmdline`"
  if ( "$sshaudit_argv" == 'tcsh -c /usr/libexec/sshaudit/record --config /etc/sshaudit/agent.toml ' || "$sshaudit_argv" == 'csh -c /usr/libexec/sshaudit/record --config /etc/sshaudit/agent.toml ' ) exec /usr/libexec/sshaudit/record --config /etc/sshaudit/agent.toml
  unset sshaudit_argv
endif
# END sshaudit recorder handover
# /etc/csh.cshrc: system-wide .cshrc file for csh(1) and tcsh(1)

if ($?tcsh && $?prompt) then

	bindkey "\e[1~" beginning-of-line # Home
	bindkey "\e[7~" beginning-of-line # Home rxvt
	bindkey "\e[2~" overwrite-mode    # Ins
	bindkey "\e[3~" delete-char       # Delete
	bindkey "\e[4~" end-of-line       # End
	bindkey "\e[8~" end-of-line       # End rxvt

	set autoexpand
	set autolist
	set prompt = "%U%m%u:%B%~%b%# "
endif

set dir=/etc/csh/cshrc.d
if (-e $dir && `/bin/ls $dir` != "") then
  foreach FILE (`/bin/ls $dir/*`)
    source $FILE;
  end;
endif
