"""A real network boot, end to end, for the pxelinux use case.

A QEMU x86 guest (software emulation: KVM is not assumed) boots from its
iPXE option ROM. QEMU's user networking hands it, by DHCP, the boot file
tftp://10.0.2.2:PORT/pxelinux.0; QEMU's own TFTP server is not enabled, and
10.0.2.2 is the host's 127.0.0.1, where atftpd.py listens. PXELINUX then
asks for pxelinux.cfg/01-<mac>, which does not exist in the root: only the
pxelinux generator can answer it. The generated config turns the serial
console on, draws a menu whose title is a marker no other file contains, and
boots reboot.c32; with -no-reboot, QEMU then exits.

(SYSLINUX 6.04's SAY never reaches the serial port, a MENU TITLE drawn by
menu.c32 does. menu.c32 reads the config a second time.)

The pxe generator's boots, each proving the guest ran a config that only a
database row holds: BIOS iPXE runs its per-host script made from SQLite and
chains PXELINUX, whose config comes from the same row; UEFI (OVMF's own PXE)
loads GRUB, which reads grub.cfg-01-<mac> made from a real PostgreSQL server.

Needs the Debian packages qemu-system-x86, ipxe-qemu, pxelinux and
syslinux-common; the UEFI boot also ovmf, grub-efi-amd64-bin, grub-common,
dnsmasq-base, postgresql and root (a tap link in a network namespace). Root
is not needed otherwise. Outside CI a missing package skips the test; with
CI=true it fails.
"""

import os
import re
import socket
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import PROJECT, SERVER
from postgres_support import postgresql  # noqa: F401  (a fixture)

pytestmark = pytest.mark.netboot

PXELINUX_GENERATOR = os.path.join(PROJECT, 'generators', 'pxelinux')
QEMU = '/usr/bin/qemu-system-x86_64'
IPXE_ROM = '/usr/lib/ipxe/qemu/pxe-e1000.rom'
PXELINUX_0 = '/usr/lib/PXELINUX/pxelinux.0'
MODULES = '/usr/lib/syslinux/modules/bios'
NEEDED = [
    (QEMU, 'qemu-system-x86'),
    (IPXE_ROM, 'ipxe-qemu'),
    (PXELINUX_0, 'pxelinux'),
] + [(os.path.join(MODULES, name), 'syslinux-common')
     for name in ('ldlinux.c32', 'menu.c32', 'libutil.c32', 'libcom32.c32', 'reboot.c32')]

MAC = '52:54:00:12:34:56'
MARKER = 'generated-for-netboot-guest'
BOOT_TIMEOUT = 120          # seconds; one boot takes well under 10 s with TCG
BIG_SIZE = 32 << 20       # bytes; loading it takes PXELINUX several seconds
RESET_AFTER = 1.0         # seconds into its download


def require_packages():
    missing = sorted(set('%s (%s)' % (package, path) for path, package in NEEDED
                         if not os.path.isfile(path)))
    if not missing:
        return
    reason = 'netboot needs the Debian packages: %s' % ', '.join(missing)
    if os.environ.get('CI') == 'true':
        pytest.fail(reason)
    pytest.skip(reason + ' (a failure when CI=true)')


@pytest.fixture
def boot_root(tmp_path):
    """A TFTP root with PXELINUX and its modules, and no pxelinux.cfg at all."""
    require_packages()
    root = tmp_path / 'tftpboot'
    root.mkdir()
    for path, _ in NEEDED[2:]:
        shutil.copy(path, str(root))
    return root


@pytest.fixture
def inventory(tmp_path):
    path = tmp_path / 'hosts.ini'
    path.write_text(textwrap.dedent('''\
        [%s]
        hostname = netboot-guest
        serial = 0 115200
        ui = menu.c32
        menu_title = generated-for-%%(hostname)s
        timeout = 1
        kernel = reboot.c32
        ''' % MAC))
    return str(path)


def qemu_argv(port, serial, monitor='none', bootfile='pxelinux.0'):
    """With no monitor, -no-reboot: the guest's reboot ends QEMU. With one,
    the test resets the guest itself, and -no-reboot would end QEMU then."""
    on_reboot = ['-no-reboot'] if monitor == 'none' else []
    return [QEMU, '-nodefaults', '-machine', 'pc', '-accel', 'tcg', '-m', '256',
            '-display', 'none', '-monitor', monitor, '-boot', 'n'] + on_reboot + [
            '-serial', 'file:%s' % serial,
            '-netdev', 'user,id=net0,bootfile=tftp://10.0.2.2:%d/%s' % (port, bootfile),
            '-device', 'e1000,netdev=net0,mac=%s,romfile=%s' % (MAC, IPXE_ROM)]


def start_qemu(argv):
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True)


def boot(port, serial, timeout=BOOT_TIMEOUT, bootfile='pxelinux.0'):
    """Boot the guest; return QEMU's exit status and output, or fail after `timeout`."""
    proc = start_qemu(qemu_argv(port, serial, bootfile=bootfile))
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        return None, output
    return proc.returncode, output


def test_qemu_guest_boots_the_generated_pxelinux_config(start_server, boot_root, inventory,
                                                        tmp_path):
    assert not (boot_root / 'pxelinux.cfg').exists()
    server = start_server('--content-generator', PXELINUX_GENERATOR, '-v6', root=boot_root,
                          env=dict(os.environ, PXELINUX_HOSTS=inventory))
    serial = tmp_path / 'serial.log'
    started = time.monotonic()
    status, output = boot(server.port, serial)
    seconds = time.monotonic() - started
    console = serial.read_bytes().decode('latin-1') if serial.exists() else ''
    report = 'QEMU status %s after %.1f s\n--- qemu\n%s\n--- serial (tail)\n%s\n--- server\n%s' % (
        status, seconds, output, console[-2000:], server.log())
    assert status == 0, report
    assert MARKER in console, report
    server.wait_for_log(r'sent pxelinux\.0 to ')
    server.wait_for_log(r'generator for \S+/pxelinux\.cfg/01-52-54-00-12-34-56: ok')
    server.wait_for_log(r'sent pxelinux\.cfg/01-52-54-00-12-34-56 to ')
    server.wait_for_log(r'sent reboot\.c32 to ')
    print('netboot: QEMU ran %.1f s' % seconds)


def monitor_command(path, command, timeout=10):
    """Run one command on QEMU's human monitor (a Unix socket) and return its
    output. The monitor echoes as it reads, so wait for the next prompt: closing
    earlier can drop a command that was only half read."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        read_until_prompt(sock)
        sock.sendall(command.encode() + b'\n')
        return read_until_prompt(sock)


def read_until_prompt(sock):
    output = b''
    while not output.endswith(b'(qemu) '):
        chunk = sock.recv(4096)
        assert chunk, 'QEMU closed its monitor: %r' % output
        output += chunk
    return output.decode('latin-1')


def wait_for_socket(path, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None and time.monotonic() < deadline, 'QEMU monitor never appeared'
        time.sleep(0.1)


def test_guest_reset_mid_download_boots_again_and_finishes(start_server, boot_root, inventory,
                                                           tmp_path):
    """PXELINUX numbers its UDP ports from a fixed start and asks the same
    names in the same order on every boot, so after a reset its request for
    vmlinuz-big comes from the port the interrupted download used. That request
    must start a new transfer at once (issue 21), not be taken for a
    retransmission of the old one.

    Seen here (iPXE ROM, then PXELINUX 6.04 through its PXE API, QEMU's user
    network, which keeps one host port per guest port): iPXE's own request
    for pxelinux.0 comes from a new port on each boot, and within one boot each
    PXELINUX request, each retry included, from a new one; but the first
    request for vmlinuz-big after the reset came from the same host port as
    the interrupted one (e.g. 127.0.0.1:45617 for both), about 6 s after the
    reset, while the old transfer was still resending."""
    big = boot_root / 'vmlinuz-big'
    big.write_bytes(os.urandom(BIG_SIZE))
    with open(inventory) as hosts:
        text = hosts.read()
    with open(inventory, 'w') as hosts:
        hosts.write(text.replace('kernel = reboot.c32', 'kernel = vmlinuz-big'))
    server = start_server('--content-generator', PXELINUX_GENERATOR, '-v7', root=boot_root,
                          env=dict(os.environ, PXELINUX_HOSTS=inventory))
    monitor = str(tmp_path / 'monitor.sock')
    serial = tmp_path / 'serial.log'
    proc = start_qemu(qemu_argv(server.port, serial, 'unix:%s,server=on,wait=off' % monitor))
    try:
        wait_for_socket(monitor, proc)
        first = server.wait_for_log(r'RRQ vmlinuz-big ', timeout=BOOT_TIMEOUT)
        client = first.split(': RRQ ')[0].split()[-1]
        time.sleep(RESET_AFTER)
        assert not re.search(r'sent vmlinuz-big ', server.log()), \
            'the download ended before the reset; make vmlinuz-big larger\n' + server.log()
        monitor_command(monitor, 'system_reset')
        # Only a request from the interrupted download's own port ends it this way.
        server.wait_for_log(r'failed sending vmlinuz-big to %s: aborted by client '
                            r'\(a new request from its port was answered\)' % re.escape(client),
                            timeout=BOOT_TIMEOUT)
        done = server.wait_for_log(r'sent vmlinuz-big to %s: ' % re.escape(client),
                                   timeout=BOOT_TIMEOUT)
    finally:
        proc.kill()
        output, _ = proc.communicate()
    print(server.log())
    assert 'bytes in' in done and '%d bytes' % BIG_SIZE in done, server.log()


###############################################################################
# generators/pxe: the configs come out of a real database #####################
###############################################################################

PXE_GENERATOR = os.path.join(PROJECT, 'generators', 'pxe')
PXE_SCHEMA = os.path.join(PROJECT, 'generators', 'pxe-hosts.sql')
# The dispatcher the DHCP server names (generators/README.md): iPXE fills in
# its own MAC; the per-host script comes from the generator.
BOOT_IPXE = '#!ipxe\nchain ipxe/${mac:hexhyp}.ipxe\n'
SQLITE_MARKER = 'ipxe-then-pxelinux-from-sqlite'


def test_bios_ipxe_script_then_pxelinux_config_from_sqlite(start_server, boot_root, tmp_path):
    """iPXE (the ROM) gets boot.ipxe by DHCP; it chains ipxe/<mac>.ipxe, which
    the pxe generator makes from an SQLite row: its kernel (ipxe_kernel) is
    /pxelinux.0. PXELINUX then asks pxelinux.cfg/01-<mac>, made from the same
    row: its MENU TITLE reaches the serial console, its reboot.c32 ends QEMU.

    (iPXE's console does not reach the serial port, so the script's own
    proof is in the server log: pxelinux.0 is asked for only because the
    generated script says so. PXELINUX takes its path prefix from the DHCP
    file name, hence boot.ipxe at the root rather than ${mac:hexhyp} there.)"""
    import sqlite3
    (boot_root / 'boot.ipxe').write_text(BOOT_IPXE)
    database = str(tmp_path / 'hosts.db')
    connection = sqlite3.connect(database)
    with open(PXE_SCHEMA) as f:
        connection.executescript(f.read())
    connection.execute('ALTER TABLE pxe_hosts ADD COLUMN ipxe_kernel text')
    connection.execute(
        'INSERT INTO pxe_hosts (mac, hostname, kernel, ipxe_kernel, serial, ui, menu_title, '
        'timeout) VALUES (?, ?, ?, ?, ?, ?, ?, ?)',
        (MAC, 'netboot-guest', 'reboot.c32', 'pxelinux.0', '0 115200', 'menu.c32',
         SQLITE_MARKER, 1))
    connection.commit()
    connection.close()
    server = start_server('--content-generator', PXE_GENERATOR, '-v6', root=boot_root,
                          env=dict(os.environ, PXE_FORMAT='sqlite', PXE_SOURCE=database))
    serial = tmp_path / 'serial.log'
    started = time.monotonic()
    status, output = boot(server.port, serial, bootfile='boot.ipxe')
    seconds = time.monotonic() - started
    console = serial.read_bytes().decode('latin-1') if serial.exists() else ''
    report = 'QEMU status %s after %.1f s\n--- qemu\n%s\n--- serial (tail)\n%s\n--- server\n%s' % (
        status, seconds, output, console[-2000:], server.log())
    assert status == 0, report
    assert SQLITE_MARKER in console, report
    server.wait_for_log(r'sent boot\.ipxe to ')
    server.wait_for_log(r'generator for \S+/ipxe/52-54-00-12-34-56\.ipxe: ok')
    server.wait_for_log(r'sent ipxe/52-54-00-12-34-56\.ipxe to ')
    server.wait_for_log(r'sent pxelinux\.0 to ')
    server.wait_for_log(r'generator for \S+/pxelinux\.cfg/01-52-54-00-12-34-56: ok')
    server.wait_for_log(r'sent reboot\.c32 to ')
    print('netboot: iPXE script + PXELINUX from SQLite, QEMU ran %.1f s' % seconds)


# UEFI: OVMF's own PXE (virtio-net, no iPXE ROM) fetches a GRUB EFI image;
# GRUB fetches grub.cfg-01-<mac>, made from PostgreSQL. QEMU's user network
# cannot carry this: it answers every TFTP request to 10.0.2.2:69 itself, and
# OVMF and GRUB know no other port. So the guest gets a tap link in a network
# namespace of its own, dnsmasq answers DHCP there, atftpd.py serves port 69.
OVMF = '/usr/share/ovmf/OVMF.fd'
GRUB_EFI_MODULES = '/usr/lib/grub/x86_64-efi'
UEFI_MAC = '52:54:00:12:34:57'
UEFI_HOST, UEFI_GUEST_FIRST = '10.0.5.1', '10.0.5.10'
UEFI_MARKER = 'grub-config-from-postgresql'
UEFI_KERNEL = 'vmlinuz-named-in-postgresql'
UEFI_NEEDED = [
    (QEMU, 'qemu-system-x86'), (OVMF, 'ovmf'),
    (os.path.join(GRUB_EFI_MODULES, 'efinet.mod'), 'grub-efi-amd64-bin'),
    ('/usr/bin/grub-mkimage', 'grub-common'), ('/usr/sbin/dnsmasq', 'dnsmasq-base'),
]


def require_uefi():
    missing = sorted(set('%s (%s)' % (package, path) for path, package in UEFI_NEEDED
                         if not os.path.isfile(path)))
    reason = None
    if missing:
        reason = 'UEFI netboot needs the Debian packages: %s' % ', '.join(missing)
    elif os.geteuid() != 0:
        reason = 'UEFI netboot needs root (a network namespace with a tap link)'
    if reason is None:
        return
    if os.environ.get('CI') == 'true':
        pytest.fail(reason)
    pytest.skip(reason + ' (a failure when CI=true)')


def run_checked(*argv):
    subprocess.run(argv, check=True, timeout=30, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture
def uefi_link():
    """A network namespace holding tap0 (10.0.5.1/24), for QEMU's -netdev tap."""
    require_uefi()
    name = 'atftpdpy-uefi-%d' % os.getpid()
    subprocess.run(['ip', 'netns', 'del', name], stderr=subprocess.DEVNULL, timeout=30)
    run_checked('ip', 'netns', 'add', name)
    try:
        run_checked('ip', '-n', name, 'link', 'set', 'lo', 'up')
        run_checked('ip', '-n', name, 'tuntap', 'add', 'tap0', 'mode', 'tap')
        run_checked('ip', '-n', name, 'addr', 'add', UEFI_HOST + '/24', 'dev', 'tap0')
        run_checked('ip', '-n', name, 'link', 'set', 'tap0', 'up')
        yield name
    finally:
        subprocess.run(['ip', 'netns', 'del', name], timeout=30)


def wait_until(predicate, proc, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(0.2)
    return False


def test_uefi_ovmf_pxe_then_grub_config_from_postgresql(start_server, postgresql, uefi_link,  # noqa: F811
                                                        tmp_path):
    """OVMF probes grubx64.efi's size (tsize, then an error), then downloads
    it; GRUB 2.06 (prefix (tftp)/grub) asks /grub/grub.cfg-01-<mac> first:
    the pxe generator answers it from a PostgreSQL row. The config's echo
    line reaches the serial console (OVMF's console is COM1), and GRUB asks
    for the kernel the row names. (There is no kernel: the test ends there.)"""
    from test_pxe import fill_postgresql
    root = tmp_path / 'tftpboot'
    (root / 'grub').mkdir(parents=True)
    subprocess.run(['grub-mkimage', '-O', 'x86_64-efi', '-p', '(tftp)/grub',
                    '-d', GRUB_EFI_MODULES, '-o', str(root / 'grubx64.efi'),
                    'efinet', 'tftp', 'net', 'normal', 'echo', 'linux', 'configfile'],
                   check=True, timeout=60)
    fill_postgresql(postgresql, columns=('mac', 'hostname', 'kernel', 'append', 'menu_title',
                                         'timeout'),
                    rows=[(UEFI_MAC, 'uefi-guest', UEFI_KERNEL, 'console=ttyS0',
                           UEFI_MARKER, 0)])
    env = dict(os.environ, PXE_FORMAT='postgresql', PXE_SOURCE=postgresql.conninfo,
               PXE_HEXIP='1')
    server = start_server(root=root, env=env, argv=[
        'ip', 'netns', 'exec', uefi_link, sys.executable, SERVER, '--logfile', '-',
        '--daemon', '--no-fork', '--port', '69', '--bind-address', UEFI_HOST,
        '--user', 'root.root', '--content-generator', PXE_GENERATOR, '-v7', str(root)])
    dnsmasq = subprocess.Popen(
        ['ip', 'netns', 'exec', uefi_link, 'dnsmasq', '--no-daemon', '--conf-file=/dev/null',
         '--port=0', '--interface=tap0', '--bind-interfaces', '--user=root',
         '--dhcp-range=%s,10.0.5.20,1h' % UEFI_GUEST_FIRST,
         '--dhcp-boot=grubx64.efi,,%s' % UEFI_HOST,
         '--dhcp-leasefile=%s' % (tmp_path / 'leases'), '--pid-file='],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    serial = tmp_path / 'serial.log'
    started = time.monotonic()
    qemu = subprocess.Popen(
        ['ip', 'netns', 'exec', uefi_link, QEMU, '-nodefaults', '-machine', 'q35',
         '-accel', 'tcg', '-m', '256', '-display', 'none', '-monitor', 'none', '-no-reboot',
         '-bios', OVMF, '-boot', 'n', '-serial', 'file:%s' % serial,
         '-netdev', 'tap,id=net0,ifname=tap0,script=no,downscript=no',
         '-device', 'virtio-net-pci,netdev=net0,mac=%s,romfile=' % UEFI_MAC],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True)

    def console():
        return serial.read_bytes().decode('latin-1') if serial.exists() else ''

    try:
        done = wait_until(lambda: UEFI_MARKER in console() and re.search(
            r'sending /%s to ' % re.escape(UEFI_KERNEL), server.log()), qemu, BOOT_TIMEOUT)
        seconds = time.monotonic() - started
    finally:
        qemu.kill()
        output, _ = qemu.communicate()
        dnsmasq.terminate()
        dhcp_log = dnsmasq.communicate(timeout=30)[0].decode('utf-8', 'replace')
    report = 'after %.1f s\n--- qemu\n%s\n--- dnsmasq\n%s\n--- serial (tail)\n%s\n--- server\n%s' % (
        seconds, output, dhcp_log[-1500:], console()[-2000:], server.log())
    assert done, report
    # OVMF: a tsize probe that it ends itself, then the download.
    server.wait_for_log(r"RRQ grubx64\.efi mode octet, options \[\('tsize', '0'\)")
    server.wait_for_log(r'sent grubx64\.efi to ')
    server.wait_for_log(r'generator for \S+/grub/grub\.cfg-01-52-54-00-12-34-57: ok')
    server.wait_for_log(r'sent /grub/grub\.cfg-01-52-54-00-12-34-57 to ')
    asked = re.findall(r'(?:sent|failed sending) (\S+) to ', server.log())
    print('netboot: UEFI (OVMF + GRUB) from PostgreSQL in %.1f s; asked: %s'
          % (seconds, ' '.join(asked)))
