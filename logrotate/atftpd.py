# SPDX-License-Identifier: GPL-2.0-or-later
# logrotate for atftpd.py started with
#   --logfile /var/log/atftpd.py.log --pidfile /run/atftpd.py.pid
# Install: cp logrotate/atftpd.py /etc/logrotate.d/atftpd.py
#
# `create` with no arguments gives the new file the old one's owner and
# mode. Started as root, the server makes its --user the owner of its log,
# so after the HUP it can reopen the new file although it no longer runs
# as root (and /var/log is not writable to it).
/var/log/atftpd.py.log {
	weekly
	rotate 4
	compress
	delaycompress
	missingok
	notifempty
	create
	postrotate
		if [ -s /run/atftpd.py.pid ]; then kill -HUP "$(cat /run/atftpd.py.pid)"; fi
	endscript
}
