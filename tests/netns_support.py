"""A throw-away Ethernet segment for multicast tests: network namespaces
joined by a bridge, each client on a host of its own.

Why not one namespace on loopback: atftp's multicast client binds the
group port without SO_REUSEADDR, so a second atftp on the same host fails
with "bind: Address already in use" (seen with Debian's atftp 0.8.0 against
Debian's atftpd too). On loopback the kernel also picks 0.0.0.0 as the
source of multicast sent from a wildcard socket (127.0.0.1 has host scope),
which atftp's MTFTP mode rejects. One namespace per client, as on a real
LAN, avoids both.

    server namespace  <prefix>-s   br0 10.77.0.1/24 (bridge, snooping off)
    client namespaces <prefix>-cN  eth0 10.77.0.(10+N)/24, a veth on br0

Every namespace has the route 224.0.0.0/4 on its interface. Needs root;
without it the tests skip, except with CI=true, where they fail.
"""

import ctypes
import hashlib
import itertools
import os
import socket
import subprocess

import pytest

SERVER_IP = '10.77.0.1'
CLONE_NEWNET = 0x40000000
COMMAND_TIMEOUT = 30
_counter = itertools.count()


def need_netns():
    if os.geteuid() == 0:
        return
    if os.environ.get('CI') == 'true':
        pytest.fail('multicast tests need root for network namespaces (CI=true: required)')
    pytest.skip('multicast tests need root for network namespaces; mandatory when CI=true')


def run(*argv):
    subprocess.run(argv, check=True, timeout=COMMAND_TIMEOUT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def client_ip(index):
    return '10.77.0.%d' % (10 + index)


def sha256(data):
    return hashlib.sha256(data).hexdigest()


class Lan:
    """The namespaces of one test; remove() deletes them all."""

    def __init__(self, clients):
        self.prefix = 'atftpdpy%d-%d' % (os.getpid(), next(_counter))
        self.server = self.prefix + '-s'
        self.clients = []
        self.created = []
        try:
            self._make_server()
            for index in range(1, clients + 1):
                self._make_client(index)
        except BaseException:
            self.remove()
            raise

    def _add(self, name):
        run('ip', 'netns', 'add', name)
        self.created.append(name)
        self.ip(name, 'link', 'set', 'lo', 'up')

    def ip(self, namespace, *args):
        run('ip', '-n', namespace, *args)

    def _make_server(self):
        self._add(self.server)
        self.ip(self.server, 'link', 'add', 'br0', 'type', 'bridge')
        self.ip(self.server, 'link', 'set', 'br0', 'type', 'bridge', 'mcast_snooping', '0')
        self.ip(self.server, 'addr', 'add', SERVER_IP + '/24', 'dev', 'br0')
        self.ip(self.server, 'link', 'set', 'br0', 'up')
        self.ip(self.server, 'route', 'add', '224.0.0.0/4', 'dev', 'br0')

    def _make_client(self, index):
        name = '%s-c%d' % (self.prefix, index)
        self._add(name)
        port = 'v%d' % index
        run('ip', 'link', 'add', 'eth0', 'netns', name, 'type', 'veth',
            'peer', 'name', port, 'netns', self.server)
        self.ip(self.server, 'link', 'set', port, 'master', 'br0')
        self.ip(self.server, 'link', 'set', port, 'up')
        self.ip(name, 'addr', 'add', client_ip(index) + '/24', 'dev', 'eth0')
        self.ip(name, 'link', 'set', 'eth0', 'up')
        self.ip(name, 'route', 'add', '224.0.0.0/4', 'dev', 'eth0')
        self.clients.append(name)

    def exec_argv(self, namespace, argv):
        return ['ip', 'netns', 'exec', namespace] + [str(arg) for arg in argv]

    def socket_in(self, namespace, kind=socket.SOCK_DGRAM):
        """A socket created inside `namespace` (it stays there for life);
        only this thread switches, and it switches back at once."""
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open('/proc/thread-self/ns/net', os.O_RDONLY)
        target = os.open('/run/netns/' + namespace, os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), 'setns ' + namespace)
            try:
                return socket.socket(socket.AF_INET, kind)
            finally:
                if libc.setns(own, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), 'setns back')
        finally:
            os.close(own)
            os.close(target)

    def remove(self):
        for name in reversed(self.created):
            subprocess.run(['ip', 'netns', 'del', name], timeout=COMMAND_TIMEOUT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.created = []


@pytest.fixture
def make_lan():
    """Factory: make_lan(clients) -> Lan; every namespace is deleted afterwards."""
    need_netns()
    lans = []

    def make(clients):
        lan = Lan(clients)
        lans.append(lan)
        return lan

    yield make
    for lan in lans:
        lan.remove()
