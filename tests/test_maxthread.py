"""--maxthread: requests beyond the limit wait in the server's queue and are
served when a slot frees; every download completes byte for byte."""

import select

import pytest

from wire_helpers import OP_DATA, TftpError, client_for, wait_for_log_count

OP_ERROR = 5


class LockstepDownload:
    """One lock-step download driven from outside (select over many)."""

    def __init__(self, client, name):
        self.client = client
        self.name = name
        self.chunks = []
        self.expected = 1
        self.done = False

    def start(self):
        self.client.rrq(self.name)

    def on_readable(self):
        opcode, number, payload, _ = self.client.recv(0)
        if opcode == OP_ERROR:
            raise TftpError(number, payload.rstrip(b'\0').decode('latin-1'))
        assert opcode == OP_DATA, opcode
        if number == (self.expected - 1) & 0xFFFF and self.expected > 1:
            return                                  # a resend of what we have
        assert number == self.expected & 0xFFFF, (number, self.expected)
        self.chunks.append(payload)
        self.client.ack(self.expected)
        self.expected += 1
        if len(payload) < 512:
            self.done = True

    @property
    def data(self):
        return b''.join(self.chunks)


def run_round_robin(downloads, max_events):
    """Service every download from this one thread until all are done."""
    by_sock = {d.client.sock: d for d in downloads}
    for _ in range(max_events):
        pending = [s for s, d in by_sock.items() if not d.done]
        if not pending:
            return
        ready, _, _ = select.select(pending, [], [], 10)
        assert ready, 'no download made progress for 10 s'
        for sock in ready:
            by_sock[sock].on_readable()
    raise AssertionError('too many events')


@pytest.mark.parametrize('count', [6])
def test_maxthread_queues_excess_requests_and_serves_all_rfc1350(start_server, tftp_root, count):
    server = start_server('--maxthread', '2', '--verbose=6')
    expected = (tftp_root / 'random.bin').read_bytes()
    clients = [client_for(server) for _ in range(count)]
    try:
        downloads = [LockstepDownload(c, 'random.bin') for c in clients]
        for d in downloads:
            d.start()
        # All requests are in: two are served, the others wait in the queue.
        wait_for_log_count(server, r'request queued', count - 2)
        ready, _, _ = select.select([c.sock for c in clients], [], [], 0.3)
        assert len(ready) == 2                      # nobody ACKed: no slot is free yet
        run_round_robin(downloads, max_events=count * (len(expected) // 512 + 2) * 3)
        for d in downloads:
            assert d.done and d.data == expected
        wait_for_log_count(server, r'sent random\.bin to ', count)
        assert sum('request queued' in line for line in server.lines) == count - 2
        assert sum('sent random.bin to ' in line for line in server.lines) == count
        assert server.alive()
    finally:
        for c in clients:
            c.close()


def test_maxthread_1_serves_requests_one_after_another_rfc1350(start_server, tftp_root):
    server = start_server('--maxthread', '1', '--verbose=6')
    expected = {name: (tftp_root / name).read_bytes()
                for name in ('random.bin', 'exact1024', 'small.txt')}
    clients = [client_for(server) for _ in expected]
    try:
        downloads = [LockstepDownload(c, name) for c, name in zip(clients, expected)]
        for d in downloads:
            d.start()
        server.wait_for_log(r'request queued')
        run_round_robin(downloads, max_events=3000)
        for d in downloads:
            assert d.data == expected[d.name]
    finally:
        for c in clients:
            c.close()


def test_queued_request_retransmitted_is_served_once_rfc1350(start_server, tftp_root):
    server = start_server('--maxthread', '1', '--verbose=6')
    with client_for(server) as first, client_for(server) as second:
        first.rrq('exact1024')
        assert first.recv()[:2] == (OP_DATA, 1)
        second.rrq('small.txt')
        server.wait_for_log(r'request queued')
        second.rrq('small.txt')                     # the client retransmits its RRQ
        second.rrq('small.txt')
        assert second.nothing_for(0.3)              # still waiting for the slot
        first.ack(1)
        assert first.recv()[:2] == (OP_DATA, 2)
        first.ack(2)
        assert first.recv()[:3] == (OP_DATA, 3, b'')
        first.ack(3)
        assert second.recv()[:3] == (OP_DATA, 1, b'hello, tftp\n')
        second.ack(1)
        assert second.nothing_for(0.3)              # served once, not three times
    assert sum('request queued' in line for line in server.lines) == 1
