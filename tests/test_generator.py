"""The content generator contract, with real generator processes (no mocks).

Each generator is a tiny script written into tmp_path. They leave marks in a
`marks` directory (argv, environment, descriptors, start/stop) that the tests
read back.
"""

import os
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from conftest import IS_ROOT, SERVER, RawClient, ServerProcess, TftpError

import atftpd


def make_generator(directory, body, name='gen', shebang='#!/bin/sh'):
    path = directory / name
    path.write_text(shebang + '\n' + textwrap.dedent(body).lstrip('\n'))
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def marks(tmp_path):
    directory = tmp_path / 'marks'
    directory.mkdir()
    return directory


def fetch(server, name, options=(), mode='octet'):
    with RawClient(server.host, server.port) as client:
        return client.download(name, mode, options)


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


RECORDER = '''
    marks=%s
    printf '%%s\\n' "$0" "$@" > "$marks/argv"
    env | grep '^TFTP_' | sort > "$marks/env"
    cat /proc/$$/fdinfo/3 > "$marks/fdinfo3"
    readlink /proc/$$/fd/0 > "$marks/stdin"
    ps -o pgid= -p $$ > "$marks/pgid"
    echo $$ > "$marks/pid"
    printf 'generated for %%s\\n' "$TFTP_REQUEST" >&3
'''


def test_argv_fd3_stdin_and_environment_exactly_as_specified(start_server, tmp_path, marks,
                                                             tftp_root):
    generator = make_generator(tmp_path, RECORDER % marks)
    server = start_server('--content-generator', generator)
    data, _ = fetch(server, 'pxelinux.cfg/01-aa-bb-cc-dd-ee-ff')
    assert data == b'generated for pxelinux.cfg/01-aa-bb-cc-dd-ee-ff\n'
    full = '%s/pxelinux.cfg/01-aa-bb-cc-dd-ee-ff' % tftp_root
    assert (marks / 'argv').read_text().splitlines() == [generator, '--file', full]
    assert 'pos:\t0' in (marks / 'fdinfo3').read_text()
    assert (marks / 'stdin').read_text().strip() == '/dev/null'
    assert (marks / 'pgid').read_text().strip() == (marks / 'pid').read_text().strip()
    env = dict(line.split('=', 1) for line in (marks / 'env').read_text().splitlines())
    assert env['TFTP_CLIENT_ADDR'] == '127.0.0.1'
    assert int(env['TFTP_CLIENT_PORT']) > 0
    assert env['TFTP_REQUEST'] == 'pxelinux.cfg/01-aa-bb-cc-dd-ee-ff'
    assert env['TFTP_FILE'] == full
    assert env['TFTP_ROOT'] == str(tftp_root)
    assert env['TFTP_MODE'] == 'octet'
    assert env['TFTP_SERVER_ADDR'] == '127.0.0.1'


def test_no_server_descriptor_leaks_into_the_generator(start_server, tmp_path, marks):
    """Only 0, 1, 2 and 3 are open when the generator starts; 1 and 2 are the
    log pipe, 0 is /dev/null, 3 the anonymous output file."""
    generator = make_generator(tmp_path, '''
        import os
        fds = {}
        for fd in os.listdir('/proc/self/fd'):
            try:
                fds[int(fd)] = os.readlink('/proc/self/fd/' + fd)
            except OSError:
                pass                    # the descriptor listdir itself used
        with open(%r, 'w') as out:
            out.write(repr(fds))
        os.write(3, b'ok')
    ''' % str(marks / 'fds'), shebang='#!%s' % sys.executable)
    server = start_server('--content-generator', generator)
    assert fetch(server, 'fds')[0] == b'ok'
    fds = eval((marks / 'fds').read_text())
    assert sorted(fds) == [0, 1, 2, 3], fds
    assert fds[0] == '/dev/null'
    assert fds[1].startswith('pipe:') and fds[1] == fds[2]
    assert '(deleted)' in fds[3] or fds[3].startswith('/tmp/#'), fds[3]


def test_seed_style_python_generator_with_optionparser(start_server, tmp_path):
    generator = make_generator(tmp_path, '''
        import os
        from optparse import OptionParser
        parser = OptionParser()
        parser.add_option('--file', dest='file')
        options, args = parser.parse_args()
        if not options.file.endswith('/maclist'):
            raise SystemExit(1)
        out = os.fdopen(3, 'w')
        out.write('#!/bin/sh\\nwl mac none\\nwl mac 00:11:22:33:44:55 00:00:00:00:00:00\\n')
        out.close()
    ''', shebang='#!%s' % sys.executable)
    server = start_server('--content-generator', generator)
    data, oack = fetch(server, 'maclist', [('tsize', '0')])
    assert data.startswith(b'#!/bin/sh\nwl mac none\n')
    assert oack == {'tsize': str(len(data))}
    with pytest.raises(TftpError) as info:
        fetch(server, 'other')
    assert info.value.code == atftpd.ERR_NOT_FOUND


@pytest.mark.parametrize('body, reason', [
    ('printf data >&3; exit 3', 'exit status 3'),
    (':', 'no output'),
    ('printf data >&3; kill -9 $$', 'killed by signal 9'),
])
def test_failures_are_file_not_found(start_server, tmp_path, body, reason):
    server = start_server('--content-generator', make_generator(tmp_path, body), '-v6')
    with pytest.raises(TftpError) as info:
        fetch(server, 'anything')
    assert info.value.code == atftpd.ERR_NOT_FOUND
    server.wait_for_log(reason)
    assert server.alive()


def test_timeout_kills_the_whole_process_group(start_server, tmp_path, marks):
    generator = make_generator(tmp_path, '''
        sleep 300 &
        echo $! > %s/grandchild
        printf partial >&3
        sleep 300
    ''' % marks)
    server = start_server('--content-generator', generator, '--generator-timeout', '1')
    with pytest.raises(TftpError) as info:
        fetch(server, 'slow')
    assert info.value.code == atftpd.ERR_NOT_FOUND
    server.wait_for_log(r'failed sending slow .*generator: timed out after 1 s')
    grandchild = int((marks / 'grandchild').read_text())
    assert wait_for(lambda: not os.path.exists('/proc/%d' % grandchild) or
                    open('/proc/%d/stat' % grandchild).read().split()[2] == 'Z')
    assert wait_for(lambda: not server.children())


def test_flood_is_stopped_at_the_size_limit(start_server, tmp_path):
    generator = make_generator(tmp_path, 'while :; do printf "%01000d" 0; done >&3')
    server = start_server('--content-generator', generator, '--generator-max-size', '100000')
    with pytest.raises(TftpError) as info:
        fetch(server, 'flood')
    assert info.value.code == atftpd.ERR_NOT_FOUND
    server.wait_for_log('output exceeded 100000 bytes')
    assert wait_for(lambda: not server.children())


def test_grandchild_left_running_is_killed_and_content_served(start_server, tmp_path, marks):
    generator = make_generator(tmp_path, '''
        sleep 300 > /dev/null 2>&1 &
        echo $! > %s/grandchild
        printf 'content\\n' >&3
    ''' % marks)
    server = start_server('--content-generator', generator)
    data, _ = fetch(server, 'forks')
    assert data == b'content\n'
    grandchild = int((marks / 'grandchild').read_text())
    assert wait_for(lambda: not os.path.exists('/proc/%d' % grandchild))


def test_generator_output_goes_to_the_log_escaped(start_server, tmp_path):
    generator = make_generator(tmp_path, r'''
        printf 'to stdout\n'
        printf 'to stderr \033[31m red\n' >&2
        exit 1
    ''')
    server = start_server('--content-generator', generator)
    with pytest.raises(TftpError):
        fetch(server, 'noisy')
    server.wait_for_log('generator: to stdout')
    line = server.wait_for_log('generator: to stderr')
    assert '\x1b' not in line and '\\x1b' in line


def test_not_executable_generator_is_refused_at_start(tftp_root, tmp_path):
    generator = tmp_path / 'gen'
    generator.write_text('#!/bin/sh\nexit 0\n')
    generator.chmod(0o644)
    server = ServerProcess(tftp_root, ['--content-generator', str(generator)], wait_ready=False)
    assert server.proc.wait(20) == 2
    server.reader.join(5)
    assert 'not an executable file' in server.log()


def test_existing_files_directories_and_refused_names_never_reach_it(start_server, tmp_path,
                                                                     marks, tftp_root):
    generator = make_generator(tmp_path, 'echo "$TFTP_REQUEST" >> %s/calls; printf x >&3' % marks)
    server = start_server('--content-generator', generator, '--allow-create')
    assert fetch(server, 'small.txt')[0] == (tftp_root / 'small.txt').read_bytes()
    for name in ('sub', '../etc/passwd', 'sub/../../x'):
        with pytest.raises(TftpError) as info:
            fetch(server, name)
        assert info.value.code == atftpd.ERR_ACCESS
    with RawClient(server.host, server.port) as client:      # a WRQ for a missing file
        client.wrq('uploaded.txt')
        opcode, block, _, _ = client.recv()
        assert (opcode, block) == (atftpd.OP_ACK, 0)
        client.data(1, b'up')
        assert client.recv()[:2] == (atftpd.OP_ACK, 1)
    assert not (marks / 'calls').exists()
    assert fetch(server, 'missing')[0] == b'x'
    assert (marks / 'calls').read_text() == 'missing\n'


def test_static_transfer_continues_while_a_slow_generator_runs(start_server, tmp_path, marks,
                                                               tftp_root):
    generator = make_generator(tmp_path, '''
        touch %s/started
        sleep 4
        touch %s/finished
        printf late >&3
    ''' % (marks, marks))
    server = start_server('--content-generator', generator)
    with RawClient(server.host, server.port) as slow:
        slow.rrq('slow.cfg')
        assert wait_for(lambda: (marks / 'started').exists())
        data, _ = fetch(server, 'random.bin')
        assert data == (tftp_root / 'random.bin').read_bytes()
        assert not (marks / 'finished').exists(), 'the static download waited for the generator'
        opcode, block, payload, _ = slow.recv()
        assert (opcode, block, payload) == (atftpd.OP_DATA, 1, b'late')


def test_retransmitted_request_does_not_start_a_second_generator(start_server, tmp_path, marks):
    generator = make_generator(tmp_path, '''
        echo run >> %s/runs
        sleep 1
        printf 'once\\n' >&3
    ''' % marks)
    server = start_server('--content-generator', generator)
    with RawClient(server.host, server.port) as client:
        for _ in range(4):
            client.rrq('dup.cfg')
            time.sleep(0.1)
        opcode, block, payload, _ = client.recv()
        assert (opcode, block, payload) == (atftpd.OP_DATA, 1, b'once\n')
        client.ack(1)
    assert (marks / 'runs').read_text() == 'run\n'


def test_uefi_size_probe_sees_the_same_bytes_twice(start_server, tmp_path, marks):
    generator = make_generator(tmp_path, '''
        echo run >> %s/runs
        od -An -N16 -tx1 /dev/urandom >&3
    ''' % marks)
    server = start_server('--content-generator', generator)
    with RawClient(server.host, server.port) as probe:
        probe.rrq('grub.cfg', options=[('tsize', '0'), ('blksize', '1428')])
        opcode, _, payload, _ = probe.recv()
        assert opcode == atftpd.OP_OACK
        size = int(probe.oack_options(payload)['tsize'])
        probe.error(atftpd.ERR_BAD_OPTION, 'User aborted the transfer')
    data, oack = fetch(server, 'grub.cfg', [('tsize', '0'), ('blksize', '1428')])
    assert int(oack['tsize']) == size == len(data)
    assert (marks / 'runs').read_text() == 'run\n'
    assert 'failed sending grub.cfg' not in server.log()   # the probe is not a failure


def test_cache_off_runs_the_generator_every_time(start_server, tmp_path, marks):
    generator = make_generator(tmp_path, 'echo run >> %s/runs; printf x >&3' % marks)
    server = start_server('--content-generator', generator, '--generator-cache', '0')
    fetch(server, 'a')
    fetch(server, 'a')
    assert (marks / 'runs').read_text() == 'run\nrun\n'


def test_generators_beyond_the_limit_wait_their_turn(start_server, tmp_path, marks):
    generator = make_generator(tmp_path, '''
        echo "start $TFTP_REQUEST" >> %s/order
        sleep 0.5
        echo "end $TFTP_REQUEST" >> %s/order
        printf '%%s' "$TFTP_REQUEST" >&3
    ''' % (marks, marks))
    server = start_server('--content-generator', generator, '--generator-max-running', '1')
    clients = [RawClient(server.host, server.port) for _ in range(3)]
    try:
        for index, client in enumerate(clients):
            client.rrq('name%d' % index)
        for index, client in enumerate(clients):
            opcode, block, payload, _ = client.recv()
            assert (opcode, block, payload) == (atftpd.OP_DATA, 1, b'name%d' % index)
            client.ack(1)
    finally:
        for client in clients:
            client.close()
    order = (marks / 'order').read_text().split('\n')
    assert order[:6] == ['start name0', 'end name0', 'start name1', 'end name1',
                         'start name2', 'end name2']


def test_generated_content_in_netascii(start_server, tmp_path):
    generator = make_generator(tmp_path, r"printf 'a\nb\n' >&3")
    server = start_server('--content-generator', generator)
    data, oack = fetch(server, 'text.cfg', [('tsize', '0')], mode='netascii')
    assert data == b'a\r\nb\r\n' and oack == {'tsize': '6'}


def test_large_generated_file_with_rollover_free_blksize(start_server, tmp_path):
    generator = make_generator(tmp_path, 'head -c 3000000 /dev/zero | tr "\\0" "z" >&3')
    server = start_server('--content-generator', generator)
    data, _ = fetch(server, 'big', [('blksize', '1428'), ('windowsize', '16')])
    assert data == b'z' * 3000000


@pytest.mark.skipif(not IS_ROOT and os.environ.get('CI') != 'true',
                    reason='privilege drop needs root')
def test_generator_runs_with_the_dropped_privileges(tmp_path):
    assert IS_ROOT, 'CI runs as root'
    base = tempfile.mkdtemp(prefix='atftpd-gen-')
    try:
        os.chmod(base, 0o755)
        root = os.path.join(base, 'root')
        os.mkdir(root)
        os.chmod(root, 0o755)
        generator = os.path.join(base, 'gen')
        with open(generator, 'w') as f:
            f.write('#!/bin/sh\nid -u >&3\n')
        os.chmod(generator, 0o755)
        server = ServerProcess(root, ['--content-generator', generator], user_args=[])
        try:
            data, _ = fetch(server, 'whoami')
            assert int(data) == 65534     # nobody
        finally:
            assert server.stop() == 0
    finally:
        for directory, _dirs, files in os.walk(base, topdown=False):
            for name in files:
                os.unlink(os.path.join(directory, name))
            os.rmdir(directory)


def test_no_child_or_descriptor_is_left_behind(start_server, tmp_path):
    generator = make_generator(tmp_path, 'printf "%s" "$TFTP_REQUEST" >&3; [ "$TFTP_REQUEST" != bad ]')
    server = start_server('--content-generator', generator, '--generator-cache', '0')
    before = server.open_fds()
    for index in range(20):
        name = 'bad' if index % 3 == 0 else 'good%d' % index
        try:
            fetch(server, name)
        except TftpError:
            pass
    assert wait_for(lambda: not server.children())
    assert wait_for(lambda: server.open_fds() == before), (before, server.open_fds())
    assert stat.S_ISDIR(os.stat('/proc/%d' % server.pid).st_mode)


def test_inetd_socket_on_0_1_2_does_not_reach_the_generator(tftp_root, tmp_path, marks):
    """Classic inetd puts the socket on descriptors 0, 1 and 2. The generator
    must see /dev/null on 0, the log pipe on 1 and 2, and no socket at all."""
    generator = make_generator(tmp_path, '''
        import os
        fds = {}
        for fd in os.listdir('/proc/self/fd'):
            try:
                fds[int(fd)] = os.readlink('/proc/self/fd/' + fd)
            except OSError:
                pass
        with open(%r, 'w') as out:
            out.write(repr(fds))
        os.write(3, b'ok')
    ''' % str(marks / 'fds'), shebang='#!%s' % sys.executable)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(('127.0.0.1', 0))
    logfile = tmp_path / 'log'
    argv = [sys.executable, SERVER, '--logfile', str(logfile), '--tftpd-timeout', '30',
            '--content-generator', generator] + (['--user', 'root.root'] if IS_ROOT else [])
    proc = subprocess.Popen(argv + [str(tftp_root)], stdin=sock, stdout=sock, stderr=sock)
    try:
        with RawClient('127.0.0.1', sock.getsockname()[1]) as client:
            assert client.download('generated')[0] == b'ok'
        fds = eval((marks / 'fds').read_text())
        assert sorted(fds) == [0, 1, 2, 3], fds
        assert fds[0] == '/dev/null'
        assert not [target for target in fds.values() if target.startswith('socket:')]
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
        sock.close()


def test_generator_that_cannot_be_run_any_more_is_not_found(start_server, tmp_path):
    """Checked at start-up, but it may be removed or made non-executable later:
    the request gets ERROR 1, the server says why and keeps serving."""
    generator = make_generator(tmp_path, 'printf x >&3')
    server = start_server('--content-generator', generator)
    os.chmod(generator, 0o644)
    with pytest.raises(TftpError) as info:
        fetch(server, 'gone')
    assert info.value.code == atftpd.ERR_NOT_FOUND
    server.wait_for_log('failed sending gone .*cannot run')
    assert fetch(server, 'small.txt')[0] == b'hello, tftp\n'
    assert not server.children()


###############################################################################
# Temporary files (the server's own, not tempfile's) ##########################
###############################################################################

@pytest.mark.parametrize('o_tmpfile', [True, False], ids=['O_TMPFILE', 'named-then-unlinked'])
def test_anonymous_file_leaves_no_name_behind(tmp_path, monkeypatch, o_tmpfile):
    """The generator's fd 3 file: writable, readable back, never visible in
    the directory, with or without O_TMPFILE (jffs2 has none)."""
    if not o_tmpfile:
        monkeypatch.setattr(os, 'O_TMPFILE', 0, raising=False)
    fd = atftpd.open_anonymous_file(str(tmp_path))
    try:
        assert os.listdir(str(tmp_path)) == []
        os.write(fd, b'generated')
        assert os.pread(fd, 100, 0) == b'generated'
        assert not os.get_inheritable(fd)
    finally:
        os.close(fd)


def test_private_file_is_new_with_mode_0600_under_a_fresh_name(tmp_path):
    fd, path = atftpd.create_private_file(str(tmp_path), '.name.', '.part')
    os.close(fd)
    name = os.path.basename(path)
    assert name.startswith('.name.') and name.endswith('.part')
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    second_fd, second = atftpd.create_private_file(str(tmp_path), '.name.', '.part')
    os.close(second_fd)
    assert second != path
