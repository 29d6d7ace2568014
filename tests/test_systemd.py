"""The systemd units of systemd/, under a real systemd as PID 1.

tests/systemd/build-image.sh builds (once; cached outside the clone) an ext4
image of a minimal Debian bookworm with systemd-sysv, its own kernel and
initramfs, python3, a TFTP client (tftp-hpa) and Debian's atftpd package
(for its atftpd.service and atftpd.socket). Each test boots it in QEMU
(-kernel/-initrd from the image, the root disk with snapshot=on, so the
cached image is never changed) with a second, small ext4 disk made for that
test: atftpd.py, systemd/, the sample generators, the files to serve,
tests/systemd/guest-lib.sh and the test's run.sh. A unit baked into the image
runs that run.sh at boot and powers off. The guest installs everything as
systemd/README.md says, drives systemctl, fetches files from 127.0.0.1 with
tftp-hpa and prints what it sees as "@@ KEY VALUE" lines on the serial
console; the assertions are made here, on those lines.

QEMU runs with TCG, as the netboot tier does: on the machine this was
written on, /dev/kvm exists but a KVM guest hangs before its first console
line (nested virtualisation; -cpu host aborts on an MSR). With TCG a guest
boots in about 20 s and a whole test (boot, run.sh, power off) takes about a
minute. ATFTPD_SYSTEMD_ACCEL=kvm asks for KVM where it works.

Needs root (debootstrap, chroot), the Debian packages debootstrap,
e2fsprogs and qemu-system-x86, and the Debian mirror (first run only).
Without root, outside CI, it skips; with CI=true it fails instead.
"""

import hashlib
import os
import re
import shutil
import subprocess
import textwrap

import pytest

from conftest import IN_CI, PROJECT


HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_SCRIPT = os.path.join(HERE, 'systemd', 'build-image.sh')
GUEST_LIB = os.path.join(HERE, 'systemd', 'guest-lib.sh')
QEMU = '/usr/bin/qemu-system-x86_64'
MISSING = 2                 # build-image.sh's exit status for a missing prerequisite
BUILD_TIMEOUT = 1200        # seconds; a cold build took 105 s
BOOT_TIMEOUT = 240          # seconds for one guest: boot, run.sh, power off (~40 s)
GENERATORS = ('content-generator.sh', 'pxelinux')

MAC = '52:54:00:12:34:56'
HOSTS_INI = textwrap.dedent('''\
    [%s]
    hostname = systemd-guest
    kernel = debian-installer/amd64/linux
    initrd = debian-installer/amd64/initrd.gz
    append = auto=true priority=critical url=http://192.0.2.1/d-i/%%(hostname)s.cfg
    ''' % MAC)
PXELINUX_NAME = 'pxelinux.cfg/01-' + MAC.replace(':', '-')
SMALL = b'hello from a systemd unit\n'
BIG = bytes(range(256)) * 1024 + b'tail'        # 256 KiB + 4: 513 blocks of 512
# CAP_SETGID (6), CAP_SETUID (7), CAP_NET_BIND_SERVICE (10)
CAPS_DAEMON = '%016x' % ((1 << 6) | (1 << 7) | (1 << 10))
CAPS_INETD = '%016x' % ((1 << 6) | (1 << 7))
NOBODY = '65534'


def systemd_tier(test):
    """A test that boots the guest: marker `systemd`; a longer timeout, since
    the first one builds the image (about 2 minutes with a nearby mirror)."""
    return pytest.mark.systemd(pytest.mark.timeout(1500)(test))


def unavailable(reason):
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason + ' (a failure when CI=true)')


@pytest.fixture(scope='module')
def image():
    """The directory with base.img, vmlinuz and initrd.img."""
    if os.geteuid() != 0:
        unavailable('the systemd tier needs root (debootstrap, chroot); euid is %d'
                    % os.geteuid())
    for path, package in ((QEMU, 'qemu-system-x86'),):
        if not os.path.exists(path):
            unavailable('the systemd tier needs %s (Debian package %s)' % (path, package))
    env = dict(os.environ)
    env['PATH'] = env.get('PATH', '/usr/bin:/bin') + ':/usr/sbin:/sbin'
    try:
        result = subprocess.run(['sh', BUILD_SCRIPT], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True,
                                timeout=BUILD_TIMEOUT, env=env)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError('build-image.sh did not finish within %d s:\n%s'
                             % (BUILD_TIMEOUT, exc.stderr))
    if result.returncode == MISSING:
        unavailable(result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, 'build-image.sh failed (exit %d):\n%s' % (
        result.returncode, result.stderr[-6000:])
    print(result.stderr.strip().splitlines()[-1])
    return result.stdout.strip().splitlines()[-1]


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def generated(generator, name, env, tmp_path):
    """What a sample generator makes of `name`, run here on the host: the
    guest must be served exactly these bytes."""
    out = tmp_path / ('generated-' + generator)
    subprocess.run(['sh', '-c', '"$0" --file "$1" 3>"$2"',
                    os.path.join(PROJECT, 'generators', generator), '/srv/tftp/' + name, str(out)],
                   env=dict(os.environ, **env), check=True, timeout=30)
    data = out.read_bytes()
    assert data
    return data


class Guest:
    """One boot: what the guest reported and its whole console."""

    def __init__(self, console):
        self.console = console
        self.seen = {}
        for line in console.splitlines():
            match = re.match(r'@@ (\S+) ?(.*)$', line.strip('\r'))
            if match:
                self.seen[match.group(1)] = match.group(2).strip()

    def __getitem__(self, key):
        assert key in self.seen, 'the guest did not report %r:\n%s' % (key, self.tail())
        return self.seen[key]

    def tail(self):
        return self.console[-12000:]


def boot(image, tmp_path, run_sh):
    """Boot the image with a test disk whose run.sh is `run_sh`; return a Guest."""
    disk = tmp_path / 'disk'
    disk.mkdir()
    shutil.copy(os.path.join(PROJECT, 'atftpd.py'), str(disk))
    shutil.copy(GUEST_LIB, str(disk / 'lib.sh'))
    shutil.copytree(os.path.join(PROJECT, 'systemd'), str(disk / 'systemd'))
    (disk / 'generators').mkdir()
    for name in GENERATORS:
        shutil.copy(os.path.join(PROJECT, 'generators', name), str(disk / 'generators'))
    files = disk / 'files'
    files.mkdir()
    (files / 'small.txt').write_bytes(SMALL)
    (files / 'big.bin').write_bytes(BIG)
    (files / 'incoming').mkdir()
    os.chmod(str(files / 'incoming'), 0o777)
    (disk / 'hosts.ini').write_text(HOSTS_INI)
    (disk / 'run.sh').write_text(textwrap.dedent(run_sh))
    disk_img = str(tmp_path / 'disk.img')
    subprocess.run(['mke2fs', '-q', '-t', 'ext4', '-d', str(disk), disk_img, '64M'],
                   check=True, timeout=60,
                   env=dict(os.environ, PATH=os.environ.get('PATH', '') + ':/usr/sbin:/sbin'))
    serial = tmp_path / 'serial.log'
    accel = ['-accel', 'kvm'] if os.environ.get('ATFTPD_SYSTEMD_ACCEL') == 'kvm' else ['-accel', 'tcg']
    argv = [QEMU, '-nodefaults', '-machine', 'pc'] + accel + [
        '-m', '1024', '-smp', '2', '-display', 'none', '-monitor', 'none', '-no-reboot',
        '-serial', 'file:%s' % serial,
        '-kernel', os.path.join(image, 'vmlinuz'), '-initrd', os.path.join(image, 'initrd.img'),
        '-append', 'root=/dev/vda rw console=ttyS0 panic=-1 systemd.show_status=error',
        '-drive', 'file=%s,format=raw,if=virtio,snapshot=on' % os.path.join(image, 'base.img'),
        '-drive', 'file=%s,format=raw,if=virtio' % disk_img]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True)
    try:
        output, _ = proc.communicate(timeout=BOOT_TIMEOUT)
        status = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        status = 'killed after %d s' % BOOT_TIMEOUT
    console = serial.read_bytes().decode('utf-8', 'replace') if serial.exists() else ''
    guest = Guest(console)
    # What the guest reported and noted, for -rP and for the record.
    print('\n'.join(line.strip('\r') for line in console.splitlines()
                    if line.startswith(('@@', '##'))))
    assert status == 0, 'QEMU: %s\n%s\n--- console (tail)\n%s' % (status, output, guest.tail())
    assert guest['run.sh'] == 'exit status 0', guest.tail()
    return guest


DAEMON_TEST = '''\
    # shellcheck source=/dev/null
    . /test/lib.sh
    install_server
    install_units
    systemd-analyze verify /etc/systemd/system/atftpd.py.service \\
        /etc/systemd/system/atftpd.py-inetd.socket /etc/systemd/system/atftpd.py-inetd.service \\
        >/tmp/verify.log 2>&1
    report verify "$?"
    note </tmp/verify.log
    cat >/etc/default/atftpd.py <<'EOF'
    ATFTPD_ARGS="--content-generator /usr/lib/atftpd.py/content-generator.sh /srv/tftp"
    EOF
    report before "$(processes)"
    systemctl start atftpd.py
    report start "$?"
    wait_for 60 port_69_bound
    report bound "$?"
    report active "$(systemctl is-active atftpd.py)"
    pid=$(main_pid atftpd.py)
    report identity "$(identity "$pid")"
    report cmdline "$(tr '\\0' ' ' <"/proc/$pid/cmdline")"
    report small "$(fetch small.txt)"
    report big "$(fetch big.bin)"
    report generated "$(fetch hello/world)"
    # Restart=on-failure: killed, it is started again.
    kill -KILL "$pid"
    wait_for 60 restarted atftpd.py "$pid"
    report restarted "$(systemctl is-active atftpd.py) $([ "$(main_pid atftpd.py)" != "$pid" ] && echo new-pid)"
    report after_restart "$(fetch small.txt)"
    report missing "$(fetch no/such/file)"
    report logged "$(journalctl -b -t atftpd -o cat | grep -c '^sent ')"

    # Uploads: refused on the read-only tree, accepted with the drop-in.
    echo uploaded >/tmp/up.txt
    chmod 777 /srv/tftp/incoming
    systemctl stop atftpd.py
    sed -i 's|^ATFTPD_ARGS="|ATFTPD_ARGS="--allow-create |' /etc/default/atftpd.py
    systemctl start atftpd.py
    wait_for 60 port_69_bound
    upload /tmp/up.txt incoming/read-only.txt | note
    report upload_read_only "$(ls /srv/tftp/incoming/read-only.txt 2>&1)"
    report read_only_logged "$(journalctl -b -t atftpd -o cat | grep -c 'Read-only file system')"
    mkdir -p /etc/systemd/system/atftpd.py.service.d
    cp /test/systemd/atftpd.py.service.d/allow-uploads.conf /etc/systemd/system/atftpd.py.service.d/
    systemctl daemon-reload
    systemctl restart atftpd.py
    wait_for 60 port_69_bound
    upload /tmp/up.txt incoming/writable.txt | note
    report upload_writable "$(sha256sum </srv/tftp/incoming/writable.txt | cut -d ' ' -f 1)"

    pid=$(main_pid atftpd.py)
    systemctl stop atftpd.py
    report stop "$?"
    report after "$(processes)"
    report active_after "$(systemctl is-active atftpd.py)"
    report pid_gone "$([ -e "/proc/$pid" ] && echo "$pid still there" || echo yes)"
    show_journal
'''


@systemd_tier
def test_daemon_unit_serves_and_generates_under_its_hardening(image, tmp_path):
    guest = boot(image, tmp_path, DAEMON_TEST)
    assert guest['verify'] == '0', guest.tail()
    assert guest['before'] == 'none'
    assert guest['start'] == '0', guest.tail()
    assert guest['bound'] == '0', guest.tail()
    assert guest['active'] == 'active', guest.tail()
    # Switched to nobody, no capability left, the bounding set the unit gives.
    assert guest['identity'] == 'uid=%s capeff=%016x capbnd=%s nonewprivs=1' % (
        NOBODY, 0, CAPS_DAEMON), guest.tail()
    # Started from the bytecode install put in /usr/sbin/__pycache__ (python3 -c
    # "... import atftpd ..." /usr/sbin/atftpd.py ARGS), not compiled again.
    assert 'import atftpd' in guest['cmdline'], guest.tail()
    assert ' /usr/sbin/atftpd.py --daemon --no-fork --content-generator ' in guest['cmdline']
    assert guest['small'] == sha256(SMALL), guest.tail()
    assert guest['big'] == sha256(BIG), guest.tail()
    expected = generated('content-generator.sh', 'hello/world',
                         {'TFTP_CLIENT_ADDR': '127.0.0.1'}, tmp_path)
    assert expected == b'Hello 127.0.0.1, you asked for world.\n'
    assert guest['generated'] == sha256(expected), guest.tail()
    assert guest['missing'] == 'none', guest.tail()
    assert guest['restarted'] == 'active new-pid', guest.tail()
    assert guest['after_restart'] == sha256(SMALL), guest.tail()
    assert int(guest['logged']) >= 3, guest.tail()       # syslog reaches the journal
    assert 'No such file' in guest['upload_read_only'], guest.tail()
    assert guest['read_only_logged'] == '1', guest.tail()
    assert guest['upload_writable'] == sha256(b'uploaded\n'), guest.tail()
    assert guest['stop'] == '0'
    assert guest['after'] == 'none', guest.tail()
    assert guest['active_after'] == 'inactive', guest.tail()
    assert guest['pid_gone'] == 'yes', guest.tail()


INETD_TEST = '''\
    # shellcheck source=/dev/null
    . /test/lib.sh
    install_server
    install_units
    mkdir -p /etc/atftpd
    cp /test/hosts.ini /etc/atftpd/pxelinux-hosts.ini
    chmod 644 /etc/atftpd/pxelinux-hosts.ini
    cat >/etc/default/atftpd.py <<'EOF'
    ATFTPD_ARGS="--tftpd-timeout 3 --content-generator /usr/lib/atftpd.py/pxelinux /srv/tftp"
    PXELINUX_HOSTS="/etc/atftpd/pxelinux-hosts.ini"
    EOF
    systemctl enable --now atftpd.py-inetd.socket
    report enable "$?"
    wait_for 60 port_69_bound
    report bound "$?"
    report socket_idle "$(systemctl is-active atftpd.py-inetd.socket)"
    report service_idle "$(systemctl is-active atftpd.py-inetd.service)"
    report processes_idle "$(processes)"
    report small "$(fetch small.txt)"
    report service_after_request "$(systemctl is-active atftpd.py-inetd.service)"
    first=$(main_pid atftpd.py-inetd.service)
    report identity "$(identity "$first")"
    report generated "$(fetch pxelinux.cfg/01-52-54-00-12-34-56)"
    report big "$(fetch big.bin)"
    # --tftpd-timeout 3: it exits when idle, the socket stays.
    wait_for 60 not_active atftpd.py-inetd.service
    report exited "$?"
    report service_after_idle "$(systemctl is-active atftpd.py-inetd.service)"
    report socket_after_idle "$(systemctl is-active atftpd.py-inetd.socket)"
    report processes_after_idle "$(processes)"
    report again "$(fetch small.txt)"
    report service_again "$(systemctl is-active atftpd.py-inetd.service)"
    second=$(main_pid atftpd.py-inetd.service)
    report new_process "$([ "$first" != "$second" ] && [ "$second" != 0 ] && echo yes || echo "no: $first $second")"
    report starts "$(journalctl -b -t atftpd -o cat | grep -c ' started, serving ')"
    systemctl stop atftpd.py-inetd.socket atftpd.py-inetd.service
    report stop "$?"
    report after "$(processes)"
    report service_after "$(systemctl is-active atftpd.py-inetd.service)"
    report socket_after "$(systemctl is-active atftpd.py-inetd.socket)"
    wait_for 10 sh -c '! grep -q "^ *[0-9]*: [0-9A-F]*:0045 " /proc/net/udp /proc/net/udp6'
    report port_free "$?"
    show_journal
'''


@systemd_tier
def test_socket_unit_starts_the_inetd_service_on_the_first_request(image, tmp_path):
    guest = boot(image, tmp_path, INETD_TEST)
    assert guest['enable'] == '0', guest.tail()
    assert guest['bound'] == '0', guest.tail()
    # Idle until the first request: systemd holds the port, no server runs.
    assert guest['socket_idle'] == 'active', guest.tail()
    assert guest['service_idle'] == 'inactive', guest.tail()
    assert guest['processes_idle'] == 'none', guest.tail()
    # The first request starts the server, which answers it.
    assert guest['small'] == sha256(SMALL), guest.tail()
    assert guest['service_after_request'] == 'active', guest.tail()
    assert guest['identity'] == 'uid=%s capeff=%016x capbnd=%s nonewprivs=1' % (
        NOBODY, 0, CAPS_INETD), guest.tail()
    # A Python generator, its settings from the EnvironmentFile, under the sandbox.
    expected = generated('pxelinux', PXELINUX_NAME,
                         {'PXELINUX_HOSTS': str(tmp_path / 'disk' / 'hosts.ini')}, tmp_path)
    assert guest['generated'] == sha256(expected), guest.tail()
    assert guest['big'] == sha256(BIG), guest.tail()
    # Idle: the server exits, the socket stays and starts a new one.
    assert guest['exited'] == '0', guest.tail()
    assert guest['service_after_idle'] == 'inactive', guest.tail()
    assert guest['socket_after_idle'] == 'active', guest.tail()
    assert guest['processes_after_idle'] == 'none', guest.tail()
    assert guest['again'] == sha256(SMALL), guest.tail()
    assert guest['service_again'] == 'active', guest.tail()
    assert guest['new_process'] == 'yes', guest.tail()
    assert guest['starts'] == '2', guest.tail()
    # Stopped: nothing left, the port is free.
    assert guest['stop'] == '0', guest.tail()
    assert guest['after'] == 'none', guest.tail()
    assert guest['service_after'] == 'inactive', guest.tail()
    assert guest['socket_after'] == 'inactive', guest.tail()
    assert guest['port_free'] == '0', guest.tail()


DEBIAN_TEST = '''\
    # shellcheck source=/dev/null
    . /test/lib.sh
    install_server
    report debian_options "$(grep '^OPTIONS=' /etc/default/atftpd)"
    # Debian's options as its postinst wrote them, plus a generator: the
    # generated file proves that OPTIONS reached atftpd.py.
    sed -i 's|^OPTIONS="|OPTIONS="--content-generator /usr/lib/atftpd.py/content-generator.sh |' \\
        /etc/default/atftpd
    mkdir -p /etc/systemd/system/atftpd.service.d
    cp /test/systemd/atftpd.service.d/atftpd-py.conf /etc/systemd/system/atftpd.service.d/
    systemctl daemon-reload
    systemctl enable --now atftpd.socket
    report enable "$?"
    wait_for 60 port_69_bound
    report bound "$?"
    report service_idle "$(systemctl is-active atftpd.service)"
    report small "$(fetch small.txt)"
    report generated "$(fetch hello/debian)"
    report active "$(systemctl is-active atftpd.service)"
    pid=$(main_pid atftpd.service)
    report cmdline "$(tr '\\0' ' ' <"/proc/$pid/cmdline")"
    report user "$(ps -o user= -p "$pid")"
    report in_tftpd "$(pgrep -x in.tftpd || echo none)"
    systemctl stop atftpd.socket atftpd.service
    report debian_stop "$?"
    report debian_after "$(processes)"
    # The same OPTIONS for the daemon unit (USE_INETD=false): starting it
    # stops Debian's socket (Conflicts=).
    install_units
    mkdir -p /etc/systemd/system/atftpd.py.service.d
    cp /test/systemd/atftpd.py.service.d/debian-options.conf /etc/systemd/system/atftpd.py.service.d/
    systemctl daemon-reload
    systemctl enable --now atftpd.socket
    systemctl start atftpd.py
    report daemon_start "$?"
    report debian_socket "$(systemctl is-active atftpd.socket)"
    wait_for 60 port_69_bound
    report daemon_small "$(fetch small.txt)"
    report daemon_generated "$(fetch hello/daemon)"
    pid=$(main_pid atftpd.py)
    report daemon_cmdline "$(tr '\\0' ' ' <"/proc/$pid/cmdline")"
    report daemon_identity "$(identity "$pid")"
    systemctl stop atftpd.py
    report stop "$?"
    report after "$(processes)"
    show_journal
'''

DEBIAN_DEFAULT_OPTIONS = ('--port 69 --tftpd-timeout 300 --retry-timeout 5 --mcast-port 1758 '
                          '--mcast-addr 239.239.239.0-255 --mcast-ttl 1 --maxthread 100 '
                          '--verbose=5 /srv/tftp')


@systemd_tier
def test_debian_atftpd_units_run_atftpd_py_with_the_debian_options(image, tmp_path):
    guest = boot(image, tmp_path, DEBIAN_TEST)
    # What Debian's postinst writes with the default debconf answers.
    assert guest['debian_options'] == 'OPTIONS="%s"' % DEBIAN_DEFAULT_OPTIONS, guest.tail()
    assert guest['enable'] == '0', guest.tail()
    assert guest['bound'] == '0', guest.tail()
    assert guest['service_idle'] == 'inactive', guest.tail()
    assert guest['small'] == sha256(SMALL), guest.tail()
    assert guest['generated'] == sha256(b'Hello 127.0.0.1, you asked for debian.\n'), guest.tail()
    assert guest['active'] == 'active', guest.tail()
    # atftpd.py (restarted from its bytecode: python3 -c "...import atftpd..."
    # /usr/sbin/atftpd.py ARGS), with every word of OPTIONS, not in.tftpd.
    assert ' /usr/sbin/atftpd.py --content-generator /usr/lib/atftpd.py/content-generator.sh %s ' \
        % DEBIAN_DEFAULT_OPTIONS in guest['cmdline'] + ' ', guest.tail()
    assert guest['in_tftpd'] == 'none', guest.tail()
    # DynamicUser=yes stays: a user of its own, not root.
    assert guest['user'] not in ('root', ''), guest.tail()
    assert guest['debian_stop'] == '0', guest.tail()
    assert guest['debian_after'] == 'none', guest.tail()
    # Then atftpd.py.service with debian-options.conf: the daemon, the same OPTIONS.
    assert guest['daemon_start'] == '0', guest.tail()
    assert guest['debian_socket'] == 'inactive', guest.tail()
    assert guest['daemon_small'] == sha256(SMALL), guest.tail()
    assert guest['daemon_generated'] == sha256(b'Hello 127.0.0.1, you asked for daemon.\n'), \
        guest.tail()
    assert ' /usr/sbin/atftpd.py --daemon --no-fork --content-generator ' \
        '/usr/lib/atftpd.py/content-generator.sh %s ' % DEBIAN_DEFAULT_OPTIONS \
        in guest['daemon_cmdline'] + ' ', guest.tail()
    assert guest['daemon_identity'] == 'uid=%s capeff=%016x capbnd=%s nonewprivs=1' % (
        NOBODY, 0, CAPS_DAEMON), guest.tail()
    assert guest['stop'] == '0', guest.tail()
    assert guest['after'] == 'none', guest.tail()


def test_scripts_are_shellcheck_clean(tmp_path):
    """The build script, the guest's library and every run.sh above: POSIX sh,
    shellcheck-clean (no guest needed)."""
    if shutil.which('shellcheck') is None:
        pytest.fail('shellcheck is missing (Debian package shellcheck)')
    scripts = [BUILD_SCRIPT, GUEST_LIB]
    for name, text in (('daemon', DAEMON_TEST), ('inetd', INETD_TEST), ('debian', DEBIAN_TEST)):
        path = tmp_path / ('run-%s.sh' % name)
        path.write_text(textwrap.dedent(text))
        scripts.append(str(path))
    result = subprocess.run(['shellcheck', '-x', '-s', 'sh'] + scripts, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True, timeout=120)
    assert result.returncode == 0, result.stdout
