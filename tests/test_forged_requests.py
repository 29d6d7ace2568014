"""Requests from sources that never answer (issue "Hostile network, round 2",
item 1 and amplification). A forged RRQ must not hold a --maxthread slot
for long nor make the server send much: until its first ACK a client gets
the first reply and one resend, on a timer of at most --retry-timeout, no
final ERROR, and its transfer makes way for a new request when every slot
is taken. A port-unreachable ICMP error ends such a transfer at once."""

import socket
import time

import clients
from conftest import RawClient
from test_generator_limits import client_from

import atftpd

FORGED = 12
MAXTHREAD = 10


def silent_sources(count):
    """Sockets on 127.0.0.x that send one RRQ each and never read or answer:
    a forged source as the server sees it (no ACK, and no ICMP error since
    the port exists)."""
    socks = []
    for index in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(('127.0.0.%d' % (2 + index % 200), 0))
        socks.append(sock)
    return socks


def datagrams_waiting(sock):
    count = 0
    sock.setblocking(False)
    while True:
        try:
            sock.recv(70000)
        except BlockingIOError:
            return count
        count += 1


def test_forged_requests_asking_long_timeouts_do_not_lock_out_a_real_client(start_server,
                                                                           tmp_path):
    clients.require('busybox')
    server = start_server('--maxthread', str(MAXTHREAD), '--verbose=6')
    request = atftpd.encode_request(atftpd.OP_RRQ, 'random.bin', 'octet', [('timeout', '255')])
    forged = silent_sources(FORGED)
    try:
        for sock in forged:
            sock.sendto(request, (server.host, server.port))
        # Every slot is taken by a source that never answers; a real client
        # (busybox retransmits its request) is served while they sit there.
        started = time.monotonic()
        result = clients.fetch('busybox', server.host, server.port, 'small.txt',
                               tmp_path / 'small.txt', timeout_s=60)
        print('\nforged lockout: %d silent sources at --maxthread %d; busybox served in %.1f s'
              % (FORGED, MAXTHREAD, time.monotonic() - started))
        assert result.returncode == 0, result.stderr
        assert (tmp_path / 'small.txt').read_bytes() == b'hello, tftp\n'
        server.wait_for_log(r'dropped: no answer from the client, slot given to a new request')
    finally:
        for sock in forged:
            sock.close()


def test_a_forged_request_costs_two_datagrams(start_server):
    server = start_server('--retry-timeout', '1')
    (sock,) = silent_sources(1)
    with sock:
        sock.sendto(atftpd.encode_request(atftpd.OP_RRQ, 'random.bin', 'octet', []),
                    (server.host, server.port))
        server.wait_for_log(r'failed sending random\.bin .*timeout \(no answer from the client\)',
                            timeout=10)
        time.sleep(0.2)     # anything still in flight on loopback has arrived
        assert datagrams_waiting(sock) == 2     # block 1 and one resend, no ERROR


def test_port_unreachable_ends_an_unanswered_transfer_at_once(start_server):
    server = start_server('--retry-timeout', '5')
    with RawClient(server.host, server.port) as client:
        client.rrq('random.bin')
    # The client's port is closed: our DATA 1 draws an ICMP port unreachable.
    server.wait_for_log(r'failed sending random\.bin .*client unreachable \(ICMP error\)',
                        timeout=4)
    with RawClient(server.host, server.port) as client:
        assert client.download('small.txt')[0] == b'hello, tftp\n'


def test_icmp_about_a_stranger_leaves_the_transfer_alone(start_server, tftp_root):
    server = start_server()
    expected = (tftp_root / 'random.bin').read_bytes()
    with RawClient(server.host, server.port) as client:
        client.rrq('random.bin')
        opcode, block, payload, tid = client.recv()
        with client_from(server, '127.0.0.3') as stranger:
            stranger.send(atftpd.encode_ack(1), tid)    # draws ERROR 5 to a port soon closed
        data = payload
        client.ack(1)
        while len(payload) == 512:
            opcode, block, payload, _ = client.recv()
            data += payload
            client.ack(block)
        assert data == expected
    server.wait_for_log(r'sent random\.bin to ')


def test_empty_mode_is_refused():
    try:
        atftpd.parse_request(b'\x00\x01f\x00\x00')
    except atftpd.PacketError as exc:
        assert (exc.code, exc.message) == (atftpd.ERR_ILLEGAL_OP, 'Empty mode')
    else:
        raise AssertionError('an empty mode was accepted')


def test_sigterm_does_not_start_queued_requests(start_server):
    """Stopping ends the running transfers; the requests queued behind them
    must not be started on the way out (their clients would get block 1,
    then silence)."""
    server = start_server('--maxthread', '1', '--verbose=6')
    with RawClient(server.host, server.port) as running:
        running.rrq('random.bin')
        running.recv()
        running.ack(1)                      # confirmed: it keeps its slot
        queued = [client_from(server, '127.0.0.%d' % (2 + index)) for index in range(3)]
        try:
            for client in queued:
                client.rrq('small.txt')
            server.wait_for_log(r'request queued')
            assert server.stop() == 0
            assert all(client.nothing_for(0.5) for client in queued)
        finally:
            for client in queued:
                client.close()
    assert 'serving small.txt' not in server.log()
