"""Real clients against the real server: atftp, tftp-hpa's tftp, curl and
busybox tftp, over IPv4 and IPv6, compared byte for byte. A missing client
fails the test (clients.require), it never skips."""

import os

import pytest

import clients
from conftest import ServerProcess

FILES = ('small.txt', 'empty', 'exact512', 'exact1024', 'random.bin')
HOSTS = ('127.0.0.1', '::1')
BIG = 'big.bin'
BIG_SIZE = 65536 * 512 + 1000     # past block 65535 at blksize 512: the counter rolls over


@pytest.fixture(scope='module')
def shared_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('clients')
    (root / 'small.txt').write_bytes(b'hello, tftp\n')
    (root / 'empty').write_bytes(b'')
    (root / 'exact512').write_bytes(bytes(range(256)) * 2)
    (root / 'exact1024').write_bytes(os.urandom(1024))
    (root / 'random.bin').write_bytes(os.urandom(300000))
    (root / 'text.txt').write_bytes(b'line one\nline two\r\nbare cr\r end\n')
    chunk = os.urandom(1 << 20)
    with open(str(root / BIG), 'wb') as f:
        for index in range(BIG_SIZE // len(chunk)):
            f.write(bytes([index]) + chunk[1:])
        f.write(chunk[:BIG_SIZE % len(chunk)])
    (root / 'upload').mkdir()
    return root


@pytest.fixture(scope='module')
def dual_server(shared_root):
    """One server on '::' (both families), uploads allowed."""
    server = ServerProcess(shared_root, ['--allow-create'], bind=())
    yield server
    assert server.stop() == 0, server.log()


def check_fetch(client, host, port, root, name, tmp_path, **options):
    clients.require(client)
    local = tmp_path / ('out-' + name.replace('/', '_'))
    result = clients.fetch(client, host, port, name, local, **options)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert local.read_bytes() == (root / name).read_bytes()


@pytest.mark.parametrize('host', HOSTS)
@pytest.mark.parametrize('name', FILES)
@pytest.mark.parametrize('client', clients.CLIENTS)
def test_fetch_default_options(client, name, host, dual_server, shared_root, tmp_path):
    check_fetch(client, host, dual_server.port, shared_root, name, tmp_path)


OPTION_SETS = [
    {'blksize': 1428},
    {'blksize': 8192, 'tsize': True},
    {'blksize': 65464},
    {'blksize': 1428, 'windowsize': 8},
    {'blksize': 1428, 'windowsize': 64, 'tsize': True},
    {'blksize': 512, 'windowsize': 16},
]


def option_cases():
    """Only the combinations a client can send: what a client lacks is not
    something the server can be tested on."""
    for client in clients.CLIENTS:
        for options in OPTION_SETS:
            for host in HOSTS:
                if clients.supports(client, ipv6=':' in host, **options):
                    label = '-'.join('%s%s' % item for item in sorted(options.items()))
                    yield pytest.param(client, options, host, id='%s-%s-%s' % (client, label, host))


@pytest.mark.parametrize('client, options, host', list(option_cases()))
def test_fetch_with_options(client, options, host, dual_server, shared_root, tmp_path):
    for name in ('random.bin', 'exact1024', 'empty'):
        check_fetch(client, host, dual_server.port, shared_root, name, tmp_path, **options)


@pytest.mark.parametrize('client', clients.CLIENTS)
def test_block_number_rollover_past_65535(client, dual_server, shared_root, tmp_path):
    """A >32 MiB file at blksize 512 needs block numbers past 65535."""
    check_fetch(client, '127.0.0.1', dual_server.port, shared_root, BIG, tmp_path,
                timeout_s=300)


def test_rollover_windowed_over_ipv6(dual_server, shared_root, tmp_path):
    check_fetch('atftp', '::1', dual_server.port, shared_root, BIG, tmp_path,
                blksize=512, windowsize=8, timeout_s=300)


@pytest.mark.parametrize('client', ['atftp', 'tftp-hpa'])
def test_netascii_is_converted_both_ways_by_clients_that_decode(client, dual_server,
                                                                shared_root, tmp_path):
    """atftp and tftp-hpa decode netascii, so the round trip gives the file back."""
    check_fetch(client, '127.0.0.1', dual_server.port, shared_root, 'text.txt', tmp_path,
                mode='netascii')


def test_curl_netascii_sees_the_wire_form(dual_server, shared_root, tmp_path):
    clients.require('curl')
    local = tmp_path / 'out'
    result = clients.fetch('curl', '127.0.0.1', dual_server.port, 'text.txt', local,
                           mode='netascii')
    assert result.returncode == 0, result.stderr
    assert local.read_bytes() == b'line one\r\nline two\r\0\r\nbare cr\r\0 end\r\n'


@pytest.mark.parametrize('host', HOSTS)
@pytest.mark.parametrize('client', clients.CLIENTS)
def test_upload(client, host, dual_server, shared_root, tmp_path):
    clients.require(client)
    for size in (0, 1000, 1024, 100000):
        local = tmp_path / ('up%d' % size)
        local.write_bytes(os.urandom(size))
        remote = 'upload/%s-%s-%d' % (client, 'v6' if ':' in host else 'v4', size)
        result = clients.upload(client, host, dual_server.port, local, remote)
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert (shared_root / remote).read_bytes() == local.read_bytes()
    assert not [n for n in os.listdir(str(shared_root / 'upload')) if n.endswith('.part')]


def test_missing_file_is_an_error_for_every_client(dual_server, tmp_path):
    for client in clients.CLIENTS:
        clients.require(client)
        result = clients.fetch(client, '127.0.0.1', dual_server.port, 'no-such-file',
                               tmp_path / client)
        assert result.returncode != 0, client
