"""RFC 7440 windowsize on the wire: windows, the --max-windowsize cap, a
mid-window ACK, simulated loss, and windowed uploads."""

import os

import pytest

from wire_helpers import OP_ACK, OP_DATA, OP_OACK, client_for, windowed_get


@pytest.mark.parametrize('windowsize', [2, 8, 64])
def test_windowsize_download_byte_for_byte_rfc7440(server, tftp_root, windowsize):
    with client_for(server) as c:
        data, oack = c.download('random.bin', options=[('windowsize', str(windowsize))])
    assert oack == {'windowsize': str(windowsize)}
    assert data == (tftp_root / 'random.bin').read_bytes()


@pytest.mark.parametrize('name', ['empty', 'small.txt', 'exact512', 'exact1024'])
def test_windowsize_small_files_rfc7440(server, tftp_root, name):
    with client_for(server) as c:
        data, stats = windowed_get(c, name, 8)
    assert data == (tftp_root / name).read_bytes()


def test_windowsize_with_blksize_rfc7440(server, tftp_root):
    with client_for(server) as c:
        data, oack = c.download('random.bin', options=[('blksize', '1428'),
                                                       ('windowsize', '16')])
    assert oack == {'blksize': '1428', 'windowsize': '16'}
    assert data == (tftp_root / 'random.bin').read_bytes()


def test_windowsize_above_max_windowsize_is_lowered_rfc7440(start_server, tftp_root):
    server = start_server('--max-windowsize', '4', '--retry-timeout', '2')
    expected = (tftp_root / 'random.bin').read_bytes()
    with client_for(server) as c:
        c.rrq('random.bin', options=[('windowsize', '16')])
        opcode, _, payload, _ = c.recv()
        assert opcode == OP_OACK and c.oack_options(payload) == {'windowsize': '4'}
        c.ack(0)
        for block in range(1, 5):
            assert c.recv()[:3] == (OP_DATA, block, expected[(block - 1) * 512:block * 512])
        assert c.nothing_for(0.5)               # the window holds 4 blocks, not 16
        c.ack(4)
        assert c.recv()[:2] == (OP_DATA, 5)


def test_windowsize_0_and_garbage_not_acknowledged_rfc7440(server):
    for value in ('0', 'abc', '-4', '65536'):
        with client_for(server) as c:
            c.rrq('small.txt', options=[('windowsize', value)])
            assert c.recv()[:3] == (OP_DATA, 1, b'hello, tftp\n'), value
            c.ack(1)


def test_ack_mid_window_restarts_after_acked_block_at_once_rfc7440_s4(start_server, tftp_root):
    # A 30 s retry timeout and a 5 s receive timeout: what arrives after the
    # ACK was sent because of the ACK, not because a timer fired.
    server = start_server('--retry-timeout', '30')
    expected = (tftp_root / 'random.bin').read_bytes()
    blocks = [expected[i:i + 512] for i in range(0, len(expected), 512)] + [b'']
    assert len(blocks[-2]) < 512
    blocks.pop()                                 # 300000 is not a multiple of 512
    with client_for(server, timeout=5) as c:
        c.rrq('random.bin', options=[('windowsize', '8')])
        assert c.recv()[0] == OP_OACK
        c.ack(0)
        for block in range(1, 9):
            assert c.recv()[:3] == (OP_DATA, block, blocks[block - 1])
        c.ack(3)                                 # "blocks 4..8 were lost"
        for block in range(4, 12):
            assert c.recv()[:3] == (OP_DATA, block, blocks[block - 1])
        # Go on as a normal windowed client and check the tail of the file.
        received = 11
        acked = 3
        for _ in range(len(blocks) * 2):
            if received - acked == 8:
                c.ack(received)
                acked = received
            if received == len(blocks):
                break
            opcode, number, payload, _ = c.recv()
            assert (opcode, number) == (OP_DATA, received + 1)
            assert payload == blocks[received]
            received += 1
        else:
            raise AssertionError('too many blocks')
        if acked != received:
            c.ack(received)
        assert c.nothing_for(0.3)
    server.wait_for_log(r'sent random\.bin to ')


def test_first_block_of_window_lost_ack_of_previous_window_restarts_at_once_rfc7440_s4(
        start_server, tftp_root):
    # RFC 7440 section 4: on a sequence error the receiver ACKs the last block
    # received in order, and the sender SHOULD send a new window starting
    # after it. When the first block of a window is lost, that block is the
    # end of the previous window, already acknowledged once.
    server = start_server('--retry-timeout', '30')
    expected = (tftp_root / 'random.bin').read_bytes()
    with client_for(server, timeout=5) as c:
        c.rrq('random.bin', options=[('windowsize', '8')])
        assert c.recv()[0] == OP_OACK
        c.ack(0)
        for block in range(1, 9):
            assert c.recv()[:2] == (OP_DATA, block)
        c.ack(8)
        assert c.recv()[:2] == (OP_DATA, 9)      # "lost"
        assert c.recv()[:2] == (OP_DATA, 10)     # a gap: ACK the last in-order block
        for block in range(11, 17):
            assert c.recv()[:2] == (OP_DATA, block)
        c.ack(8)
        for block in range(9, 17):
            assert c.recv()[:3] == (OP_DATA, block, expected[(block - 1) * 512:block * 512])
        c.error(0, 'enough')


@pytest.mark.parametrize('windowsize', [8, 16])
def test_loss_every_7th_datagram_still_byte_for_byte_rfc7440_s4(start_server, tftp_root,
                                                               windowsize):
    server = start_server('--retry-timeout', '1')
    name = 'lossy.bin'
    expected = os.urandom(60000)
    (tftp_root / name).write_bytes(expected)
    with client_for(server, timeout=5) as c:
        data, stats = windowed_get(c, name, windowsize, drop=lambda n: n % 7 == 0)
    assert stats['dropped'] > 0 and stats['gaps'] > 0
    assert data == expected


def test_windowed_wrq_server_acks_at_window_end_rfc7440(start_server, tftp_root):
    server = start_server('--allow-create', '--retry-timeout', '2')
    payload = os.urandom(4 * 512 * 3 + 100)      # three full windows and a short block
    blocks = [payload[i:i + 512] for i in range(0, len(payload), 512)]
    assert len(blocks[-1]) == 100
    with client_for(server) as c:
        c.wrq('windowed.bin', options=[('windowsize', '4')])
        opcode, _, body, _ = c.recv()
        assert opcode == OP_OACK and c.oack_options(body) == {'windowsize': '4'}
        for start in range(0, len(blocks), 4):
            window = range(start + 1, min(start + 4, len(blocks)) + 1)
            for block in window:
                c.data(block, blocks[block - 1])
                if block != window[-1]:
                    assert c.nothing_for(0.02)   # no ACK inside the window
            assert c.recv()[:2] == (OP_ACK, window[-1])
    assert (tftp_root / 'windowed.bin').read_bytes() == payload


def test_windowed_wrq_gap_is_acked_with_last_in_order_block_rfc7440_s4(start_server,
                                                                      tftp_root):
    server = start_server('--allow-create', '--retry-timeout', '2')
    payload = os.urandom(10 * 512 + 7)
    blocks = [payload[i:i + 512] for i in range(0, len(payload), 512)]
    with client_for(server) as c:
        c.wrq('gappy.bin', options=[('windowsize', '4')])
        assert c.recv()[0] == OP_OACK
        for block in (1, 2, 4):                  # block 3 "lost"
            c.data(block, blocks[block - 1])
        assert c.recv()[:2] == (OP_ACK, 2)
        # RFC 7440 section 4: the sender restarts its window after block 2.
        for block in (3, 4, 5, 6):
            c.data(block, blocks[block - 1])
        assert c.recv()[:2] == (OP_ACK, 6)
        for block in (7, 8, 9, 10):
            c.data(block, blocks[block - 1])
        assert c.recv()[:2] == (OP_ACK, 10)
        c.data(11, blocks[10])
        assert c.recv()[:2] == (OP_ACK, 11)
    assert (tftp_root / 'gappy.bin').read_bytes() == payload


def test_windowed_wrq_full_upload_rfc7440(start_server, tftp_root):
    server = start_server('--allow-create')
    payload = os.urandom(300000)
    blksize, windowsize = 1428, 8
    blocks = [payload[i:i + blksize] for i in range(0, len(payload), blksize)]
    if len(blocks[-1]) == blksize:
        blocks.append(b'')
    with client_for(server) as c:
        c.wrq('big-up.bin', options=[('blksize', str(blksize)), ('windowsize', str(windowsize)),
                                     ('tsize', str(len(payload)))])
        opcode, _, body, _ = c.recv()
        assert opcode == OP_OACK
        assert c.oack_options(body) == {'blksize': '1428', 'windowsize': '8', 'tsize': '300000'}
        for start in range(0, len(blocks), windowsize):
            end = min(start + windowsize, len(blocks))
            for block in range(start + 1, end + 1):
                c.data(block, blocks[block - 1])
            assert c.recv()[:2] == (OP_ACK, end)
    assert (tftp_root / 'big-up.bin').read_bytes() == payload


def test_windowed_download_rolls_over_block_65535_rfc7440_rfc1350_s6(start_server, tmp_path):
    root = tmp_path / 'roll'
    root.mkdir()
    payload = os.urandom(65536 * 8 + 5)                 # 65537 blocks of 8 bytes
    (root / 'roll.bin').write_bytes(payload)
    server = start_server(root=root)
    with client_for(server) as c:
        data, stats = windowed_get(c, 'roll.bin', 64, blksize=8)
    assert data == payload


def test_mid_window_ack_across_rollover_rfc7440_s4(start_server, tmp_path):
    # Window 65533..(wrap)..4 with windowsize 8; ACK for wire block 65535
    # (internal 65535) must restart at wire block 0, not be taken as stale.
    root = tmp_path / 'roll'
    root.mkdir()
    payload = os.urandom(65560 * 8 + 3)
    (root / 'roll.bin').write_bytes(payload)
    server = start_server('--retry-timeout', '30', root=root)
    block = lambda n: payload[(n - 1) * 8:n * 8]        # noqa: E731
    with client_for(server, timeout=5) as c:
        c.rrq('roll.bin', options=[('blksize', '8'), ('windowsize', '8')])
        assert c.recv()[0] == OP_OACK
        c.ack(0)
        received = 0
        for _ in range(65532 // 8):                     # windows up to block 65528
            for n in range(received + 1, received + 9):
                assert c.recv()[:2] == (OP_DATA, n & 0xFFFF)
            received += 8
            c.ack(received)
        assert received == 65528
        for n in range(65529, 65537):                   # 65529..65535, 0
            assert c.recv()[:3] == (OP_DATA, n & 0xFFFF, block(n))
        c.ack(65534)                                    # "65535 and 0 were lost"
        for n in range(65535, 65543):                   # 65535, 0, 1, .. 6
            assert c.recv()[:3] == (OP_DATA, n & 0xFFFF, block(n))
        c.error(0, 'enough')


def test_windowed_upload_rolls_over_block_65535_rfc7440_rfc1350_s6(start_server, tftp_root):
    server = start_server('--allow-create')
    payload = os.urandom(65536 * 8 + 3)
    blksize, windowsize = 8, 64
    count = len(payload) // blksize + 1
    with client_for(server) as c:
        c.wrq('roll-up.bin', options=[('blksize', '8'), ('windowsize', '64')])
        assert c.recv()[0] == OP_OACK
        for start in range(0, count, windowsize):
            end = min(start + windowsize, count)
            for n in range(start + 1, end + 1):
                c.data(n, payload[(n - 1) * blksize:n * blksize])
            assert c.recv()[:2] == (OP_ACK, end & 0xFFFF)
    assert (tftp_root / 'roll-up.bin').read_bytes() == payload
