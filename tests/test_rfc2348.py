"""RFC 2348 blksize on the wire: valid sizes, the --max-blksize cap, and
invalid values (left out of the OACK, never ERROR 8)."""

import os

import pytest

from wire_helpers import OP_DATA, OP_OACK, client_for, lockstep_get, lockstep_put


@pytest.mark.parametrize('blksize,name', [(8, 'exact1024'), (8, 'small.txt'), (8, 'empty'),
                                          (1428, 'random.bin'), (1428, 'exact1024'),
                                          (65464, 'random.bin'), (65464, 'small.txt')])
def test_blksize_served_byte_for_byte_rfc2348(server, tftp_root, blksize, name):
    expected = (tftp_root / name).read_bytes()
    with client_for(server) as c:
        data, sizes, _, oack = lockstep_get(c, name, options=[('blksize', str(blksize))])
    assert oack == {'blksize': str(blksize)}
    assert data == expected
    assert sizes == [blksize] * (len(expected) // blksize) + [len(expected) % blksize]


def test_blksize_above_max_blksize_is_lowered_to_cap_rfc2348(start_server, tftp_root):
    server = start_server('--max-blksize', '1024')
    with client_for(server) as c:
        data, sizes, _, oack = lockstep_get(c, 'random.bin', options=[('blksize', '1428')])
    assert oack == {'blksize': '1024'}
    assert set(sizes[:-1]) == {1024} and sizes[-1] == 300000 % 1024
    assert data == (tftp_root / 'random.bin').read_bytes()


def test_blksize_below_cap_is_granted_as_asked_rfc2348(start_server, tftp_root):
    server = start_server('--max-blksize', '1024')
    with client_for(server) as c:
        data, sizes, _, oack = lockstep_get(c, 'exact1024', options=[('blksize', '1000')])
    assert oack == {'blksize': '1000'}
    assert sizes == [1000, 24]
    assert data == (tftp_root / 'exact1024').read_bytes()


def test_blksize_above_protocol_max_is_lowered_to_65464_rfc2348(server, tftp_root):
    with client_for(server) as c:
        data, sizes, _, oack = lockstep_get(c, 'random.bin', options=[('blksize', '65535')])
    assert oack == {'blksize': '65464'}
    assert data == (tftp_root / 'random.bin').read_bytes()


@pytest.mark.parametrize('value', ['7', '0', '1', '-512', 'abc', '', '1e3', '0x200',
                                   '99999999999999999999999'])
def test_invalid_blksize_is_not_acknowledged_never_error_8_rfc2348(server, tftp_root, value):
    expected = (tftp_root / 'exact1024').read_bytes()
    with client_for(server) as c:
        c.rrq('exact1024', options=[('blksize', value)])
        opcode, number, payload, _ = c.recv()
        assert (opcode, number, payload) == (OP_DATA, 1, expected[:512])   # no OACK, 512
        c.ack(1)
        assert c.recv()[:3] == (OP_DATA, 2, expected[512:])
        c.ack(2)
        assert c.recv()[:3] == (OP_DATA, 3, b'')
        c.ack(3)


def test_invalid_blksize_leaves_other_options_acknowledged_rfc2348(server):
    with client_for(server) as c:
        c.rrq('small.txt', options=[('blksize', '4'), ('tsize', '0')])
        opcode, _, payload, _ = c.recv()
        assert opcode == OP_OACK
        assert c.oack_options(payload) == {'tsize': '12'}
        c.ack(0)
        assert c.recv()[:3] == (OP_DATA, 1, b'hello, tftp\n')
        c.ack(1)


@pytest.mark.parametrize('blksize', [8, 1428, 65464])
def test_wrq_blksize_rfc2348(start_server, tftp_root, blksize):
    server = start_server('--allow-create')
    payload = os.urandom(3 * blksize) if blksize < 65464 else os.urandom(70000)
    with client_for(server) as c:
        oack = lockstep_put(c, 'up.bin', payload, options=[('blksize', str(blksize))])
    assert oack == {'blksize': str(blksize)}
    assert (tftp_root / 'up.bin').read_bytes() == payload
