"""Malformed datagrams, to the listening port and to a live transfer's TID:
each gets an ERROR or nothing, the server stays up, transfers go on."""

import os
import socket
import struct

import pytest

from wire_helpers import (OP_ACK, OP_DATA, OP_ERROR, OP_OACK, client_for, drain,
                          lockstep_get, opcode_of, raw_request)

OP_RRQ, OP_WRQ = 1, 2


def H(number):
    return struct.pack('!H', number)


# Every one of these must be answered by an ERROR or by nothing. Requests
# that parse name a missing file, so a valid-looking one gets ERROR 1.
CORPUS = [
    ('empty', b''),
    ('one byte', b'\x00'),
    ('two bytes rrq', b'\x00\x01'),
    ('two bytes ack', b'\x00\x04'),
    ('three bytes', b'\x00\x03\x00'),
    ('opcode 0', H(0) + b'small.txt\0octet\0'),
    ('opcode 7', H(7) + b'small.txt\0octet\0'),
    ('opcode 255', H(255) + b'small.txt\0octet\0'),
    ('opcode 65535', H(65535) + b'\xff' * 20),
    ('opcode high byte', b'\x01\x01small.txt\0octet\0'),
    ('rrq without nuls', H(OP_RRQ) + b'small.txt'),
    ('rrq without mode', H(OP_RRQ) + b'small.txt\0'),
    ('rrq mode without nul', H(OP_RRQ) + b'small.txt\0octet'),
    ('rrq empty filename', H(OP_RRQ) + b'\0octet\0'),
    ('rrq only nuls', H(OP_RRQ) + b'\0' * 10),
    ('wrq empty filename', H(OP_WRQ) + b'\0octet\0'),
    ('rrq mail mode', H(OP_RRQ) + b'small.txt\0mail\0'),
    ('wrq mail mode', H(OP_WRQ) + b'root\0mail\0'),
    ('rrq unknown mode', H(OP_RRQ) + b'nosuch\0binary\0'),
    ('rrq huge option values', raw_request(OP_RRQ, b'nosuch', b'octet', b'blksize', b'9' * 5000,
                                           b'tsize', b'9' * 5000, b'timeout', b'-' * 100,
                                           b'windowsize', b'\xff' * 100)),
    ('rrq odd option count', raw_request(OP_RRQ, b'nosuch', b'octet', b'blksize')),
    ('rrq many options', raw_request(OP_RRQ, b'nosuch', b'octet', *([b'x', b'1'] * 2000))),
    ('rrq binary filename', raw_request(OP_RRQ, b'\xff\xfe\n\r%s%n', b'octet')),
    ('rrq 65000 bytes no nul', H(OP_RRQ) + b'A' * 65000),
    ('rrq 65000 bytes long name', raw_request(OP_RRQ, b'B' * 64980, b'octet')),
    ('rrq 65000 bytes of options', raw_request(OP_RRQ, b'nosuch', b'octet', b'blksize', b'1024')
     + b'\0' * 64900),
    ('data', H(OP_DATA) + H(1) + b'x' * 512),
    ('data short', H(OP_DATA) + H(1)),
    ('ack', H(OP_ACK) + H(0)),
    ('ack 65535', H(OP_ACK) + H(65535)),
    ('error', H(OP_ERROR) + H(0) + b'oops\0'),
    ('error without text', H(OP_ERROR) + H(8)),
    ('oack', H(OP_OACK) + b'blksize\0' + b'1024\0'),
    ('oack empty', H(OP_OACK)),
]

CORPUS_IDS = [name for name, _ in CORPUS]


def sync_with_listener(server):
    """Return once the listener has handled everything sent before: it
    reads datagrams in order, so the answer to this request comes last."""
    with client_for(server) as probe:
        probe.rrq('sync-no-such-file')
        assert probe.recv()[:2] == (OP_ERROR, 1)


def send_corpus_each_from_own_socket(server):
    host, port = server.host, server.port
    socks = []
    for _name, datagram in CORPUS:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, 0))
        sock.sendto(datagram, (host, port))
        socks.append(sock)
        if len(datagram) > 4000:
            # Large datagrams could fill the listener's receive buffer, and
            # then the kernel, not the server, would drop what follows.
            sync_with_listener(server)
    return socks


def test_malformed_corpus_to_listening_port_gets_error_or_nothing_rfc1350_s5(server, tftp_root):
    socks = send_corpus_each_from_own_socket(server)
    try:
        # The listener handles datagrams in order: once this download has
        # started, every corpus datagram has been answered (or dropped).
        with client_for(server) as c:
            data, _ = c.download('random.bin')
        assert data == (tftp_root / 'random.bin').read_bytes()
        answered = 0
        for (name, _), sock in zip(CORPUS, socks):
            replies = drain(sock)
            assert len(replies) <= 1, name
            for datagram, _addr in replies:
                assert opcode_of(datagram) == OP_ERROR, (name, datagram[:40])
                assert datagram.endswith(b'\0') and len(datagram) < 600, name
                answered += 1
        assert answered > 0
    finally:
        for sock in socks:
            sock.close()
    assert server.alive()
    assert 'internal error' not in server.log()
    with client_for(server) as c:                   # and still serving
        data, _, _, _ = lockstep_get(c, 'small.txt')
    assert data == b'hello, tftp\n'


@pytest.mark.parametrize('name,datagram', CORPUS, ids=CORPUS_IDS)
def test_malformed_datagram_alone_gets_error_or_nothing_rfc1350_s5(server, name, datagram):
    with client_for(server, timeout=2) as c:
        c.send(datagram)
        with client_for(server) as probe:           # ordering point, see above
            assert lockstep_get(probe, 'small.txt')[0] == b'hello, tftp\n'
        replies = drain(c.sock)
    assert len(replies) <= 1
    for reply, _addr in replies:
        assert opcode_of(reply) == OP_ERROR
    assert server.alive()


def test_expected_error_codes_for_bad_requests_rfc1350_s5(server):
    cases = [
        (H(OP_RRQ) + b'small.txt', 4),
        (H(OP_RRQ) + b'\0octet\0', 4),
        (H(OP_RRQ) + b'small.txt\0mail\0', 4),
        (H(7) + b'small.txt\0octet\0', 4),
        (H(OP_DATA) + H(1) + b'x', 4),
        (raw_request(OP_RRQ, b'nosuch', b'octet', b'blksize'), 1),
    ]
    for datagram, code in cases:
        with client_for(server) as c:
            c.send(datagram)
            opcode, number, _, _ = c.recv()
        assert (opcode, number) == (OP_ERROR, code), datagram[:30]


def test_huge_option_values_on_real_file_are_ignored_rfc2347(server):
    options = [('blksize', '9' * 5000), ('tsize', '9' * 5000), ('timeout', '9' * 300),
               ('windowsize', '9' * 300)]
    with client_for(server) as c:
        c.rrq('small.txt', options=options)
        assert c.recv()[:3] == (OP_DATA, 1, b'hello, tftp\n')
        c.ack(1)


def test_malformed_corpus_to_live_transfer_tid_download_completes_rfc1350_s4(start_server,
                                                                           tftp_root):
    server = start_server('--retry-timeout', '2')
    expected = (tftp_root / 'random.bin').read_bytes()
    last = len(expected) // 512 + 1
    with client_for(server) as c, client_for(server) as stranger:
        c.rrq('random.bin')
        chunks = []
        sent_corpus = 0
        block = 1
        for _ in range(2 * last):
            opcode, number, payload, addr = c.recv()
            if (opcode, number) == (OP_DATA, block - 1):
                # Our ACK was lost: the corpus burst (65000-byte datagrams)
                # can fill the socket buffer, and the kernel drops what follows.
                c.ack(block - 1)
                continue
            assert (opcode, number) == (OP_DATA, block)
            chunks.append(payload)
            if block in (1, 100, last - 1):
                for _name, datagram in CORPUS:
                    stranger.sock.sendto(datagram, c.peer)
                    sent_corpus += 1
            c.ack(block)
            if block == last:
                break
            block += 1
        assert c.nothing_for(0.2)
        replies = drain(stranger.sock)
    assert b''.join(chunks) == expected
    for datagram, addr in replies:
        assert opcode_of(datagram) == OP_ERROR
        assert struct.unpack('!H', datagram[2:4])[0] == 5     # Unknown transfer ID
    # ERROR datagrams are not answered; the rest get ERROR 5 (a burst with
    # 65000-byte datagrams may overflow the socket buffer: fewer replies).
    errors = sum(1 for _, d in CORPUS if d[:2] == H(OP_ERROR))
    assert 0 < len(replies) <= sent_corpus - 3 * errors
    assert server.alive()
    assert 'internal error' not in server.log()


def test_junk_from_the_clients_own_port_is_ignored_rfc1350_s4(start_server, tftp_root):
    server = start_server('--retry-timeout', '2')
    expected = (tftp_root / 'random.bin').read_bytes()
    last = len(expected) // 512 + 1
    junk = [datagram for _name, datagram in CORPUS
            if datagram[:2] != H(OP_ERROR) and datagram[:2] != H(OP_ACK)]
    junk += [H(OP_ACK), H(OP_ACK) + b'\x00', H(OP_ACK) + H(60000), H(OP_ACK) + H(0)]
    with client_for(server) as c:
        c.rrq('random.bin')
        chunks = []
        for block in range(1, last + 1):
            opcode, number, payload, _ = c.recv()
            assert (opcode, number) == (OP_DATA, block)
            chunks.append(payload)
            if block in (2, 300):
                for datagram in junk:
                    c.send(datagram)
                assert c.nothing_for(0.2)       # nothing answered, nothing resent
            c.ack(block)
    assert b''.join(chunks) == expected
    assert server.alive()


def test_malformed_corpus_to_upload_tid_upload_completes_rfc1350_s4(start_server, tftp_root):
    server = start_server('--allow-create', '--retry-timeout', '2')
    payload = os.urandom(20000)
    with client_for(server) as c, client_for(server) as stranger:
        c.wrq('target.bin')
        assert c.recv()[:2] == (OP_ACK, 0)
        for block in range(1, len(payload) // 512 + 2):
            c.data(block, payload[(block - 1) * 512:block * 512])
            if block in (1, 20):
                for _name, datagram in CORPUS:
                    stranger.sock.sendto(datagram, c.peer)
            for _ in range(3):
                reply = c.recv()[:2]
                if reply != (OP_ACK, block - 1):
                    break
                # A resent ACK: our DATA was lost in a full socket buffer.
                c.data(block, payload[(block - 1) * 512:block * 512])
            assert reply == (OP_ACK, block)
        replies = drain(stranger.sock)
    assert replies and all(opcode_of(d) == OP_ERROR for d, _ in replies)
    assert (tftp_root / 'target.bin').read_bytes() == payload
    assert server.alive()
