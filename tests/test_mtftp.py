"""PXE MTFTP (--mtftp FILE, --mtftp-port), as atftpd does it: Debian's
atftp in --mget mode on the namespace LAN, wire-level checks on 127.0.0.1,
and the configuration parser."""

import os
import re
import socket
import subprocess
import sys

import pytest

import atftpd
from conftest import SERVER, RawClient
from process_support import public_root, require_root  # noqa: F401 (fixture)
from netns_support import SERVER_IP, make_lan, sha256  # noqa: F401 (fixture)
from wire_helpers import OP_DATA, OP_ERROR

CLIENT_TIMEOUT = 90
LISTENING = re.compile(r'mtftp: listening on (\S+):(\d+), (\d+) files')


def write_config(tmp_path, text):
    path = tmp_path / 'mtftp.conf'
    path.write_text(text)
    return path


@pytest.mark.netns
def test_atftp_mget_clients_fetch_the_file(make_lan, start_server, tftp_root, tmp_path):
    """Three `atftp --mget` clients at once: one opens the transfer, the
    others listen on the group (or open their own afterwards); every copy
    is checked. atftp options: --mtftp "mcast-ip G", "client-port P",
    "listen-delay 1"."""
    lan = make_lan(3)
    config = write_config(tmp_path, '# PXE boot image\nrandom.bin   239.1.1.1  1760\n')
    argv = lan.exec_argv(lan.server, [
        sys.executable, SERVER, '--daemon', '--no-fork', '--port', '69', '--bind-address',
        SERVER_IP, '--user', 'root.root', '--logfile', '-', '-v6', '--retry-timeout', '1',
        '--mtftp', config, tftp_root])
    server = start_server(argv=argv)
    assert LISTENING.search(server.wait_for_log(LISTENING.pattern)).groups() == (
        SERVER_IP, '75', '1')
    clients = []
    for index in (1, 2, 3):
        command = ['atftp', '--mget', '-r', 'random.bin', '-l', tmp_path / ('out%d' % index),
                   '--mtftp', 'mcast-ip 239.1.1.1', '--mtftp', 'client-port 1760',
                   '--mtftp', 'listen-delay 1', SERVER_IP, '75']
        clients.append(subprocess.Popen(lan.exec_argv(lan.clients[index - 1], command),
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    expected = sha256((tftp_root / 'random.bin').read_bytes())
    for index, proc in enumerate(clients, 1):
        try:
            output, _ = proc.communicate(timeout=CLIENT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        assert proc.returncode == 0, output
        assert sha256((tmp_path / ('out%d' % index)).read_bytes()) == expected
    served = server.wait_for_log(r'sent random.bin to 10\.77\.0\.1\d:\d+: .* '
                                 r'MTFTP 239\.1\.1\.1:1760')
    assert 'blksize 512' in served


@pytest.fixture
def mtftp_server(start_server, tmp_path):
    config = write_config(tmp_path, 'random.bin 239.1.1.9 1760\nsmall.txt 239.1.1.10 1760\n')
    server = start_server('--mtftp', config, '--mtftp-port', '0', '-v6')
    match = LISTENING.search(server.wait_for_log(LISTENING.pattern))
    server.mtftp_port = int(match.group(2))
    return server


def test_mtftp_first_block_is_unicast_and_one_transfer_per_file(mtftp_server, tftp_root):
    server = mtftp_server
    with RawClient('127.0.0.1', server.mtftp_port) as first, \
            RawClient('127.0.0.1', server.mtftp_port) as second:
        first.rrq('random.bin', options=[('blksize', '1428')])     # options are ignored
        opcode, number, payload, _ = first.recv()
        assert (opcode, number) == (OP_DATA, 1)
        assert payload == (tftp_root / 'random.bin').read_bytes()[:512]
        second.rrq('random.bin')
        server.wait_for_log(r'random.bin not served: already being sent')
        assert second.nothing_for(0.2)
        first.error(0, 'done')
    server.wait_for_log(r'failed sending random.bin .* aborted by client')


@pytest.mark.parametrize('name,mode,reason', [
    ('exact512', 'octet', 'not in the MTFTP file'),
    ('small.txt', 'netascii', 'octet mode only'),
    ('../etc/passwd', 'octet', r'\.\.'),
])
def test_mtftp_requests_it_does_not_serve_get_no_answer(mtftp_server, name, mode, reason):
    with RawClient('127.0.0.1', mtftp_server.mtftp_port) as client:
        client.rrq(name, mode)
        mtftp_server.wait_for_log(reason)
        assert client.nothing_for(0.2)


def test_mtftp_write_request_is_an_illegal_operation(mtftp_server):
    with RawClient('127.0.0.1', mtftp_server.mtftp_port) as client:
        client.wrq('random.bin')
        opcode, code, _, _ = client.recv()
        assert (opcode, code) == (OP_ERROR, atftpd.ERR_ILLEGAL_OP)
        client.send(b'\0\1garbage', client.server)      # no NUL: a bad request, answered
        opcode, code, _, _ = client.recv()
        assert (opcode, code) == (OP_ERROR, atftpd.ERR_ILLEGAL_OP)
    assert mtftp_server.alive()


def test_mtftp_needs_daemon_mode(tftp_root, tmp_path):
    """As with atftpd: in inetd mode --mtftp is reported and not started."""
    config = write_config(tmp_path, 'random.bin 239.1.1.9 1760\n')
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(('127.0.0.1', 0))
        user = ['--user', 'root.root'] if os.geteuid() == 0 else []
        proc = subprocess.run([sys.executable, SERVER, '--logfile', '-', '--mtftp', str(config),
                               '-t', '1'] + user + [str(tftp_root)], stdin=sock.fileno(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    assert proc.returncode == 0, proc.stdout
    assert b'--mtftp needs --daemon' in proc.stdout


def test_parse_mtftp_config(tmp_path):
    lines = [
        '# format: file_name IP port\n',
        '\n',
        'linux           239.255.1.1 3001\n',       # atftpd's sample file
        'pxelinux.0      239.255.1.2 3001 extra\n',
        'short 239.255.1.3\n',
        'bad 10.0.0.1 3001\n',
        'port 239.255.1.4 70000\n',
        'range 239.255.1.5 1-2\n',
        'linux 239.255.1.6 3001\n',                 # the same file again
        'other 239.255.1.1 3001\n',                 # the same group and port again
        '../up 239.255.1.7 3001\n',
    ]
    entries, problems = atftpd.parse_mtftp_config(lines, str(tmp_path))
    assert entries == [('linux', str(tmp_path / 'linux'), ('239.255.1.1', 3001)),
                       ('pxelinux.0', str(tmp_path / 'pxelinux.0'), ('239.255.1.2', 3001))]
    assert [number for number, _ in problems] == [5, 6, 7, 8, 9, 10, 11]


def test_mtftp_config_lines_for_missing_files_are_skipped(start_server, tmp_path):
    config = write_config(tmp_path, 'random.bin 239.1.1.9 1760\nnothere 239.1.1.10 1760\n'
                                    'oops\n')
    server = start_server('--mtftp', config, '--mtftp-port', '0', '-v6')
    assert LISTENING.search(server.wait_for_log(LISTENING.pattern)).group(3) == '1'
    server.wait_for_log(r'mtftp: nothere ignored')
    server.wait_for_log(r'line 3 ignored')


def test_mtftp_starts_as_nobody_even_where_nobody_cannot_read_the_stdlib(public_root):
    """Started as root, the server reads the --mtftp file after dropping to
    nobody. Reading it as latin-1 text looked the codec up in the stdlib,
    which nobody cannot read where Python lives under /root (pyenv, as on
    this project's machines): LookupError at start."""
    require_root()
    listing = os.path.join(public_root, 'mtftp.conf')
    with open(listing, 'w') as f:
        f.write('pub.txt 239.255.1.1 1758\n')
    os.chmod(listing, 0o644)
    proc = subprocess.Popen([sys.executable, SERVER, '--daemon', '--no-fork', '--port', '0',
                             '--bind-address', '127.0.0.1', '--logfile', '-', '--mtftp', listing,
                             '--mtftp-port', '0', '-v6', public_root],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if 'started, serving' in line or 'Traceback' in line:
                break
        assert 'started, serving' in lines[-1], ''.join(lines)
        assert not any('mtftp' in line and 'cannot' in line for line in lines), ''.join(lines)
    finally:
        proc.terminate()
        proc.wait(20)
