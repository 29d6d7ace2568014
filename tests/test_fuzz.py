"""A datagram fuzzer against the live server, while real clients transfer.

Tens of thousands of MUTATED valid datagrams (RRQ, WRQ, ACK, DATA, ERROR,
OACK: bit flips, truncation, extension, opcode swaps, option garbage,
splices, NUL games, block numbers) go to the listening port, to every live
transfer port (from strangers), and to transfers the fuzzer opened itself
(from their own peer, i.e. with the right TID). Meanwhile atftp and curl
download and upload files over and over. Afterwards:

  * every real-client transfer completed byte for byte;
  * the server is alive, logged no internal error, and still serves;
  * no transfer is left: its own log accounts for every transfer it began,
    /proc/PID/fd is back to what it was before, no '.part' file remains;
  * nothing outside the upload directory changed.

Bounded: ATFTPD_FUZZ_DATAGRAMS datagrams (default 40000) or
ATFTPD_FUZZ_SECONDS seconds of fuzzing (default 60), whichever comes first.
The seed is ATFTPD_FUZZ_SEED (default 1009) and is printed with the figures:

    python3 -m pytest -q tests/test_fuzz.py -s
"""

import os
import random
import select
import signal
import socket
import threading
import time

import clients
from hostile_support import (OP_ACK, OP_DATA, OP_ERROR, OP_OACK, OP_RRQ, OP_WRQ, LogAccount,
                             Mutator, ack, data, error, fd_targets, part_files_under, request,
                             rss_kib, tree_snapshot, udp_ports, valid_corpus, wait_for_fd_baseline,
                             wait_until)

SEED = int(os.environ.get('ATFTPD_FUZZ_SEED', '1009'))
DATAGRAMS = int(os.environ.get('ATFTPD_FUZZ_DATAGRAMS', '40000'))
MAX_SECONDS = float(os.environ.get('ATFTPD_FUZZ_SECONDS', '60'))
RATE = float(os.environ.get('ATFTPD_FUZZ_RATE', '2000'))     # datagrams per second
RECLAIM_SECONDS = 30        # --retry-timeout 1: a transfer gives up after ~6 s


def make_root(tmp_path):
    rng = random.Random(SEED)
    root = tmp_path / 'fuzzroot'
    root.mkdir()
    (root / 'big.bin').write_bytes(rng.randbytes(1 << 20))
    (root / 'random.bin').write_bytes(rng.randbytes(300000))
    (root / 'small.txt').write_bytes(b'hello, tftp\n')
    (root / 'text.txt').write_bytes(b'line one\nline two\r\nbare cr\r end\n' * 50)
    (root / 'empty').write_bytes(b'')
    (root / 'sub').mkdir()
    (root / 'sub' / 'inner.txt').write_bytes(b'inner file\n')
    (root / 'incoming').mkdir()
    (root / 'upload.src').write_bytes(rng.randbytes(200000))
    return root


class RealClients(threading.Thread):
    """atftp and curl, downloading (and uploading) in turn until told to
    stop; every result is checked byte for byte."""

    PLAN = [('atftp', 'get', {}), ('curl', 'get', {'blksize': 1428}),
            ('atftp', 'get', {'blksize': 1428, 'windowsize': 8}), ('curl', 'get', {'tsize': True}),
            ('atftp', 'get', {'blksize': 1024, 'windowsize': 64, 'tsize': True}),
            ('atftp', 'put', {}), ('curl', 'put', {'blksize': 1428})]

    def __init__(self, server, root, workdir, limit=500):
        threading.Thread.__init__(self, daemon=True)
        self.server, self.root, self.workdir, self.limit = server, root, workdir, limit
        self.stop = threading.Event()
        self.completed = 0
        self.bytes_verified = 0
        self.failures = []
        self.expected = (root / 'big.bin').read_bytes()
        self.upload = (root / 'upload.src').read_bytes()

    def run(self):
        for count in range(self.limit):
            if self.stop.is_set():
                return
            client, verb, options = self.PLAN[count % len(self.PLAN)]
            local = self.workdir / ('real-%d' % count)
            if verb == 'get':
                cp = clients.fetch(client, self.server.host, self.server.port, 'big.bin', local,
                                   timeout_s=90, **options)
                got = local.read_bytes() if local.exists() else b''
                expected = self.expected
            else:
                remote = 'incoming/real-%d' % count
                cp = clients.upload(client, self.server.host, self.server.port,
                                    self.root / 'upload.src', remote, timeout_s=90, **options)
                target = self.root / remote
                got = target.read_bytes() if target.exists() else b''
                expected = self.upload
            if cp.returncode == 0 and got == expected:
                self.completed += 1
                self.bytes_verified += len(got)
            else:
                self.failures.append('%s %s %s: rc %d, %d bytes (%s); %s' % (
                    client, verb, options, cp.returncode, len(got),
                    'identical' if got == expected else 'DIFFERENT', cp.stderr.strip()[-300:]))
            if local.exists():
                local.unlink()


class Fuzzer:
    """Sends mutated datagrams on three paths and drains every reply."""

    def __init__(self, server, seed):
        self.server = server
        self.addr = (server.host, server.port)
        names = [b'big.bin', b'random.bin', b'small.txt', b'text.txt', b'empty',
                 b'sub/inner.txt', b'nosuch', b'/big.bin', b'..\\x']
        uploads = [b'incoming/fz%d' % i for i in range(4)]
        self.mutator = Mutator(seed, valid_corpus(names, uploads))
        self.rng = random.Random(seed + 1)
        self.pool = [self._socket() for _ in range(64)]         # listener fuzzing
        self.strangers = [self._socket() for _ in range(16)]    # TID fuzzing
        self.owned = []                                         # [[sock, tid, kind, first]]
        self.retired = []                                       # silent owned sockets
        self.counts = {'listener': 0, 'stranger': 0, 'owned': 0, 'owned transfers': 0,
                       'replies': 0, 'reply ERROR': 0, 'reply DATA': 0, 'reply OACK': 0,
                       'reply ACK': 0, 'ERROR 5 to strangers': 0}
        self.ports = set()

    def _socket(self):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((self.server.host, 0))
        sock.setblocking(False)
        return sock

    def total(self):
        return self.counts['listener'] + self.counts['stranger'] + self.counts['owned']

    def send(self, sock, datagram, addr, path):
        try:
            sock.sendto(datagram, addr)
            self.counts[path] += 1
        except OSError:
            pass        # e.g. ECONNREFUSED from a transfer port that just closed

    def drain(self, wait=0.0):
        socks = self.pool + self.strangers + self.retired + [entry[0] for entry in self.owned]
        ready, _, _ = select.select(socks, [], [], wait)
        strangers = set(self.strangers)
        for sock in ready:
            for _ in range(64):
                try:
                    reply, _addr = sock.recvfrom(70000)
                except (BlockingIOError, OSError):
                    break
                self.counts['replies'] += 1
                opcode = reply[1] if len(reply) >= 2 else None
                name = {OP_ERROR: 'reply ERROR', OP_DATA: 'reply DATA', OP_OACK: 'reply OACK',
                        OP_ACK: 'reply ACK'}.get(opcode)
                if name:
                    self.counts[name] += 1
                if sock in strangers and opcode == OP_ERROR and reply[2:4] == b'\x00\x05':
                    self.counts['ERROR 5 to strangers'] += 1

    def refresh_ports(self):
        try:
            self.ports = udp_ports(self.server.pid) - {self.server.port}
        except OSError:
            pass

    def listener_round(self, count):
        for _ in range(count):
            self.send(self.rng.choice(self.pool), self.mutator.mutate(), self.addr, 'listener')

    def stranger_round(self, count):
        if not self.ports:
            return
        ports = sorted(self.ports)
        for _ in range(count):
            port = self.rng.choice(ports)
            seed = self.rng.choice([ack(self.rng.randrange(4)), data(1, b'z' * 512),
                                    error(0), request(OP_RRQ, b'big.bin')])
            self.send(self.rng.choice(self.strangers), self.mutator.mutate(seed),
                      (self.server.host, port), 'stranger')

    def open_owned(self):
        """A transfer of our own: a valid request, then (later) mutations
        from the same port, i.e. with the transfer's real TID."""
        if len(self.owned) >= 24:
            # It vanishes mid-transfer: silent from now on, but its socket
            # stays bound until the end, so that a real client can never be
            # given the same port while the server still serves the old one.
            self.retired.append(self.owned.pop(0)[0])
        sock = self._socket()
        if self.rng.random() < 0.25:
            kind = 'put'
            datagram = request(OP_WRQ, b'incoming/owned-%d' % self.counts['owned transfers'],
                               b'octet', self.rng.choice([(), ((b'blksize', b'600'),)]))
        else:
            kind = 'get'
            name = self.rng.choice([b'big.bin', b'random.bin', b'text.txt', b'small.txt'])
            options = self.rng.choice([(), ((b'blksize', b'1024'), (b'windowsize', b'8')),
                                       ((b'tsize', b'0'),)])
            datagram = request(OP_RRQ, name, self.rng.choice([b'octet', b'netascii']), options)
        self.send(sock, datagram, self.addr, 'owned')
        ready, _, _ = select.select([sock], [], [], 0.5)
        if not ready:
            sock.close()
            return
        try:
            first, tid = sock.recvfrom(70000)
        except OSError:
            sock.close()
            return
        self.counts['owned transfers'] += 1
        self.owned.append([sock, tid, kind, first])

    def owned_round(self, count):
        if not self.owned:
            return
        for _ in range(count):
            sock, tid, kind, _first = self.rng.choice(self.owned)
            if kind == 'get':
                seed = self.rng.choice([ack(0), ack(1), ack(2), ack(self.rng.randrange(70)),
                                        error(0, b'bye'), error(8)])
            else:
                block = self.rng.randrange(1, 6)
                seed = self.rng.choice([data(block, b'd' * 512), data(block, b'short'),
                                        error(0), ack(0)])
            self.send(sock, self.mutator.mutate(seed), tid, 'owned')

    def close(self):
        for sock in self.pool + self.strangers + self.retired + [e[0] for e in self.owned]:
            sock.close()
        self.owned, self.retired = [], []


def test_fuzz_live_server_while_real_clients_transfer(start_server, tmp_path):
    for name in ('atftp', 'curl'):
        clients.require(name)
    root = make_root(tmp_path)
    workdir = tmp_path / 'work'
    workdir.mkdir()
    # --no-timeout: a fuzzed 'timeout 9' is a valid RFC 2349 request that an
    # abandoned transfer then honours (6 x 9 s before it gives up; 'timeout
    # 255' would be 25 minutes). The reclaim check needs --retry-timeout 1
    # to be the bound. --maxthread 2000: no fuzzed request waits in the queue.
    server = start_server('--verbose=6', '--retry-timeout', '1', '--no-timeout',
                          '--maxthread', '2000', '--allow-create', root=root)
    baseline = fd_targets(server.pid)
    outside_uploads = {k: v for k, v in tree_snapshot(root).items()
                       if not k.startswith('incoming')}
    rss_before = rss_kib(server.pid)
    rss_peak = rss_before

    real = RealClients(server, root, workdir)
    fuzzer = Fuzzer(server, SEED)
    started = time.monotonic()
    real.start()
    try:
        rounds = 0
        while fuzzer.total() < DATAGRAMS and time.monotonic() - started < MAX_SECONDS:
            rounds += 1
            if rounds % 5 == 0:
                fuzzer.refresh_ports()
                rss_peak = max(rss_peak, rss_kib(server.pid))
            if rounds % 3 == 0:
                fuzzer.open_owned()
            fuzzer.listener_round(60)
            fuzzer.stranger_round(30)
            fuzzer.owned_round(12)
            # Paced, so that the fuzzing lasts while real transfers come and go.
            due = started + fuzzer.total() / RATE
            for _ in range(100):
                fuzzer.drain(max(0.0, min(0.02, due - time.monotonic())))
                if time.monotonic() >= due:
                    break
            if not server.alive():
                break
        fuzz_seconds = time.monotonic() - started
        real.stop.set()
        real.join(120)
        for _ in range(20):
            fuzzer.drain(0.05)
    finally:
        real.stop.set()
        fuzzer.close()

    alive = server.alive()
    # Every abandoned transfer gives up after its timeout: fds and the log agree.
    leaked = wait_for_fd_baseline(server, baseline, RECLAIM_SECONDS) if alive else {}
    wait_until(lambda: not LogAccount(server.lines).still_open(), 5)
    account = LogAccount(server.lines)
    still_open = account.still_open()
    parts = part_files_under(root)
    changed = {k for k, v in tree_snapshot(root).items()
               if not k.startswith('incoming') and outside_uploads.get(k) != v}
    changed |= set(outside_uploads) - {k for k in tree_snapshot(root)}
    if alive:
        server.proc.send_signal(signal.SIGUSR1)
        stats_line = server.wait_for_log(r'stats: ')
        final_ok = clients.fetch('curl', server.host, server.port, 'big.bin',
                                 workdir / 'final', timeout_s=30)
        final_good = (final_ok.returncode == 0
                      and (workdir / 'final').read_bytes() == real.expected)
    else:
        stats_line, final_good = 'server dead', False

    failures = (len(real.failures) + len(account.internal_errors) + (0 if alive else 1)
                + len(leaked) + sum(still_open.values()) + len(parts) + len(changed)
                + (0 if final_good else 1))
    print('\n=== atftpd.py fuzz figures (seed %d) ===' % SEED)
    print('datagrams tried: %d (listener %d, live transfer ports as a stranger %d, own '
          'transfers with the right TID %d) in %.1f s' % (
              fuzzer.total(), fuzzer.counts['listener'], fuzzer.counts['stranger'],
              fuzzer.counts['owned'], fuzz_seconds))
    print('mutations applied: %s' % ', '.join('%s %d' % kv for kv in
                                             sorted(fuzzer.mutator.kinds.items())))
    print('replies: %d (ERROR %d, of which ERROR 5 to strangers %d; DATA %d; OACK %d; '
          'ACK %d)' % (fuzzer.counts['replies'], fuzzer.counts['reply ERROR'],
                       fuzzer.counts['ERROR 5 to strangers'], fuzzer.counts['reply DATA'],
                       fuzzer.counts['reply OACK'], fuzzer.counts['reply ACK']))
    print('fuzzer-owned transfers opened and abandoned: %d' % fuzzer.counts['owned transfers'])
    print('server transfers begun/ended (its log): %d/%d, %d ended by timeout' % (
        account.started(), account.ended(), account.timeouts))
    print('real-client transfers completed: %d, bytes verified: %d, failures: %d' % (
        real.completed, real.bytes_verified, len(real.failures)))
    print('server: alive %s, internal errors %d, VmRSS %d -> peak %d KiB, fds %d before, '
          '%d leaked, %d transfers still open, %d .part files, %d files changed' % (
              alive, len(account.internal_errors), rss_before, rss_peak, len(baseline),
              len(leaked), sum(still_open.values()), len(parts), len(changed)))
    print('server %s' % stats_line.split('atftpd', 1)[-1])
    print('failures: %d' % failures)

    assert alive, 'server died:\n' + '\n'.join(server.lines[-30:])
    assert not real.failures, '\n'.join(real.failures)
    assert real.completed > 0
    assert not account.internal_errors, '\n'.join(account.internal_errors[:10])
    assert not leaked, 'descriptors not released: %s' % leaked
    assert not still_open, 'transfers never ended: %s\n%s' % (still_open, '\n'.join(
        line for line in server.lines if any(c + ':' in line or line.endswith(c)
                                             for c in still_open)))
    assert not parts, parts
    assert not changed, 'files outside incoming/ changed: %s' % sorted(changed)
    assert final_good, final_ok.stderr


def test_non_ascii_digit_option_does_not_strand_a_transfer(start_server, tftp_root):
    """Latin-1 b'\\xb2' is '²', for which str.isdigit() is true and int()
    fails. Such an option value must be ignored like any other invalid one
    (README: 'the default applies'), not leave a transfer that never
    answers, never times out and keeps its descriptors and its slot."""
    (tftp_root / 'incoming').mkdir()
    server = start_server('--retry-timeout', '1', '--allow-create', '--maxthread', '2')
    baseline = fd_targets(server.pid)
    replies = []
    socks = []
    try:
        for opcode, name, option in ((OP_RRQ, b'small.txt', (b'blksize', b'\xb2')),
                                     (OP_RRQ, b'small.txt', (b'windowsize', b'1\xb2')),
                                     (OP_WRQ, b'incoming/up', (b'tsize', b'\xb9'))):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((server.host, 0))
            socks.append(sock)
            sock.sendto(request(opcode, name, b'octet', [option]), (server.host, server.port))
            ready, _, _ = select.select([sock], [], [], 2)
            if not ready:
                replies.append(None)
                continue
            reply, tid = sock.recvfrom(1000)
            replies.append(reply[:4])
            if opcode == OP_RRQ:
                sock.sendto(ack(1), tid)            # small.txt is one block: done
    finally:
        for sock in socks:
            sock.close()
    leaked = wait_for_fd_baseline(server, baseline, 10)
    errors = [line for line in server.lines if 'internal error' in line]
    assert not errors and not leaked and not part_files_under(tftp_root), (
        'replies %r; internal errors %r; descriptors held: %r; .part files: %r'
        % (replies, errors, leaked, part_files_under(tftp_root)))
    assert replies[0] == data(1, b'')[:4] and replies[1] == data(1, b'')[:4], replies
    assert replies[2] == ack(0), replies
