# SPDX-License-Identifier: GPL-2.0-or-later
# shellcheck shell=sh
# Shell functions shared by the cached test-root builders
# (tests/emulation/build-rootfs.sh, tests/systemd/build-image.sh).

mounts_below() {
    awk -v dir="$1/" 'index($2, dir) == 1 { print $2 }' /proc/mounts | sort -r
}

remove_build() {
    # A killed debootstrap may leave proc, sys or dev mounted below the build:
    # unmount them (deepest first) and never remove a tree that still has one.
    mounts_below "$1" | while read -r mnt; do umount -l "$mnt" || true; done
    if [ -n "$(mounts_below "$1")" ]; then
        echo "${0##*/}: $1 still has file systems mounted below it; not removed" >&2
        return 1
    fi
    rm -rf "$1"
}
