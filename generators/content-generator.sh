#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-or-later
# content-generator.sh: the smallest useful content generator for atftpd.py.
#
# Produces: a short greeting for any requested name under "hello/", e.g.
#   curl tftp://127.0.0.1:6969/hello/world  ->  "Hello 127.0.0.1, you asked for world."
# Reads: nothing but its arguments and the TFTP_* environment.
# Contract (see README.md, "Content generator"):
#   - atftpd.py runs it as:  content-generator.sh --file <root>/<requested name>
#   - the content goes to file descriptor 3; stdout/stderr go to the server's log;
#   - exit 0 with output: served. Exit non-zero or no output: "File not found";
#   - unknown arguments are ignored, so newer servers can pass more.
# Example: ./content-generator.sh --file /srv/tftp/hello/x 3>&1
set -eu

file=
while [ $# -gt 0 ]; do
	case "$1" in
	--file)
		file=${2-}
		[ $# -gt 1 ] && shift
		;;
	--file=*) file=${1#--file=} ;;
	--help)
		printf 'usage: %s --file PATH   (content on fd 3)\n' "$0"
		printf 'Answers PATHs under hello/; reads TFTP_CLIENT_ADDR.\n'
		exit 0
		;;
	esac
	shift
done

case "$file" in
*/hello/*) ;;
*) exit 1 ;; # not ours: the client gets "File not found"
esac

printf 'Hello %s, you asked for %s.\n' "${TFTP_CLIENT_ADDR-stranger}" "${file##*/}" >&3
