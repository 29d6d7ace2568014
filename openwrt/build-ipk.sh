#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-or-later
# Build the atftpd-py .ipk for OpenWrt releases that use opkg (24.10 and
# older), without the OpenWrt SDK:
#
#   sh openwrt/build-ipk.sh [OUTDIR]        (default: the current directory)
#
# An ipk is a gzipped tar of ./debian-binary, ./control.tar.gz and
# ./data.tar.gz, as OpenWrt's scripts/ipkg-build makes it. The package is
# the one openwrt/Makefile describes: name, version and release are read
# from there, the server is ../atftpd.py with its first line made
# '#!/usr/bin/python3'. Prints the path of the package it wrote.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
outdir=$(cd "${1:-.}" && pwd)
server="$here/../atftpd.py"

makefile_value() {
	sed -n "s/^$1:=//p" "$here/Makefile"
}

name=$(makefile_value PKG_NAME)
version=$(makefile_value PKG_VERSION)-$(makefile_value PKG_RELEASE)
maintainer=$(makefile_value PKG_MAINTAINER)
license=$(makefile_value PKG_LICENSE)
if [ -z "$name" ] || [ -z "$version" ]; then
	echo "cannot read $here/Makefile" >&2
	exit 1
fi
if [ ! -r "$server" ]; then
	echo "no server at $server" >&2
	exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umask 022

# Files owned by root in the archives: GNU tar can say so; other tars
# record the current user, so run them as root (or under fakeroot).
owner=""
if tar --version 2>/dev/null | grep -q 'GNU tar'; then
	owner="--owner=0 --group=0 --numeric-owner"
fi

# data.tar.gz: what opkg installs.
data="$work/data"
mkdir -p "$data/usr/sbin" "$data/etc/init.d" "$data/etc/config"
sed '1s|^#!.*|#!/usr/bin/python3|' "$server" >"$data/usr/sbin/atftpd.py"
cp "$here/files/atftpd.init" "$data/etc/init.d/atftpd"
cp "$here/files/atftpd.config" "$data/etc/config/atftpd"
chmod 0755 "$data/usr/sbin/atftpd.py" "$data/etc/init.d/atftpd"
chmod 0644 "$data/etc/config/atftpd"

# control.tar.gz: metadata and the maintainer scripts every SDK-built
# package has (enable and start the init script on install, stop and
# disable it on removal).
control="$work/control"
mkdir -p "$control"
cat >"$control/control" <<EOF
Package: $name
Version: $version
Depends: python3-light
Conflicts: atftpd
Section: net
Architecture: all
Maintainer: $maintainer
License: $license
Description: TFTP server in Python that can generate missing files
 A drop-in for atftpd (same command line, same UCI config) in one Python
 file: RFC 1350, 2347, 2348, 2349 and 7440, IPv4 and IPv6, and a content
 generator that runs a program of your choice when a requested file does
 not exist.
EOF
echo "/etc/config/atftpd" >"$control/conffiles"
cat >"$control/postinst" <<'EOF'
#!/bin/sh
[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0
[ -s "${IPKG_INSTROOT}/lib/functions.sh" ] || exit 0
# shellcheck source=/dev/null
. "${IPKG_INSTROOT}/lib/functions.sh"
default_postinst "$0" "$@"
EOF
cat >"$control/prerm" <<'EOF'
#!/bin/sh
[ -s "${IPKG_INSTROOT}/lib/functions.sh" ] || exit 0
# shellcheck source=/dev/null
. "${IPKG_INSTROOT}/lib/functions.sh"
default_prerm "$0" "$@"
EOF
chmod 0644 "$control/control" "$control/conffiles"
chmod 0755 "$control/postinst" "$control/prerm"

echo "2.0" >"$work/debian-binary"
# shellcheck disable=SC2086 # $owner is empty or several options
(cd "$data" && tar $owner -cf - ./usr ./etc) | gzip -9n >"$work/data.tar.gz"
# shellcheck disable=SC2086
(cd "$control" && tar $owner -cf - ./control ./conffiles ./postinst ./prerm) | gzip -9n >"$work/control.tar.gz"

package="$outdir/${name}_${version}_all.ipk"
# shellcheck disable=SC2086
(cd "$work" && tar $owner -cf - ./debian-binary ./control.tar.gz ./data.tar.gz) | gzip -9n >"$package"
echo "$package"
