"""An impaired link between two network namespaces that the test creates.

    with ImpairedLink(loss=5, duplicate=5, reorder=25, correlation=50,
                      delay_ms=100) as link:
        link.server_ns, link.client_ns          # namespace names
        link.server_addr, link.client_addr      # 10.x addresses inside them
        link.run_in_client(fn, *args)           # fn runs with the client netns
        link.stats()                            # what the impairment did

Two ways to impair, same numbers and same meaning (netem's):

  * 'netem': a veth pair between the namespaces and
    `tc qdisc add dev X root netem loss L% duplicate D% delay Tms reorder R% C%`
    on both ends, when the kernel has sch_netem.
  * 'relay': a TUN device in each namespace and a thread here that moves IP
    packets between them, dropping, duplicating and delaying them exactly as
    netem would (with `reorder R% C%`, R% of the packets, correlated C%, skip
    the delay and overtake the ones waiting). Used when sch_netem is missing
    (kernels built without CONFIG_NET_SCH_NETEM and without modules).

ATFTPD_TEST_LINK=netem|relay forces one. Everything is torn down in
close(): the relay thread, the TUN descriptors and both namespaces. Traffic
never leaves the two namespaces; nothing is added to the caller's namespace.
"""

import ctypes
import errno
import fcntl
import heapq
import os
import random
import select
import shutil
import struct
import subprocess
import threading
import time

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454ca
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000

_libc = ctypes.CDLL(None, use_errno=True)


def run(*argv, check=True):
    cp = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=30)
    if check and cp.returncode != 0:
        raise RuntimeError('%s failed (%d): %s' % (' '.join(map(str, argv)), cp.returncode,
                                                   cp.stderr.strip()))
    return cp


def can_make_namespaces():
    """None if this process can make network namespaces, else why not."""
    if os.geteuid() != 0:
        return 'needs root (network namespaces, TUN/veth devices)'
    if shutil.which('ip') is None:
        return "needs 'ip' (iproute2)"
    return None


def require_namespaces(what):
    """Skip the calling test when network namespaces cannot be made; with
    CI=true, fail it instead."""
    import pytest
    why = can_make_namespaces()
    if why is None:
        return
    if os.environ.get('CI') == 'true':
        pytest.fail('%s: %s (CI=true, so this is a failure)' % (what, why), pytrace=False)
    pytest.skip('%s: %s' % (what, why))


def setns(name):
    """Move the calling THREAD into network namespace `name` (ip netns)."""
    fd = os.open('/var/run/netns/%s' % name, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, 'setns(%s): %s' % (name, os.strerror(err)))
    finally:
        os.close(fd)


def in_namespace(name, fn, *args, **kwargs):
    """Run fn(*args, **kwargs) in a thread that lives in namespace `name`:
    sockets it opens and processes it starts are in that namespace."""
    result = {}

    def body():
        try:
            setns(name)
            result['value'] = fn(*args, **kwargs)
        except BaseException as exc:      # noqa: BLE001 - re-raised below
            result['error'] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join()
    if 'error' in result:
        raise result['error']
    return result.get('value')


def netem_available():
    """Can a netem qdisc be created? Tried on a veth inside a scratch namespace."""
    name = 'hnprobe%d' % os.getpid()
    try:
        run('ip', 'netns', 'add', name)
    except (RuntimeError, OSError):
        return False
    try:
        run('ip', '-n', name, 'link', 'add', 'p0', 'type', 'veth', 'peer', 'name', 'p1')
        cp = run('ip', 'netns', 'exec', name, 'tc', 'qdisc', 'add', 'dev', 'p0', 'root',
                 'netem', 'delay', '1ms', check=False)
        return cp.returncode == 0
    except (RuntimeError, OSError):
        return False
    finally:
        run('ip', 'netns', 'del', name, check=False)


class CorrelatedRandom:
    """netem's get_crandom(): a uniform variate correlated with the last one."""

    def __init__(self, rng, correlation_percent):
        self.rng = rng
        self.rho = correlation_percent / 100.0
        self.last = rng.random()

    def next(self):
        value = self.rng.random()
        if self.rho:
            value = value * (1 - self.rho) + self.last * self.rho
        self.last = value
        return value


class Direction:
    """The impairment of one direction, netem's order: loss, duplicate,
    then delay unless this packet is picked for reordering."""

    def __init__(self, rng, loss, duplicate, reorder, correlation, delay):
        self.rng = rng
        self.loss = loss / 100.0
        self.duplicate = duplicate / 100.0
        self.reorder = CorrelatedRandom(rng, correlation)
        self.reorder_p = reorder / 100.0
        self.delay = delay
        self.counts = {'packets': 0, 'lost': 0, 'duplicated': 0, 'reordered': 0, 'delivered': 0}

    def schedule(self, now):
        """Delivery times for one packet: [] lost, one or two times."""
        self.counts['packets'] += 1
        if self.rng.random() < self.loss:
            self.counts['lost'] += 1
            return []
        copies = 1
        if self.rng.random() < self.duplicate:
            self.counts['duplicated'] += 1
            copies = 2
        times = []
        for _ in range(copies):
            if self.delay and self.reorder_p and self.reorder.next() < self.reorder_p:
                self.counts['reordered'] += 1
                times.append(now)
            else:
                times.append(now + self.delay)
        return times


class ImpairedLink:
    SERVER_ADDR = '10.213.%d.1'
    CLIENT_ADDR = '10.213.%d.2'

    def __init__(self, loss=5, duplicate=5, reorder=25, correlation=50, delay_ms=100,
                 seed=9, mode=None):
        self.loss, self.duplicate, self.reorder = loss, duplicate, reorder
        self.correlation, self.delay_ms, self.seed = correlation, delay_ms, seed
        tag = '%d' % os.getpid()
        self.server_ns = 'hnsrv%s' % tag
        self.client_ns = 'hncli%s' % tag
        subnet = os.getpid() % 250 + 1
        self.server_addr = self.SERVER_ADDR % subnet
        self.client_addr = self.CLIENT_ADDR % subnet
        self.mode = mode or os.environ.get('ATFTPD_TEST_LINK') or (
            'netem' if netem_available() else 'relay')
        self.fds = []
        self.thread = None
        self.stopping = threading.Event()
        self.directions = {}
        self.created = []
        self.relay_error = None

    # -- set up and tear down --

    def __enter__(self):
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def open(self):
        for name in (self.server_ns, self.client_ns):
            run('ip', 'netns', 'del', name, check=False)    # a leftover of a killed run
            run('ip', 'netns', 'add', name)
            self.created.append(name)
            run('ip', '-n', name, 'link', 'set', 'lo', 'up')
        if self.mode == 'netem':
            self._open_veth_netem()
        elif self.mode == 'relay':
            self._open_tun_relay()
        else:
            raise ValueError('ATFTPD_TEST_LINK must be netem or relay, not %r' % self.mode)

    def netem_args(self):
        args = ['netem']
        if self.loss:
            args += ['loss', '%g%%' % self.loss]
        if self.duplicate:
            args += ['duplicate', '%g%%' % self.duplicate]
        if self.delay_ms:
            args += ['delay', '%gms' % self.delay_ms]
            if self.reorder:
                args += ['reorder', '%g%%' % self.reorder, '%g%%' % self.correlation]
        return args

    def _open_veth_netem(self):
        run('ip', '-n', self.server_ns, 'link', 'add', 'hn0', 'type', 'veth', 'peer', 'name',
            'hn1', 'netns', self.client_ns)
        for ns, dev, addr in ((self.server_ns, 'hn0', self.server_addr),
                              (self.client_ns, 'hn1', self.client_addr)):
            run('ip', '-n', ns, 'addr', 'add', addr + '/24', 'dev', dev)
            run('ip', '-n', ns, 'link', 'set', dev, 'up')
            run('ip', 'netns', 'exec', ns, 'tc', 'qdisc', 'add', 'dev', dev, 'root',
                *self.netem_args())

    def _open_tun(self, ns, addr, peer):
        def make():
            fd = os.open('/dev/net/tun', os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, TUNSETIFF, struct.pack('16sH', b'hn0', IFF_TUN | IFF_NO_PI))
            except OSError:
                os.close(fd)
                raise
            return fd
        fd = in_namespace(ns, make)         # the device is made in the thread's netns
        self.fds.append(fd)
        os.set_blocking(fd, False)
        run('ip', 'netns', 'exec', ns, 'sysctl', '-q', '-w', 'net.ipv6.conf.hn0.disable_ipv6=1',
            check=False)
        run('ip', '-n', ns, 'addr', 'add', addr, 'peer', peer, 'dev', 'hn0')
        run('ip', '-n', ns, 'link', 'set', 'hn0', 'up')
        return fd

    def _open_tun_relay(self):
        server_fd = self._open_tun(self.server_ns, self.server_addr, self.client_addr)
        client_fd = self._open_tun(self.client_ns, self.client_addr, self.server_addr)
        rng = random.Random(self.seed)
        delay = self.delay_ms / 1000.0
        args = (self.loss, self.duplicate, self.reorder, self.correlation, delay)
        self.directions = {
            server_fd: (client_fd, Direction(rng, *args)),     # server -> client
            client_fd: (server_fd, Direction(rng, *args)),     # client -> server
        }
        self.thread = threading.Thread(target=self._relay, name='impaired-link', daemon=True)
        self.thread.start()

    def _relay(self):
        """Move packets until close(); every wait is bounded by select's timeout."""
        queue = []
        sequence = 0
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                while queue and queue[0][0] <= now:
                    _due, _seq, out_fd, packet, counts = heapq.heappop(queue)
                    try:
                        os.write(out_fd, packet)
                        counts['delivered'] += 1
                    except OSError as exc:
                        if exc.errno not in (errno.EAGAIN, errno.EIO, errno.EINVAL):
                            raise
                timeout = 0.2 if not queue else max(0.0, min(0.2, queue[0][0] - now))
                ready, _, _ = select.select(list(self.directions), [], [], timeout)
                now = time.monotonic()
                for fd in ready:
                    out_fd, direction = self.directions[fd]
                    for _ in range(256):
                        try:
                            packet = os.read(fd, 65536)
                        except BlockingIOError:
                            break
                        for due in direction.schedule(now):
                            sequence += 1
                            heapq.heappush(queue, (due, sequence, out_fd, packet,
                                                   direction.counts))
        except BaseException as exc:      # noqa: BLE001 - reported by stats()/close()
            self.relay_error = exc

    def close(self):
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(5)
            self.thread = None
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []
        for name in self.created:
            run('ip', 'netns', 'del', name, check=False)
        self.created = []

    # -- use --

    def run_in_client(self, fn, *args, **kwargs):
        return in_namespace(self.client_ns, fn, *args, **kwargs)

    def run_in_server(self, fn, *args, **kwargs):
        return in_namespace(self.server_ns, fn, *args, **kwargs)

    def stats(self):
        """{'server->client': counts, 'client->server': counts} (relay), or tc's
        own statistics text (netem)."""
        if self.relay_error is not None:
            raise AssertionError('impaired-link relay died: %r' % (self.relay_error,))
        if self.mode == 'relay':
            fds = list(self.directions)
            return {'server->client': dict(self.directions[fds[0]][1].counts),
                    'client->server': dict(self.directions[fds[1]][1].counts)}
        out = {}
        for ns, dev in ((self.server_ns, 'hn0'), (self.client_ns, 'hn1')):
            out[ns] = run('ip', 'netns', 'exec', ns, 'tc', '-s', 'qdisc', 'show', 'dev', dev,
                          check=False).stdout.strip()
        return out

    def describe(self):
        return '%s: loss %g%% duplicate %g%% delay %g ms reorder %g%% %g%% (both directions)' % (
            self.mode, self.loss, self.duplicate, self.delay_ms, self.reorder, self.correlation)
