"""Helpers for the hostile-network tests: test_fuzz.py, test_floods.py,
test_netem.py and test_upload_safety.py.

  * What the server holds: its descriptors, its UDP ports, its memory, and
    the transfers its own log says are still open (LogAccount).
  * Mutator: seeded mutations of valid TFTP datagrams (bit flips, truncation,
    extension, opcode swaps, option garbage, splices).
  * Robust reference peers (receive/send) that follow RFC 1350/2347/7440 to
    the letter and survive loss, duplication and reordering: used to tell a
    server fault from a client quirk on impaired links.

Every loop here is bounded in count and in time; every wait has a deadline.
"""

import hashlib
import os
import random
import re
import select
import socket
import struct
import time

OP_RRQ, OP_WRQ, OP_DATA, OP_ACK, OP_ERROR, OP_OACK = 1, 2, 3, 4, 5, 6


###############################################################################
# What the server process holds ###############################################
###############################################################################

def fd_targets(pid):
    """{fd: what it points to} for process `pid`."""
    out = {}
    base = '/proc/%d/fd' % pid
    for name in os.listdir(base):
        try:
            out[int(name)] = os.readlink(os.path.join(base, name))
        except OSError:
            pass                    # closed meanwhile
    return out


def fd_count(pid):
    return len(os.listdir('/proc/%d/fd' % pid))


def rss_kib(pid):
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    raise AssertionError('no VmRSS for %d' % pid)


def socket_inodes(pid):
    inodes = set()
    for target in fd_targets(pid).values():
        match = re.match(r'socket:\[(\d+)\]$', target)
        if match:
            inodes.add(match.group(1))
    return inodes


def udp_ports(pid):
    """Local UDP ports of the sockets process `pid` holds, read from its own
    network namespace's /proc/PID/net/udp and udp6."""
    inodes = socket_inodes(pid)
    ports = set()
    for table in ('udp', 'udp6'):
        try:
            with open('/proc/%d/net/%s' % (pid, table)) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(':', 1)[1], 16))
    return ports


def wait_until(predicate, timeout, interval=0.05):
    """Poll `predicate` until it is true or `timeout` seconds pass; return
    its last value. Bounded by time (and so by count)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wait_for_fd_baseline(server, baseline, timeout):
    """Wait until the server holds exactly the descriptors it held at
    `baseline` (a fd_targets() result); return the difference, {} if none."""
    def difference():
        now = fd_targets(server.pid)
        return {fd: target for fd, target in now.items() if baseline.get(fd) != target}
    wait_until(lambda: not difference(), timeout)
    return difference()


def file_digest(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def tree_snapshot(root):
    """{relative path: (mode, sha256 or link target)} of everything under root."""
    out = {}
    for directory, dirs, files in os.walk(str(root)):
        for name in dirs + files:
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, str(root))
            info = os.lstat(path)
            if os.path.islink(path):
                out[rel] = ('link', os.readlink(path))
            elif os.path.isdir(path):
                out[rel] = ('dir', oct(info.st_mode))
            else:
                out[rel] = (oct(info.st_mode), file_digest(path))
    return out


def part_files_under(root):
    """Upload temporaries ('.NAME.XXXX.part') anywhere under root."""
    found = []
    for directory, _dirs, files in os.walk(str(root)):
        found += [os.path.join(directory, n) for n in files
                  if n.startswith('.') and n.endswith('.part')]
    return sorted(found)


class LogAccount:
    """The server's table of transfers as its log (at --verbose=6) tells it:
    each transfer begins with 'serving NAME to CLIENT' or 'receiving NAME
    from CLIENT' and ends with exactly one 'sent'/'received'/'failed' line
    (or, for an upload refused before it began, 'CLIENT: cannot create')."""

    START = re.compile(r'atftpd\[\d+\]: (?:serving .* to|receiving .* from) (\S+)$')
    END = re.compile(r'atftpd\[\d+\]: (?:sent|received|failed sending|failed receiving)'
                     r' .* (?:to|from) (\S+?): ')
    REFUSED = re.compile(r'atftpd\[\d+\]: (\S+): cannot create temporary file')

    def __init__(self, lines):
        self.starts, self.ends = {}, {}
        self.internal_errors = []
        self.timeouts = 0
        for line in lines:
            match = self.START.search(line)
            if match:
                self.starts[match.group(1)] = self.starts.get(match.group(1), 0) + 1
                continue
            match = self.END.search(line) or self.REFUSED.search(line)
            if match:
                self.ends[match.group(1)] = self.ends.get(match.group(1), 0) + 1
                # Reclaimed by the timer, or (never answered) given up or
                # made way for a new request.
                if line.endswith('timeout') or any(word in line for word in (
                        ': timeout;', ': timeout (no answer', ': dropped: no answer')):
                    self.timeouts += 1
                continue
            if 'internal error' in line or 'Traceback' in line:
                self.internal_errors.append(line)

    def started(self):
        return sum(self.starts.values())

    def ended(self):
        return sum(self.ends.values())

    def still_open(self):
        """{client: transfers started and not ended}."""
        return {client: count - self.ends.get(client, 0)
                for client, count in self.starts.items()
                if count > self.ends.get(client, 0)}


###############################################################################
# Datagrams and their mutations ################################################
###############################################################################

def H(number):
    return struct.pack('!H', number & 0xFFFF)


def request(opcode, name, mode=b'octet', options=()):
    out = H(opcode) + name + b'\0' + mode + b'\0'
    for key, value in options:
        out += key + b'\0' + value + b'\0'
    return out


def ack(block):
    return H(OP_ACK) + H(block)


def data(block, payload):
    return H(OP_DATA) + H(block) + payload


def error(code, message=b'oops'):
    return H(OP_ERROR) + H(code) + message + b'\0'


def valid_corpus(names, upload_names=()):
    """Well-formed datagrams of every kind, the seeds of the mutations."""
    option_sets = [(), ((b'blksize', b'1428'),), ((b'tsize', b'0'),),
                   ((b'blksize', b'1024'), (b'windowsize', b'8'), (b'tsize', b'0')),
                   ((b'timeout', b'1'), (b'blksize', b'65464')), ((b'windowsize', b'64'),)]
    corpus = []
    for name in names:
        for mode in (b'octet', b'netascii', b'OCTET'):
            for options in option_sets:
                corpus.append(request(OP_RRQ, name, mode, options))
    for name in upload_names:
        for options in option_sets[:3]:
            corpus.append(request(OP_WRQ, name, b'octet', options))
    corpus += [ack(0), ack(1), ack(2), ack(65535), data(1, b'x' * 512), data(2, b'y' * 100),
               data(1, b''), error(0, b'bye'), error(8, b'options'), error(5),
               H(OP_OACK) + b'blksize\x001428\x00tsize\x0012\x00']
    return corpus


# Option values that have broken or might break parsers: huge, negative,
# signed, spaced, non-ASCII digits (Latin-1 superscripts, Arabic-Indic), NULs.
GARBAGE_VALUES = [b'', b'0', b'-1', b'+8', b' 512 ', b'9' * 25, b'99999999999', b'1e3',
                  b'0x10', b'\xb2', b'\xb3\xb9', b'1\xb2', b'\xd9\xa1', b'\xff' * 8, b'%n%s',
                  b'512\x00\x00', b'65464', b'65465', b'65535', b'65536', b'8', b'7']
GARBAGE_NAMES = [b'blksize', b'tsize', b'timeout', b'windowsize', b'BLKSIZE', b'multicast',
                 b'', b'\xff', b'x' * 300]


class Mutator:
    """Seeded mutations of valid datagrams. Every method is a pure function
    of the random stream, so a seed reproduces the same sequence."""

    def __init__(self, seed, corpus):
        self.rng = random.Random(seed)
        self.corpus = list(corpus)
        self.kinds = {}
        self.operators = [self.bit_flips, self.byte_sets, self.truncate, self.extend,
                          self.opcode_swap, self.option_garbage, self.splice,
                          self.nul_games, self.block_games]

    def mutate(self, datagram=None):
        rng = self.rng
        datagram = datagram if datagram is not None else rng.choice(self.corpus)
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            operator = rng.choice(self.operators)
            self.kinds[operator.__name__] = self.kinds.get(operator.__name__, 0) + 1
            datagram = operator(datagram)
        return datagram[:65000]

    def bit_flips(self, d):
        if not d:
            return b'\x01'
        b = bytearray(d)
        for _ in range(self.rng.randint(1, 4)):
            i = self.rng.randrange(len(b))
            b[i] ^= 1 << self.rng.randrange(8)
        return bytes(b)

    def byte_sets(self, d):
        if not d:
            return bytes([self.rng.randrange(256)])
        b = bytearray(d)
        for _ in range(self.rng.randint(1, 3)):
            b[self.rng.randrange(len(b))] = self.rng.choice((0, 0xff, 0x2f, 0x2e, 0x5c, 0x80,
                                                             self.rng.randrange(256)))
        return bytes(b)

    def truncate(self, d):
        return d[:self.rng.randint(0, len(d))]

    def extend(self, d):
        rng = self.rng
        choice = rng.random()
        if choice < 0.4:
            tail = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        elif choice < 0.7:
            tail = b'\0' * rng.randint(1, 600)
        elif choice < 0.97:
            tail = d[-rng.randint(1, max(1, len(d))):] * rng.randint(1, 8)
        else:
            tail = b'A' * rng.randint(1000, 20000)      # rare big datagrams
        return d + tail

    def opcode_swap(self, d):
        opcode = self.rng.choice((0, 1, 2, 3, 4, 5, 6, 7, 0x100, 0x0301, 0xffff))
        return H(opcode) + d[2:]

    def option_garbage(self, d):
        rng = self.rng
        pairs = b''
        for _ in range(rng.randint(1, 4)):
            pairs += rng.choice(GARBAGE_NAMES) + b'\0' + rng.choice(GARBAGE_VALUES) + b'\0'
        if rng.random() < 0.3:
            pairs = pairs[:-1]          # an unterminated last field
        return d + pairs

    def splice(self, d):
        other = self.rng.choice(self.corpus)
        cut = self.rng.randint(0, len(d))
        return d[:cut] + other[self.rng.randint(0, len(other)):]

    def nul_games(self, d):
        rng = self.rng
        if b'\0' in d and rng.random() < 0.5:
            positions = [i for i, c in enumerate(d) if c == 0]
            i = rng.choice(positions)
            return d[:i] + d[i + 1:]                    # drop a terminator
        i = rng.randint(0, len(d))
        return d[:i] + b'\0' * rng.randint(1, 3) + d[i:]

    def block_games(self, d):
        if len(d) < 4:
            return d + H(self.rng.randrange(65536))
        return d[:2] + H(self.rng.choice((0, 1, 2, 65535, 65534, 32768,
                                          self.rng.randrange(65536)))) + d[4:]


###############################################################################
# Robust reference peers ######################################################
###############################################################################

class PeerFailure(Exception):
    """The reference peer gave up or got an ERROR: a clear, reported error."""


def _parse_oack(body):
    fields = body.split(b'\0')[:-1]
    return {fields[i].decode('latin-1').lower(): fields[i + 1].decode('latin-1')
            for i in range(0, len(fields) - 1, 2)}


def reference_get(server_addr, name, options=(), timeout=1.0, retries=8, max_seconds=120,
                  sock=None):
    """Download `name` as a strict RFC 1350/2347/7440 receiver that survives
    loss, duplication and reordering. Returns (bytes, stats); raises
    PeerFailure with the reason on an ERROR or after `retries` silent
    timeouts in a row. Never returns wrong bytes knowingly: a block is
    accepted only as the next one in order."""
    own = sock is None
    if own:
        family = socket.AF_INET6 if ':' in server_addr[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
    stats = {'datagrams': 0, 'timeouts': 0, 'duplicates': 0, 'gaps': 0, 'stray': 0}
    try:
        rrq = request(OP_RRQ, name.encode(), b'octet',
                      [(k.encode(), str(v).encode()) for k, v in options])
        sock.sendto(rrq, server_addr)
        peer = None
        blksize, windowsize = 512, 1
        chunks = []
        received = 0            # last block received in order
        acked = 0               # last block acknowledged
        gap_acked = False
        last_sent = rrq
        silent = 0
        deadline = time.monotonic() + max_seconds
        resend_at = time.monotonic() + timeout    # moved only by progress, never by
        done = False                              # duplicates (or we would stall)
        for _ in range(10 ** 7):
            now = time.monotonic()
            if now > deadline:
                raise PeerFailure('gave up after %s s' % max_seconds)
            if now >= resend_at:
                if done:
                    break           # the dally is over: the final ACK went through
                silent += 1
                stats['timeouts'] += 1
                if silent > retries:
                    raise PeerFailure('no progress after %d timeouts' % retries)
                sock.sendto(last_sent, peer or server_addr)
                resend_at = now + timeout
                continue
            ready, _, _ = select.select([sock], [], [], resend_at - now)
            if not ready:
                continue
            datagram, addr = sock.recvfrom(70000)
            stats['datagrams'] += 1
            if peer is None and len(datagram) >= 2:
                peer = addr
            if addr != peer or len(datagram) < 2:
                stats['stray'] += 1
                continue
            opcode = struct.unpack('!H', datagram[:2])[0]
            if opcode == OP_ERROR:
                code = struct.unpack('!H', datagram[2:4])[0] if len(datagram) >= 4 else 0
                raise PeerFailure('server error %d: %r' % (code, datagram[4:].rstrip(b'\0')))
            if opcode == OP_OACK:
                if received == 0:
                    if last_sent != ack(0):
                        silent = 0
                        resend_at = time.monotonic() + timeout
                    oack = _parse_oack(datagram[2:])
                    blksize = int(oack.get('blksize', 512))
                    windowsize = int(oack.get('windowsize', 1))
                    last_sent = ack(0)
                    sock.sendto(last_sent, peer)
                else:
                    stats['duplicates'] += 1
                continue
            if opcode != OP_DATA or len(datagram) < 4:
                stats['stray'] += 1
                continue
            number = struct.unpack('!H', datagram[2:4])[0]
            payload = datagram[4:]
            if done:
                if number == received & 0xFFFF:
                    sock.sendto(ack(received), peer)        # our final ACK was lost
                continue
            if number == (received + 1) & 0xFFFF and len(payload) <= blksize:
                chunks.append(payload)
                received += 1
                silent = 0
                resend_at = time.monotonic() + timeout
                gap_acked = False
                final = len(payload) < blksize
                if final or received - acked >= windowsize:
                    last_sent = ack(received)
                    sock.sendto(last_sent, peer)
                    acked = received
                if final:
                    done = True     # dally one timeout for a repeated last block
                continue
            if ((number - received) & 0xFFFF) < 0x8000:
                stats['gaps'] += 1
            else:
                stats['duplicates'] += 1
            if not gap_acked:
                # A gap or an old block: say once where we are (RFC 7440 s4).
                gap_acked = True
                last_sent = ack(received)
                sock.sendto(last_sent, peer)
                acked = received
        return b''.join(chunks), stats
    finally:
        if own:
            sock.close()


def reference_put(server_addr, name, payload, options=(), timeout=1.0, retries=8,
                  max_seconds=120, sock=None):
    """Upload `payload` as a strict RFC 1350/2347/7440 sender: windows of
    `windowsize` blocks (1 = lock-step), restarted after the block the server
    acknowledges, resent whole on a timeout. Returns stats; raises
    PeerFailure on an ERROR or after `retries` silent timeouts in a row."""
    own = sock is None
    if own:
        family = socket.AF_INET6 if ':' in server_addr[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
    stats = {'datagrams': 0, 'timeouts': 0, 'stray': 0, 'resent': 0}
    try:
        wrq = request(OP_WRQ, name.encode(), b'octet',
                      [(k.encode(), str(v).encode()) for k, v in options])
        sock.sendto(wrq, server_addr)
        peer = None
        blksize, windowsize = 512, 1
        count = len(payload) // blksize + 1
        acked = -1              # -1: the WRQ is not answered yet
        silent = 0
        deadline = time.monotonic() + max_seconds

        def send_window():
            for block in range(acked + 1, min(acked + windowsize, count) + 1):
                sock.sendto(data(block, payload[(block - 1) * blksize:block * blksize]), peer)

        resend_at = time.monotonic() + timeout    # moved only by progress
        for _ in range(10 ** 7):
            now = time.monotonic()
            if now > deadline:
                raise PeerFailure('gave up after %s s' % max_seconds)
            if now >= resend_at:
                silent += 1
                stats['timeouts'] += 1
                if silent > retries:
                    raise PeerFailure('no progress after %d timeouts' % retries)
                if peer is None:
                    sock.sendto(wrq, server_addr)
                else:
                    stats['resent'] += 1
                    send_window()
                resend_at = now + timeout
                continue
            ready, _, _ = select.select([sock], [], [], resend_at - now)
            if not ready:
                continue
            datagram, addr = sock.recvfrom(70000)
            stats['datagrams'] += 1
            if peer is None and len(datagram) >= 2:
                peer = addr
            if addr != peer or len(datagram) < 4:
                stats['stray'] += 1
                continue
            opcode, number = struct.unpack('!HH', datagram[:4])
            if opcode == OP_ERROR:
                raise PeerFailure('server error %d: %r' % (number, datagram[4:].rstrip(b'\0')))
            if opcode == OP_OACK:
                if acked == -1:
                    oack = _parse_oack(datagram[2:])
                    blksize = int(oack.get('blksize', 512))
                    windowsize = int(oack.get('windowsize', 1))
                    count = len(payload) // blksize + 1
                    acked = 0
                    silent = 0
                    resend_at = time.monotonic() + timeout
                    send_window()
                continue
            if opcode != OP_ACK:
                stats['stray'] += 1
                continue
            if acked == -1:
                if number != 0:
                    continue
                acked = 0
                silent = 0
                resend_at = time.monotonic() + timeout
                send_window()
                continue
            last_sent = min(acked + windowsize, count)
            block = last_sent - ((last_sent - number) & 0xFFFF)     # unwrap
            if block <= acked:
                continue            # old or duplicate: the timer resends if needed
            acked = block
            silent = 0
            resend_at = time.monotonic() + timeout
            if acked >= count:
                return stats
            send_window()
        raise AssertionError('unreachable')
    finally:
        if own:
            sock.close()
