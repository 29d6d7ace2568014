"""Floods and resource exhaustion on loopback, against the real server:

  * RRQs from thousands of source ports (bounded), while a well-behaved
    client downloads;
  * requests for a huge sparse file up to --maxthread, with the biggest
    windows, and a client queued behind them;
  * slow-loris clients (one ACKing just often enough, one ACKing far too
    late), clients that vanish mid-transfer (reads, windows, netascii,
    OACKs never acknowledged, uploads);
  * a descriptor limit of 32 (prlimit), with reads, uploads and the content
    generator asking for more than that.

In every case: the well-behaved client's download completes byte for byte,
VmRSS stays bounded, the server stays up, and every abandoned transfer is
reclaimed after its timeout (--retry-timeout 1: 6 tries, then 'failed ...
timeout' in the log, its descriptors closed). Every loop is bounded in count
and in time; the figures are printed (-s).
"""

import os
import random
import resource
import select
import shutil
import signal
import socket
import struct
import sys
import threading
import time

import clients
import conftest
from conftest import IS_ROOT, ServerProcess
from hostile_support import (OP_DATA, OP_ERROR, OP_RRQ, OP_WRQ, LogAccount,
                             PeerFailure, ack, data, error, fd_targets, part_files_under,
                             reference_get, request, rss_kib, wait_for_fd_baseline, wait_until)

RECLAIM = 30                # seconds: with --retry-timeout 1 a transfer gives up in ~6 s
MIB = 1024 * 1024


def raise_fd_limit(wanted):
    """Raise this process's soft descriptor limit towards `wanted`; return
    how many descriptors we may use."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def udp_socket(host='127.0.0.1'):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    return sock


def recv(sock, timeout):
    """(datagram, addr) or (None, None) after `timeout` seconds."""
    ready, _, _ = select.select([sock], [], [], timeout)
    if not ready:
        return None, None
    try:
        return sock.recvfrom(70000)
    except OSError:
        return None, None


class Sampler(threading.Thread):
    """Samples the server's VmRSS and descriptor count until stopped (bounded)."""

    def __init__(self, pid, interval=0.05, limit=20000):
        threading.Thread.__init__(self, daemon=True)
        self.pid, self.interval, self.limit = pid, interval, limit
        self.rss, self.fds = [], []
        self.stop = threading.Event()

    def run(self):
        for _ in range(self.limit):
            if self.stop.wait(self.interval):
                return
            try:
                self.rss.append(rss_kib(self.pid))
                self.fds.append(len(os.listdir('/proc/%d/fd' % self.pid)))
            except (OSError, AssertionError):
                return

    def finish(self):
        self.stop.set()
        self.join(5)
        return (max(self.rss) if self.rss else 0), (max(self.fds) if self.fds else 0)


class Downloader(threading.Thread):
    """A well-behaved client: reference downloads, one after another, each
    checked byte for byte, until stopped (bounded in count)."""

    def __init__(self, server, name, expected, options=(), limit=200):
        threading.Thread.__init__(self, daemon=True)
        self.server, self.name, self.expected, self.options = server, name, expected, options
        self.limit = limit
        self.stop = threading.Event()
        self.completed, self.failures = 0, []

    def run(self):
        for _ in range(self.limit):
            if self.stop.is_set():
                return
            try:
                got, _stats = reference_get((self.server.host, self.server.port), self.name,
                                            self.options, timeout=1.0, retries=40,
                                            max_seconds=90)
            except PeerFailure as exc:
                self.failures.append(str(exc))
                continue
            if got == self.expected:
                self.completed += 1
            else:
                self.failures.append('wrong bytes: %d of %d' % (len(got), len(self.expected)))

    def finish(self):
        self.stop.set()
        self.join(120)


def reclaimed(server, baseline):
    """Wait for every transfer to end; return (leaked fds, still-open transfers)."""
    leaked = wait_for_fd_baseline(server, baseline, RECLAIM)
    wait_until(lambda: not LogAccount(server.lines).still_open(), 5)
    return leaked, LogAccount(server.lines).still_open()


def assert_clean(server, baseline, root=None):
    leaked, still_open = reclaimed(server, baseline)
    account = LogAccount(server.lines)
    assert server.alive()
    assert not account.internal_errors, account.internal_errors[:5]
    assert not leaked, 'descriptors not released: %s' % leaked
    assert not still_open, 'transfers never ended: %s' % still_open
    if root is not None:
        assert not part_files_under(root), part_files_under(root)
    return account


# -- RRQ flood from thousands of source ports -------------------------------------

def test_rrq_flood_from_thousands_of_ports_good_client_served_memory_bounded(
        start_server, tftp_root):
    ports = min(3000, raise_fd_limit(4096) - 400)
    assert ports >= 500, 'too few descriptors for a meaningful flood'
    rng = random.Random(4242)
    big = rng.randbytes(MIB)
    (tftp_root / 'big.bin').write_bytes(big)
    server = start_server('--verbose=6', '--retry-timeout', '1')
    baseline = fd_targets(server.pid)
    rss_before = rss_kib(server.pid)
    sampler = Sampler(server.pid)
    good = Downloader(server, 'big.bin', big, options=[('blksize', '1428')])
    sampler.start()
    good.start()
    flood = []
    kinds = {'valid': 0, 'missing': 0, 'garbage': 0}
    try:
        # Every flooder asks once and is never heard from again. Their sockets
        # stay open (silent) so that no later client is handed the same port.
        for i in range(ports):
            sock = udp_socket()
            sock.setblocking(False)
            flood.append(sock)
            roll = rng.random()
            if roll < 0.6:
                kinds['valid'] += 1
                datagram = request(OP_RRQ, rng.choice([b'big.bin', b'random.bin']), b'octet',
                                   rng.choice([(), ((b'blksize', b'1428'),),
                                               ((b'windowsize', b'8'), (b'tsize', b'0'))]))
            elif roll < 0.8:
                kinds['missing'] += 1
                datagram = request(OP_RRQ, b'missing-%d' % i)
            else:
                kinds['garbage'] += 1
                datagram = bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
            sock.sendto(datagram, (server.host, server.port))
            if i % 100 == 99:
                time.sleep(0.05)            # ~2000 requests/s
        # A real client in the middle of it all, too.
        cp = clients.fetch('curl', server.host, server.port, 'big.bin',
                           tftp_root.parent / 'curl.out', blksize=1428, timeout_s=90)
        curl_ok = cp.returncode == 0 and (tftp_root.parent / 'curl.out').read_bytes() == big
        leaked, still_open = reclaimed(server, baseline)
    finally:
        good.finish()
        rss_peak, fds_peak = sampler.finish()
        for sock in flood:
            sock.close()
    account = LogAccount(server.lines)
    queued = sum('request queued' in line for line in server.lines)
    dropped = sum('queue full' in line for line in server.lines)
    print('\nRRQ flood: %d source ports (%s); good client: %d downloads completed, %d '
          'failures; curl %s; server began %d transfers, %d ended by timeout, %d queued, '
          '%d dropped (queue full); VmRSS %d -> peak %d KiB; fds peak %d' % (
              ports, kinds, good.completed, len(good.failures), 'ok' if curl_ok else 'FAILED',
              account.started(), account.timeouts, queued, dropped, rss_before, rss_peak,
              fds_peak))
    assert curl_ok, cp.stderr
    assert good.completed >= 1 and not good.failures, good.failures
    assert not leaked and not still_open, (leaked, still_open)
    assert not account.internal_errors, account.internal_errors[:5]
    # Every flooder that was given a transfer had it reclaimed by timeout.
    assert account.timeouts >= 90, account.timeouts
    assert rss_peak - rss_before < 64 * 1024, (rss_before, rss_peak)
    assert server.alive()


# -- huge sparse files at --maxthread ------------------------------------------------

def hog(server, name, results, index):
    """Ask for the biggest blocks and window (64 x 65464 bytes; the server
    grants 16, the most that fits its 1 MiB per window, and holds that), take
    what arrives of that window, vanish."""
    sock = udp_socket()
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, getattr(socket, 'SO_RCVBUFFORCE', 33), 8 << 20)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sock.sendto(request(OP_RRQ, name, b'octet', [(b'blksize', b'65464'),
                                                    (b'windowsize', b'64'),
                                                    (b'tsize', b'0')]),
                    (server.host, server.port))
        reply, tid = recv(sock, 10)
        if reply is None or reply[:2] != b'\x00\x06':
            results[index] = 'no OACK: %r' % (reply[:20] if reply else None)
            return
        fields = reply[2:].split(b'\0')
        results[index] = {fields[i].decode(): fields[i + 1].decode()
                          for i in range(0, len(fields) - 1, 2)}
        sock.sendto(ack(0), tid)
        blocks = 0
        for _ in range(64):
            reply, _addr = recv(sock, 0.5)
            if reply is None:
                break
            if reply[:2] == b'\x00\x03' and len(reply) == 65468:
                blocks += 1
        results[index]['blocks'] = blocks
        # ... and vanish: the socket stays bound but silent until the end.
        results[index]['sock'] = sock
    except OSError as exc:
        results[index] = 'error %r' % (exc,)


def test_huge_sparse_files_at_maxthread_queue_good_client_memory_bounded(
        start_server, tftp_root):
    huge = tftp_root / 'huge.img'
    with open(str(huge), 'wb') as f:
        f.truncate(64 << 30)                # 64 GiB, sparse: costs no disk
    maxthread = 6
    server = start_server('--verbose=6', '--retry-timeout', '1', '--maxthread', str(maxthread))
    baseline = fd_targets(server.pid)
    rss_before = rss_kib(server.pid)
    sampler = Sampler(server.pid)
    sampler.start()
    results = [None] * maxthread
    threads = [threading.Thread(target=hog, args=(server, b'huge.img', results, i),
                                daemon=True) for i in range(maxthread)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        # All slots are held by silent hogs now: a good client waits in the
        # queue (retransmitting its request) and is served once they are reclaimed.
        expected = (tftp_root / 'random.bin').read_bytes()
        got, stats = reference_get((server.host, server.port), 'random.bin', timeout=1.0,
                                   retries=40, max_seconds=60)
        account_mid = LogAccount(server.lines)
        leaked, still_open = reclaimed(server, baseline)
    finally:
        rss_peak, fds_peak = sampler.finish()
        for item in results:
            if isinstance(item, dict) and 'sock' in item:
                item['sock'].close()
    queued = sum('request queued' in line for line in server.lines)
    granted = [int(r['windowsize']) for r in results if isinstance(r, dict) and 'windowsize' in r]
    window_bytes = max(granted or [64]) * (65464 + 4)
    print('\nhuge files: %d hogs at --maxthread %d got %s blocks of 65464 bytes of their '
          'first window and vanished; good client queued %d time(s), then served (%d timeouts); VmRSS %d -> '
          'peak %d KiB (windows held: %d x %d KiB); fds peak %d' % (
              maxthread, maxthread, [r.get('blocks') if isinstance(r, dict) else r
                                     for r in results], queued, stats['timeouts'], rss_before,
              rss_peak, maxthread, window_bytes // 1024, fds_peak))
    for item in results:
        assert isinstance(item, dict), item
        assert item['tsize'] == str(64 << 30) and item['blksize'] == '65464', item
        assert item['windowsize'] == '16', item          # 16 x 65464 bytes fit in 1 MiB
        assert item['blocks'] >= 1, item
    assert got == expected
    assert queued >= 1
    assert account_mid.timeouts >= maxthread
    assert not leaked and not still_open, (leaked, still_open)
    # Memory: what the windows in flight hold, not the file size (64 GiB each).
    assert rss_peak - rss_before < maxthread * window_bytes // 1024 * 2 + 32 * 1024, (
        rss_before, rss_peak)
    assert server.alive()


# -- slow-loris clients ----------------------------------------------------------------

def loris(server, name, expected, ack_delay, blocks, out):
    """Lock-step download that waits `ack_delay` s before each ACK, for
    `blocks` blocks; records every byte it got and whether the server gave
    up on it ('late'); then goes silent."""
    sock = udp_socket()
    out['sock'] = sock
    out['errors'] = []
    sock.sendto(request(OP_RRQ, name), (server.host, server.port))
    got = b''
    block = 0
    tid = None
    for _ in range(blocks * 10):
        reply, addr = recv(sock, ack_delay + 8)
        if reply is None:
            out['silence'] = True
            break
        tid = tid or addr
        opcode, number = struct.unpack('!HH', reply[:4])
        if opcode == OP_ERROR:
            out['errors'].append((number, reply[4:].rstrip(b'\0')))
            break
        if opcode != OP_DATA or number != block + 1:
            continue                        # a resend of a block we have
        block += 1
        got += reply[4:]
        if block == blocks:
            break
        time.sleep(ack_delay)
        sock.sendto(ack(block), tid)
    out['got'] = got
    out['blocks'] = block
    out['intact'] = got == expected[:len(got)]
    out['tid'] = tid


def test_slow_loris_clients_do_not_starve_a_good_client_and_are_reclaimed(
        start_server, tftp_root):
    server = start_server('--verbose=6', '--retry-timeout', '1', '--maxthread', '4')
    baseline = fd_targets(server.pid)
    expected = (tftp_root / 'random.bin').read_bytes()
    slow = [{} for _ in range(2)]
    late = {}
    # Two ACK every 0.8 s: under the retry timeout, so they keep their slots.
    threads = [threading.Thread(target=loris, args=(server, b'random.bin', expected, 0.8, 10,
                                                    slow[i]), daemon=True) for i in range(2)]
    # One ACKs "once a minute" (here: after 8 s, past the 6 s the server waits).
    threads.append(threading.Thread(target=loris, args=(server, b'random.bin', expected, 8.0,
                                                        2, late), daemon=True))
    try:
        for thread in threads:
            thread.start()
        wait_until(lambda: LogAccount(server.lines).started() >= 3, 10)
        good = []
        for _ in range(3):                  # served throughout, not after the loris
            got, _stats = reference_get((server.host, server.port), 'random.bin',
                                        timeout=1.0, retries=20, max_seconds=60)
            good.append(got == expected)
        for thread in threads:
            thread.join(40)
        late_line = server.wait_for_log(r'failed sending random\.bin to 127\.0\.0\.1:%d: '
                                        r'timeout' % late['sock'].getsockname()[1], 15)
        # Its late ACK reaches a closed port: nothing comes back, nothing restarts.
        if late.get('tid'):
            late['sock'].sendto(ack(1), late['tid'])
            reply, _ = recv(late['sock'], 1.5)
            assert reply is None, reply[:20]
        account = assert_clean(server, baseline)
    finally:
        for item in slow + [late]:
            if 'sock' in item:
                item['sock'].close()
    print('\nslow loris: 2 slow clients took %s blocks (intact %s); the late one got %d '
          'block(s) and %s; good client: %d/%d downloads intact; %d transfers ended by '
          'timeout' % ([s.get('blocks') for s in slow], [s.get('intact') for s in slow],
                       late.get('blocks', 0), 'was reclaimed' if late_line else '?',
                       sum(good), len(good), account.timeouts))
    assert good == [True, True, True]
    for item in slow:
        assert item['blocks'] == 10 and item['intact'] and not item['errors'], item
    assert late['intact']
    assert account.timeouts >= 3


# -- clients that vanish mid-transfer ---------------------------------------------------

def vanish_after(server, kind, index, socks):
    """Start one transfer and walk away at a chosen point; return its socket."""
    sock = udp_socket()
    socks.append(sock)
    addr = (server.host, server.port)
    if kind == 'lockstep':
        sock.sendto(request(OP_RRQ, b'random.bin'), addr)
        for block in range(1, 2 + index % 5):
            reply, tid = recv(sock, 5)
            if reply is None:
                return
            sock.sendto(ack(block), tid)
    elif kind == 'window':
        sock.sendto(request(OP_RRQ, b'random.bin', b'octet', [(b'blksize', b'1024'),
                                                             (b'windowsize', b'16')]), addr)
        reply, tid = recv(sock, 5)
        if reply is not None:
            sock.sendto(ack(0), tid)
            for _ in range(16):
                recv(sock, 2)           # take the first window, never ACK it
    elif kind == 'netascii':
        sock.sendto(request(OP_RRQ, b'long.txt', b'netascii'), addr)
        recv(sock, 5)
    elif kind == 'oack':
        sock.sendto(request(OP_RRQ, b'random.bin', b'octet', [(b'tsize', b'0')]), addr)
        recv(sock, 5)                   # the OACK, never acknowledged
    elif kind == 'upload':
        sock.sendto(request(OP_WRQ, b'incoming/vanished-%d' % index), addr)
        reply, tid = recv(sock, 5)
        if reply is not None:
            for block in range(1, 4):
                sock.sendto(data(block, b'u' * 512), tid)
                recv(sock, 5)
    elif kind == 'upload-silent':
        sock.sendto(request(OP_WRQ, b'incoming/silent-%d' % index), addr)
        recv(sock, 5)                   # ACK 0, and then nothing


def test_clients_vanishing_mid_transfer_are_all_reclaimed(start_server, tftp_root):
    (tftp_root / 'incoming').mkdir()
    (tftp_root / 'long.txt').write_bytes(b'a line of text\n' * 500)
    server = start_server('--verbose=6', '--retry-timeout', '1', '--allow-create')
    baseline = fd_targets(server.pid)
    expected = (tftp_root / 'random.bin').read_bytes()
    plan = ([('lockstep', i) for i in range(10)] + [('window', i) for i in range(10)]
            + [('netascii', i) for i in range(5)] + [('oack', i) for i in range(5)]
            + [('upload', i) for i in range(5)] + [('upload-silent', i) for i in range(5)])
    socks = []
    good = Downloader(server, 'random.bin', expected, limit=50)
    try:
        good.start()
        threads = [threading.Thread(target=vanish_after, args=(server, kind, i, socks),
                                    daemon=True) for kind, i in plan]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        wait_until(lambda: LogAccount(server.lines).timeouts >= len(plan), RECLAIM)
        good.finish()
        assert_clean(server, baseline, tftp_root)
    finally:
        good.finish()
        for sock in socks:
            sock.close()
    # Those that never answered (OACK or upload-silent) end 'timeout (no answer ...)'.
    timed_out = [line for line in server.lines
                 if ': timeout;' in line or ': timeout (no answer from the client);' in line]
    read_timeouts = sum(1 for line in timed_out if 'failed sending' in line)
    write_timeouts = sum(1 for line in timed_out if 'failed receiving' in line)
    print('\nvanishing clients: %d abandoned (%d reads, %d uploads); reclaimed by timeout: '
          '%d reads, %d uploads; good client: %d downloads intact, %d failures' % (
              len(plan), 30, 10, read_timeouts, write_timeouts, good.completed,
              len(good.failures)))
    assert read_timeouts == 30 and write_timeouts == 10, server.log()[-3000:]
    assert os.listdir(str(tftp_root / 'incoming')) == []     # nothing under a final name
    assert good.completed >= 1 and not good.failures, good.failures


# -- descriptor exhaustion --------------------------------------------------------------

GENERATOR = os.path.join(conftest.PROJECT, 'generators', 'content-generator.sh')
NOFILE = 32


def start_limited(root, extra=()):
    argv = ['prlimit', '--nofile=%d:%d' % (NOFILE, NOFILE), sys.executable, conftest.SERVER,
            '--logfile', '-', '--daemon', '--no-fork', '--port', '0',
            '--bind-address', '127.0.0.1']
    argv += (['--user', 'root.root'] if IS_ROOT else [])
    argv += ['--verbose=6', '--allow-create', '--content-generator', GENERATOR]
    return ServerProcess(root, argv=argv + list(extra) + [str(root)])


def test_descriptor_exhaustion_requests_wait_server_survives_and_recovers(tftp_root):
    """With RLIMIT_NOFILE 32, more transfers than descriptors: the excess
    requests (reads, an upload, a generated file) get nothing or an error
    and are retried by their clients; the server stays up and logs no
    internal error; once the transfers holding the descriptors end, it
    serves reads, uploads and generated files again, without a restart,
    and every transfer is accounted for with no '.part' file left."""
    clients.require('curl')
    assert shutil.which('prlimit'), 'prlimit (util-linux) is needed'
    (tftp_root / 'incoming').mkdir()
    # --retry-timeout 10: the holders keep their descriptors until they let go.
    server = start_limited(tftp_root, ['--retry-timeout', '10', '--generator-cache', '5'])
    holders, probes_socks = [], []
    try:
        with open('/proc/%d/limits' % server.pid) as f:
            assert any(line.startswith('Max open files') and ' %d ' % NOFILE in line
                       for line in f), 'prlimit did not apply'
        baseline = fd_targets(server.pid)
        served, starved = 0, 0
        for _ in range(NOFILE):             # more than can possibly be open
            sock = udp_socket()
            sock.sendto(request(OP_RRQ, b'random.bin'), (server.host, server.port))
            reply, tid = recv(sock, 0.3)
            if reply is not None and reply[:4] == data(1, b'')[:4]:
                served += 1
                holders.append((sock, tid))
            else:
                starved += 1
                holders.append((sock, None))
        fds_full = len(fd_targets(server.pid))
        # Exhausted: an upload, a generated file and a small read.
        probes = {}
        for name, datagram in (('upload', request(OP_WRQ, b'incoming/during')),
                               ('generated', request(OP_RRQ, b'hello/during')),
                               ('read', request(OP_RRQ, b'small.txt'))):
            sock = udp_socket()
            probes_socks.append(sock)
            sock.sendto(datagram, (server.host, server.port))
            reply, tid = recv(sock, 0.5)
            probes[name] = reply[:4] if reply else None
            if reply is not None and tid[1] != server.port:
                sock.sendto(error(0, b'probe done'), tid)       # it fitted: end it
        # Nearly exhausted: one holder lets go, two descriptors are free. The
        # generator's temporary file fits, its output pipe does not.
        sock, tid = [h for h in holders if h[1] is not None][0]
        sock.sendto(error(0, b'done'), tid)
        wait_until(lambda: len(fd_targets(server.pid)) <= fds_full - 2, 5)
        sock = udp_socket()
        probes_socks.append(sock)
        sock.sendto(request(OP_RRQ, b'hello/partial'), (server.host, server.port))
        reply, _ = recv(sock, 1.0)
        probes['generated, 2 fds free'] = reply[:4] if reply else None
        server.proc.send_signal(signal.SIGUSR1)         # needs no descriptor
        server.wait_for_log(r'stats: ')
        assert server.alive()
        # The holders end their transfers: the descriptors come back.
        for sock, tid in holders:
            if tid is not None:
                sock.sendto(error(0, b'done'), tid)
        leaked = wait_for_fd_baseline(server, baseline, 15)
        assert not leaked, leaked
        # Everything works again, without a restart.
        out = tftp_root.parent / 'after.bin'
        cp = clients.fetch('curl', server.host, server.port, 'random.bin', out, timeout_s=30)
        assert cp.returncode == 0 and out.read_bytes() == (tftp_root / 'random.bin').read_bytes()
        cp = clients.upload('curl', server.host, server.port, tftp_root / 'small.txt',
                            'incoming/after', timeout_s=30)
        assert cp.returncode == 0
        assert (tftp_root / 'incoming' / 'after').read_bytes() == b'hello, tftp\n'
        # A starved client retransmitting its request is now served.
        for sock, _tid in [h for h in holders if h[1] is None][:3]:
            sock.sendto(request(OP_RRQ, b'small.txt'), (server.host, server.port))
            reply, tid = recv(sock, 3)
            assert reply == data(1, b'hello, tftp\n'), reply
            sock.sendto(ack(1), tid)
        # The generated file asked for while descriptors were short, asked for
        # again from the same address (a client retransmitting its request, a
        # UEFI size probe and then the transfer) within --generator-cache.
        generated = tftp_root.parent / 'generated'
        cp_gen = clients.fetch('curl', server.host, server.port, 'hello/partial', generated,
                               timeout_s=30)
        generated_ok = cp_gen.returncode == 0 and generated.read_bytes().startswith(b'Hello ')
        account = assert_clean(server, baseline, tftp_root)
        print('\ndescriptor limit %d: %d reads served, %d starved (server at %d fds); during '
              'exhaustion: %s; after: read, upload, starved clients ok; generated file %s; '
              'internal errors %d' % (
                  NOFILE, served, starved, fds_full, probes,
                  'ok' if generated_ok else 'NOT SERVED', len(account.internal_errors)))
        assert served >= 5 and starved >= 5, (served, starved)
        assert generated_ok, (
            'a generated file asked for while descriptors were short (the generator could '
            'not start: EMFILE) is refused as "File not found", and that answer is cached: '
            'still refused after recovery (curl rc %d):\n%s' % (cp_gen.returncode, '\n'.join(
                line for line in server.lines if 'generator' in line or 'hello/' in line)))
    finally:
        for sock, _tid in holders:
            sock.close()
        for sock in probes_socks:
            sock.close()
        if server.alive():
            assert server.stop() == 0


def test_storm_of_generated_names_under_a_descriptor_limit_has_no_internal_error(tftp_root):
    """400 clients ask distinct generated names at once, the server at 200
    descriptors and --maxthread 50: transfers that cannot get a socket or a
    generator end one by one (no transfer ends another from deep inside its
    own call stack: that recursed until RecursionError). A client is told
    "not found" or an ERROR only for a reason about its file; a request
    that failed for want of descriptors gets no answer, so it asks again."""
    clients.require('curl')
    assert raise_fd_limit(1024) >= 600
    argv = ['prlimit', '--nofile=200:200', sys.executable, conftest.SERVER,
            '--logfile', '-', '--daemon', '--no-fork', '--port', '0', '--bind-address',
            '127.0.0.1', '--verbose=6', '--maxthread', '50', '--content-generator', GENERATOR]
    argv += (['--user', 'root.root'] if IS_ROOT else [])
    server = ServerProcess(tftp_root, argv=argv + [str(tftp_root)])
    socks = [udp_socket() for _ in range(400)]
    replies = {'data': 0, 'error': 0, 'none': 0}
    try:
        for index, sock in enumerate(socks):
            sock.sendto(request(OP_RRQ, b'hello/storm-%d' % index), (server.host, server.port))
        deadline = time.monotonic() + 30
        for sock in socks:
            reply, _tid = recv(sock, max(0.05, deadline - time.monotonic()))
            kind = 'none' if reply is None else 'data' if reply[:2] == b'\x00\x03' else 'error'
            replies[kind] += 1
        account = LogAccount(server.lines)
        out = tftp_root.parent / 'after.txt'
        cp = clients.fetch('curl', server.host, server.port, 'hello/after', out, timeout_s=60)
        print('\nstorm of 400 generated names at 200 fds, --maxthread 50: %s; internal '
              'errors %d' % (replies, len(account.internal_errors)))
        assert not account.internal_errors, account.internal_errors[:3]
        assert replies['error'] == 0, [line for line in server.lines if 'failed' in line][:5]
        assert cp.returncode == 0 and out.read_bytes().startswith(b'Hello '), cp.stderr
        assert server.alive()
    finally:
        for sock in socks:
            sock.close()
        if server.alive():
            assert server.stop() == 0


def test_queue_of_requests_that_end_at_once_is_drained_without_recursion(start_server,
                                                                         tftp_root, tmp_path):
    """100 confirmed transfers hold --maxthread and 400 requests wait, each
    for a name whose "not found" the generator cache already holds, so each
    ends the moment it starts. Ending one transfer used to start the next
    from inside its own call stack, 400 deep: RecursionError, and clients
    told "internal error". Now the queue drains flat, each gets ERROR 1."""
    assert raise_fd_limit(1024) >= 600
    generator = tmp_path / 'never'
    generator.write_text('#!/bin/sh\nexit 1\n')
    generator.chmod(0o755)
    server = start_server('--verbose=6', '--retry-timeout', '10', '--content-generator',
                          str(generator), '--generator-cache', '120')
    holders, waiting = [], []
    try:
        sock = udp_socket()
        waiting.append(sock)
        sock.sendto(request(OP_RRQ, b'nothere'), (server.host, server.port))
        assert recv(sock, 5)[0][:4] == error(1, b'')[:4]        # cached from now on
        for _ in range(100):
            sock = udp_socket()
            sock.sendto(request(OP_RRQ, b'random.bin'), (server.host, server.port))
            reply, tid = recv(sock, 5)
            holders.append((sock, tid))
            assert reply is not None and reply[:4] == data(1, b'')[:4], reply
            sock.sendto(ack(1), tid)
        queued = []
        for _ in range(400):
            sock = udp_socket()
            queued.append(sock)
            sock.sendto(request(OP_RRQ, b'nothere'), (server.host, server.port))
        waiting += queued
        assert wait_until(lambda: sum('request queued' in line for line in server.lines)
                          >= 400, 20)
        holders[0][0].sendto(error(0, b'done'), holders[0][1])     # one slot frees
        deadline = time.monotonic() + 20
        codes = [(recv(sock, max(0.01, deadline - time.monotonic()))[0] or b'????')[:4]
                 for sock in queued]
        account = LogAccount(server.lines)
        print('\nqueue of 400 that end at once: %d ERROR 1, internal errors %d' % (
            codes.count(error(1, b'')[:4]), len(account.internal_errors)))
        assert not account.internal_errors, account.internal_errors[:3]
        assert codes.count(error(1, b'')[:4]) == 400
        assert server.alive()
    finally:
        for sock in [holder for holder, _tid in holders] + waiting:
            sock.close()

