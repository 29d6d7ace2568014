"""The server as a process: signals, pidfile, log files, inetd mode and the
switch to an unprivileged user. Every test runs the real atftpd.py."""

import grp
import os
import pwd
import re
import signal
import socket
import time

import pytest

from conftest import STARTED, RawClient, ServerProcess, TftpError
from process_support import (addresses_of, daemon_args, error_line, inetd_socket,  # noqa: F401
                             proc_ids, public_root, require_root, run_cli, wait_exit,
                             wait_for_file_line)

import atftpd


def start_with_logfile(start_server, logfile, *args, **kwargs):
    """A server logging to `logfile` (a later --logfile beats conftest's '-');
    its address comes from the start-up line in that file."""
    server = start_server('--logfile', str(logfile), *args, wait_ready=False, **kwargs)
    line = wait_for_file_line(logfile, STARTED.pattern, timeout=20, proc=server.proc)
    server.addresses.extend(addresses_of(line))
    return server


def download(server, name='small.txt', **kwargs):
    with RawClient(server.host, server.port) as client:
        data, _ = client.download(name, **kwargs)
    return data


###############################################################################
# Signals and the pidfile #####################################################
###############################################################################

@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_stop_signal_ends_transfers_and_removes_pidfile(start_server, tmp_path, sig):
    pidfile = tmp_path / 'atftpd.pid'
    server = start_server('--pidfile', str(pidfile))
    assert pidfile.read_text() == '%d\n' % server.pid
    with RawClient(server.host, server.port) as client:
        client.rrq('random.bin')
        opcode, block, _, tid = client.recv()
        assert (opcode, block) == (atftpd.OP_DATA, 1)
        # The client stops ACKing: the transfer is in flight when the signal comes.
        assert server.stop(sig) == 0, server.log()
        for _ in range(20):
            opcode, code, payload, addr = client.recv(timeout=5)
            if opcode == atftpd.OP_ERROR:
                break
            assert opcode == atftpd.OP_DATA     # a resend racing the signal
        assert opcode == atftpd.OP_ERROR, 'no ERROR packet after signal %d' % sig
        assert addr == tid, 'ERROR not from the transfer TID'
        assert payload.endswith(b'\0')
    assert not pidfile.exists(), 'pidfile left behind'
    log = server.log()
    assert 'received signal %d, stopping' % sig in log
    assert 'failed sending random.bin to' in log and 'server stopping' in log


def test_pidfile_contains_pid_while_running(start_server, tmp_path):
    pidfile = tmp_path / 'run' / 'atftpd.pid'
    pidfile.parent.mkdir()
    server = start_server('--pidfile', str(pidfile))
    assert int(pidfile.read_text().strip()) == server.pid
    assert download(server)
    assert int(pidfile.read_text().strip()) == server.pid
    assert server.stop() == 0
    assert not pidfile.exists()


def test_sighup_reopens_logfile(start_server, tmp_path):
    logfile = tmp_path / 'atftpd.log'
    rotated = tmp_path / 'atftpd.log.1'
    server = start_with_logfile(start_server, logfile)
    os.rename(str(logfile), str(rotated))               # logrotate's move
    server.proc.send_signal(signal.SIGHUP)
    wait_for_file_line(logfile, r'received SIGHUP, log reopened', proc=server.proc)
    assert server.alive()
    assert download(server) == b'hello, tftp\n'
    wait_for_file_line(logfile, r'sent small\.txt to 127\.0\.0\.1:\d+', proc=server.proc)
    old = rotated.read_text()
    assert 'started, serving' in old
    assert 'sent small.txt' not in old and 'log reopened' not in old
    assert server.stop() == 0
    assert 'received signal 15, stopping' in logfile.read_text()


def test_sigusr1_logs_stats_and_keeps_running(server):
    assert download(server) == b'hello, tftp\n'
    server.wait_for_log(r'sent small\.txt to ')
    server.proc.send_signal(signal.SIGUSR1)
    line = server.wait_for_log(r'stats: ')
    assert 'stats: 1 requests, 1 files sent' in line, line
    assert server.alive()
    assert download(server, 'exact512') == bytes(range(256)) * 2
    assert server.stop() == 0


###############################################################################
# Start-up problems ###########################################################
###############################################################################

@pytest.mark.parametrize('mode', ['daemon', 'inetd'])
def test_missing_root_is_reported_clearly(tmp_path, mode):
    missing = tmp_path / 'srv' / 'tftp'
    args = daemon_args() if mode == 'daemon' else []
    result = run_cli(args + ['--logfile', '-', str(missing)], timeout=10)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    line = error_line(result)
    assert 'directory %s does not exist' % missing in line, line


def test_root_unreadable_after_privilege_drop_is_reported(tftp_root):
    require_root()
    # pytest's tmp directories are 0700 root: root can read the root, nobody cannot.
    server = ServerProcess(tftp_root, user_args=[], wait_ready=False)
    status = wait_exit(server.proc)
    server.reader.join(5)
    assert status == 2, server.log()
    assert re.search(r'not started: as nobody \(uid \d+, gid \d+\): directory %s is not '
                     r'accessible: Permission denied' % re.escape(str(tftp_root)),
                     server.log()), server.log()


def test_forking_daemon_refuses_a_root_nobody_can_read_with_one_line(tftp_root, tmp_path):
    # The check runs before the fork, so the shell or init script that
    # started it sees the status and the reason.
    require_root()
    args = ['--daemon', '--port', '0', '--bind-address', '127.0.0.1',
            '--logfile', str(tmp_path / 'log'), str(tftp_root)]
    result = run_cli(args, timeout=20)
    assert (result.returncode, result.stdout) == (2, ''), result.stderr
    assert re.fullmatch(r'atftpd\.py: as nobody \(uid \d+, gid \d+\): directory \S+ is not '
                        r'accessible: Permission denied\n', result.stderr), result.stderr


def test_generator_nobody_cannot_run_is_refused_at_start(public_root, tmp_path):
    require_root()
    generator = tmp_path / 'gen'         # inside pytest's 0700 directory
    generator.write_text('#!/bin/sh\necho hi >&3\n')
    generator.chmod(0o755)
    args = daemon_args() + ['--logfile', '-', '--content-generator', str(generator), public_root]
    result = run_cli(args, timeout=20)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert 'not started: as nobody' in result.stdout
    assert 'cannot run the content generator %s' % generator in result.stdout


###############################################################################
# Log content #################################################################
###############################################################################

def test_logfile_default_level_one_line_per_transfer(start_server, tmp_path):
    logfile = tmp_path / 'atftpd.log'
    server = start_with_logfile(start_server, logfile)
    assert len(download(server, 'random.bin')) == 300000
    wait_for_file_line(logfile, r'sent random\.bin to', proc=server.proc)
    assert server.stop() == 0
    lines = logfile.read_text().splitlines()
    about = [line for line in lines if 'random.bin' in line]
    assert len(about) == 1, '\n'.join(lines)
    assert 'sent random.bin to 127.0.0.1:' in about[0] and '300000 bytes' in about[0]
    assert not [line for line in lines if 'sending blocks' in line], '\n'.join(lines)
    assert len(lines) <= 6, 'more than start, transfer, stop and stats:\n' + '\n'.join(lines)


def test_trace_logs_every_packet(start_server, tmp_path):
    logfile = tmp_path / 'atftpd.log'
    server = start_with_logfile(start_server, logfile, '--trace')
    assert len(download(server, 'random.bin')) == 300000
    wait_for_file_line(logfile, r'sent random\.bin to', proc=server.proc)
    assert server.stop() == 0
    lines = logfile.read_text().splitlines()
    blocks = [line for line in lines if 'sending blocks' in line]
    assert len(blocks) >= 300000 // 512, '%d per-packet lines' % len(blocks)
    assert any('sending blocks 1..1' in line for line in blocks)


def test_control_characters_are_escaped_in_the_log(start_server, tftp_root, tmp_path):
    stored = 'we\nird\x1b[31m\r.txt'
    (tftp_root / stored).write_bytes(b'odd name\n')
    logfile = tmp_path / 'atftpd.log'
    server = start_with_logfile(start_server, logfile, '--verbose=7')
    assert download(server, stored) == b'odd name\n'
    missing = 'no\nsuch\x1b]0;title\x07\udcff'        # \udcff: the raw byte 0xff
    with RawClient(server.host, server.port) as client:
        with pytest.raises(TftpError) as exc:
            client.download(missing)
        assert exc.value.code == atftpd.ERR_NOT_FOUND
        with pytest.raises(TftpError) as exc:
            client.download('../\x1b[2Jescape\n')
        assert exc.value.code == atftpd.ERR_ACCESS
    wait_for_file_line(logfile, r'sent we\\nird', proc=server.proc)
    wait_for_file_line(logfile, r'refused \.\./\\x1b\[2Jescape\\n: outside the root',
                       proc=server.proc)
    wait_for_file_line(logfile, r'no\\nsuch\\x1b\]0;title\\x07\\udcff not found',
                       proc=server.proc)
    assert server.stop() == 0
    raw = logfile.read_bytes()
    bad = sorted(set(b for b in raw if (b < 0x20 and b != 0x0a) or b >= 0x7f))
    assert not bad, 'raw control or non-ASCII bytes in the log: %r' % bad
    text = raw.decode('ascii')
    assert 'sent we\\nird\\x1b[31m\\r.txt to 127.0.0.1:' in text
    for line in text.splitlines():
        assert ' atftpd[%d]: ' % server.pid in line, 'a log record split over lines: %r' % line


###############################################################################
# inetd mode ##################################################################
###############################################################################

def test_inetd_mode_serves_from_the_inherited_socket(start_server, tftp_root):
    sock = inetd_socket()
    try:
        server = start_server(daemon=False, stdin=sock.fileno())
        assert server.addresses == [sock.getsockname()]
    finally:
        sock.close()
    with RawClient('127.0.0.1', server.port) as client:
        data, _ = client.download('random.bin', options=[('blksize', 1428)])
    assert data == (tftp_root / 'random.bin').read_bytes()
    assert server.stop() == 0


def test_inetd_mode_exits_when_idle(start_server):
    sock = inetd_socket()
    try:
        server = start_server('--tftpd-timeout', '1', daemon=False, stdin=sock.fileno())
    finally:
        sock.close()
    assert download(server) == b'hello, tftp\n'
    status = wait_exit(server.proc, timeout=15)
    server.reader.join(5)
    assert status == 0, server.log()
    assert 'idle for 1 s, exiting' in server.log()


def test_inetd_mode_stays_up_while_active_then_exits(start_server):
    """Idle means no request for S seconds, counted from the last one."""
    sock = inetd_socket()
    try:
        server = start_server('--tftpd-timeout', '2', daemon=False, stdin=sock.fileno())
    finally:
        sock.close()
    for _ in range(3):
        assert download(server) == b'hello, tftp\n'
        time.sleep(1)
        assert server.alive(), server.log()
    assert wait_exit(server.proc, timeout=15) == 0


@pytest.mark.parametrize('kind', ['devnull', 'pipe', 'tcp-socket'])
def test_inetd_mode_without_datagram_socket_exits_2(tftp_root, kind):
    if kind == 'devnull':
        result = run_cli(['--logfile', '-', tftp_root], timeout=10)
    elif kind == 'pipe':
        read_end, write_end = os.pipe()
        try:
            result = run_cli(['--logfile', '-', tftp_root], timeout=10, stdin=read_end)
        finally:
            os.close(read_end)
            os.close(write_end)
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(('127.0.0.1', 0))
            result = run_cli(['--logfile', '-', tftp_root], timeout=10, stdin=tcp.fileno())
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    line = error_line(result)
    assert 'not a datagram socket' in line and '--daemon' in line, line


###############################################################################
# Privileges ##################################################################
###############################################################################

def nobody_ids():
    entry = pwd.getpwnam('nobody')
    try:
        gid = grp.getgrnam('nogroup').gr_gid
    except KeyError:
        gid = entry.pw_gid
    return entry.pw_uid, gid


@pytest.mark.parametrize('user_args', [[], ['--user', 'nobody.nogroup']],
                         ids=['default', 'nobody.nogroup'])
@pytest.mark.parametrize('mode', ['daemon', 'inetd'])
def test_root_drops_to_nobody(start_server, public_root, mode, user_args):
    require_root()
    uid, gid = nobody_ids()
    if mode == 'daemon':
        server = start_server(root=public_root, user_args=user_args)
    else:
        sock = inetd_socket()
        try:
            server = start_server(root=public_root, user_args=user_args, daemon=False,
                                  stdin=sock.fileno())
        finally:
            sock.close()
    assert download(server, 'pub.txt') == b'world readable\n'
    ids = proc_ids(server.pid)
    assert ids['Uid'] == [uid] * 4, ids
    assert ids['Gid'] == [gid] * 4, ids
    assert 0 not in ids['Groups'], 'root group kept: %s' % ids
    assert server.stop() == 0


@pytest.mark.parametrize('permissive', [False, True], ids=['strict', 'permissive'])
def test_root_serves_only_world_readable_files(start_server, public_root, permissive):
    require_root()
    secret = os.path.join(public_root, 'secret.txt')
    with open(secret, 'wb') as f:
        f.write(b'for root only\n')
    os.chmod(secret, 0o600)
    args = ['--permissive'] if permissive else []
    server = start_server(*args, root=public_root, user_args=['--user', 'root.root'])
    assert proc_ids(server.pid)['Uid'][1] == 0
    assert download(server, 'pub.txt') == b'world readable\n'
    if permissive:
        assert download(server, 'secret.txt') == b'for root only\n'
    else:
        with pytest.raises(TftpError) as exc:
            download(server, 'secret.txt')
        assert exc.value.code == atftpd.ERR_ACCESS
        server.wait_for_log(r'refused secret\.txt: not world-readable')
    assert server.stop() == 0


###############################################################################
# Internal errors #############################################################
###############################################################################

class RecordingLog(atftpd.Log):
    def __init__(self):
        atftpd.Log.__init__(self, level=atftpd.LOG_DEBUG, logfile='-')
        self.lines = []

    def log(self, level, fmt, *args):
        self.lines.append(fmt % args)


def test_internal_error_is_logged_with_its_frames_and_contained():
    """A handler that raises is reported (with where it was raised, built
    without the traceback module, which may not import after the privilege
    drop) and does not leave dispatch."""
    server = atftpd.Server.__new__(atftpd.Server)
    server.log = RecordingLog()

    def broken_handler():
        {}['missing']

    server.dispatch(broken_handler, None)
    assert server.log.lines[0] == "internal error: KeyError: 'missing'"
    assert 'test_process.py' in server.log.lines[1]
    assert server.log.lines[1].endswith('broken_handler()')
