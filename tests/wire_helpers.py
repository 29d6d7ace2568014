"""Helpers shared by the wire-level protocol tests (test_rfc*.py,
test_malformed.py, test_maxthread.py). Every loop is bounded; every receive
goes through RawClient.recv, which has a timeout."""

import os
import re
import select
import struct
import time

from conftest import RawClient, TftpError  # noqa: F401  (TftpError is re-exported)

OP_RRQ, OP_WRQ, OP_DATA, OP_ACK, OP_ERROR, OP_OACK = 1, 2, 3, 4, 5, 6


def client_for(server, timeout=None):
    """A RawClient aimed at `server` (ServerProcess)."""
    if timeout is None:
        return RawClient(server.host, server.port)
    return RawClient(server.host, server.port, timeout=timeout)


def netascii(local):
    """Local text to netascii, written out independently of the server's codec."""
    out = bytearray()
    for byte in local:
        if byte == 0x0A:
            out += b'\r\n'
        elif byte == 0x0D:
            out += b'\r\0'
        else:
            out.append(byte)
    return bytes(out)


def error_of(reply):
    """(code, message) of an ERROR reply tuple from RawClient.recv."""
    opcode, number, payload, _addr = reply
    assert opcode == OP_ERROR, 'expected an ERROR, got opcode %r' % (opcode,)
    return number, payload.rstrip(b'\0').decode('latin-1')


def expect_error(client, timeout=None):
    """Receive one datagram, assert it is an ERROR, return (code, message)."""
    return error_of(client.recv(timeout))


def lockstep_get(client, name, mode='octet', options=(), max_blocks=200000):
    """Download in strict lock-step (windowsize 1 semantics).

    Returns (data, block_sizes, wire_numbers, oack). Raises TftpError on an
    ERROR from the server. `wire_numbers` are the 16-bit numbers as seen."""
    client.rrq(name, mode, options)
    opcode, number, payload, _ = client.recv()
    oack = None
    blksize = 512
    if opcode == OP_OACK:
        oack = client.oack_options(payload)
        blksize = int(oack.get('blksize', 512))
        assert int(oack.get('windowsize', 1)) == 1
        client.ack(0)
        opcode, number, payload, _ = client.recv()
    chunks, sizes, numbers = [], [], []
    expected = 1
    for _ in range(max_blocks):
        if opcode == OP_ERROR:
            raise TftpError(number, payload.rstrip(b'\0').decode('latin-1'))
        assert opcode == OP_DATA, opcode
        assert number == expected & 0xFFFF, (number, expected)
        assert len(payload) <= blksize
        chunks.append(payload)
        sizes.append(len(payload))
        numbers.append(number)
        client.ack(expected)
        if len(payload) < blksize:
            return b''.join(chunks), sizes, numbers, oack
        expected += 1
        opcode, number, payload, _ = client.recv()
    raise AssertionError('too many blocks')


def windowed_get(client, name, windowsize, blksize=512, drop=None, max_datagrams=100000,
                 extra_options=()):
    """An RFC 7440 receiver. `drop(n)` (n counts DATA datagrams from 1) says
    whether to ignore that datagram as if the network lost it. On a gap the
    receiver ACKs the last block received in order (once per gap); at the end
    of a window (windowsize blocks after its last ACK) or on the final block
    it ACKs. Returns (data, stats dict)."""
    options = [('blksize', str(blksize)), ('windowsize', str(windowsize))] + list(extra_options)
    client.rrq(name, 'octet', options)
    opcode, number, payload, _ = client.recv()
    assert opcode == OP_OACK, (opcode, payload)
    oack = client.oack_options(payload)
    assert int(oack['blksize']) == blksize and int(oack['windowsize']) == windowsize, oack
    client.ack(0)
    chunks = []
    received = 0            # last block received in order (unwrapped)
    acked = 0               # last block we acknowledged
    gap_acked = False
    seen = dropped = gaps = 0
    for _ in range(max_datagrams):
        opcode, number, payload, _ = client.recv()
        if opcode == OP_ERROR:
            raise TftpError(number, payload.rstrip(b'\0').decode('latin-1'))
        assert opcode == OP_DATA, opcode
        seen += 1
        if drop is not None and drop(seen):
            dropped += 1
            continue
        if number == (received + 1) & 0xFFFF:
            assert len(payload) <= blksize
            chunks.append(payload)
            received += 1
            gap_acked = False
            final = len(payload) < blksize
            if final or received - acked >= windowsize:
                client.ack(received)
                acked = received
            if final:
                return b''.join(chunks), {'seen': seen, 'dropped': dropped, 'gaps': gaps}
        elif (number - received) & 0xFFFF < 0x8000:
            # A block from beyond the next one: something was lost.
            if not gap_acked:
                gaps += 1
                gap_acked = True
                client.ack(received)
                acked = received
        # else: an old block sent again, already have it
    raise AssertionError('too many datagrams')


def start_upload(client, name, mode='octet', options=()):
    """Send a WRQ and return the first reply (opcode, number, payload, addr)."""
    client.wrq(name, mode, options)
    return client.recv()


def lockstep_put(client, name, payload, mode='octet', options=(), blksize=512):
    """A complete lock-step upload of `payload` (already in wire form).
    Returns the OACK options or None; raises TftpError on an ERROR."""
    opcode, number, body, _ = start_upload(client, name, mode, options)
    oack = None
    if opcode == OP_ERROR:
        raise TftpError(number, body.rstrip(b'\0').decode('latin-1'))
    if opcode == OP_OACK:
        oack = client.oack_options(body)
        blksize = int(oack.get('blksize', blksize))
    else:
        assert (opcode, number) == (OP_ACK, 0), (opcode, number)
    count = len(payload) // blksize + 1         # a final short (maybe empty) block
    for block in range(1, count + 1):
        client.data(block, payload[(block - 1) * blksize:block * blksize])
        opcode, number, body, _ = client.recv()
        if opcode == OP_ERROR:
            raise TftpError(number, body.rstrip(b'\0').decode('latin-1'))
        assert (opcode, number) == (OP_ACK, block & 0xFFFF), (opcode, number, block)
    return oack


def wait_for_log_count(server, pattern, count, timeout=10.0):
    """Wait until `count` log lines match `pattern`; return them. Polls the
    collected lines like ServerProcess.wait_for_log, within a deadline."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        found = [line for line in server.lines[:] if regex.search(line)]
        if len(found) >= count or time.monotonic() >= deadline or not server.alive():
            break
        time.sleep(0.02)
    assert len(found) >= count, 'expected %d lines matching %r:\n%s' % (
        count, pattern, server.log())
    return found


def part_files(directory):
    """Temporary upload files ('.NAME.XXXX.part') left in `directory`."""
    return sorted(n for n in os.listdir(directory) if n.startswith('.') and n.endswith('.part'))


def drain(sock, limit=1000):
    """Read whatever is queued on `sock` right now (no waiting)."""
    out = []
    for _ in range(limit):
        ready, _, _ = select.select([sock], [], [], 0)
        if not ready:
            break
        out.append(sock.recvfrom(70000))
    return out


def opcode_of(datagram):
    return struct.unpack('!H', datagram[:2])[0] if len(datagram) >= 2 else None


def raw_request(opcode, *fields):
    """An RRQ/WRQ built from raw byte fields, each followed by a NUL."""
    return struct.pack('!H', opcode) + b''.join(f + b'\0' for f in fields)

