"""A request from the address and port of a running transfer (issue 21).

Boot firmware that is reset in the middle of a download asks again from the
same port: PXELINUX 6.04 numbers its ports from 49152 upwards and GRUB 2.06
from 25300, in the same order on every boot. Once the old transfer has been
answered (an ACK of the OACK or of a block, a DATA block for an upload), such
a request is a new client and is served at once with a new TID; the old
transfer ends, without an ERROR, when the new one's client ACKs. Before that
answer, the same request is the client's own retransmission.

A spoofed RRQ carrying a running download's address and port looks the same
on the wire as the client's own datagram, so these tests send it from the
client's socket. It starts a transfer beside the old one but must not end it:
the real client goes on ACKing the old TID, and the new TID's packets are
ignored or answered with ERROR 5 (both client behaviours are tested)."""

import os

import pytest

from wire_helpers import OP_ACK, OP_DATA, OP_ERROR, OP_OACK, client_for, part_files

BLOCKS_BEFORE_RESET = 20


def big_file(tftp_root, size=200000):
    payload = os.urandom(size)
    (tftp_root / 'big.bin').write_bytes(payload)
    return payload


def ack_some_blocks(c, options=(), count=BLOCKS_BEFORE_RESET):
    """Start a lock-step download and ACK `count` blocks; returns the TID."""
    c.rrq('big.bin', options=options)
    opcode, _, _, tid = c.recv()
    if opcode == OP_OACK:
        c.ack(0)
        opcode, _, _, _ = c.recv()
    for block in range(1, count + 1):
        assert opcode == OP_DATA
        c.ack(block)
        opcode, number, _, addr = recv_from(c, tid)
        assert number == block + 1
    return tid


def recv_from(c, tid, limit=200):
    """The next datagram from `tid`; datagrams from other TIDs are skipped."""
    for _ in range(limit):
        reply = c.recv()
        if reply[3] == tid:
            return reply
    raise AssertionError('no datagram from %r' % (tid,))


def recv_not_from(c, tid, limit=200):
    """The next datagram from any TID but `tid` (the old transfer's resends
    may arrive in between)."""
    for _ in range(limit):
        reply = c.recv()
        if reply[3] != tid:
            return reply
    raise AssertionError('only datagrams from the old TID %r' % (tid,))


def finish_lockstep(c, tid, first, blksize=512, limit=10000):
    """Go on with a lock-step download from `tid`; `first` is the reply in
    hand (an OACK or DATA 1). Datagrams from other TIDs are ignored.
    Returns the bytes of every block from 1."""
    opcode, number, payload, _ = first
    if opcode == OP_OACK:
        c.send(b'\0\4\0\0', tid)
        opcode, number, payload, _ = recv_from(c, tid)
    chunks = []
    for _ in range(limit):
        assert opcode == OP_DATA and number == (len(chunks) + 1) & 0xFFFF, (opcode, number)
        chunks.append(payload)
        c.send(bytes([0, OP_ACK]) + number.to_bytes(2, 'big'), tid)
        if len(payload) < blksize:
            return b''.join(chunks)
        opcode, number, payload, _ = recv_from(c, tid)
    raise AssertionError('too many blocks')


@pytest.mark.parametrize('options,blksize', [((), 512),
                                             ((('blksize', '1428'), ('tsize', '0')), 1428)])
def test_reset_client_asking_again_from_its_port_is_served_at_once(start_server, tftp_root,
                                                                    options, blksize):
    payload = big_file(tftp_root)
    server = start_server('--retry-timeout', '1')
    with client_for(server) as c:
        old = ack_some_blocks(c, options)
        c.rrq('big.bin', options=options)       # the firmware booted again
        first = recv_not_from(c, old)
        new = first[3]
        assert first[0] == (OP_OACK if options else OP_DATA)
        assert finish_lockstep(c, new, first, blksize) == payload
    server.wait_for_log(r'aborted by client \(a new request from its port was answered\)')
    server.wait_for_log(r'sent big\.bin to 127\.0\.0\.1')
    assert 'Timeout' not in server.log()


def test_request_repeated_before_any_ack_is_a_retransmission(start_server, tftp_root):
    payload = big_file(tftp_root)
    server = start_server('--retry-timeout', '2', '--verbose=7', '--trace')
    with client_for(server) as c:
        c.rrq('big.bin')
        first = c.recv()
        tid = first[3]
        c.rrq('big.bin')                        # our request again: DATA 1 was slow
        server.wait_for_log('duplicate request ignored')
        assert finish_lockstep(c, tid, first) == payload
        assert c.nothing_for(0.5)           # no second transfer sends us anything
    assert server.log().count('serving big.bin') == 1


def test_spoofed_request_does_not_end_a_download_the_client_still_acks(start_server,
                                                                        tftp_root):
    payload = big_file(tftp_root)
    server = start_server('--retry-timeout', '1')
    with client_for(server) as c:
        tid = ack_some_blocks(c)
        c.rrq('big.bin')                        # spoofed: same address and port
        data = [b'x' * 512] * BLOCKS_BEFORE_RESET
        number = BLOCKS_BEFORE_RESET + 1
        c.ack(BLOCKS_BEFORE_RESET)              # the real client repeats its last ACK
        for _ in range(10000):
            opcode, block, chunk, addr = c.recv()
            if addr != tid:
                continue                        # the new TID: a client ignores it
            assert opcode == OP_DATA
            if block != number & 0xFFFF:
                continue
            data.append(chunk)
            c.send(bytes([0, OP_ACK]) + block.to_bytes(2, 'big'), tid)
            number += 1
            if len(chunk) < 512:
                break
        assert b''.join(data)[512 * BLOCKS_BEFORE_RESET:] == payload[512 * BLOCKS_BEFORE_RESET:]
    server.wait_for_log(r'sent big\.bin to 127\.0\.0\.1')


def test_spoofed_request_answered_with_error_5_leaves_the_download_alone(start_server,
                                                                          tftp_root):
    payload = big_file(tftp_root)
    server = start_server('--retry-timeout', '1')
    with client_for(server) as c:
        tid = ack_some_blocks(c)
        c.rrq('big.bin')
        stranger = recv_not_from(c, tid)[3]
        c.send(bytes([0, OP_ERROR, 0, 5]) + b'Unknown transfer ID\0', stranger)
        server.wait_for_log(r'aborted by client \(5')
        c.ack(BLOCKS_BEFORE_RESET)
        reply = recv_from(c, tid)
        rest = finish_lockstep_from(c, tid, reply, BLOCKS_BEFORE_RESET + 1)
        assert rest == payload[512 * BLOCKS_BEFORE_RESET:]
    server.wait_for_log(r'sent big\.bin to 127\.0\.0\.1')


def finish_lockstep_from(c, tid, reply, expected, limit=10000):
    """Lock-step from block `expected` on; repeats of earlier blocks skipped."""
    chunks = []
    for _ in range(limit):
        opcode, number, payload, _ = reply
        assert opcode == OP_DATA
        if number == expected & 0xFFFF:
            chunks.append(payload)
            c.send(bytes([0, OP_ACK]) + number.to_bytes(2, 'big'), tid)
            expected += 1
            if len(payload) < 512:
                return b''.join(chunks)
        reply = recv_from(c, tid)
    raise AssertionError('too many blocks')


def test_upload_restarted_from_the_same_port_starts_over(start_server, tftp_root):
    (tftp_root / 'incoming').mkdir()
    server = start_server('--allow-create', '--retry-timeout', '1')
    payload = os.urandom(512 * 10 + 100)
    with client_for(server) as c:
        c.wrq('incoming/up.bin')
        opcode, number, _, old = c.recv()
        assert (opcode, number) == (OP_ACK, 0)
        for block in range(1, 4):
            c.data(block, b's' * 512)
            assert recv_from(c, old)[:2] == (OP_ACK, block)
        c.wrq('incoming/up.bin')                # the client was reset
        opcode, number, _, new = recv_not_from(c, old)
        assert (opcode, number) == (OP_ACK, 0)
        for block in range(1, 12):
            chunk = payload[(block - 1) * 512:block * 512]
            c.send(bytes([0, OP_DATA]) + block.to_bytes(2, 'big') + chunk, new)
            assert recv_from(c, new)[:2] == (OP_ACK, block)
    server.wait_for_log(r'received incoming/up\.bin from')
    server.wait_for_log(r'aborted by client \(a new request from its port was answered\)')
    assert (tftp_root / 'incoming' / 'up.bin').read_bytes() == payload
    assert part_files(str(tftp_root / 'incoming')) == []
