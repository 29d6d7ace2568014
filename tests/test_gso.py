"""UDP GSO for windowed downloads. The first GSO_AFTER blocks of a window go
one by one, the rest in sendmsg() batches that the kernel (Linux 4.18+) cuts
back into datagrams. A client must see exactly the datagrams it would see
without GSO, and where the kernel refuses (here: a block above the path MTU)
the server must go on block by block."""

import os
import sys

import pytest

import conftest
import impaired_link
from conftest import IS_ROOT, RawClient, ServerProcess
from process_support import strace_attached
from wire_helpers import client_for, wait_for_log_count, windowed_get

SIZE = 40 * 1428        # a multiple of 1428 and of 512: the final block is empty


@pytest.fixture
def gso_root(tftp_root):
    (tftp_root / 'gso.bin').write_bytes(os.urandom(SIZE))
    (tftp_root / 'gso-odd.bin').write_bytes(os.urandom(SIZE + 777))
    return tftp_root


@pytest.mark.parametrize('name', ['gso.bin', 'gso-odd.bin'])
@pytest.mark.parametrize('windowsize, blksize', [(16, 1428), (64, 1428), (48, 512),
                                                 (24, 8192)])
def test_windowed_download_arrives_block_by_block(start_server, gso_root, name, windowsize,
                                                  blksize):
    """windowed_get asserts that every DATA is one block (no payload above
    blksize) and in order; nothing may be sent twice on a clean loopback."""
    server = start_server('--verbose=7')
    expected = (gso_root / name).read_bytes()
    with client_for(server) as c:
        data, stats = windowed_get(c, name, windowsize, blksize)
    assert data == expected
    assert stats['seen'] == len(expected) // blksize + 1
    assert 'no GSO' not in server.log()


def test_windowed_download_over_ipv6_arrives_block_by_block(start_server, gso_root):
    server = start_server('--verbose=7', bind=('::1',))
    with client_for(server) as c:
        data, stats = windowed_get(c, 'gso-odd.bin', 32, 1428)
    assert data == (gso_root / 'gso-odd.bin').read_bytes()
    assert stats['seen'] == len(data) // 1428 + 1
    assert 'no GSO' not in server.log()


def test_blocks_too_big_for_a_batch_go_one_by_one(start_server, tftp_root):
    """Two 40000-byte blocks exceed a GSO call's 64 KiB: no batch is tried."""
    expected = os.urandom(12 * 40000 + 5)
    (tftp_root / 'big-blocks.bin').write_bytes(expected)
    server = start_server('--verbose=7')
    with client_for(server) as c:
        data, stats = windowed_get(c, 'big-blocks.bin', 16, 40000)
    # 520 kB at once overflows the client's receive buffer now and then:
    # resends may add datagrams, the bytes must be right.
    assert data == expected
    assert 'no GSO' not in server.log()


@pytest.mark.parametrize('args, batches, singles', [
    # 41 blocks in one window: the OACK and blocks 1..8 one by one, then one
    # batch of 33 (the last of them the empty final block).
    ((), 1, 9),
    # --no-gso: every block with its own sendto().
    (('--no-gso',), 0, 42),
])
def test_system_calls_for_one_window(start_server, gso_root, tmp_path, args, batches, singles):
    """strace the server during one window of 64 blocks."""
    if not IS_ROOT:
        pytest.skip('strace -p needs root (or ptrace rights) on the server')
    server = start_server(*args)
    trace = tmp_path / 'strace.txt'
    with strace_attached(server.pid, 'sendto,sendmsg', trace):
        with client_for(server) as c:
            data, stats = windowed_get(c, 'gso.bin', 64, 1428)
    assert data == (gso_root / 'gso.bin').read_bytes()
    lines = trace.read_text().splitlines()
    assert len([line for line in lines if 'sendmsg(' in line and '= -1' not in line]) == batches
    assert len([line for line in lines if 'sendto(' in line]) == singles, lines


@pytest.mark.netns
def test_gso_refused_falls_back_to_block_by_block(tmp_path, gso_root):
    """In a namespace whose loopback has a 1500-byte MTU, GSO of 8 KiB blocks
    is refused (EMSGSIZE); the window goes on block by block, fragmented."""
    impaired_link.require_namespaces('GSO fallback test')
    namespace = 'atftpdgso%d' % os.getpid()
    impaired_link.run('ip', 'netns', 'add', namespace)
    server = None
    try:
        impaired_link.run('ip', '-n', namespace, 'link', 'set', 'lo', 'mtu', '1500', 'up')
        argv = ['ip', 'netns', 'exec', namespace, sys.executable, conftest.SERVER,
                '--logfile', '-', '--daemon', '--no-fork', '--port', '0',
                '--bind-address', '127.0.0.1', '--user', 'root.root', '--verbose=7',
                str(gso_root)]
        server = ServerProcess(gso_root, argv=argv)

        expected = os.urandom(20 * 8192 + 100)
        (gso_root / 'gso-8k.bin').write_bytes(expected)

        def fetch():
            with RawClient('127.0.0.1', server.port) as c:
                return windowed_get(c, 'gso-8k.bin', 16, 8192)

        data, stats = impaired_link.in_namespace(namespace, fetch)
        assert data == expected
        assert stats['seen'] == 21
        wait_for_log_count(server, 'no GSO, sending block by block', 1)
    finally:
        if server is not None and server.alive():
            assert server.stop() == 0
        impaired_link.run('ip', 'netns', 'del', namespace, check=False)
