"""Where replies come from, and what a transfer costs in memory and descriptors."""

import os
import struct
import time

import atftpd
from conftest import RawClient, ServerProcess


def test_reply_comes_from_the_address_the_request_was_sent_to(start_server, tftp_root):
    """A multi-homed host must answer from the address the client used: on a
    wildcard socket, a request to 127.0.0.2 is answered from 127.0.0.2 (every
    127/8 address is local on Linux), and so is the ERROR for a missing file."""
    server = start_server(bind=('0.0.0.0',))
    for target in ('127.0.0.2', '127.0.0.3'):
        with RawClient('127.0.0.1', server.port) as client:
            client.server = (target, server.port)
            data, _ = client.download('small.txt')
            assert data == (tftp_root / 'small.txt').read_bytes()
            assert client.peer[0] == target
            client.rrq('missing')
            opcode, code, _, addr = client.recv()
            assert (opcode, code, addr[0]) == (atftpd.OP_ERROR, atftpd.ERR_NOT_FOUND, target)


def test_dual_stack_socket_answers_ipv4_from_ipv4(start_server, tftp_root):
    server = start_server(bind=())          # '::', both families
    with RawClient('127.0.0.1', server.port) as client:
        data, _ = client.download('small.txt')
        assert client.peer[0] == '127.0.0.1'
    with RawClient('::1', server.port) as client:
        assert client.download('small.txt')[0] == data
        assert client.peer[0] == '::1'
    line = server.wait_for_log('sent small.txt to 127.0.0.1:')
    assert '::ffff:' not in line


def test_each_transfer_has_its_own_port(server):
    ports = set()
    clients = [RawClient(server.host, server.port) for _ in range(3)]
    try:
        for client in clients:
            client.rrq('random.bin')
        for client in clients:
            opcode, block, _, addr = client.recv()
            assert (opcode, block) == (atftpd.OP_DATA, 1)
            ports.add(addr[1])
    finally:
        for client in clients:
            client.close()
    assert len(ports) == 3 and server.port not in ports


def rss_kib(pid):
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    raise AssertionError('no VmRSS')


def test_memory_does_not_grow_with_file_size(tmp_path):
    """Files are read block by block: serving a 256 MiB file to a client that
    stops after a few blocks costs no more memory than a small file does."""
    root = tmp_path / 'root'
    root.mkdir()
    with open(str(root / 'huge'), 'wb') as f:
        f.truncate(256 << 20)                   # sparse: costs no disk
    (root / 'small').write_bytes(b'x' * 100)
    server = ServerProcess(root, ['--retry-timeout', '30'])
    try:
        clients = []
        with RawClient(server.host, server.port) as warmup:
            warmup.download('small')
        before = rss_kib(server.pid)
        for _ in range(8):
            client = RawClient(server.host, server.port)
            clients.append(client)
            # Two 64 KiB blocks a window: a burst of more can overflow the
            # client's default 208 KiB receive buffer on a busy machine.
            client.rrq('huge', options=[('blksize', '65464'), ('windowsize', '2')])
            assert client.recv()[0] == atftpd.OP_OACK
            client.ack(0)
            for block in range(1, 3):
                assert client.recv()[:2] == (atftpd.OP_DATA, block)
            client.ack(2)
            client.recv()
        after = rss_kib(server.pid)
        for client in clients:
            client.error(0, 'done')
            client.close()
        # 8 windows of 2 x 64 KiB are 1 MiB; a whole file would be 2 GiB.
        assert after - before < 16 * 1024, (before, after)
    finally:
        assert server.stop() == 0


def test_finished_transfers_release_their_descriptors(server):
    before = server.open_fds()
    for _ in range(30):
        with RawClient(server.host, server.port) as client:
            client.download('exact1024')
    with RawClient(server.host, server.port) as client:      # and an abandoned one
        client.rrq('random.bin')
        client.recv()
        client.error(0, 'bye')
    deadline = time.monotonic() + 10
    while server.open_fds() != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.open_fds() == before


def test_transfer_ends_with_error_0_after_retries(start_server):
    """A client that vanishes mid-transfer: the server resends 5 times, then
    gives up and frees the transfer (logged as a timeout)."""
    server = start_server('--retry-timeout', '1')
    with RawClient(server.host, server.port) as client:
        client.rrq('random.bin')
        client.recv()
        client.ack(1)
        first = client.recv()
        resent = [client.recv(timeout=5) for _ in range(5)]
        assert all(item[:3] == first[:3] for item in resent)
        opcode, code, _, _ = client.recv(timeout=5)
        assert (opcode, code) == (atftpd.OP_ERROR, atftpd.ERR_UNDEFINED)
    server.wait_for_log('failed sending random.bin .*timeout')


def test_a_client_that_never_answers_gets_one_resend(start_server):
    """Until its first ACK the client may be a forged source: one resend,
    even if it asked for a long timeout (the timer stays --retry-timeout)."""
    server = start_server('--retry-timeout', '1')
    with RawClient(server.host, server.port) as client:
        client.rrq('random.bin', options=[('timeout', '255')])
        first = client.recv()
        assert first[0] == atftpd.OP_OACK
        assert client.recv(timeout=5)[:3] == first[:3]
        server.wait_for_log(r'failed sending random.bin .*timeout \(no answer from the client\)',
                            timeout=5)
        assert client.nothing_for(1.5), 'no ERROR either: a forged source gets two datagrams'


def test_ack_with_trailing_bytes_counts_as_an_ack(server, tftp_root):
    """An ACK padded to 60000 bytes is read as far as it matters (the first
    four bytes) and the transfer goes on with the right bytes."""
    expected = (tftp_root / 'random.bin').read_bytes()
    with RawClient(server.host, server.port) as client:
        client.rrq('random.bin')
        opcode, block, payload, _ = client.recv()
        assert (opcode, block) == (atftpd.OP_DATA, 1)
        data = payload
        client.send(struct.pack('!HH', atftpd.OP_ACK, 1) + b'z' * 60000)
        while len(payload) == 512:
            opcode, block, payload, _ = client.recv()
            assert opcode == atftpd.OP_DATA
            data += payload
            client.ack(block)
    assert data == expected


def test_file_truncated_during_a_download_ends_with_an_error(server, tftp_root):
    """A file cut short under a running transfer must not pass for complete
    (its last block short, fewer bytes than the tsize the client was told)."""
    path = tftp_root / 'shrinking.bin'
    path.write_bytes(b's' * 20000)
    with RawClient(server.host, server.port) as client:
        client.rrq('shrinking.bin', options=[('tsize', '0')])
        assert client.recv()[0] == atftpd.OP_OACK
        client.ack(0)
        assert client.recv()[:2] == (atftpd.OP_DATA, 1)
        os.truncate(str(path), 700)
        client.ack(1)
        opcode, code, message, _ = client.recv()
        assert (opcode, code, message) == (atftpd.OP_ERROR, atftpd.ERR_UNDEFINED, b'File changed\0')
    server.wait_for_log(r'failed sending shrinking\.bin .*file shrank while being sent '
                        r'\(700 of 20000 bytes\)')
