"""--port-range and --allow/--deny (what tftp-hpa and dnsmasq users rely
on), on the wire with real clients where one can show it."""

import os
import socket
import subprocess
import sys

import pytest

import clients
from conftest import SERVER, RawClient
from process_support import run_cli
from netns_support import SERVER_IP, make_lan  # noqa: F401 (fixture)
from test_generator_limits import client_from, fetch_from

import atftpd

LOW, HIGH = 47000, 47002


def test_every_transfer_socket_binds_inside_the_port_range(start_server, tmp_path):
    clients.require('busybox')
    server = start_server('--port-range', '%d:%d' % (LOW, HIGH))
    for index in range(5):          # more transfers than ports, one after another
        result = clients.fetch('busybox', server.host, server.port, 'small.txt',
                               tmp_path / ('out%d' % index))
        assert result.returncode == 0, result.stderr
    ports = set()
    for _ in range(3):
        with RawClient(server.host, server.port) as client:
            client.rrq('small.txt')
            ports.add(client.recv()[3][1])
            client.ack(1)
    assert ports <= set(range(LOW, HIGH + 1)), ports


def test_an_exhausted_port_range_drops_requests_until_a_port_frees(start_server):
    server = start_server('--port-range', '%d:%d' % (LOW, LOW + 1))
    holders = [RawClient(server.host, server.port) for _ in range(2)]
    try:
        for holder in holders:
            holder.rrq('random.bin')
            holder.recv()
            holder.ack(1)
            holder.recv()                   # block 2: it keeps its port
        with RawClient(server.host, server.port) as late:
            late.rrq('small.txt')
            assert late.nothing_for(1.0)    # no port, no ERROR: its client asks again
            server.wait_for_log(r'every port of --port-range %d:%d is in use' % (LOW, LOW + 1))
            holders[0].send(atftpd.encode_error(0, 'enough'))
            server.wait_for_log(r'failed sending random\.bin .*aborted by client')
            late.rrq('small.txt')           # the retry
            opcode, block, payload, addr = late.recv()
            assert (opcode, block, payload) == (atftpd.OP_DATA, 1, b'hello, tftp\n')
            assert addr[1] in (LOW, LOW + 1)
            late.ack(1)
    finally:
        for holder in holders:
            holder.close()
    assert server.alive()


def test_allow_and_deny_by_client_address(start_server):
    server = start_server('--allow', '127.0.0.0/30', '--deny', '127.0.0.3', '--verbose=6')
    for address, served in (('127.0.0.1', True), ('127.0.0.2', True), ('127.0.0.3', False),
                            ('127.0.0.9', False)):
        with client_from(server, address) as client:
            client.rrq('small.txt')
            if served:
                assert client.recv()[:3] == (atftpd.OP_DATA, 1, b'hello, tftp\n'), address
                client.ack(1)
            else:
                assert client.nothing_for(0.5), address     # dropped, as tcp-wrappers do
    server.wait_for_log(r'127\.0\.0\.3:\d+: refused by --allow/--deny')


def test_ipv4_client_of_a_dual_stack_socket_matches_an_ipv4_network(start_server):
    if not socket.has_ipv6:
        pytest.skip('no IPv6 on this host')
    server = start_server('--allow', '127.0.0.1/32', '--allow', '::1', bind=('::',))
    with RawClient('127.0.0.1', server.port) as client:      # ::ffff:127.0.0.1 to the server
        assert client.download('small.txt')[0] == b'hello, tftp\n'
    with RawClient('::1', server.port) as client:
        assert client.download('small.txt')[0] == b'hello, tftp\n'


def test_networks_match_as_written():
    networks = [atftpd.parse_network(text) for text in ('192.0.2.0/24', '2001:db8::/32')]
    assert atftpd.in_networks('192.0.2.77', networks)
    assert atftpd.in_networks('::ffff:192.0.2.1', networks)
    assert atftpd.in_networks('2001:db8:1::5%eth0', networks)
    assert not atftpd.in_networks('192.0.3.1', networks)
    assert not atftpd.in_networks('2001:db9::1', networks)
    assert atftpd.in_networks('10.1.2.3', [atftpd.parse_network('0.0.0.0/0')])


@pytest.mark.parametrize('args', [['--allow', '10.0.0.0/33'], ['--deny', 'router.lan'],
                                  ['--port-range', '2000'], ['--port-range', '3:2'],
                                  ['--port-range', '1:70000']])
def test_bad_values_exit_2_with_one_line(args):
    result = run_cli(args + ['--daemon', '--no-fork', '/srv'])
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith('atftpd.py: error: argument %s' % args[0])


def test_tcp_wrapper_rules_for_tftp_are_named(tmp_path):
    allow, deny, other = tmp_path / 'hosts.allow', tmp_path / 'hosts.deny', tmp_path / 'x'
    allow.write_text('# in.tftpd: 10.0.0.0/8\nsshd: ALL\n')
    deny.write_text('sshd, in.tftpd : ALL\n')
    other.write_text('ALL: 192.0.2.1\n')
    found = atftpd.tcp_wrapper_mentions([str(allow), str(deny), str(other),
                                         str(tmp_path / 'missing')])
    assert found == [str(deny), str(other)]


def test_missing_dev_log_is_said_at_start(tmp_path):
    """With the default log target (syslog) and no /dev/log (a container),
    every line would be lost: the start says so on stderr. Where the host
    has /dev/log, it says nothing."""
    argv = [sys.executable, SERVER, '--daemon', '--no-fork', '--port', '0', '--bind-address',
            '127.0.0.1'] + (['--user', 'root.root'] if os.geteuid() == 0 else []) + [str(tmp_path)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            universal_newlines=True)
    try:
        if os.path.exists('/dev/log'):
            proc.terminate()
            assert 'dev/log' not in proc.communicate(timeout=20)[1]
        else:
            assert proc.stderr.readline() == (
                'atftpd.py: warning: /dev/log is missing: syslog lines are lost (in a '
                'container use --logfile -, else --logfile FILE)\n')
    finally:
        proc.terminate()
        proc.wait(20)


# -- per-client root and case-insensitive names --------------------------------------

def test_unique_root_by_ip_serves_the_clients_own_file_first(start_server, tftp_root):
    own = tftp_root / '127.0.0.2'
    own.mkdir()
    (own / 'small.txt').write_bytes(b'only for 127.0.0.2\n')
    server = start_server('--unique-root', 'ip')
    assert fetch_from(server, '127.0.0.2', 'small.txt') == b'only for 127.0.0.2\n'
    assert fetch_from(server, '127.0.0.1', 'small.txt') == b'hello, tftp\n'
    # Not in its own root: the shared one.
    assert fetch_from(server, '127.0.0.2', 'random.bin') == (tftp_root / 'random.bin').read_bytes()
    with client_from(server, '127.0.0.2') as client:        # confinement per root
        client.rrq('../small.txt')
        assert client.recv()[:2] == (atftpd.OP_ERROR, atftpd.ERR_ACCESS)


def test_client_mac_is_read_from_the_arp_table_as_dnsmasq_spells_it(tmp_path):
    arp = tmp_path / 'arp'
    arp.write_text('IP address       HW type     Flags       HW address            Mask     Device\n'
                   '10.0.0.5         0x1         0x2         52:54:00:AB:cd:01     *        eth0\n'
                   '10.0.0.6         0x1         0x0         00:00:00:00:00:00     *        eth0\n')
    assert atftpd.client_mac('10.0.0.5', str(arp)) == '52-54-00-ab-cd-01'
    assert atftpd.client_mac('::ffff:10.0.0.5', str(arp)) == '52-54-00-ab-cd-01'
    assert atftpd.client_mac('10.0.0.6', str(arp)) is None      # incomplete entry
    assert atftpd.client_mac('fe80::1', str(arp)) is None


@pytest.mark.netns
def test_unique_root_by_mac_on_a_real_link(make_lan, start_server, tftp_root):
    lan = make_lan(1)
    mac = subprocess.run(lan.exec_argv(lan.clients[0], ['cat', '/sys/class/net/eth0/address']),
                         stdout=subprocess.PIPE, universal_newlines=True, timeout=10,
                         check=True).stdout.strip().replace(':', '-')
    own = tftp_root / mac
    own.mkdir()
    (own / 'small.txt').write_bytes(b'for this MAC\n')
    server = start_server(argv=lan.exec_argv(lan.server, [
        sys.executable, SERVER, '--daemon', '--no-fork', '--port', '69', '--bind-address',
        SERVER_IP, '--user', 'root.root', '--logfile', '-', '--unique-root', 'mac',
        str(tftp_root)]))
    client = RawClient.__new__(RawClient)        # its socket lives in the client namespace
    client.sock, client.server, client.timeout, client.peer = (
        lan.socket_in(lan.clients[0]), (SERVER_IP, 69), 10.0, None)
    with client:
        assert client.download('small.txt')[0] == b'for this MAC\n'


def test_case_insensitive_names(start_server, tftp_root):
    (tftp_root / 'Boot').mkdir()
    (tftp_root / 'Boot' / 'BCD').write_bytes(b'boot configuration data\n')
    (tftp_root / 'twice').mkdir()
    (tftp_root / 'twice' / 'File').write_bytes(b'one\n')
    (tftp_root / 'twice' / 'FILE').write_bytes(b'two\n')
    server = start_server('--case-insensitive')
    with RawClient(server.host, server.port) as client:
        assert client.download('\\boot\\bcd')[0] == b'boot configuration data\n'
    with RawClient(server.host, server.port) as client:
        assert client.download('twice/File')[0] == b'one\n'       # the exact name first
    with RawClient(server.host, server.port) as client:
        client.rrq('twice/file')
        assert client.recv()[:2] == (atftpd.OP_ERROR, atftpd.ERR_NOT_FOUND)
    server.wait_for_log(r'ambiguous case-insensitive match: FILE, File')
    with RawClient(server.host, server.port) as client:
        client.rrq('BOOT/../small.txt')
        assert client.recv()[:2] == (atftpd.OP_ERROR, atftpd.ERR_ACCESS)
    plain = start_server()
    with RawClient(plain.host, plain.port) as client:
        client.rrq('boot/bcd')
        assert client.recv()[:2] == (atftpd.OP_ERROR, atftpd.ERR_NOT_FOUND)


# -- generators' MAC, visible misses, statistics file ---------------------------------

@pytest.mark.netns
def test_generator_gets_the_clients_mac_on_a_real_link(make_lan, start_server, tftp_root,
                                                        tmp_path):
    lan = make_lan(1)
    mac = subprocess.run(lan.exec_argv(lan.clients[0], ['cat', '/sys/class/net/eth0/address']),
                         stdout=subprocess.PIPE, universal_newlines=True, timeout=10,
                         check=True).stdout.strip()
    generator = tmp_path / 'gen'
    generator.write_text('#!/bin/sh\nprintf "mac=%s" "$TFTP_CLIENT_MAC" >&3\n')
    generator.chmod(0o755)
    server = start_server(argv=lan.exec_argv(lan.server, [
        sys.executable, SERVER, '--daemon', '--no-fork', '--port', '69', '--bind-address',
        SERVER_IP, '--user', 'root.root', '--logfile', '-', '--content-generator',
        str(generator), str(tftp_root)]))
    client = RawClient.__new__(RawClient)
    client.sock, client.server, client.timeout, client.peer = (
        lan.socket_in(lan.clients[0]), (SERVER_IP, 69), 10.0, None)
    with client:
        assert client.download('whoami')[0] == ('mac=%s' % mac.lower()).encode()
    # Marked as generated in the one line per transfer, at the default level.
    server.wait_for_log(r'sent whoami to .*, generated$')


def test_generator_gets_an_empty_mac_where_none_is_known(start_server, tmp_path):
    generator = tmp_path / 'gen'
    generator.write_text('#!/bin/sh\nprintf "mac=[%s]" "${TFTP_CLIENT_MAC-unset}" >&3\n')
    generator.chmod(0o755)
    server = start_server('--content-generator', str(generator))
    with RawClient(server.host, server.port) as client:     # loopback: no ARP entry
        assert client.download('whoami')[0] == b'mac=[]'


def test_misses_are_logged_at_the_default_level_unless_quieted(start_server, tmp_path):
    generator = tmp_path / 'gen'
    generator.write_text('#!/bin/sh\nexit 1\n')
    generator.chmod(0o755)
    loud = start_server()
    quiet = start_server('--quiet-misses')
    loud_gen = start_server('--content-generator', str(generator))
    quiet_gen = start_server('--content-generator', str(generator), '--quiet-misses')
    for server in (loud, quiet, loud_gen, quiet_gen):
        with RawClient(server.host, server.port) as client:
            client.rrq('pxelinux.cfg/01-52-54-00-12-34-56')
            assert client.recv()[:2] == (atftpd.OP_ERROR, atftpd.ERR_NOT_FOUND)
    loud.wait_for_log(r'127\.0\.0\.1:\d+: pxelinux\.cfg/01-52-54-00-12-34-56 not found')
    loud_gen.wait_for_log(r'failed sending pxelinux\.cfg/01-52-54-00-12-34-56 to 127\.0\.0\.1:'
                          r'\d+: not found \(generator: exit status 1\)')
    for server in (quiet, quiet_gen):
        server.wait_for_log(r'started, serving')
        assert server.stop() == 0
        assert 'pxelinux.cfg' not in server.log(), server.log()


def test_stats_file_in_prometheus_text_format(start_server, tmp_path):
    import signal
    path = tmp_path / 'atftpd.prom'
    server = start_server('--stats-file', str(path))
    with RawClient(server.host, server.port) as client:
        assert client.download('small.txt')[0] == b'hello, tftp\n'
    server.wait_for_log(r'sent small\.txt')
    server.proc.send_signal(signal.SIGUSR1)
    server.wait_for_log(r'stats: ')
    metrics = {}
    for line in path.read_text().splitlines():
        if not line.startswith('#'):
            name, value = line.split()
            metrics[name] = float(value)
        else:
            assert line.split()[1] in ('HELP', 'TYPE'), line
    assert metrics['atftpd_requests_total'] == 1
    assert metrics['atftpd_sent_total'] == 1
    assert metrics['atftpd_bytes_sent_total'] == len(b'hello, tftp\n')
    assert metrics['atftpd_start_time_seconds'] > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith('.tmp')] == []
    assert server.stop() == 0
    assert 'atftpd_requests_total 1\n' in path.read_text()      # written again at exit
