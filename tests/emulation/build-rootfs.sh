#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-or-later
# Build, or reuse, a Debian bookworm root filesystem for a foreign CPU, with
# python3 and its standard library, for tests/test_emulation.py.
#
#   sh tests/emulation/build-rootfs.sh ARCH      (ARCH: mipsel or armel)
#
# Prints the root's path as its last line. The root lives outside the clone,
# in $ATFTPD_EMULATION_CACHE (default /var/cache/atftpd-py-tests), as
# rootfs-ARCH. A root is reused when its stamp file says it was built
# completely by this version of the script; otherwise it is built anew in a
# temporary directory and moved into place only when it works.
#
# Needs root and the Debian packages debootstrap, qemu-user-static and
# binfmt-support. Mounts binfmt_misc when it is not mounted and registers
# qemu's interpreter for ARCH (update-binfmts --enable), so that the
# foreign binaries in the root run under qemu-user, in a chroot too (the
# interpreter is registered with the F flag: it need not be in the root).
#
# Exit status: 0 ready; 2 a prerequisite is missing (the message says which);
# 1 the build failed.
set -eu

# Bump when the contents of the root change, so that cached roots are rebuilt.
BUILD_VERSION=1
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${ATFTPD_EMULATION_CACHE:-/var/cache/atftpd-py-tests}
PACKAGES=python3-minimal,libpython3.11-stdlib

die() {
    echo "build-rootfs.sh: $*" >&2
    exit 1
}

missing() {
    echo "build-rootfs.sh: missing prerequisite: $*" >&2
    exit 2
}

# shellcheck source=SCRIPTDIR/../build-lib.sh
. "$(dirname "$0")/../build-lib.sh"

[ $# -eq 1 ] || { echo "usage: build-rootfs.sh mipsel|armel" >&2; exit 2; }
ARCH=$1
case $ARCH in
    mipsel) QEMU=mipsel ;;
    armel) QEMU=arm ;;
    *) echo "build-rootfs.sh: unsupported architecture $ARCH (mipsel, armel)" >&2; exit 2 ;;
esac

ROOTFS=$CACHE/rootfs-$ARCH
STAMP=$ROOTFS/.atftpd-py-rootfs
STAMP_TEXT="atftpd.py test root, version $BUILD_VERSION: $SUITE $ARCH $PACKAGES"

[ "$(id -u)" -eq 0 ] || missing "must run as root (debootstrap, chroot, binfmt_misc)"
command -v debootstrap >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin
command -v debootstrap >/dev/null 2>&1 || missing "debootstrap (Debian package debootstrap)"
command -v update-binfmts >/dev/null 2>&1 || missing "update-binfmts (Debian package binfmt-support)"
command -v chroot >/dev/null 2>&1 || missing "chroot (Debian package coreutils)"
[ -f "/usr/share/binfmts/qemu-$QEMU" ] || missing "qemu-$QEMU binfmt entry (Debian package qemu-user-static)"
[ -x "/usr/bin/qemu-$QEMU-static" ] || missing "/usr/bin/qemu-$QEMU-static (Debian package qemu-user-static)"

# binfmt_misc: mounted, and qemu's interpreter registered and enabled.
BINFMT=/proc/sys/fs/binfmt_misc
if [ ! -e "$BINFMT/register" ]; then
    mount -t binfmt_misc binfmt_misc "$BINFMT" 2>/dev/null ||
        missing "binfmt_misc is not mounted at $BINFMT and cannot be mounted (a container without CAP_SYS_ADMIN?)"
fi
if ! grep -qx enabled "$BINFMT/qemu-$QEMU" 2>/dev/null; then
    update-binfmts --enable "qemu-$QEMU" >&2 ||
        missing "update-binfmts --enable qemu-$QEMU failed"
fi
grep -qx enabled "$BINFMT/qemu-$QEMU" 2>/dev/null ||
    missing "qemu-$QEMU is not enabled in $BINFMT"
grep -q '^flags:.*F' "$BINFMT/qemu-$QEMU" ||
    missing "qemu-$QEMU is registered without the F (fix binary) flag: a chroot cannot find its interpreter"

check_root() {
    # The root's python3 runs, emulated, with the standard library we need.
    chroot "$1" /usr/bin/python3 -c 'import platform, selectors, subprocess, tempfile, configparser, fnmatch; print(platform.machine())'
}

# One build per architecture at a time; a second caller waits, then reuses it.
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock-$ARCH"
command -v flock >/dev/null 2>&1 || missing "flock (Debian package util-linux)"
flock -w 600 9 || die "another build of $ROOTFS is still running after 600 s"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_TEXT" ]; then
    machine=$(check_root "$ROOTFS") || die "the cached root $ROOTFS does not run; remove it to rebuild"
    echo "build-rootfs.sh: reusing $ROOTFS ($machine)" >&2
    echo "$ROOTFS"
    exit 0
fi

# Holding the lock: any other build directory was left by a killed build.
for stale in "$CACHE"/.build-"$ARCH".*; do
    if [ -d "$stale" ]; then
        remove_build "$stale" || die "cannot remove the stale build $stale"
    fi
done
WORK=$CACHE/.build-$ARCH.$$
trap 'remove_build "$WORK"' EXIT
trap 'exit 1' HUP INT TERM

echo "build-rootfs.sh: building $ROOTFS ($SUITE $ARCH, from $MIRROR)" >&2
started=$(date +%s)
debootstrap --arch="$ARCH" --variant=minbase --include="$PACKAGES" \
    "$SUITE" "$WORK" "$MIRROR" >&2 ||
    { tail -n 30 "$WORK/debootstrap/debootstrap.log" >&2 2>/dev/null || true; die "debootstrap failed"; }

# What the tests need in the root: /dev/null (for the generators' stdin) and
# /tmp. debootstrap normally makes the device nodes; make sure.
[ -c "$WORK/dev/null" ] || { rm -f "$WORK/dev/null"; mknod -m 666 "$WORK/dev/null" c 1 3; }
chmod 1777 "$WORK/tmp"
rm -rf "$WORK"/var/cache/apt/archives/*.deb "$WORK"/var/lib/apt/lists/*

machine=$(check_root "$WORK") || die "python3 does not run in the new root"
echo "$STAMP_TEXT" >"$WORK/.atftpd-py-rootfs"
rm -rf "$ROOTFS"
mv "$WORK" "$ROOTFS"
trap - EXIT
echo "build-rootfs.sh: built $ROOTFS ($machine, $(du -sm "$ROOTFS" | cut -f1) MB) in $(($(date +%s) - started)) s" >&2
echo "$ROOTFS"
