"""The sample generators in generators/, run as atftpd.py runs them.

Each one is served through the real server to a real client and its content
checked byte for byte; the generated maclist script is run under sh and
busybox sh with a stub `wl`; the iptables rules go through the real
`iptables-restore --test` in a network namespace of their own; hostile
inventory rows must never reach the output. Edge cases (exit status,
stderr, nothing written) run the generator directly with descriptor 3 on a
temporary file, exactly as the server sets it up.
"""

import ast
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import textwrap

import pytest

from conftest import IS_ROOT, PROJECT, RawClient, TftpError
from light_support import blocker_source, excluded_modules, write_launcher

import atftpd

GENERATORS = os.path.join(PROJECT, 'generators')
MACLIST = os.path.join(GENERATORS, 'maclist')
IPTABLES = os.path.join(GENERATORS, 'iptables')
PXELINUX = os.path.join(GENERATORS, 'pxelinux')     # a link to pxe, its old name
PXE = os.path.join(GENERATORS, 'pxe')
SH_EXAMPLE = os.path.join(GENERATORS, 'content-generator.sh')
PYTHON_GENERATORS = [MACLIST, IPTABLES, PXELINUX, PXE]


def require(tool):
    """The path of `tool`; a missing tool fails the test, it never skips."""
    for directory in os.environ.get('PATH', '').split(os.pathsep) + ['/usr/sbin', '/sbin']:
        path = os.path.join(directory, tool)
        if os.access(path, os.X_OK):
            return path
    pytest.fail('%s is not installed (see tests/debian-packages.txt)' % tool)


def run_generator(argv, env=None, timeout=30):
    """Run a generator with descriptor 3 on a temporary file, stdin on
    /dev/null, as atftpd.py does. Returns (exit status, content, stderr).
    (dup2 leaves 3 inheritable; every other descriptor of ours is
    close-on-exec, as Python makes them.)"""
    with tempfile.TemporaryFile() as out:
        fd = out.fileno()
        result = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=dict(os.environ, **(env or {})), close_fds=False,
            preexec_fn=lambda: os.dup2(fd, 3), timeout=timeout, universal_newlines=True)
        out.seek(0)
        return result.returncode, out.read(), result.stderr


def serve(start_server, generator, env, *args):
    """A server whose generator sees `env` on top of the test's environment."""
    return start_server('--content-generator', generator, '-v6', *args,
                        env=dict(os.environ, **env))


def fetch(server, name, options=()):
    with RawClient(server.host, server.port) as client:
        return client.download(name, options=options)[0]


def assert_not_found(server, name):
    with pytest.raises(TftpError) as info:
        fetch(server, name)
    assert info.value.code == atftpd.ERR_NOT_FOUND


###############################################################################
# All of them ################################################################
###############################################################################

@pytest.mark.parametrize('generator, words', [
    (MACLIST, ['MACLIST_SOURCE', 'MACLIST_FORMAT', 'MACLIST_QUERY', 'MACLIST_FILTER',
               'MACLIST_NAME', 'sqlite3', 'python3-sqlite3', 'Example']),
    (IPTABLES, ['IPTABLES_POLICY', 'IPTABLES_NAME', 'TFTP_CLIENT_ADDR', 'Example']),
    (PXELINUX, ['PXELINUX_HOSTS', 'PXELINUX_HEXIP', 'Example']),
    (PXE, ['PXE_FORMAT', 'PXE_SOURCE', 'PXE_QUERY', 'PXE_TIMEOUT', 'PXE_LOADERS', 'PXE_HEXIP',
           'PXE_GRUB_DIR', 'PXE_IPXE_DIR', 'grub.cfg-01-', 'sqlite3', 'python3-sqlite3', 'psql',
           'Example']),
    (SH_EXAMPLE, ['TFTP_CLIENT_ADDR', '--file']),
])
def test_help_exits_0_and_names_what_it_reads(generator, words):
    result = subprocess.run([generator, '--help'], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
    assert result.returncode == 0, result.stderr
    for word in words:
        assert word in result.stdout


@pytest.mark.parametrize('generator', PYTHON_GENERATORS)
def test_python_generators_are_3_7_executables_with_a_header(generator):
    with open(generator) as f:
        source = f.read()
    assert source.startswith('#!/usr/bin/env python3\n# SPDX-License-Identifier: GPL-2.0-or-later\n"""')
    assert os.access(generator, os.X_OK)
    tree = ast.parse(source, filename=generator, feature_version=(3, 7))
    for node in ast.walk(tree):
        assert not isinstance(node, ast.NamedExpr), 'walrus at line %d' % node.lineno
        if isinstance(node, ast.Attribute):
            assert node.attr not in ('removeprefix', 'removesuffix'), node.lineno


@pytest.mark.parametrize('generator', PYTHON_GENERATORS)
def test_unknown_arguments_are_ignored(generator, tmp_path):
    status, content, _ = run_generator(
        [generator, '--newer-option', 'x', '--file', str(tmp_path / 'not-mine'), '--flag=1',
         'stray'])
    assert (status, content) == (1, b'')


def test_shell_example_is_shellcheck_clean():
    result = subprocess.run([require('shellcheck'), '-s', 'sh', SH_EXAMPLE],
                            stdout=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert result.returncode == 0, result.stdout


def test_shell_example_through_the_server(start_server):
    server = serve(start_server, SH_EXAMPLE, {})
    assert fetch(server, 'hello/world') == b'Hello 127.0.0.1, you asked for world.\n'
    assert_not_found(server, 'other/world')


@pytest.mark.parametrize('shell', [['sh'], ['busybox', 'sh']])
def test_shell_example_contract_under_sh_and_busybox(shell, tmp_path):
    shell = [require(shell[0])] + shell[1:]
    env = {'TFTP_CLIENT_ADDR': '192.0.2.7'}
    mine = run_generator(shell + [SH_EXAMPLE, '--x', '--file', '/srv/hello/a b', '--y'], env)
    assert mine == (0, b'Hello 192.0.2.7, you asked for a b.\n', '')
    assert run_generator(shell + [SH_EXAMPLE, '--file=/srv/hello/c'], env)[:2] == (
        0, b'Hello 192.0.2.7, you asked for c.\n')
    assert run_generator(shell + [SH_EXAMPLE, '--file', '/srv/other'], env)[:2] == (1, b'')
    assert run_generator(shell + [SH_EXAMPLE, '--file'], env)[:2] == (1, b'')


###############################################################################
# maclist ####################################################################
###############################################################################

ETHERS = '''\
# ethers(5) for the tests
00:11:22:33:44:55 laptop        # wireless
0:1A:2b:3:44:5    phone         # wireless
00-11-22-33-44-66 printer
0011.2233.4477    tv            # wireless
00:11:22:33:44:55 laptop-again  # wireless
'''

LEASES = '''\
1700000000 00:11:22:33:44:55 192.168.1.10 laptop 01:00:11:22:33:44:55
1700000000 52:54:00:AA:BB:CC 192.168.1.11 * *
duid 00:01:00:01:2c:5f:1a:2b:52:54:00:aa:bb:cc
1700000000 1234567 fd00::10 host6 00:01:00:01:2c:5f:1a:2b:52:54:00:aa:bb:cc
1700000000 00:11:22:33:44:zz 192.168.1.12 bad *
'''


def maclist_script(*macs):
    return ('#!/bin/sh\n'
            '# Generated by the atftpd.py maclist generator; do not edit.\n'
            'wl mac none\n'
            'wl mac %s 00:00:00:00:00:00\n' % ' '.join(macs)).encode()


@pytest.fixture
def ethers(tmp_path):
    path = tmp_path / 'ethers'
    path.write_text(ETHERS)
    return str(path)


def make_database(path, rows):
    connection = sqlite3.connect(str(path))
    with connection:
        connection.execute('CREATE TABLE hosts (mac, name TEXT, wireless INTEGER)')
        connection.executemany('INSERT INTO hosts VALUES (?, ?, ?)', rows)
    connection.close()
    return str(path)


def test_maclist_from_ethers_through_the_server(start_server, ethers):
    server = serve(start_server, MACLIST, {'MACLIST_SOURCE': ethers})
    expected = maclist_script('00:11:22:33:44:55', '00:11:22:33:44:66', '00:11:22:33:44:77',
                              '00:1a:2b:03:44:05')
    assert fetch(server, 'maclist', [('tsize', '0')]) == expected
    assert fetch(server, 'routers/kitchen/maclist') == expected
    assert_not_found(server, 'maclist.txt')
    assert_not_found(server, 'maclist/other')


def test_maclist_filter_keeps_only_entries_flagged_wireless(start_server, ethers):
    server = serve(start_server, MACLIST, {'MACLIST_SOURCE': ethers,
                                           'MACLIST_FILTER': '*wireless*'})
    assert fetch(server, 'maclist') == maclist_script(
        '00:11:22:33:44:55', '00:11:22:33:44:77', '00:1a:2b:03:44:05')


def test_maclist_from_dnsmasq_leases(start_server, tmp_path):
    leases = tmp_path / 'dnsmasq.leases'
    leases.write_text(LEASES)
    server = serve(start_server, MACLIST, {'MACLIST_SOURCE': str(leases),
                                           'MACLIST_FORMAT': 'dnsmasq'})
    assert fetch(server, 'maclist') == maclist_script('00:11:22:33:44:55', '52:54:00:aa:bb:cc')
    server.wait_for_log(r"dnsmasq.leases:5: skipped, not a station MAC address: "
                        r"'00:11:22:33:44:zz'")


def test_maclist_from_sqlite_with_a_query(start_server, tmp_path):
    database = make_database(tmp_path / 'hosts.db', [
        ('00:11:22:33:44:99', 'laptop', 1), ('00:11:22:33:44:55', 'desktop', 0),
        ('00-11-22-33-44-88', 'phone', 1)])
    server = serve(start_server, MACLIST, {
        'MACLIST_SOURCE': database, 'MACLIST_FORMAT': 'sqlite',
        'MACLIST_QUERY': 'SELECT mac, name FROM hosts WHERE wireless = 1'})
    assert fetch(server, 'maclist') == maclist_script('00:11:22:33:44:88', '00:11:22:33:44:99')


def test_maclist_fetched_by_curl(start_server, ethers, tmp_path):
    server = serve(start_server, MACLIST, {'MACLIST_SOURCE': ethers})
    out = tmp_path / 'fetched'
    result = subprocess.run([require('curl'), '-s', '-S', '-o', str(out),
                             'tftp://127.0.0.1:%d/maclist' % server.port],
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == maclist_script('00:11:22:33:44:55', '00:11:22:33:44:66',
                                              '00:11:22:33:44:77', '00:1a:2b:03:44:05')


STUB_WL = '''\
#!/bin/sh
for arg in "$@"; do printf '[%s]' "$arg"; done >> "$WL_CALLS"
printf '\\n' >> "$WL_CALLS"
'''


def run_with_stub_wl(shell, script_bytes, tmp_path):
    """Run a generated script with a `wl` that only records its arguments;
    return the calls, one '[arg][arg]...' line each."""
    bin_dir = tmp_path / 'stub-bin'
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / 'wl').write_text(STUB_WL)
    (bin_dir / 'wl').chmod(0o755)
    script = tmp_path / 'maclist.sh'
    script.write_bytes(script_bytes)
    calls = tmp_path / 'wl-calls'
    if calls.exists():
        calls.unlink()
    env = dict(os.environ, PATH='%s:%s' % (bin_dir, os.environ['PATH']), WL_CALLS=str(calls))
    result = subprocess.run(shell + [str(script)], env=env, cwd=str(tmp_path), timeout=30,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True)
    assert result.returncode == 0, result.stdout
    assert result.stdout == ''
    return calls.read_text().splitlines()


SHELLS = [['sh'], ['busybox', 'sh']]


@pytest.mark.parametrize('shell', SHELLS, ids=['sh', 'busybox-sh'])
def test_maclist_script_makes_exactly_the_wl_calls(start_server, ethers, tmp_path, shell):
    shell = [require(shell[0])] + shell[1:]
    server = serve(start_server, MACLIST, {'MACLIST_SOURCE': ethers})
    calls = run_with_stub_wl(shell, fetch(server, 'maclist'), tmp_path)
    assert calls == [
        '[mac][none]',
        '[mac][00:11:22:33:44:55][00:11:22:33:44:66][00:11:22:33:44:77][00:1a:2b:03:44:05]'
        '[00:00:00:00:00:00]',
    ]


def hostile_ethers(canary):
    touch = 'touch %s' % canary
    return '\n'.join([
        '00:11:22:33:44:55;%s host' % touch,
        '$(%s) host' % touch,
        '`%s` host' % touch,
        '00:11:22:33:44:66 host$(%s);`%s`  # wireless' % (touch, touch),
        '00:11:22:33:44:zz bad',
        '01:00:5e:00:00:01 multicast',
        'ff:ff:ff:ff:ff:ff broadcast',
        '00:00:00:00:00:00 terminator',
        '00:11:22:33:44:77 "quoted \'host\' name"',
        '00:11:22:33:44:5 5 short-but-valid-octet; touch x',
        '00:11:22:33:44:555 too-long',
        '00:11:22:33:44 too-short',
        '001122334455667 too-many-digits',
        '00:11-22:33:44:55 mixed-separators',
    ]) + '\n'


@pytest.mark.parametrize('shell', SHELLS, ids=['sh', 'busybox-sh'])
def test_maclist_hostile_ethers_rows_never_reach_the_script(start_server, tmp_path, shell):
    shell = [require(shell[0])] + shell[1:]
    canary = tmp_path / 'CANARY'
    source = tmp_path / 'ethers'
    source.write_text(hostile_ethers(canary))
    server = serve(start_server, MACLIST, {'MACLIST_SOURCE': str(source)})
    script = fetch(server, 'maclist')
    assert script == maclist_script('00:11:22:33:44:05', '00:11:22:33:44:66',
                                    '00:11:22:33:44:77')
    assert run_with_stub_wl(shell, script, tmp_path) == [
        '[mac][none]', '[mac][00:11:22:33:44:05][00:11:22:33:44:66][00:11:22:33:44:77]'
                       '[00:00:00:00:00:00]']
    assert not canary.exists()
    for line in (1, 2, 3, 5, 6, 7, 8, 11, 12, 13, 14):
        server.wait_for_log(r'ethers:%d: skipped, not a station MAC address' % line)


def test_maclist_hostile_sqlite_rows_never_reach_the_script(tmp_path):
    canary = tmp_path / 'CANARY'
    touch = 'touch %s' % canary
    database = make_database(tmp_path / 'hosts.db', [
        ('00:11:22:33:44:55\n%s' % touch, 'newline', 1),
        ('00:11:22:33:44:55; %s' % touch, 'semicolon', 1),
        ('$(%s)' % touch, 'subst', 1),
        ('`%s`' % touch, 'backticks', 1),
        (None, 'null', 1),
        (42, 'integer', 1),
        (b'\x00\x11\x22\x33\x44\x55', 'blob', 1),
        ('00:11:22:33:44:88', 'host"; %s; "' % touch, 1),
        (' 00:11:22:33:44:99\n', "it's $(%s)" % touch, 1),
    ])
    status, content, stderr = run_generator([MACLIST, '--file', '/srv/tftp/maclist'], {
        'MACLIST_SOURCE': database, 'MACLIST_FORMAT': 'sqlite'})
    assert status == 0, stderr
    assert content == maclist_script('00:11:22:33:44:88', '00:11:22:33:44:99')
    assert run_with_stub_wl(['sh'], content, tmp_path)[1] == (
        '[mac][00:11:22:33:44:88][00:11:22:33:44:99][00:00:00:00:00:00]')
    assert not canary.exists()
    warnings = stderr.splitlines()
    assert len(warnings) == 7, stderr
    assert all(line.startswith('maclist: %s row ' % database) for line in warnings)
    assert "row 1: skipped, not a station MAC address: '00:11:22:33:44:55\\n" in stderr


@pytest.mark.parametrize('env, message', [
    ({'MACLIST_SOURCE': '/nonexistent/ethers'},
     'maclist: cannot read /nonexistent/ethers: No such file or directory'),
    ({'MACLIST_FORMAT': 'csv'},
     "maclist: MACLIST_FORMAT must be one of dnsmasq, ethers, postgresql, sqlite, not 'csv'"),
    ({'MACLIST_FORMAT': 'sqlite', 'MACLIST_SOURCE': '/nonexistent/hosts.db'},
     'maclist: cannot read /nonexistent/hosts.db: no such database'),
    ({'MACLIST_FILTER': 'nothing-matches'},
     "no valid MAC address in %s matching 'nothing-matches'; nothing served"),
])
def test_maclist_broken_input_is_refused_with_a_message(ethers, env, message):
    env = dict({'MACLIST_SOURCE': ethers}, **env)
    status, content, stderr = run_generator([MACLIST, '--file', '/srv/maclist'], env)
    assert (status, content) == (1, b'')
    assert (message % ethers if '%s' in message else message) in stderr


def test_maclist_broken_sql_is_refused_with_a_message(tmp_path):
    database = make_database(tmp_path / 'hosts.db', [('00:11:22:33:44:55', 'a', 1)])
    status, content, stderr = run_generator([MACLIST, '--file', '/srv/maclist'], {
        'MACLIST_SOURCE': database, 'MACLIST_FORMAT': 'sqlite',
        'MACLIST_QUERY': 'SELECT mac FROM nosuchtable'})
    assert (status, content) == (1, b'')
    assert stderr == 'maclist: %s: no such table: nosuchtable\n' % database


def test_maclist_never_writes_to_its_database(tmp_path):
    database = make_database(tmp_path / 'hosts.db', [('00:11:22:33:44:55', 'a', 1)])
    status, content, stderr = run_generator([MACLIST, '--file', '/srv/maclist'], {
        'MACLIST_SOURCE': database, 'MACLIST_FORMAT': 'sqlite',
        'MACLIST_QUERY': "INSERT INTO hosts VALUES ('00:11:22:33:44:66', 'b', 1)"})
    assert (status, content) == (1, b'')
    assert 'readonly' in stderr


def test_maclist_is_deterministic_whatever_the_row_order(tmp_path):
    rows = [('00:11:22:33:44:%02x' % n, 'h%d' % n, 1) for n in range(2, 40)]
    first = make_database(tmp_path / 'a.db', rows)
    second = make_database(tmp_path / 'b.db', rows[::-1] + rows[:5])
    outputs = [run_generator([MACLIST, '--file', '/srv/maclist'],
                             {'MACLIST_SOURCE': db, 'MACLIST_FORMAT': 'sqlite'})
               for db in (first, second, first)]
    assert outputs[0][0] == 0
    assert outputs[0] == outputs[1] == outputs[2]


###############################################################################
# iptables ###################################################################
###############################################################################

POLICY = '''\
# firewall policy for the tests
policy input drop
policy forward drop
accept input in lo
accept input state established
accept input proto icmp
accept input proto tcp port 22 from 192.168.1.0/24   # ssh from the LAN
accept input proto udp port 67:68,53 in br-lan
reject input proto tcp port 23
accept input proto tcp port 80,443 client 127.0.0.1
accept forward in br-lan out wan+
drop output proto tcp to 10.0.0.0/8 port 25 client 192.168.1.0/24
policy output drop client 10.0.0.0/8
'''

COMMON_RULES = '''\
-A INPUT -i lo -j ACCEPT
-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A INPUT -p icmp -j ACCEPT
-A INPUT -p tcp -s 192.168.1.0/24 --dport 22 -j ACCEPT
-A INPUT -i br-lan -p udp -m multiport --dports 67:68,53 -j ACCEPT
-A INPUT -p tcp --dport 23 -j REJECT
'''

RULES_FOR_LOCALHOST = ('''\
# Generated by the atftpd.py iptables generator for 127.0.0.1; do not edit.
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
''' + COMMON_RULES + '''\
-A INPUT -p tcp -m multiport --dports 80,443 -j ACCEPT
-A FORWARD -i br-lan -o wan+ -j ACCEPT
COMMIT
''').encode()


@pytest.fixture
def policy(tmp_path):
    path = tmp_path / 'firewall.policy'
    path.write_text(POLICY)
    return str(path)


def test_iptables_rules_for_the_requesting_client(start_server, policy):
    server = serve(start_server, IPTABLES, {'IPTABLES_POLICY': policy})
    assert fetch(server, 'firewall/127.0.0.1.rules', [('tsize', '0')]) == RULES_FOR_LOCALHOST
    assert_not_found(server, 'firewall/192.168.1.7.rules')     # not this client's name
    assert_not_found(server, 'firewall.rules')


def test_iptables_fixed_name(start_server, policy):
    server = serve(start_server, IPTABLES, {'IPTABLES_POLICY': policy,
                                            'IPTABLES_NAME': 'firewall.rules'})
    assert fetch(server, 'firewall.rules') == RULES_FOR_LOCALHOST
    assert_not_found(server, 'firewall/127.0.0.1.rules')
    assert_not_found(server, 'other/firewall.rules')


def test_iptables_client_lines_follow_the_client(policy):
    status, content, stderr = run_generator(
        [IPTABLES, '--file', '/srv/tftp/firewall/10.1.2.3.rules'],
        {'IPTABLES_POLICY': policy, 'TFTP_ROOT': '/srv/tftp/', 'TFTP_CLIENT_ADDR': '10.1.2.3'})
    assert (status, stderr) == (0, '')
    assert content == ('''\
# Generated by the atftpd.py iptables generator for 10.1.2.3; do not edit.
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT DROP [0:0]
''' + COMMON_RULES + '''\
-A FORWARD -i br-lan -o wan+ -j ACCEPT
COMMIT
''').encode()


def namespace_argv():
    """A throwaway network namespace: iptables-restore there touches nothing
    of the host's. As non-root, a user namespace maps us to root in it."""
    return [require('unshare')] + (['-n'] if IS_ROOT else ['-r', '-n'])


def iptables_restore_test(rules, tmp_path):
    path = tmp_path / 'candidate.rules'
    path.write_bytes(rules)
    return subprocess.run(namespace_argv() + [require('iptables-restore'), '--test', str(path)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=60)


@pytest.mark.parametrize('client', ['127.0.0.1', '10.1.2.3', '192.168.1.7', '2001:db8::7'])
def test_iptables_restore_accepts_the_rules(start_server, policy, tmp_path, client):
    if client == '127.0.0.1':
        rules = fetch(serve(start_server, IPTABLES, {'IPTABLES_POLICY': policy}),
                      'firewall/127.0.0.1.rules')
    else:
        status, rules, stderr = run_generator(
            [IPTABLES, '--file', '/srv/firewall/%s.rules' % client],
            {'IPTABLES_POLICY': policy, 'TFTP_ROOT': '/srv', 'TFTP_CLIENT_ADDR': client})
        assert status == 0, stderr
    assert rules.count(b'\n-A ') >= 6
    result = iptables_restore_test(rules, tmp_path)
    assert result.returncode == 0, result.stdout


def test_iptables_restore_test_is_not_vacuous(tmp_path):
    """The check above means something: --test does reject a bad rule."""
    result = iptables_restore_test(b'*filter\n-A INPUT -p tcp --dport 99999 -j ACCEPT\nCOMMIT\n',
                                   tmp_path)
    assert result.returncode != 0, result.stdout


@pytest.mark.parametrize('line, reason', [
    ('accept input proto tcp;touch{IFS}{canary}', 'proto must be tcp, udp, icmp or all'),
    ('accept input proto tcp port 22 $(touch {canary})', "unknown word '$(touch'"),
    ('accept input proto tcp port 22 $(touch{IFS}{canary})', 'has no value'),
    ('accept input from `touch{IFS}{canary}`', 'not an IPv4 address or network'),
    ('accept input in eth0;touch{IFS}{canary}', 'bad interface name'),
    ('accept input in "eth0"', 'bad interface name'),
    ('accept input proto tcp port 22;reboot', 'bad port list'),
    ('accept input proto tcp port 99999', 'bad port: 99999'),
    ('accept input proto tcp port 30:20', 'bad port: 30:20'),
    ('accept input proto tcp port 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16',
     'more than 15 ports'),
    ('accept input proto icmp port 22', 'port needs proto tcp or udp'),
    ('accept input from 192.168.1.1/24', 'not an IPv4 address or network'),
    ('accept input proto tcp proto udp', 'proto given twice'),
    ('accept input state related', 'state must be one of'),
    ('accept input comment hello', "unknown word 'comment'"),
    ('accept input client 10.0.0.0/33', 'not an IPv4 address or network'),
    ('policy input reject', 'expected "policy CHAIN accept|drop [client NET]"'),
    ('policy input drop proto tcp', 'expected "policy CHAIN accept|drop [client NET]"'),
    ('allow input', "unknown statement 'allow'"),
    ('accept prerouting', 'expected "policy|accept|drop|reject input|forward|output"'),
    ('-A INPUT -j ACCEPT', 'expected "policy|accept|drop|reject input|forward|output"'),
])
def test_iptables_refuses_a_policy_with_a_bad_line(tmp_path, line, reason):
    canary = tmp_path / 'CANARY'
    path = tmp_path / 'firewall.policy'
    path.write_text('accept input in lo\n%s\n' % line.format(canary=canary, IFS='${IFS}'))
    status, content, stderr = run_generator(
        [IPTABLES, '--file', '/srv/firewall.rules'],
        {'IPTABLES_POLICY': str(path), 'IPTABLES_NAME': 'firewall.rules',
         'TFTP_ROOT': '/srv', 'TFTP_CLIENT_ADDR': '192.0.2.1'})
    assert (status, content) == (1, b'')
    assert stderr.startswith('iptables: %s:2: ' % path), stderr
    assert reason in stderr
    assert len(stderr.splitlines()) == 1
    assert not canary.exists()


def test_iptables_missing_policy_is_refused_with_a_message(start_server):
    server = serve(start_server, IPTABLES, {'IPTABLES_POLICY': '/nonexistent/fw.policy'})
    assert_not_found(server, 'firewall/127.0.0.1.rules')
    server.wait_for_log(r'generator: iptables: cannot read /nonexistent/fw.policy: '
                        r'No such file or directory')


###############################################################################
# pxelinux ###################################################################
###############################################################################

INVENTORY = '''\
[DEFAULT]
kernel = debian-installer/amd64/linux
initrd = debian-installer/amd64/initrd.gz
append = auto=true priority=critical url=http://192.0.2.1/d-i/%(hostname)s.cfg hostname=%(hostname)s
timeout = 30

[52:54:00:12:34:56]
hostname = web1
ip = 192.0.2.20

[52-54-00-AB-CD-EF]
hostname = db1
kernel = centos/vmlinuz
initrd = centos/initrd.img
append = inst.ks=http://192.0.2.1/ks/%(hostname)s.ks ip=dhcp
ipappend = 2
'''

WEB1 = b'''\
# Generated by the atftpd.py pxelinux generator for 52:54:00:12:34:56 (web1); do not edit.
DEFAULT install
PROMPT 0
TIMEOUT 30
LABEL install
  KERNEL debian-installer/amd64/linux
  INITRD debian-installer/amd64/initrd.gz
  APPEND auto=true priority=critical url=http://192.0.2.1/d-i/web1.cfg hostname=web1
'''

DB1 = b'''\
# Generated by the atftpd.py pxelinux generator for 52:54:00:ab:cd:ef (db1); do not edit.
DEFAULT install
PROMPT 0
TIMEOUT 30
LABEL install
  KERNEL centos/vmlinuz
  INITRD centos/initrd.img
  APPEND inst.ks=http://192.0.2.1/ks/db1.ks ip=dhcp
  IPAPPEND 2
'''


@pytest.fixture
def inventory(tmp_path):
    path = tmp_path / 'hosts.ini'
    path.write_text(INVENTORY)
    return str(path)


def test_pxelinux_config_for_known_macs(start_server, inventory):
    server = serve(start_server, PXELINUX, {'PXELINUX_HOSTS': inventory})
    assert fetch(server, 'pxelinux.cfg/01-52-54-00-12-34-56', [('tsize', '0')]) == WEB1
    assert fetch(server, 'pxelinux.cfg/01-52-54-00-ab-cd-ef') == DB1
    assert fetch(server, 'bios/pxelinux.cfg/01-52-54-00-ab-cd-ef') == DB1
    assert_not_found(server, 'pxelinux.cfg/C000020A')          # hex IP names are off


def test_pxelinux_unknown_host_is_not_found_and_quiet(start_server, inventory):
    server = serve(start_server, PXELINUX, {'PXELINUX_HOSTS': inventory})
    for name in ['pxelinux.cfg/01-52-54-00-12-34-57', 'pxelinux.cfg/default',
                 'pxelinux.cfg/01-52-54-00-12-34', 'other/01-52-54-00-12-34-56']:
        assert_not_found(server, name)
    server.wait_for_log(r'generator for .*/other/01-52-54-00-12-34-56: exit status 1')
    assert not re.search(r'\]: generator: ', server.log())    # nothing on stderr


@pytest.mark.parametrize('name', [
    'pxelinux.cfg/01-52-54-00-12-34-56-78', 'pxelinux.cfg/C0A80114', 'pxelinux.cfg/C0A8',
    'pxelinux.cfg/b8945908-d6a6-41a9-611d-74a6ab80b83d', 'pxelinux.cfg/default',
    'pxelinux.0', 'ldlinux.c32'])
def test_pxelinux_misses_without_reading_the_inventory(name):
    """PXELINUX probes about ten names per boot: those that cannot be a host
    fail at once, before the inventory is opened (here it does not exist)."""
    assert run_generator([PXELINUX, '--file', '/srv/' + name],
                         {'PXELINUX_HOSTS': '/nonexistent.ini'}) == (1, b'', '')


def test_pxelinux_hex_ip_names_when_enabled(start_server, inventory):
    server = serve(start_server, PXELINUX, {'PXELINUX_HOSTS': inventory,
                                            'PXELINUX_HEXIP': '1'})
    assert fetch(server, 'pxelinux.cfg/C0000214') == WEB1            # 192.0.2.20
    assert fetch(server, 'pxelinux.cfg/01-52-54-00-12-34-56') == WEB1
    assert_not_found(server, 'pxelinux.cfg/C0000215')
    assert_not_found(server, 'pxelinux.cfg/C00002')                  # a subnet probe


def test_pxelinux_menu_and_serial_keys(tmp_path):
    path = tmp_path / 'hosts.ini'
    path.write_text(textwrap.dedent('''\
        [52:54:00:12:34:56]
        hostname = lab
        serial = 0 115200
        ui = menu.c32
        menu_title = Install %(hostname)s, 100%% automatic
        kernel = reboot.c32
        timeout = 1
        '''))
    status, content, stderr = run_generator(
        [PXELINUX, '--file', '/srv/pxelinux.cfg/01-52-54-00-12-34-56'],
        {'PXELINUX_HOSTS': str(path)})
    assert (status, stderr) == (0, '')
    assert content == b'''\
# Generated by the atftpd.py pxelinux generator for 52:54:00:12:34:56 (lab); do not edit.
SERIAL 0 115200
UI menu.c32
MENU TITLE Install lab, 100% automatic
DEFAULT install
PROMPT 0
TIMEOUT 1
LABEL install
  KERNEL reboot.c32
'''


@pytest.mark.parametrize('host, reason', [
    ('hostname = web1"; reboot; "', "bad hostname: 'web1\"; reboot; \"'"),
    ("hostname = it's", 'bad hostname'),
    ('hostname = $(reboot)', 'bad hostname'),
    ('append = quiet\n  DEFAULT evil\n  LABEL evil', "bad append: 'quiet\\nDEFAULT evil"),
    ('kernel = linux initrd=evil.img', 'bad kernel'),
    ('kernel = linux\n  APPEND evil', 'bad kernel'),
    ('menu_title = a\tb', 'bad menu_title'),
    ('timeout = 1; reboot', 'bad timeout'),
    ('serial = 0 115200\n  UI evil.c32', 'bad serial'),
    ('ip = 192.0.2.300', 'bad ip'),
    ('apend = quiet', "unknown key 'apend'"),
    ('append = 100% done', "'%' must be followed by '%' or '('"),
    ('append = %(nothing)s', 'nothing'),
])
def test_pxelinux_refuses_a_host_with_a_bad_value(tmp_path, host, reason):
    path = tmp_path / 'hosts.ini'
    path.write_text('[DEFAULT]\nkernel = linux\n\n[52:54:00:12:34:56]\n%s\n' % host)
    status, content, stderr = run_generator(
        [PXELINUX, '--file', '/srv/pxelinux.cfg/01-52-54-00-12-34-56'],
        {'PXELINUX_HOSTS': str(path)})
    assert (status, content) == (1, b'')
    assert stderr.startswith('pxelinux: [52:54:00:12:34:56]: '), stderr
    assert reason in stderr


@pytest.mark.parametrize('text, reason', [
    ('[52:54:00:12:34:56]\nkernel = a\n[52-54-00-12-34-56]\nkernel = b\n',
     '52-54-00-12-34-56 is the same host as 52:54:00:12:34:56'),
    ('[52:54:00:12:34:56]\nkernel = a\n[52:54:00:12:34:56]\nkernel = b\n',
     "section '52:54:00:12:34:56' already exists"),
    ('kernel = a\n', 'File contains no section headers'),
    ('[52:54:00:12:34:56]\nhostname = web1\n', '[52:54:00:12:34:56]: no kernel'),
])
def test_pxelinux_refuses_a_broken_inventory(tmp_path, text, reason):
    path = tmp_path / 'hosts.ini'
    path.write_text(text)
    status, content, stderr = run_generator(
        [PXELINUX, '--file', '/srv/pxelinux.cfg/01-52-54-00-12-34-56'],
        {'PXELINUX_HOSTS': str(path)})
    assert (status, content) == (1, b'')
    assert stderr.startswith('pxelinux: ') and reason in stderr, stderr


def test_pxelinux_missing_inventory_is_refused_with_a_message():
    assert run_generator([PXELINUX, '--file', '/srv/pxelinux.cfg/01-52-54-00-12-34-56'],
                         {'PXELINUX_HOSTS': '/nonexistent.ini'}) == (
        1, b'', "pxelinux: cannot read /nonexistent.ini: [Errno 2] No such file or "
                "directory: '/nonexistent.ini'\n")


def test_pxelinux_same_bytes_for_both_uefi_requests(start_server, inventory):
    """UEFI firmware asks twice; with the cache off the generator runs twice."""
    server = serve(start_server, PXELINUX, {'PXELINUX_HOSTS': inventory},
                   '--generator-cache', '0')
    first = fetch(server, 'pxelinux.cfg/01-52-54-00-12-34-56', [('tsize', '0')])
    assert fetch(server, 'pxelinux.cfg/01-52-54-00-12-34-56') == first == WEB1


###############################################################################
# python3-light ##############################################################
###############################################################################

@pytest.fixture
def light_python(tmp_path):
    """argv prefix: this Python with python3-light's missing modules blocked."""
    launcher = write_launcher(tmp_path / 'python3_light.py')
    # The blocker itself works: the same finder, then 'import sqlite3', fails.
    check = run_generator([sys.executable, '-I', '-c', blocker_source() + 'import sqlite3\n'])
    assert check[0] != 0 and "No module named 'sqlite3' (python3-light)" in check[2], check
    return [sys.executable, '-I', launcher]


@pytest.mark.parametrize('generator, name, env_of', [
    (MACLIST, 'maclist', lambda tmp: {'MACLIST_SOURCE': tmp['ethers']}),
    (MACLIST, 'maclist', lambda tmp: {'MACLIST_SOURCE': tmp['leases'],
                                      'MACLIST_FORMAT': 'dnsmasq'}),
    (IPTABLES, 'firewall/192.0.2.1.rules', lambda tmp: {'IPTABLES_POLICY': tmp['policy']}),
    (PXELINUX, 'pxelinux.cfg/C0000214', lambda tmp: {'PXELINUX_HOSTS': tmp['inventory'],
                                                     'PXELINUX_HEXIP': 'yes'}),
    (PXE, 'grub/grub.cfg-C0000214', lambda tmp: {'PXE_SOURCE': tmp['inventory'],
                                                 'PXE_HEXIP': 'yes'}),
    (PXE, 'ipxe/52-54-00-ab-cd-ef.ipxe', lambda tmp: {'PXE_SOURCE': tmp['inventory']}),
], ids=['maclist-ethers', 'maclist-dnsmasq', 'iptables', 'pxelinux', 'pxe-grub', 'pxe-ipxe'])
def test_runs_on_python3_light(light_python, tmp_path, ethers, policy, inventory,
                               generator, name, env_of):
    leases = tmp_path / 'leases'
    leases.write_text(LEASES)
    env = dict(env_of({'ethers': ethers, 'leases': str(leases), 'policy': policy,
                       'inventory': inventory}),
               TFTP_ROOT='/srv', TFTP_CLIENT_ADDR='192.0.2.1')
    argv = [generator, '--file', '/srv/' + name]
    full = run_generator(argv, env)
    light = run_generator(light_python + argv, env)
    assert full[0] == 0 and full[1], full
    assert light == full


def test_sqlite_source_on_python3_light_says_what_is_missing(light_python, tmp_path):
    database = make_database(tmp_path / 'hosts.db', [('00:11:22:33:44:55', 'a', 1)])
    env = {'MACLIST_SOURCE': database, 'MACLIST_FORMAT': 'sqlite'}
    assert run_generator(light_python + [MACLIST, '--file', '/srv/maclist'], env) == (
        1, b'', 'maclist: MACLIST_FORMAT=sqlite needs the Python sqlite3 module '
                '(OpenWrt: opkg install python3-sqlite3)\n')


def test_sqlite_is_the_only_optional_module_and_imported_lazily():
    """Statically: no generator imports a module python3-light lacks at the
    top level; only maclist and pxe (pxelinux) import sqlite3, inside a function."""
    blocked = set(excluded_modules())
    for generator in PYTHON_GENERATORS:
        with open(generator) as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] if isinstance(
                    node, ast.Import) else [node.module]
                assert not blocked & set(n.split('.')[0] for n in names), (generator, names)
        nested = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                  for alias in node.names if alias.name in blocked]
        assert nested == (['sqlite3'] if generator in (MACLIST, PXELINUX, PXE) else []), \
            generator
