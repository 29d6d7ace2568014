# SPDX-License-Identifier: GPL-2.0-or-later
# Shell functions for the test scripts that tests/test_systemd.py runs in its
# guest (Debian bookworm, systemd as PID 1). Each test writes a run.sh that
# sources this file from the test disk (/test, read-only). The guest reports
# what it sees as "@@ KEY VALUE" lines on the serial console; the pytest side
# judges them. Every wait here is bounded.
# shellcheck shell=sh

set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

report() {
    printf '@@ %s\n' "$*"
}

# Debug output, shown by the pytest side when a test fails.
note() {
    sed 's/^/## /'
}

# Install atftpd.py as systemd/README.md says: /usr/sbin/atftpd.py, its
# bytecode cached beside it; the sample generators in /usr/lib/atftpd.py;
# the test files in /srv/tftp (world-readable, as a server started as root
# wants them).
install_server() {
    cp /test/atftpd.py /usr/sbin/atftpd.py
    chmod 755 /usr/sbin/atftpd.py
    python3 -m py_compile /usr/sbin/atftpd.py
    mkdir -p /usr/lib/atftpd.py
    cp /test/generators/* /usr/lib/atftpd.py/
    chmod 755 /usr/lib/atftpd.py/*
    mkdir -p /srv/tftp
    cp -R /test/files/. /srv/tftp/
    chmod -R a+rX /srv/tftp
}

# The units of systemd/, as systemd/README.md installs them.
install_units() {
    cp /test/systemd/atftpd.py.service /test/systemd/atftpd.py-inetd.socket \
        /test/systemd/atftpd.py-inetd.service /etc/systemd/system/
    systemctl daemon-reload
}

# wait_for SECONDS COMMAND...: run COMMAND every 0.2 s until it succeeds;
# status 1 if it has not within SECONDS.
wait_for() {
    tries=$(($1 * 5))
    shift
    while ! "$@"; do
        tries=$((tries - 1))
        [ "$tries" -gt 0 ] || return 1
        sleep 0.2
    done
}

# Something listens on UDP port 69 (0x0045), IPv4 or IPv6.
port_69_bound() {
    grep -q '^ *[0-9]*: [0-9A-F]*:0045 ' /proc/net/udp /proc/net/udp6
}

not_active() {
    ! systemctl is-active --quiet "$1"
}

# fetch NAME: download NAME from 127.0.0.1:69 with tftp-hpa; print the
# sha256 of what arrived, or "none".
fetch() {
    rm -f /tmp/fetched
    timeout 40 tftp -m binary 127.0.0.1 -c get "$1" /tmp/fetched >/tmp/tftp.log 2>&1
    if [ -s /tmp/fetched ]; then
        sha256sum </tmp/fetched | cut -d ' ' -f 1
    else
        echo none
    fi
    note </tmp/tftp.log >&2
}

# upload LOCAL NAME: send LOCAL to 127.0.0.1:69 as NAME; print tftp's output.
upload() {
    timeout 40 tftp -m binary 127.0.0.1 -c put "$1" "$2" 2>&1 | tr '\n' ' '
    echo
}

# Every process whose command line names atftpd.py ("none" if none).
processes() {
    found=$(pgrep -f 'atftpd\.py' | tr '\n' ' ')
    echo "${found:-none}"
}

# identity PID: uid, effective and bounding capabilities, no_new_privs.
identity() {
    awk '/^Uid:/ { uid = $2 } /^CapEff:/ { eff = $2 } /^CapBnd:/ { bnd = $2 }
         /^NoNewPrivs:/ { nnp = $2 }
         END { printf "uid=%s capeff=%s capbnd=%s nonewprivs=%s\n", uid, eff, bnd, nnp }' \
        "/proc/$1/status" 2>/dev/null || echo "no process $1"
}

main_pid() {
    systemctl show -p MainPID --value "$1"
}

# restarted UNIT OLD_PID: UNIT has a main process other than OLD_PID, and
# port 69 is bound again.
restarted() {
    new=$(main_pid "$1")
    [ "$new" != 0 ] && [ "$new" != "$2" ] && port_69_bound
}

# The journal of the TFTP units and the server, for the record.
show_journal() {
    journalctl --no-pager -b -o short-monotonic 2>&1 | sed 's/ atftpd-py-test / /' |
        grep -i 'atftpd\|tftp' | grep -v 'atftpd-py-test\.service' | tail -n 80 | note
}
