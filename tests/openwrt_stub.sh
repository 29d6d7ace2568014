#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-or-later
# A stand-in for OpenWrt's /etc/rc.common with the procd, UCI and
# functions.sh calls an init script makes, for tests/test_openwrt.py.
#
#   busybox sh tests/openwrt_stub.sh INITSCRIPT ACTION
#
# It runs like the real rc.common (source the script, then dispatch the
# action), but every procd call is written to $STUB_LOG, one line per call,
# arguments shell-quoted, instead of going to ubus. UCI comes from
# $UCI_CONFIG_DIR; option types are checked by tests/uci_validate_data.py,
# which stands in for /sbin/validate_data (its header says what real
# behaviour it encodes). $IPKG_INSTROOT means what it means to the real
# rc.common: image-build mode, where config_load returns at once (so start
# declares no instance) and enable/disable link below it.
#
# With $STUB_PROCD (a directory), procd's side is kept there, as procd
# holds it between commands: start/reload/restart replace the service's
# instances with the ones declared (zero instances included: procd then
# stops the running server), stop deletes the service, and `status` reports
# as procd.sh's _procd_status does ("running", "active with no instances",
# "inactive" with status 3), or through the script's status_service.
# Not among issue 15's observations, taken from rc.common and procd.sh's
# source: `status` calls status_service when the script defines one, and
# _procd_status's wording and exit codes.
# shellcheck disable=SC3043 # busybox ash has local; rc.common relies on it

STUB_DIR=$(cd "$(dirname "$0")" && pwd)
: "${STUB_LOG:=/dev/stderr}"
: "${STUB_PYTHON:=python3}"

stub_record() {
	local arg line="$1"
	shift
	for arg in "$@"; do
		line="$line '$(printf '%s' "$arg" | sed "s/'/'\\\\''/g")'"
	done
	printf '%s\n' "$line" >>"$STUB_LOG"
}

stub_validate_data() {
	"$STUB_PYTHON" "$STUB_DIR/uci_validate_data.py" "$@"
}

# /lib/functions.sh ##########################################################

get_bool() {
	local _tmp="$1"
	case "$_tmp" in
		1|on|true|yes|enabled) _tmp=1 ;;
		0|off|false|no|disabled) _tmp=0 ;;
		*) _tmp="$2" ;;
	esac
	printf '%s' "$_tmp"
}

CONFIG_SECTIONS=

# uci_load: the CONFIG_* variables functions.sh keeps (see
# uci_validate_data.py load). In image-build mode it does nothing.
config_load() {
	local _vars
	stub_record config_load "$@"
	[ -n "$IPKG_INSTROOT" ] && return 0
	_vars=$(stub_validate_data load "$1") || return 1
	eval "$_vars"
}

config_foreach() {
	local function="$1" type="$2" section stype
	shift 2
	stub_record config_foreach "$function" "$type" "$@"
	for section in $CONFIG_SECTIONS; do
		eval "stype=\${CONFIG_${section}_TYPE}"
		[ -z "$type" ] || [ "$type" = "$stype" ] || continue
		"$function" "$section" "$@"
	done
}

config_get() {
	case "$3" in
		"") eval "$1=\${CONFIG_${2}:-\$4}" ;;
		*) eval "$1=\${CONFIG_${2}_${3}:-\$4}" ;;
	esac
}

# As functions.sh: only a UCI list has items; an option gives none.
config_list_foreach() {
	[ "$#" -ge 3 ] || return 0
	local section="$1" option="$2" function="$3" val len c=1
	shift 3
	config_get len "$section" "${option}_LENGTH"
	[ -z "$len" ] && return 0
	while [ "$c" -le "$len" ]; do
		config_get val "$section" "${option}_ITEM$c"
		"$function" "$val" "$@"
		c=$((c + 1))
	done
}

logger() {
	stub_record logger "$@"
}

# /sbin/uci: only `uci show PACKAGE`, as reload_config uses it.
uci() {
	if [ "$1" != show ] || [ "$#" != 2 ]; then
		echo "stub: uci $*" >&2
		return 1
	fi
	stub_validate_data show "$2"
}

# /sbin/validate_data, found on PATH as on a router (procd.sh calls it by
# its full path; the stub's procd.sh calls the stand-in).
validate_data() {
	stub_validate_data check "$@"
}

# /lib/functions/procd.sh: the validation half, as in procd ##################

uci_validate_section() {
	local _package="$1" _type="$2" _name="$3" _result _error
	shift 3
	_result=$(stub_validate_data validate "$_package" "$_type" "$_name" "$@" 2>/dev/null)
	_error=$?
	eval "$_result"
	[ "$_error" = 0 ] || stub_validate_data validate "$_package" "$_type" "$_name" "$@" >/dev/null
	return "$_error"
}

uci_load_validate() {
	local _package="$1" _type="$2" _name="$3" _function="$4" _option _result
	shift 4
	for _option in "$@"; do
		eval "local ${_option%%:*}"
	done
	uci_validate_section "$_package" "$_type" "$_name" "$@"
	_result=$?
	stub_record uci_load_validate "$_package" "$_type" "$_name" "$_function" "$_result" "$@"
	[ -n "$_function" ] || return "$_result"
	eval "$_function \"\$_name\" \"\$_result\""
}

# /lib/functions/procd.sh: the ubus half, recorded ###########################

# What this command declares, kept apart for procd's state ($STUB_PROCD).
STUB_DECLARED=
stub_declare() {
	local log="$STUB_LOG"
	stub_record "$@"
	[ -n "$STUB_PROCD" ] && [ -n "$STUB_DECLARED" ] || return 0
	STUB_LOG="$STUB_DECLARED"
	stub_record "$@"
	STUB_LOG="$log"
}

procd_open_service() {
	stub_record procd_open_service "$@"
	[ -n "$STUB_PROCD" ] || return 0
	STUB_DECLARED="$STUB_PROCD/$1.new"
	: >"$STUB_DECLARED"
}
procd_open_instance() { stub_declare procd_open_instance "$@"; }
procd_set_param() { stub_declare procd_set_param "$@"; }
procd_append_param() { stub_declare procd_append_param "$@"; }
procd_close_instance() { stub_declare procd_close_instance "$@"; }
procd_add_mdns() { stub_declare procd_add_mdns "$@"; }
procd_add_reload_trigger() { stub_record procd_add_reload_trigger "$@"; }

procd_kill() {
	stub_record procd_kill "$@"
	[ -z "$STUB_PROCD" ] || rm -f "$STUB_PROCD/$1"
}

procd_add_validation() {
	stub_record procd_add_validation "$@"
	"$@"
}

# procd replaces the service's instances with the declared ones: an
# instance that is gone is stopped, a changed one restarted, an unchanged
# one left running.
procd_close_service() {
	service_triggers
	stub_record procd_close_service "$@"
	[ -n "$STUB_DECLARED" ] || return 0
	mv "$STUB_DECLARED" "${STUB_DECLARED%.new}"
	STUB_DECLARED=
}

_procd_status() {
	local state="$STUB_PROCD/$1"
	[ -f "$state" ] || { echo "inactive"; return 3; }
	if ! grep -q '^procd_open_instance' "$state"; then
		[ -z "$2" ] && { echo "active with no instances"; return 0; }
	fi
	if [ -n "$2" ] && ! grep -q "^procd_open_instance '$2'\$" "$state"; then
		echo "unknown instance $2"
		return 4
	fi
	echo "running"
}

# /etc/rc.common #############################################################

initscript="$1"
action="${2:-help}"
[ "$#" -ge 2 ] && shift 2

start_service() { return 0; }
stop_service() { return 0; }
service_triggers() { return 0; }

enable() {
	local name err=1
	name="$(basename "$initscript")"
	[ "$START" ] && ln -sf "../init.d/$name" "$IPKG_INSTROOT/etc/rc.d/S${START}${name##S[0-9][0-9]}" && err=0
	[ "$STOP" ] && ln -sf "../init.d/$name" "$IPKG_INSTROOT/etc/rc.d/K${STOP}${name##K[0-9][0-9]}" && err=0
	return "$err"
}

disable() {
	local name
	name="$(basename "$initscript")"
	rm -f "$IPKG_INSTROOT"/etc/rc.d/S??"$name" "$IPKG_INSTROOT"/etc/rc.d/K??"$name"
}

# shellcheck source=/dev/null
. "$initscript"

[ -n "$USE_PROCD" ] || { echo "stub: $initscript does not set USE_PROCD" >&2; exit 2; }

rc_procd() {
	local method="set"
	[ -n "$2" ] && method="add"
	procd_open_service "$(basename "$initscript")" "$initscript"
	"$@"
	procd_close_service "$method"
}

start() { rc_procd start_service "$@"; }
stop() { stop_service "$@"; procd_kill "$(basename "$initscript")" "$1"; }
restart() { stop "$@"; start "$@"; }
reload() { start; }
boot() { start "$@"; }
status() {
	if type status_service >/dev/null 2>&1; then
		status_service "$@"
	else
		_procd_status "$(basename "$initscript")" "$1"
	fi
}

case "$action" in
	start|stop|reload|restart|boot|enable|disable|status) "$action" "$@" ;;
	*) echo "stub: no action $action" >&2; exit 2 ;;
esac
