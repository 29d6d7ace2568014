"""RFC 2090 multicast: real atftp clients (`atftp --option multicast`) on a
bridged namespace LAN (tests/netns_support.py), a raw master client that
can pause mid-transfer, and wire-level checks that need no group traffic.

atftp's multicast client ACKs, when it is master, the block before its
first gap (RFC 2090), and checks that group DATA comes from the address
and port that sent its OACK."""

import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys

import pytest

import atftpd
from conftest import SERVER, RawClient
from netns_support import SERVER_IP, client_ip, make_lan, sha256  # noqa: F401 (fixture)
from wire_helpers import OP_ACK, OP_DATA, OP_ERROR, OP_OACK


CLIENT_TIMEOUT = 90
BLKSIZE = 512
CLOSED = re.compile(r'multicast group (\S+):(\d+) for \S+ closed, (\d+) blocks sent')


def start_lan_server(start_server, lan, root, *args):
    argv = lan.exec_argv(lan.server, [
        sys.executable, SERVER, '--daemon', '--no-fork', '--port', '69', '--bind-address',
        SERVER_IP, '--user', 'root.root', '--logfile', '-', '-v6', '--retry-timeout', '1']
        + list(args) + [root])
    return start_server(argv=argv)


def atftp_get(lan, index, name, local, *options):
    """Start `atftp --option multicast -g` in client namespace `index`."""
    argv = ['atftp', '--option', 'multicast'] + list(options) + [
        '-g', '-r', name, '-l', local, SERVER_IP, '69']
    return subprocess.Popen(lan.exec_argv(lan.clients[index - 1], argv),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def finish(proc):
    try:
        output, _ = proc.communicate(timeout=CLIENT_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise AssertionError('atftp did not finish: %s' % output.decode(errors='replace'))
    return proc.returncode, output.decode(errors='replace')


def count_lines(server, pattern):
    return sum(1 for line in server.lines if re.search(pattern, line))


class McastClient:
    """A raw RFC 2090 client inside a client namespace: a unicast socket for
    OACK/ACK and a group socket; it ACKs only when told to, so a test can
    hold a transfer still at a known block."""

    def __init__(self, lan, index):
        self.lan = lan
        self.address = client_ip(index)
        self.namespace = lan.clients[index - 1]
        self.sock = lan.socket_in(self.namespace)
        self.sock.bind((self.address, 0))
        self.group_sock = None
        self.server = None
        self.blocks = {}

    def close(self):
        for sock in (self.sock, self.group_sock):
            if sock is not None:
                sock.close()

    def request(self, name, options=()):
        """RRQ with multicast; returns the OACK options (dict)."""
        self.sock.sendto(atftpd.encode_request(atftpd.OP_RRQ, name, 'octet',
                                               list(options) + [('multicast', '')]),
                         (SERVER_IP, 69))
        data, self.server = self.recv(self.sock)
        assert data[:2] == struct.pack('!H', OP_OACK), data
        fields = data[2:].split(b'\0')[:-1]
        oack = {fields[i].decode(): fields[i + 1].decode() for i in range(0, len(fields), 2)}
        group, port, _master = oack['multicast'].split(',')
        self.join(group, int(port))
        return oack

    def join(self, group, port):
        self.group_sock = self.lan.socket_in(self.namespace)
        self.group_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.group_sock.bind(('', port))
        membership = socket.inet_aton(group) + socket.inet_aton(self.address)
        self.group_sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)

    def recv(self, sock, timeout=10):
        ready, _, _ = select.select([sock], [], [], timeout)
        assert ready, 'timed out waiting for a datagram'
        return sock.recvfrom(70000)

    def ack(self, block):
        self.sock.sendto(struct.pack('!HH', OP_ACK, block), self.server)

    def fetch_until(self, last, blksize=BLKSIZE):
        """ACK and receive group DATA until block `last` or a short block;
        True when the file ended."""
        block = max(self.blocks) if self.blocks else 0
        for _ in range(100000):
            if block >= last:
                return False
            self.ack(block)
            data, source = self.recv(self.group_sock)
            assert source == self.server, (source, self.server)   # the TID (RFC 2090)
            opcode, number = struct.unpack('!HH', data[:4])
            assert opcode == OP_DATA and number == block + 1, (opcode, number, block)
            block = number
            self.blocks[number] = data[4:]
            if len(data) - 4 < blksize:
                self.ack(block)
                return True
        raise AssertionError('too many blocks')

    def content(self):
        return b''.join(self.blocks[n] for n in sorted(self.blocks))


def file_blocks(size, blksize=BLKSIZE):
    return size // blksize + 1


###############################################################################
# Real atftp clients on the namespace LAN #####################################
###############################################################################

@pytest.mark.netns
def test_atftp_clients_join_a_running_transfer_and_fetch_what_they_missed(
        make_lan, start_server, tftp_root, tmp_path):
    """A raw master stops at block 100; three atftp clients join as members
    and take every later block from the group; the master finishes; each
    atftp client then becomes master in turn and asks for blocks 1..100."""
    lan = make_lan(4)
    expected = (tftp_root / 'random.bin').read_bytes()
    server = start_lan_server(start_server, lan, tftp_root)
    master = McastClient(lan, 4)
    try:
        oack = master.request('random.bin')
        group = oack['multicast'].rsplit(',', 1)[0]
        assert oack['multicast'] == group + ',1'
        assert group == '239.255.0.0,1758'          # the first of the defaults
        assert master.fetch_until(100) is False
        clients = [atftp_get(lan, i, 'random.bin', tmp_path / ('out%d' % i)) for i in (1, 2, 3)]
        server.wait_for_log(r'joins multicast group .* \(4 members\)')
        assert master.fetch_until(10 ** 6) is True
        results = [finish(proc) for proc in clients]
    finally:
        master.close()
    assert master.content() == expected
    for index, (status, output) in enumerate(results, 1):
        assert status == 0, output
        assert sha256((tmp_path / ('out%d' % index)).read_bytes()) == sha256(expected)
    closed = CLOSED.search(server.wait_for_log(CLOSED.pattern))
    blocks = file_blocks(len(expected))
    # Shared: four clients for less than twice the blocks of one.
    assert blocks <= int(closed.group(3)) < 2 * blocks
    assert count_lines(server, r'master client of multicast group') >= 4


@pytest.mark.netns
@pytest.mark.parametrize('switch', [False, True], ids=['retries', 'switch-client'])
def test_master_killed_mid_transfer_next_client_takes_over(
        make_lan, start_server, tftp_root, tmp_path, switch):
    """A raw master holds the transfer at block 100; atftp client 1 joins
    and is stopped (SIGSTOP), clients 2 and 3 join; the raw master leaves,
    so client 1 is master but silent, and is killed. The server gives up on
    it (after the retries, or at once with --mcast-switch-client) and the
    next client takes over; clients 2 and 3 get the whole file."""
    lan = make_lan(4)
    expected = (tftp_root / 'random.bin').read_bytes()
    server = start_lan_server(start_server, lan, tftp_root,
                              *(['--mcast-switch-client'] if switch else []))
    holder = McastClient(lan, 4)
    try:
        holder.request('random.bin')
        assert holder.fetch_until(100) is False
        first = atftp_get(lan, 1, 'random.bin', tmp_path / 'out1')
        server.wait_for_log(r'joins multicast group .* \(2 members\)')
        first.send_signal(signal.SIGSTOP)
        others = [atftp_get(lan, i, 'random.bin', tmp_path / ('out%d' % i)) for i in (2, 3)]
        server.wait_for_log(r'joins multicast group .* \(4 members\)')
        holder.sock.sendto(atftpd.encode_error(0, 'leaving'), holder.server)
    finally:
        holder.close()
    server.wait_for_log(r'10\.77\.0\.11:\d+: master client')
    first.kill()                                    # the master dies mid-transfer
    first.wait(10)
    results = [finish(proc) for proc in others]
    for index, (status, output) in enumerate(results, 2):
        assert status == 0, output
        assert sha256((tmp_path / ('out%d' % index)).read_bytes()) == sha256(expected)
    server.wait_for_log(r'failed sending random.bin to 10\.77\.0\.11:\d+: timeout')
    assert count_lines(server, r'10\.77\.0\.1[23]:\d+: master client') >= 2
    server.wait_for_log(CLOSED.pattern)


@pytest.mark.netns
def test_two_files_get_two_groups(make_lan, start_server, tftp_root):
    lan = make_lan(2)
    (tftp_root / 'other.bin').write_bytes(os.urandom(20000))
    server = start_lan_server(start_server, lan, tftp_root, '--mcast-addr', '239.9.9.7-8',
                              '--mcast-port', '4000-4001', '--mcast-ttl', '4')
    one, two = McastClient(lan, 1), McastClient(lan, 2)
    try:
        groups = [one.request('random.bin')['multicast'], two.request('other.bin')['multicast']]
        assert groups == ['239.9.9.7,4000,1', '239.9.9.8,4000,1']
        assert one.fetch_until(10 ** 6) and two.fetch_until(10 ** 6)
        assert two.content() == (tftp_root / 'other.bin').read_bytes()
    finally:
        one.close()
        two.close()
    assert server.alive()


###############################################################################
# Wire-level checks without group traffic (no root needed) ####################
###############################################################################
# The OACKs, ACKs and ERRORs of a session are unicast, so these run against a
# server on 127.0.0.1 whether or not multicast can leave the host.

@pytest.fixture
def mserver(start_server):
    """A server on 127.0.0.1 that logs the multicast group events (info)."""
    return start_server('-v6')


def oack_of(client, name, options):
    client.rrq(name, options=options)
    opcode, _, payload, addr = client.recv()
    assert opcode == OP_OACK, (opcode, payload)
    return client.oack_options(payload), addr


def test_oack_carries_group_and_master_flag_rfc2090(mserver):
    server = mserver
    with RawClient(server.host, server.port) as first, \
            RawClient(server.host, server.port) as second:
        oack, tid = oack_of(first, 'random.bin', [('blksize', '1024'), ('multicast', ''),
                                                  ('tsize', '0')])
        assert oack == {'blksize': '1024', 'multicast': '239.255.0.0,1758,1',
                        'tsize': '300000'}
        assert list(oack) == ['blksize', 'multicast', 'tsize']        # request order
        oack2, tid2 = oack_of(second, 'random.bin', [('multicast', ''), ('blksize', '1024')])
        assert oack2 == {'multicast': '239.255.0.0,1758,0', 'blksize': '1024'}
        assert tid2 == tid                          # one TID for the whole group
        # A member that ACKs out of turn is told again that it is not master.
        second.ack(0)
        opcode, _, payload, _ = second.recv()
        assert opcode == OP_OACK and second.oack_options(payload)['multicast'].endswith(',0')
        # The master leaves with an ERROR: the member is promoted.
        first.error(0, 'bye')
        opcode, _, payload, _ = second.recv()
        assert opcode == OP_OACK and second.oack_options(payload)['multicast'].endswith(',1')
        second.error(0, 'bye')
    server.wait_for_log(CLOSED.pattern)


def test_different_blksize_gets_another_group(mserver):
    server = mserver
    with RawClient(server.host, server.port) as first, \
            RawClient(server.host, server.port) as second:
        oack, tid = oack_of(first, 'random.bin', [('multicast', '')])
        oack2, tid2 = oack_of(second, 'random.bin', [('multicast', ''), ('blksize', '1024')])
        assert oack['multicast'] == '239.255.0.0,1758,1'
        assert oack2['multicast'] == '239.255.0.1,1758,1'
        assert tid != tid2
        first.error(0, 'bye')
        second.error(0, 'bye')


@pytest.mark.parametrize('options,mode', [
    ([('multicast', 'junk')], 'octet'),             # RFC 2090: the value is empty
    ([('multicast', '1' * 400)], 'octet'),
    ([('multicast', '')], 'netascii'),              # atftpd: no multicast in netascii
])
def test_invalid_multicast_request_is_served_by_unicast(server, tftp_root, options, mode):
    name = 'text.txt' if mode == 'netascii' else 'random.bin'
    with RawClient(server.host, server.port) as client:
        data, oack = client.download(name, mode, options + [('blksize', '1024')])
    assert oack == {'blksize': '1024'}
    expected = (tftp_root / name).read_bytes()
    if mode == 'netascii':
        expected = atftpd.netascii_encode(expected)
    assert data == expected


def test_no_multicast_option_ignores_the_request(start_server, tftp_root):
    server = start_server('--no-multicast')
    with RawClient(server.host, server.port) as client:
        data, oack = client.download('random.bin', options=[('multicast', ''),
                                                            ('blksize', '1024')])
    assert oack == {'blksize': '1024'}
    assert data == (tftp_root / 'random.bin').read_bytes()
    assert 'joins multicast' not in server.log()


def test_hostile_packets_to_a_session_change_nothing(mserver, tftp_root):
    server = mserver
    with RawClient(server.host, server.port) as master, \
            RawClient(server.host, server.port) as stranger, \
            RawClient(server.host, server.port) as bystander:
        oack, tid = oack_of(master, 'random.bin', [('multicast', '')])
        for datagram in (b'', b'\0', b'\0\4', struct.pack('!HH', OP_ACK, 65535),
                         struct.pack('!HH', 99, 1), struct.pack('!HH', OP_DATA, 1) + b'x'):
            master.send(datagram, tid)
        stranger.send(b'\0\5\0\0no nul', tid)       # an ERROR from a stranger: ignored
        stranger.send(struct.pack('!HH', OP_ACK, 0), tid)
        opcode, number, _, _ = stranger.recv()
        assert (opcode, number) == (OP_ERROR, atftpd.ERR_UNKNOWN_TID)
        # Unicast transfers are untouched, and the master is still served.
        data, _ = bystander.download('small.txt')
        assert data == (tftp_root / 'small.txt').read_bytes()
        master.rrq('random.bin', options=[('multicast', '')])         # a repeat: OACK again
        opcode, _, payload, addr = master.recv()
        assert opcode == OP_OACK and addr == tid
        assert master.oack_options(payload)['multicast'].endswith(',1')
        master.error(0, 'bye')
    server.wait_for_log(CLOSED.pattern)
    assert server.alive()


def test_shutdown_sends_every_member_an_error(start_server):
    server = start_server()
    with RawClient(server.host, server.port) as first, \
            RawClient(server.host, server.port) as second:
        oack_of(first, 'random.bin', [('multicast', '')])
        oack_of(second, 'random.bin', [('multicast', '')])
        assert server.stop() == 0
        for client in (first, second):
            opcode, code, _, _ = client.recv()
            assert (opcode, code) == (OP_ERROR, 0)


###############################################################################
# Option parsing (pure functions) #############################################
###############################################################################

@pytest.mark.parametrize('text,expected', [
    ('239.255.0.0-2', ['239.255.0.0', '239.255.0.1', '239.255.0.2']),
    ('239.255.0.0-1,128-129,200', ['239.255.0.0', '239.255.0.1', '239.255.0.128',
                                   '239.255.0.129', '239.255.0.200']),
    ('224.1.2.3', ['224.1.2.3']),
    ('239.1.1.1,239.2.2.2-3', ['239.1.1.1', '239.2.2.2', '239.2.2.3']),
    (' 239.1.1.5 , 5 ', ['239.1.1.5']),             # repeats count once
])
def test_parse_mcast_addresses(text, expected):
    assert atftpd.parse_mcast_addresses(text) == expected


def test_parse_mcast_addresses_defaults():
    assert len(atftpd.parse_mcast_addresses(atftpd.MCAST_DEFAULT_ADDR)) == 256
    assert atftpd.parse_port_list(atftpd.MCAST_DEFAULT_PORT) == [1758]


@pytest.mark.parametrize('text', [
    '', '10.0.0.1', '239.255.0', '239.255.0.0-256', '239.255.0.5-1', '1-2,239.0.0.1',
    '239.255.0.x', '239.255-256.0.1', '240.0.0.1', '239.255.0.0-', '239.255.0.0,,1',
    '239.255.0.٣',
])
def test_parse_mcast_addresses_rejects(text):
    with pytest.raises(ValueError):
        atftpd.parse_mcast_addresses(text)


@pytest.mark.parametrize('text,expected', [
    ('1758', [1758]), ('1758-1760,8000', [1758, 1759, 1760, 8000]), ('5,5,4-5', [5, 4]),
])
def test_parse_port_list(text, expected):
    assert atftpd.parse_port_list(text) == expected


@pytest.mark.parametrize('text', ['', '0', '65536', '2-1', 'x', '1758,', '-5', '1e3'])
def test_parse_port_list_rejects(text):
    with pytest.raises(ValueError):
        atftpd.parse_port_list(text)


@pytest.mark.parametrize('args', [
    ['--mcast-addr', '10.1.2.3'], ['--mcast-port', '0'], ['--mcast-ttl', '256'],
    ['--mcast-ttl', 'x'], ['--mtftp-port', '70000'],
])
def test_bad_multicast_settings_are_usage_errors(tftp_root, capsys, args):
    with pytest.raises(SystemExit) as exc:
        atftpd.config_from_args(atftpd.build_parser(), args + [str(tftp_root)])
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2      # usage + error


def test_oack_with_multicast_keeps_request_order():
    request = [('tsize', '0'), ('multicast', ''), ('windowsize', '8'), ('blksize', '1024')]
    acked = [('tsize', 10), ('blksize', 1024)]
    assert atftpd.oack_with_multicast(request, acked, 'g,1,0') == [
        ('tsize', 10), ('multicast', 'g,1,0'), ('blksize', 1024)]
