"""Router-class CPUs: atftpd.py and the sample generators in a Debian bookworm
root for mipsel (and armel), run under qemu-user, as OpenWrt's python3-light.

tests/emulation/build-rootfs.sh builds the root with debootstrap outside the
clone (/var/cache/atftpd-py-tests/rootfs-ARCH) and reuses it when present.
The server runs in a chroot of it: `chroot ROOT /usr/bin/python3 atftpd.py`,
the root's own python3, emulated through binfmt_misc. The generators it
starts run there too, emulated as well. Every module of
tests/python3-light-excluded.txt is unimportable in all of them (a
sitecustomize on PYTHONPATH, see emulation_support.py). Real clients on the
host (curl, atftp, busybox tftp) fetch over 127.0.0.1: the chroot shares the
host's network. Every byte is compared.

Needs root and the Debian packages debootstrap, qemu-user-static and
binfmt-support. Without root, outside CI, the tier is skipped; with CI=true
any missing prerequisite is a failure. What it proves, and what it does not
(qemu's CPU is not a router's), is in tests/emulation/README.md.
"""

import os
import re
import shutil
import signal
import struct
import subprocess
import time

import pytest

import atftpd
from clients import fetch as client_fetch, require
from conftest import RawClient, ServerProcess, TftpError
from test_sample_generators import DB1, INVENTORY, WEB1  # the same inventory, emulated
from emulation_support import (QEMU, Installed, Unavailable, build_rootfs,
                               excluded_modules)

pytestmark = pytest.mark.emulation

ARCHES = ['mipsel', 'armel']
CLIENTS = ['curl', 'atftp', 'busybox']
# ELF header fields of the root's python3: (EI_CLASS, EI_DATA, e_machine).
ELF = {'mipsel': (1, 1, 8), 'armel': (1, 1, 40)}     # 32-bit, little-endian, MIPS / ARM
ROLLOVER_SIZE = 65536 * 512 + 1000                    # block numbers wrap at blksize 512


@pytest.fixture(scope='module', params=ARCHES)
def rootfs(request):
    arch = request.param
    for client in CLIENTS:
        require(client)
    try:
        path = build_rootfs(arch)
    except Unavailable as exc:
        if os.environ.get('CI') == 'true':
            pytest.fail('emulation tier (%s): %s' % (arch, exc))
        pytest.skip('emulation tier (%s): %s (a failure when CI=true)' % (arch, exc))
    return arch, path


@pytest.fixture
def installed(rootfs):
    """The code under test, copied into the root for this test only."""
    arch, path = rootfs
    inst = Installed(path, arch)
    try:
        yield inst
    finally:
        inst.remove()


@pytest.fixture
def emulated(installed):
    """Factory: emulated(*args, **env) -> a ServerProcess running atftpd.py in
    the root, with python3-light; `env` is added to its environment. Each one
    is stopped at the end and must exit 0, with no internal error logged."""
    servers = []

    def start(*args, **env):
        server = ServerProcess(None, argv=installed.server_argv('-v6', *args),
                               env=installed.env(**env))
        servers.append(server)
        assert_emulated(server.pid, installed.arch)
        return server

    try:
        yield start
    finally:
        failures = []
        for server in servers:
            if server.alive():
                try:
                    status = server.stop()
                except AssertionError as exc:
                    failures.append(str(exc))
                    continue
                if status != 0:
                    failures.append('server exited with %s:\n%s' % (status, server.log()))
            for bad in ('internal error', 'Traceback', 'python3-light'):
                if bad in server.log():
                    failures.append('%r in the log:\n%s' % (bad, server.log()))
            if server.alive():
                server.kill()
        assert not failures, '\n'.join(failures)


def assert_emulated(pid, arch):
    """The server process is qemu-user's: its executable is the emulator."""
    exe = os.readlink('/proc/%d/exe' % pid)
    qemu = QEMU[arch][0]
    assert os.path.basename(exe) == qemu, 'server pid %d runs %s, not %s' % (pid, exe, qemu)


def fetched(client, server, name, tmp_path, **options):
    """The bytes `client` fetched from the emulated server."""
    local = tmp_path / ('fetched-%s' % client)
    if local.exists():
        local.unlink()
    result = client_fetch(client, '127.0.0.1', server.port, name, str(local),
                          timeout_s=180, **options)
    assert result.returncode == 0, '%s %s %r: %s%s\n%s' % (
        client, name, options, result.stdout, result.stderr, server.log())
    return local.read_bytes()


def assert_not_found(server, name):
    with RawClient('127.0.0.1', server.port) as client:
        with pytest.raises(TftpError) as info:
            client.download(name)
    assert info.value.code == atftpd.ERR_NOT_FOUND


###############################################################################
# It really runs emulated, as python3-light ##################################
###############################################################################

def test_root_is_foreign_and_runs_emulated(installed):
    with open(os.path.join(installed.rootfs, 'usr', 'bin', 'python3.11'), 'rb') as f:
        header = f.read(20)
    assert header[:4] == b'\x7fELF'
    assert (header[4], header[5], struct.unpack('<H', header[18:20])[0]) == ELF[installed.arch]

    result = installed.run(['uname', '-m'])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == QEMU[installed.arch][2]

    result = installed.run(['/usr/bin/python3', '-c', 'import platform, struct, sys; '
                            'print(platform.machine(), sys.byteorder, struct.calcsize("P"))'])
    assert result.returncode == 0, result.stderr
    machine, byteorder, pointer = result.stdout.split()
    assert machine == QEMU[installed.arch][2]
    assert (byteorder, pointer) == ('little', '4')


def test_excluded_modules_are_unimportable_in_the_root(installed):
    probe = ('import importlib, sys\n'
             'for name in sys.argv[1:]:\n'
             '    try:\n'
             '        importlib.import_module(name)\n'
             '    except ImportError as e:\n'
             '        print("blocked", name, "python3-light" in str(e))\n'
             '    else:\n'
             '        print("imported", name)\n')
    names = excluded_modules()
    result = installed.run(['/usr/bin/python3', '-c', probe] + names)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split('\n')[:-1]) == sorted('blocked %s True' % n for n in names)
    # Not vacuous: without the blocker, the root's python3 has them.
    env = installed.env()
    del env['PYTHONPATH']
    result = installed.run(['/usr/bin/python3', '-c', probe, 'logging', 'email', 'urllib',
                            'sqlite3', 'ssl'], env=env)
    assert result.stdout.split() == ['imported', 'logging', 'imported', 'email', 'imported',
                                     'urllib', 'imported', 'sqlite3', 'imported', 'ssl'], \
        result.stdout + result.stderr


###############################################################################
# Static files ###############################################################
###############################################################################

@pytest.fixture
def files(installed):
    srv = installed.host('srv')
    content = {
        'small.txt': b'hello, tftp\n',
        'exact512': bytes(range(256)) * 2,
        'random.bin': os.urandom(300000),
        'sub/inner.txt': b'inner file\n',
    }
    os.mkdir(os.path.join(srv, 'sub'))
    for name, data in content.items():
        with open(os.path.join(srv, name), 'wb') as f:
            f.write(data)
    return content


@pytest.mark.parametrize('client, options', [
    ('curl', {}),
    ('curl', {'blksize': 1428}),
    ('atftp', {}),
    # windowsize 16: past GSO_AFTER, so GSO batches go through qemu-user too
    ('atftp', {'blksize': 1428, 'windowsize': 16, 'tsize': True}),
    ('busybox', {}),
    ('busybox', {'blksize': 8192}),
])
def test_static_files_byte_for_byte(emulated, files, tmp_path, client, options):
    server = emulated()
    for name, data in sorted(files.items()):
        assert fetched(client, server, name, tmp_path, **options) == data, name
    assert_not_found(server, 'no/such/file')


@pytest.mark.parametrize('client', CLIENTS)
def test_rollover_file_at_blksize_512(emulated, installed, tmp_path, client):
    """More than 65535 blocks of 512 bytes: the block number wraps to 0."""
    data = os.urandom(ROLLOVER_SIZE)
    with open(installed.host('srv', 'big.bin'), 'wb') as f:
        f.write(data)
    server = emulated()
    options = {'blksize': 512} if client == 'atftp' else {}   # curl: 512 by default
    assert fetched(client, server, 'big.bin', tmp_path, **options) == data
    line = server.wait_for_log(r'sent big\.bin to ')
    assert ': %d bytes in ' % ROLLOVER_SIZE in line and 'blksize 512,' in line, line


###############################################################################
# Generated content: the sample generators, emulated too ######################
###############################################################################

ETHERS = '''\
# /etc/ethers for the maclist generator
00:11:22:33:44:55 laptop        # wireless
00:1A:2B:3:44:5   phone         # wireless
00-11-22-33-44-66 printer
0011.2233.4477    tv            # wireless
01:00:5e:00:00:01 multicast     # wireless
'''
MACLIST_WIRELESS = (b'#!/bin/sh\n'
                    b'# Generated by the atftpd.py maclist generator; do not edit.\n'
                    b'wl mac none\n'
                    b'wl mac 00:11:22:33:44:55 00:11:22:33:44:77 00:1a:2b:03:44:05 '
                    b'00:00:00:00:00:00\n')



def wait_for_generator_runs(server, name, count, timeout=10.0):
    """Wait until the log shows `count` successful runs for names ending in
    /`name` (the log is read by a thread: the last line may lag the client)."""
    pattern = re.compile(r'generator for \S*/%s: ok ' % re.escape(name))
    deadline = time.monotonic() + timeout
    while True:
        runs = len(pattern.findall(server.log()))
        if runs >= count or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert runs == count, '%d runs for %s, not %d:\n%s' % (runs, name, count, server.log())


def test_maclist_generated_in_the_root(emulated, installed, tmp_path):
    with open(installed.host('ethers'), 'w') as f:
        f.write(ETHERS)
    server = emulated('--content-generator', installed.inside('generators', 'maclist'),
                      '--generator-cache', '0',
                      MACLIST_SOURCE=installed.inside('ethers'), MACLIST_FILTER='*wireless*')
    for client in CLIENTS:
        assert fetched(client, server, 'maclist', tmp_path) == MACLIST_WIRELESS, client
        assert fetched(client, server, 'routers/kitchen/maclist', tmp_path) == MACLIST_WIRELESS
    server.wait_for_log(r'ethers:6: skipped, not a station MAC address')
    wait_for_generator_runs(server, 'maclist', 2 * len(CLIENTS))
    assert_not_found(server, 'maclist.txt')


def test_pxelinux_generated_in_the_root(emulated, installed, tmp_path):
    with open(installed.host('hosts.ini'), 'w') as f:
        f.write(INVENTORY)
    server = emulated('--content-generator', installed.inside('generators', 'pxelinux'),
                      '--generator-cache', '0',
                      PXELINUX_HOSTS=installed.inside('hosts.ini'), PXELINUX_HEXIP='1')
    for client in CLIENTS:
        assert fetched(client, server, 'pxelinux.cfg/01-52-54-00-12-34-56', tmp_path) == WEB1
        assert fetched(client, server, 'pxelinux.cfg/01-52-54-00-ab-cd-ef', tmp_path) == DB1
        assert fetched(client, server, 'pxelinux.cfg/C0000214', tmp_path) == WEB1   # 192.0.2.20
    wait_for_generator_runs(server, 'pxelinux.cfg/01-52-54-00-12-34-56', len(CLIENTS))
    for name in ('pxelinux.cfg/01-52-54-00-12-34-57', 'pxelinux.cfg/C0000215',
                 'pxelinux.cfg/default'):
        assert_not_found(server, name)


def test_generators_run_as_python3_light_too(emulated, installed):
    """The blocker reaches the generators: maclist's sqlite source needs the
    sqlite3 module, which python3-light lacks (the root's python3 has it)."""
    server = emulated('--content-generator', installed.inside('generators', 'maclist'),
                      MACLIST_FORMAT='sqlite', MACLIST_SOURCE='/nonexistent.db')
    assert_not_found(server, 'maclist')
    server.wait_for_log(r'generator: .*MACLIST_FORMAT=sqlite needs the Python sqlite3 module')


def test_script_restarts_from_its_bytecode_in_the_root(emulated, installed, tmp_path):
    """As a router runs it (bytecode allowed): atftpd.py compiles itself into
    __pycache__ with the root's python3-light and exec()s `python3 -c "import
    atftpd"`, still under qemu (README.md, "Memory")."""
    content = os.urandom(100000)
    with open(installed.host('srv', 'boot.bin'), 'wb') as f:
        f.write(content)
    server = emulated(PYTHONDONTWRITEBYTECODE='')      # empty: bytecode allowed
    with open('/proc/%d/cmdline' % server.pid, 'rb') as f:
        argv = f.read().split(b'\0')
    assert b'-c' in argv and b'import atftpd' in argv[argv.index(b'-c') + 1], argv
    assert any(name.startswith('atftpd.') and name.endswith('.pyc')
               for name in os.listdir(installed.host('__pycache__')))
    assert fetched('atftp', server, 'boot.bin', tmp_path) == content


def test_server_stops_cleanly_on_sigterm_while_sending(emulated, installed):
    """SIGTERM through qemu-user reaches the server in the middle of a transfer;
    it says goodbye to the client and exits 0."""
    with open(installed.host('srv', 'random.bin'), 'wb') as f:
        f.write(os.urandom(100000))
    server = emulated()
    with RawClient('127.0.0.1', server.port) as client:
        client.rrq('random.bin')
        opcode, number, payload, _ = client.recv()
        assert (opcode, number, len(payload)) == (atftpd.OP_DATA, 1, 512)
        server.proc.send_signal(signal.SIGTERM)
        for _ in range(10):                      # a retransmission may come first
            opcode, number, _, _ = client.recv()
            if opcode != atftpd.OP_DATA:
                break
        assert (opcode, number) == (atftpd.OP_ERROR, 0)
    assert server.stop() == 0, server.log()


def test_build_script_is_shellcheck_clean():
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'emulation',
                          'build-rootfs.sh')
    if shutil.which('shellcheck') is None:
        pytest.fail('shellcheck is missing (Debian package shellcheck)')
    result = subprocess.run(['shellcheck', '-x', '-s', 'sh', script], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
    assert result.returncode == 0, result.stdout
