"""Helpers for the process-level and command-line tests (test_cli.py,
test_process.py, test_python3_light.py), and strace_attached for the tests
that check a running server's system calls (test_gso.py,
test_upload_safety.py). Built on conftest's ServerProcess; nothing here
mocks the server: every test runs the real atftpd.py."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import pytest

from conftest import IS_ROOT, SERVER, STARTED, ServerProcess

PYTHON = sys.executable


class ArgvServer(ServerProcess):
    """A ServerProcess started with exactly `argv` (ServerProcess otherwise adds
    --logfile -, --daemon ... and the root itself). `wait_ready` waits for the
    'started, serving' line on stdout, so pass it False when logging elsewhere."""

    def __init__(self, argv, root=None, stdin=None, wait_ready=True, env=None):
        ServerProcess.__init__(self, root, argv=argv, stdin=stdin, wait_ready=wait_ready,
                               env=env)


@pytest.fixture
def argv_servers():
    """Factory for ArgvServers; each one still running at the end is stopped
    with SIGTERM and must exit 0."""
    servers = []

    def start(argv, **kwargs):
        server = ArgvServer(argv, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.alive():
            status = server.stop()
            assert status == 0, 'server exited with %s:\n%s' % (status, server.log())


def user_args():
    """What conftest's ServerProcess passes by default: keep root as root so
    that pytest's 0700 temporary directories stay readable."""
    return ['--user', 'root.root'] if IS_ROOT else []


def daemon_args(port=0, bind='127.0.0.1'):
    args = ['--daemon', '--no-fork', '--port', str(port)]
    if bind:
        args += ['--bind-address', bind]
    return args


def run_cli(args, timeout=20, stdin=subprocess.DEVNULL, env=None, python=PYTHON):
    """atftpd.py with `args`; a run that does not end within `timeout` is
    killed and reported (a bad command line must never start a server)."""
    try:
        return subprocess.run([python, SERVER] + [str(a) for a in args], stdin=stdin,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=timeout, env=env, universal_newlines=True)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError('atftpd.py %s did not exit within %s s (stdout %r, stderr %r)'
                             % (' '.join(map(str, args)), timeout, exc.stdout, exc.stderr))


def error_line(result):
    """The single argparse error line of a failed run, after checking that
    stderr is usage line(s) then exactly one 'atftpd.py: error:' line."""
    lines = result.stderr.splitlines()
    assert lines, 'nothing on stderr (status %s, stdout %r)' % (result.returncode, result.stdout)
    assert lines[0].startswith('usage: '), result.stderr
    errors = [i for i, line in enumerate(lines) if line.startswith('atftpd.py: error: ')]
    assert len(errors) == 1, 'expected one error line:\n' + result.stderr
    assert errors[0] == len(lines) - 1, 'lines after the error line:\n' + result.stderr
    for line in lines[1:-1]:
        assert line.startswith(' '), 'not a usage continuation line: %r\n%s' % (line, result.stderr)
    return lines[-1]


def wait_for_file_line(path, pattern, timeout=10.0, proc=None):
    """Wait until a line of the file at `path` matches `pattern`; return it."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    text = ''
    while time.monotonic() < deadline:
        try:
            with open(path, 'rb') as f:
                text = f.read().decode('utf-8', 'replace')
        except FileNotFoundError:
            text = ''
        for line in text.splitlines():
            if regex.search(line):
                return line
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.02)
    raise AssertionError('no line of %s matches %r:\n%s' % (path, pattern, text))


def addresses_of(started_line):
    """[(host, port)] from a 'started, serving ... on A:P, ...' line."""
    match = STARTED.search(started_line)
    assert match, started_line
    found = []
    for item in match.group(2).split(', '):
        host, port = item.rsplit(':', 1)
        found.append((host.strip('[]'), int(port)))
    return found


def free_port():
    """A UDP port free on both families right now (for fixed --port tests)."""
    for _ in range(20):
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s6:
            s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s6.bind(('::', 0))
            port = s6.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s4:
                s4.bind(('0.0.0.0', port))
            return port
        except OSError:
            continue
    raise AssertionError('no free UDP port')


def proc_ids(pid):
    """{'Uid': [real, effective, saved, fs], 'Gid': [...], 'Groups': [...]}."""
    ids = {}
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            key, _, value = line.partition(':')
            if key in ('Uid', 'Gid', 'Groups'):
                ids[key] = [int(v) for v in value.split()]
    return ids


def require_root():
    """Privilege tests need root: skipped locally, a failure in CI."""
    if IS_ROOT:
        return
    if os.environ.get('CI') == 'true':
        pytest.fail('privilege-drop tests must run as root in CI (CI=true, euid %d)'
                    % os.geteuid())
    pytest.skip('privilege-drop tests need root (euid %d); they are mandatory when CI=true'
                % os.geteuid())


@pytest.fixture
def public_root():
    """A world-readable root under /tmp that nobody can read (pytest's own
    temporary directories are 0700)."""
    path = tempfile.mkdtemp(prefix='atftpd-public-', dir='/tmp')
    os.chmod(path, 0o755)
    with open(os.path.join(path, 'pub.txt'), 'wb') as f:
        f.write(b'world readable\n')
    os.chmod(os.path.join(path, 'pub.txt'), 0o644)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def wait_exit(proc, timeout=20):
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        raise AssertionError('process %d did not exit within %s s' % (proc.pid, timeout))


def inetd_socket():
    """A UDP socket bound to 127.0.0.1:0, as inetd would pass on stdin."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(('127.0.0.1', 0))
    return sock


def traced_by(pid):
    with open('/proc/%d/status' % pid) as f:
        return any(line.startswith('TracerPid:') and line.split()[1] != '0' for line in f)


@contextmanager
def strace_attached(pid, calls, output):
    """strace -f the running process `pid` for the system calls `calls` (a
    comma-separated list) into the file `output` while the block runs; the
    lines are complete when the block ends. Needs root (ptrace rights)."""
    if shutil.which('strace') is None:
        pytest.fail('strace is needed (tests/debian-packages.txt)', pytrace=False)
    tracer = subprocess.Popen(['strace', '-f', '-qq', '-e', 'trace=' + calls, '-o',
                               str(output), '-p', str(pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not traced_by(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert traced_by(pid), 'strace did not attach'
        yield
    finally:
        tracer.terminate()
        tracer.wait(10)
