"""RFC 2349 timeout and tsize on the wire."""

import os

import pytest

from wire_helpers import OP_ACK, OP_DATA, OP_OACK, client_for, lockstep_get, lockstep_put


@pytest.mark.parametrize('value', ['1', '2', '255'])
def test_timeout_1_to_255_is_acknowledged_rfc2349(server, tftp_root, value):
    with client_for(server) as c:
        data, _, _, oack = lockstep_get(c, 'exact1024', options=[('timeout', value)])
    assert oack == {'timeout': value}
    assert data == (tftp_root / 'exact1024').read_bytes()


@pytest.mark.parametrize('value', ['0', '256', '1000', '-1', '1.5', 'abc', '',
                                   '99999999999999999999999'])
def test_timeout_out_of_range_is_not_acknowledged_rfc2349(server, tftp_root, value):
    with client_for(server) as c:
        c.rrq('small.txt', options=[('timeout', value)])
        assert c.recv()[:3] == (OP_DATA, 1, b'hello, tftp\n')     # no OACK, no ERROR 8
        c.ack(1)


def test_negotiated_timeout_drives_retransmission_rfc2349(start_server, tftp_root):
    # The server's own retry timeout is 10 s; the client asks for 1 s. The
    # resend must arrive before the client's 5 s receive timeout.
    server = start_server('--retry-timeout', '10')
    expected = (tftp_root / 'exact1024').read_bytes()
    with client_for(server, timeout=5) as c:
        c.rrq('exact1024', options=[('timeout', '1')])
        opcode, _, payload, _ = c.recv()
        assert opcode == OP_OACK and c.oack_options(payload) == {'timeout': '1'}
        c.ack(0)
        assert c.recv()[:3] == (OP_DATA, 1, expected[:512])
        assert c.recv()[:3] == (OP_DATA, 1, expected[:512])       # resent, not acked
        c.ack(1)
        assert c.recv()[:3] == (OP_DATA, 2, expected[512:])
        c.ack(2)
        assert c.recv()[:3] == (OP_DATA, 3, b'')
        c.ack(3)


def test_negotiated_timeout_applies_to_oack_resend_rfc2349(start_server):
    server = start_server('--retry-timeout', '10')
    with client_for(server, timeout=5) as c:
        c.rrq('small.txt', options=[('timeout', '1'), ('tsize', '0')])
        first = c.recv()
        assert first[0] == OP_OACK
        second = c.recv()                        # OACK not acknowledged: sent again
        assert second[:3] == first[:3]
        c.ack(0)
        assert c.recv()[:3] == (OP_DATA, 1, b'hello, tftp\n')
        c.ack(1)


def test_negotiated_timeout_in_wrq_rfc2349(start_server, tftp_root):
    server = start_server('--allow-create', '--retry-timeout', '10')
    with client_for(server, timeout=5) as c:
        c.wrq('timed.bin', options=[('timeout', '1')])
        opcode, _, payload, _ = c.recv()
        assert opcode == OP_OACK and c.oack_options(payload) == {'timeout': '1'}
        c.data(1, b'x' * 512)
        assert c.recv()[:2] == (OP_ACK, 1)
        assert c.recv()[:2] == (OP_ACK, 1)       # no block 2: ACK 1 again
        c.data(2, b'end')
        assert c.recv()[:2] == (OP_ACK, 2)
    assert (tftp_root / 'timed.bin').read_bytes() == b'x' * 512 + b'end'


@pytest.mark.parametrize('name', ['small.txt', 'exact512', 'random.bin', 'sub/inner.txt'])
def test_tsize_in_rrq_is_file_size_rfc2349(server, tftp_root, name):
    expected = (tftp_root / name).read_bytes()
    with client_for(server) as c:
        data, _, _, oack = lockstep_get(c, name, options=[('tsize', '0')])
    assert oack == {'tsize': str(len(expected))}
    assert data == expected


def test_tsize_for_empty_file_is_left_out_rfc2349(server):
    # Policy (negotiate_options): curl rejects "tsize 0", so an empty file
    # is sent without it; with no other option there is no OACK at all.
    with client_for(server) as c:
        data, sizes, _, oack = lockstep_get(c, 'empty', options=[('tsize', '0')])
    assert oack is None and sizes == [0] and data == b''
    with client_for(server) as c:
        data, _, _, oack = lockstep_get(c, 'empty', options=[('tsize', '0'), ('blksize', '1024')])
    assert oack == {'blksize': '1024'} and data == b''


def test_tsize_in_rrq_ignores_client_value_rfc2349(server):
    with client_for(server) as c:
        c.rrq('small.txt', options=[('tsize', '123456')])
        opcode, _, payload, _ = c.recv()
        assert opcode == OP_OACK and c.oack_options(payload) == {'tsize': '12'}
        c.ack(0)
        assert c.recv()[:3] == (OP_DATA, 1, b'hello, tftp\n')
        c.ack(1)


@pytest.mark.parametrize('size', [0, 1500, 300000])
def test_tsize_in_wrq_is_echoed_rfc2349(start_server, tftp_root, size):
    server = start_server('--allow-create')
    payload = os.urandom(size)
    with client_for(server) as c:
        oack = lockstep_put(c, 'sized.bin', payload, options=[('tsize', str(size))])
    assert oack == {'tsize': str(size)}
    assert (tftp_root / 'sized.bin').read_bytes() == payload
