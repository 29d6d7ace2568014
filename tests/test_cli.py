"""The command line: errors, --help, --version and atftpd compatibility.

Bad command lines must exit 2 with the usage line and exactly one error
line naming the problem, and never start a server. The compatibility tests
run the real server with the command lines that init scripts use (Debian's
postinst, OpenWrt's init script) and download a file from it.
"""

import os
import pwd
import re
import socket
import struct
import time

import pytest

from conftest import IS_ROOT, SERVER, STARTED, RawClient
from process_support import (PYTHON, argv_servers, daemon_args, error_line,  # noqa: F401
                             free_port, public_root, run_cli, user_args)

import atftpd

ATFTPD_OPTIONS = [
    '--tftpd-timeout', '--retry-timeout', '--maxthread', '--verbose', '--trace', '--no-timeout',
    '--no-tsize', '--no-blksize', '--no-windowsize', '--no-multicast', '--logfile', '--pidfile',
    '--listen-local', '--daemon', '--no-fork', '--user', '--group', '--port', '--bind-address',
    '--mcast-ttl', '--mcast-addr', '--mcast-port', '--pcre', '--pcre-test', '--mtftp',
    '--mtftp-port', '--prevent-sas', '--no-source-port-checking', '--mcast-switch-client',
    '--version', '--help',
]

GENERATOR_ENVIRONMENT = [
    'TFTP_CLIENT_ADDR', 'TFTP_CLIENT_PORT', 'TFTP_SERVER_ADDR', 'TFTP_REQUEST', 'TFTP_FILE',
    'TFTP_ROOT', 'TFTP_MODE', 'TFTP_OPTIONS',
]

# (test id, arguments before the root, words the error line must contain)
BAD_COMMAND_LINES = [
    ('unknown-option', ['--no-such-option'], ['--no-such-option']),
    ('port-not-a-number', ['--port', 'abc'], ['--port', 'abc']),
    ('port-too-large', ['--port', '70000'], ['--port', '70000']),
    ('maxthread-zero', ['--maxthread', '0'], ['--maxthread']),
    ('max-blksize-too-small', ['--max-blksize', '4'], ['--max-blksize']),
    ('max-blksize-too-large', ['--max-blksize', '70000'], ['--max-blksize']),
    ('max-windowsize-zero', ['--max-windowsize', '0'], ['--max-windowsize']),
    ('retry-timeout-zero', ['--retry-timeout', '0'], ['--retry-timeout']),
    ('verbose-not-a-number', ['--verbose=abc'], ['--verbose', 'abc']),
    ('bind-address-not-an-ip', ['--bind-address', 'not-an-ip'], ['--bind-address', 'not-an-ip']),
    ('no-such-user', ['--user', 'no-such-user-xyz'], ['--user', 'no-such-user-xyz']),
    ('generator-missing', ['--content-generator', '/nonexistent'],
     ['--content-generator', '/nonexistent']),
]


def base_args():
    # What a working start would need: if a bad option were accepted, the
    # server would start (and be killed by run_cli's timeout).
    return ['--daemon', '--no-fork', '--port', '0', '--bind-address', '127.0.0.1',
            '--logfile', '-']


@pytest.mark.parametrize('args,words', [case[1:] for case in BAD_COMMAND_LINES],
                         ids=[case[0] for case in BAD_COMMAND_LINES])
def test_bad_command_line_exits_2_with_one_error_line(tftp_root, args, words):
    result = run_cli(base_args() + args + [tftp_root], timeout=10)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    line = error_line(result)
    for word in words:
        assert word in line, 'error line does not name %r: %r' % (word, line)
    assert result.stdout == ''


def test_missing_root_exits_2(tmp_path):
    missing = tmp_path / 'no-such-dir'
    result = run_cli(base_args() + [missing], timeout=10)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    line = error_line(result)
    assert str(missing) in line and 'does not exist' in line, line


def test_root_that_is_a_file_exits_2(tftp_root):
    path = tftp_root / 'small.txt'
    result = run_cli(base_args() + [path], timeout=10)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    line = error_line(result)
    assert str(path) in line and 'not a directory' in line, line


def test_help_lists_every_atftpd_option_and_the_environment():
    env = dict(os.environ, COLUMNS='80')
    result = run_cli(['--help'], env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ''
    text = result.stdout
    assert text.startswith('usage: ')
    missing = [name for name in ATFTPD_OPTIONS
               if not re.search(r'(?<![\w-])%s(?![\w-])' % re.escape(name), text)]
    assert not missing, 'options not in --help: %s' % missing
    missing = [name for name in GENERATOR_ENVIRONMENT if name not in text]
    assert not missing, 'environment variables not in --help: %s' % missing


def test_help_short_option():
    result = run_cli(['-h'])
    assert result.returncode == 0
    assert '--content-generator' in result.stdout


@pytest.mark.parametrize('flag', ['-V', '--version'])
def test_version(flag):
    result = run_cli([flag])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'atftpd.py %s' % atftpd.__version__
    assert atftpd.__version__ in result.stdout


###############################################################################
# atftpd compatibility: real servers ##########################################
###############################################################################

def download_from(host, port, name='small.txt'):
    with RawClient(host, port) as client:
        data, _ = client.download(name)
    return data


def test_underscore_aliases_of_multicast_options(start_server, tftp_root):
    server = start_server('--mcast_ttl', '1', '--mcast_addr', '239.255.0.0-255',
                          '--mcast_port', '1758')
    assert download_from(server.host, server.port) == (tftp_root / 'small.txt').read_bytes()


def test_debian_postinst_command_line(argv_servers, public_root):
    # /var/lib/dpkg/info/atftpd.postinst (inetd line, options only), with the
    # port made free and --daemon --no-fork --logfile - so it runs in the test.
    argv = [PYTHON, SERVER, '--port', '0', '--tftpd-timeout', '300', '--retry-timeout', '5',
            '--mcast-port', '1758', '--mcast-addr', '239.239.239.0-255', '--mcast-ttl', '1',
            '--maxthread', '100', '--verbose=5', '--daemon', '--no-fork', '--logfile', '-',
            public_root]
    server = argv_servers(argv, root=public_root)
    assert 'serving %s on' % public_root in server.wait_for_log(STARTED.pattern)
    # Bound to '::' (both families) or 0.0.0.0 without IPv6: IPv4 works either way.
    assert download_from('127.0.0.1', server.port, 'pub.txt') == b'world readable\n'


def test_options_after_the_directory(argv_servers, tftp_root):
    argv = [PYTHON, SERVER, tftp_root] + daemon_args() + ['--logfile', '-'] + user_args()
    server = argv_servers(argv, root=tftp_root)
    assert 'serving %s on' % tftp_root in server.wait_for_log(STARTED.pattern)
    assert download_from(server.host, server.port) == (tftp_root / 'small.txt').read_bytes()


def test_long_option_abbreviations(argv_servers, tftp_root):
    argv = [PYTHON, SERVER, '--daem', '--no-f', '--port', '0', '--bind-addr', '127.0.0.1',
            '--logf', '-'] + user_args() + [tftp_root]
    server = argv_servers(argv, root=tftp_root)
    assert download_from(server.host, server.port) == (tftp_root / 'small.txt').read_bytes()


@pytest.mark.parametrize('flag', ['--verbose', '-v', '--verb'])
def test_verbose_followed_by_directory(argv_servers, tmp_path, flag):
    # atftpd's --verbose takes its value only attached: '--verbose DIR' is
    # level 6 (info) and DIR is the root, not the level.
    root = tmp_path / 'verbose-root'
    root.mkdir()
    (root / 'only-here.txt').write_bytes(b'served from the verbose root\n')
    argv = [PYTHON, SERVER] + daemon_args() + ['--logfile', '-'] + user_args() + [flag, root]
    server = argv_servers(argv, root=root)
    assert 'serving %s on' % root in server.wait_for_log(STARTED.pattern)
    data = download_from(server.host, server.port, 'only-here.txt')
    assert data == b'served from the verbose root\n'
    server.wait_for_log(r'serving only-here\.txt to ')      # an info (6) line


def send_from_port_zero(host, port, payload):
    """A datagram whose UDP source port is 0: the server's ERROR reply to it
    fails with EINVAL, which the server logs at debug level."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
    try:
        raw.sendto(struct.pack('!HHHH', 0, port, 8 + len(payload), 0) + payload, (host, 0))
    finally:
        raw.close()


@pytest.mark.parametrize('flag', ['-v7', '--verbose=7'])
def test_verbose_7_logs_debug_lines(start_server, tftp_root, flag):
    if not IS_ROOT:
        pytest.skip('provoking a debug line needs a raw socket (root)')
    server = start_server(flag)
    assert download_from(server.host, server.port) == (tftp_root / 'small.txt').read_bytes()
    server.wait_for_log(r'serving small\.txt to ')                  # info
    send_from_port_zero(server.host, server.port, b'\x00\x09junk')
    server.wait_for_log(r'127\.0\.0\.1:0: cannot send error: ')     # debug


def test_default_level_has_no_debug_or_info_lines(start_server, tftp_root):
    server = start_server()
    assert download_from(server.host, server.port) == (tftp_root / 'small.txt').read_bytes()
    server.wait_for_log(r'sent small\.txt to ')
    if IS_ROOT:
        send_from_port_zero(server.host, server.port, b'\x00\x09junk')
        time.sleep(0.5)
    assert server.stop() == 0
    assert not [line for line in server.lines if 'serving small.txt' in line
                or 'cannot send error' in line or 'bad request' in line], server.log()


def test_openwrt_init_script_command_line(argv_servers, tftp_root):
    # OpenWrt's atftpd init script: no --logfile (syslog), a fixed port.
    port = free_port()
    argv = [PYTHON, SERVER, '--no-fork', '--daemon', '--user', 'root.root', '--port', str(port),
            tftp_root]
    if not IS_ROOT:                 # only root may switch to root; keep the shape
        argv[5] = pwd.getpwuid(os.getuid()).pw_name
    server = argv_servers(argv, root=tftp_root, wait_ready=False)
    deadline = time.monotonic() + 15
    while True:
        assert server.alive(), 'server exited with %s:\n%s' % (server.proc.poll(), server.log())
        try:
            with RawClient('127.0.0.1', port, timeout=0.5) as client:
                data, _ = client.download('small.txt')
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
    assert data == (tftp_root / 'small.txt').read_bytes()


###############################################################################
# Verbose normalisation, directly #############################################
###############################################################################

@pytest.mark.parametrize('argv,expected', [
    (['--verbose', '/srv/tftp'], ['--verbose=', '/srv/tftp']),
    (['--verbose=7'], ['--verbose=7']),
    (['-v7'], ['--verbose=7']),
    (['-v'], ['--verbose=']),
    (['--verb', 'dir'], ['--verbose=', 'dir']),
    (['--verbo=3'], ['--verbose=3']),
    (['-V'], ['-V']),
    (['--version'], ['--version']),
    (['--daemon', '--', '-v', '--verbose'], ['--daemon', '--', '-v', '--verbose']),
    (['--port', '69', '/srv'], ['--port', '69', '/srv']),
])
def test_normalise_verbose(argv, expected):
    assert atftpd.normalise_verbose(argv) == expected


@pytest.mark.parametrize('argv,level', [
    ([], atftpd.LOG_NOTICE),
    (['--verbose'], 6),
    (['-v'], 6),
    (['-v', '-v'], 7),
    (['-v', '-v', '-v'], 7),                 # capped at debug
    (['-v7'], 7),
    (['--verbose=7'], 7),
    (['--verbose=0'], 0),
    (['-v3'], 3),
    (['--verbose=9'], 7),
    (['--verbose=3', '-v'], 4),
])
def test_config_verbose_levels(tftp_root, argv, level):
    config = atftpd.config_from_args(atftpd.build_parser(), argv + [str(tftp_root)])
    assert config.log_level == level
    assert config.root == str(tftp_root)


def test_config_verbose_then_directory_is_the_root(tftp_root):
    config = atftpd.config_from_args(atftpd.build_parser(), ['--verbose', str(tftp_root)])
    assert config.log_level == 6
    assert config.root == str(tftp_root)
    assert config.extra_directories == []


def test_config_bad_verbose_is_a_usage_error(tftp_root, capsys):
    with pytest.raises(SystemExit) as exc:
        atftpd.config_from_args(atftpd.build_parser(), ['--verbose=abc', str(tftp_root)])
    assert exc.value.code == 2
    assert 'verbose' in capsys.readouterr().err


def test_config_debian_postinst_values(tftp_root):
    config = atftpd.config_from_args(atftpd.build_parser(), [
        '--port', '69', '--tftpd-timeout', '300', '--retry-timeout', '5', '--mcast-port', '1758',
        '--mcast-addr', '239.239.239.0-255', '--mcast-ttl', '1', '--maxthread', '100',
        '--verbose=5', str(tftp_root)])
    assert (config.port, config.retry_timeout, config.maxthread, config.log_level) == (69, 5, 100, 5)
    assert config.idle_timeout == 300            # not --daemon: inetd mode
    assert config.root == str(tftp_root)
    assert config.mcast_addresses[0] == '239.239.239.0' and len(config.mcast_addresses) == 256
    assert (config.mcast_ports, config.mcast_ttl, config.multicast) == ([1758], 1, True)


def test_help_shows_the_verbose_level_attached_as_the_parser_takes_it():
    help_text = run_cli(['--help']).stdout
    assert re.search(r'^  -v\[N\], --verbose\[=N\] ', help_text, re.M), help_text
    for form in ('-v7', '--verbose=7'):
        assert atftpd.config_from_args(atftpd.build_parser(), [form, '/srv']).log_level == 7
    # Detached, as in atftpd: one level more, and the word is the directory.
    config = atftpd.config_from_args(atftpd.build_parser(), ['-v', '7'])
    assert (config.log_level, os.path.basename(config.root)) == (atftpd.LOG_NOTICE + 1, '7')
