#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-or-later
# Build, or reuse, a bootable Debian bookworm image with systemd as PID 1,
# for tests/test_systemd.py.
#
#   sh tests/systemd/build-image.sh
#
# Prints the directory that holds the image as its last line: base.img (ext4,
# the whole root file system), vmlinuz and initrd.img (the image's own Debian
# kernel and initramfs, for qemu -kernel/-initrd). It lives outside the clone,
# in $ATFTPD_SYSTEMD_CACHE (default /var/cache/atftpd-py-tests/systemd). It is
# reused when its stamp file says it was built completely by this version of
# the script; otherwise it is built anew in a temporary directory and moved
# into place only when complete. The tests boot it with snapshot=on, so it is
# never written to.
#
# The root: debootstrap --variant=minbase with systemd-sysv, the kernel,
# python3, udev, a TFTP client (tftp-hpa), procps, and Debian's own atftpd
# (for its unit files; its units are disabled here, each test enables what
# it needs). One unit is added: atftpd-py-test.service, which at boot mounts
# the second disk (/dev/vdb, made per test), runs its run.sh with output on
# the serial console (ttyS0), and powers the machine off (QEMU then exits).
# Nothing of the project is in the image: atftpd.py and the units come on
# that second disk.
#
# Needs root and the Debian packages debootstrap and e2fsprogs.
#
# Exit status: 0 ready; 2 a prerequisite is missing (the message says which);
# 1 the build failed.
set -eu

# Bump when the contents of the image change, so that cached images are rebuilt.
BUILD_VERSION=3
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${ATFTPD_SYSTEMD_CACHE:-/var/cache/atftpd-py-tests/systemd}
PACKAGES=systemd-sysv,udev,linux-image-amd64,python3,tftp-hpa,procps,atftpd
IMAGE_SIZE=2G

die() {
    echo "build-image.sh: $*" >&2
    exit 1
}

missing() {
    echo "build-image.sh: missing prerequisite: $*" >&2
    exit 2
}

# shellcheck source=SCRIPTDIR/../build-lib.sh
. "$(dirname "$0")/../build-lib.sh"

STAMP=$CACHE/stamp
STAMP_TEXT="atftpd.py systemd test image, version $BUILD_VERSION: $SUITE $PACKAGES"

[ "$(id -u)" -eq 0 ] || missing "must run as root (debootstrap, chroot)"
command -v debootstrap >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin
command -v debootstrap >/dev/null 2>&1 || missing "debootstrap (Debian package debootstrap)"
command -v mke2fs >/dev/null 2>&1 || missing "mke2fs (Debian package e2fsprogs)"
command -v chroot >/dev/null 2>&1 || missing "chroot (Debian package coreutils)"
command -v flock >/dev/null 2>&1 || missing "flock (Debian package util-linux)"

# One build at a time; a second caller waits, then reuses it.
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock -w 900 9 || die "another build in $CACHE is still running after 900 s"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_TEXT" ] &&
    [ -f "$CACHE/base.img" ] && [ -f "$CACHE/vmlinuz" ] && [ -f "$CACHE/initrd.img" ]; then
    echo "build-image.sh: reusing $CACHE" >&2
    echo "$CACHE"
    exit 0
fi

# Holding the lock: any other build directory was left by a killed build.
for stale in "$CACHE"/.build.*; do
    if [ -d "$stale" ]; then
        remove_build "$stale" || die "cannot remove the stale build $stale"
    fi
done
WORK=$CACHE/.build.$$
ROOT=$WORK/root
trap 'remove_build "$WORK"' EXIT
trap 'exit 1' HUP INT TERM
mkdir -p "$WORK"

echo "build-image.sh: building $CACHE ($SUITE amd64, from $MIRROR)" >&2
started=$(date +%s)
DEBIAN_FRONTEND=noninteractive debootstrap --arch=amd64 --variant=minbase \
    --include="$PACKAGES" "$SUITE" "$ROOT" "$MIRROR" >&2 ||
    { tail -n 30 "$ROOT/debootstrap/debootstrap.log" >&2 2>/dev/null || true; die "debootstrap failed"; }

# Debian's atftpd enables its socket (port 69) on installation: off here,
# the tests that want it enable it. No getty on the serial console: it is the
# tests' output. No network: the tests use the loopback interface only.
chroot "$ROOT" systemctl disable atftpd.socket atftpd.service >&2 2>/dev/null || true
rm -f "$ROOT/etc/systemd/system/sockets.target.wants/atftpd.socket" \
    "$ROOT/etc/systemd/system/multi-user.target.wants/atftpd.service"
for unit in serial-getty@ttyS0.service getty@tty1.service systemd-timesyncd.service \
    apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer; do
    ln -sf /dev/null "$ROOT/etc/systemd/system/$unit"
done
echo "atftpd-py-test" >"$ROOT/etc/hostname"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' >"$ROOT/etc/fstab"
: >"$ROOT/etc/machine-id"

cat >"$ROOT/usr/local/sbin/atftpd-py-test" <<'EOF'
#!/bin/sh
# Run the test script of the second disk; its output goes to ttyS0.
mkdir -p /test
if mount -o ro /dev/vdb /test; then
    sh /test/run.sh
    echo "@@ run.sh exit status $?"
else
    echo "@@ cannot mount /dev/vdb"
fi
sync
EOF
chmod 755 "$ROOT/usr/local/sbin/atftpd-py-test"
cat >"$ROOT/etc/systemd/system/atftpd-py-test.service" <<'EOF'
[Unit]
Description=atftpd.py systemd test: run /dev/vdb's run.sh
After=multi-user.target
ConditionPathExists=/dev/vdb
# Done, or failed, or timed out: the machine powers off and QEMU exits.
SuccessAction=poweroff
FailureAction=poweroff

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/atftpd-py-test
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
TTYReset=no
TTYVHangup=no
TimeoutStartSec=300

[Install]
WantedBy=multi-user.target
EOF
mkdir -p "$ROOT/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/atftpd-py-test.service \
    "$ROOT/etc/systemd/system/multi-user.target.wants/atftpd-py-test.service"
ln -sf /lib/systemd/system/multi-user.target "$ROOT/etc/systemd/system/default.target"

kernel=$(find "$ROOT/boot" -name 'vmlinuz-*' | sort | tail -n 1)
initrd=$(find "$ROOT/boot" -name 'initrd.img-*' | sort | tail -n 1)
{ [ -n "$kernel" ] && [ -f "$kernel" ]; } || die "no kernel in $ROOT/boot"
{ [ -n "$initrd" ] && [ -f "$initrd" ]; } || die "no initramfs in $ROOT/boot"
cp "$kernel" "$WORK/vmlinuz"
cp "$initrd" "$WORK/initrd.img"
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/* "$ROOT/debootstrap"

mke2fs -q -t ext4 -L atftpd-py-test -d "$ROOT" "$WORK/base.img" "$IMAGE_SIZE" >&2 ||
    die "mke2fs failed"
remove_build "$ROOT" || die "cannot remove $ROOT"
rm -f "$CACHE/base.img" "$CACHE/vmlinuz" "$CACHE/initrd.img" "$STAMP"
mv "$WORK/base.img" "$WORK/vmlinuz" "$WORK/initrd.img" "$CACHE/"
echo "$STAMP_TEXT" >"$STAMP"
echo "build-image.sh: built $CACHE ($(basename "$kernel")) in $(($(date +%s) - started)) s" >&2
echo "$CACHE"
