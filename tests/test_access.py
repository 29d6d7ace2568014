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
from test_generator_limits import client_from

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
