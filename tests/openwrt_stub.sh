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
# which stands in for /sbin/validate_data. $IPKG_INSTROOT is honoured by
# enable/disable, as in rc.common.
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

STUB_SECTIONS=

config_load() {
	stub_record config_load "$@"
	STUB_SECTIONS=$(stub_validate_data sections "$1") || return 1
}

config_foreach() {
	local function="$1" type="$2" stype sname
	shift 2
	stub_record config_foreach "$function" "$type" "$@"
	while read -r stype sname; do
		[ -n "$sname" ] || continue
		[ -z "$type" ] || [ "$type" = "$stype" ] || continue
		"$function" "$sname" "$@"
	done <<EOF
$STUB_SECTIONS
EOF
}

logger() {
	stub_record logger "$@"
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

procd_open_service() { stub_record procd_open_service "$@"; }
procd_open_instance() { stub_record procd_open_instance "$@"; }
procd_set_param() { stub_record procd_set_param "$@"; }
procd_append_param() { stub_record procd_append_param "$@"; }
procd_close_instance() { stub_record procd_close_instance "$@"; }
procd_add_mdns() { stub_record procd_add_mdns "$@"; }
procd_add_reload_trigger() { stub_record procd_add_reload_trigger "$@"; }
procd_kill() { stub_record procd_kill "$@"; }

procd_add_validation() {
	stub_record procd_add_validation "$@"
	"$@"
}

procd_close_service() {
	service_triggers
	stub_record procd_close_service "$@"
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

case "$action" in
	start|stop|reload|restart|boot|enable|disable) "$action" "$@" ;;
	*) echo "stub: no action $action" >&2; exit 2 ;;
esac
