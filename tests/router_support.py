"""Helpers for the router packaging tests (test_openwrt.py,
test_busybox_init.py): required tools, free ports, a foreground server
reader, the busybox applet PATH, and a child subreaper so that daemons that
detach themselves are reaped by the test (PID 1 of a container may never
reap them, and a zombie still answers kill -0)."""

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

from conftest import PROJECT

IN_CI = os.environ.get('CI') == 'true'
IS_ROOT = os.geteuid() == 0
STARTED = re.compile(r'started, serving (.*) on (.*)$')
COMMAND_TIMEOUT = 60
PR_SET_CHILD_SUBREAPER = 36


def need(condition, reason):
    """Skip with `reason` on a developer machine; fail in CI (CI=true)."""
    if condition:
        return
    if IN_CI:
        pytest.fail(reason + ' (CI=true: required)')
    pytest.skip(reason)


def need_root():
    need(IS_ROOT, 'needs root (start-stop-daemon, inetd user field, privilege drop)')


def need_program(name, package):
    path = shutil.which(name)
    need(path is not None, '%s not found: apt-get install %s' % (name, package))
    return path


def free_udp_port():
    """A UDP port free right now on 127.0.0.1 (scripts under test need a
    fixed number; the small race with other programs is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def udp_port_bound(port):
    wanted = ':%04X ' % port
    for table in ('/proc/net/udp', '/proc/net/udp6'):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    if wanted in line.split(None, 2)[1] + ' ':
                        return True
        except OSError:
            continue
    return False


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError('timed out waiting for ' + what)


def pid_alive(pid):
    """True while /proc/PID exists and is not a zombie."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


def pids_with(text):
    """Processes whose command line contains `text` (a unique tmp path)."""
    found = []
    for entry in os.listdir('/proc'):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open('/proc/%s/cmdline' % entry, 'rb') as f:
                    if text.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return [pid for pid in found if pid_alive(pid)]


def kill_pids(pids, sig=signal.SIGKILL):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def run(argv, timeout=COMMAND_TIMEOUT, **kwargs):
    """subprocess.run with a bound, text output, no exception on status."""
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kwargs)


def busybox_tftp_get(path, name, port, host='127.0.0.1'):
    """Download `name` with busybox's own tftp client; return the bytes."""
    if os.path.exists(path):
        os.unlink(path)
    result = run(['busybox', 'tftp', '-g', '-r', name, '-l', path, host, str(port)])
    assert result.returncode == 0, 'busybox tftp failed: %s' % result.stderr
    with open(path, 'rb') as f:
        return f.read()


class ForegroundServer:
    """A server process whose stdout is the log (--logfile -): read in a
    thread; ready when the 'started, serving ... on ADDR:PORT' line appears."""

    def __init__(self, argv, **kwargs):
        self.lines = []
        self.port = None
        self.ready = threading.Event()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     **kwargs)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if not self.ready.wait(30) or self.port is None:
            self.kill()
            raise AssertionError('server did not start:\n' + self.log())

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode('utf-8', 'replace').rstrip('\n')
            self.lines.append(line)
            match = STARTED.search(line)
            if match:
                self.port = int(match.group(2).split(', ')[0].rsplit(':', 1)[1])
                self.ready.set()
        self.ready.set()

    def log(self):
        return '\n'.join(self.lines)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError('server did not stop on SIGTERM:\n' + self.log())

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait(10)


class Subreaper:
    """Make this process the child subreaper while the block runs, so that a
    daemon started through a double fork becomes our child; watch(pid) reaps
    it from a thread the moment it exits (nothing else is waited for, so the
    subprocess module's own children are untouched)."""

    def __init__(self):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.threads = []

    def __enter__(self):
        if self.libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), 'prctl(PR_SET_CHILD_SUBREAPER)')
        return self

    def watch(self, pid):
        def reap():
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        thread = threading.Thread(target=reap, daemon=True)
        thread.start()
        self.threads.append(thread)

    def __exit__(self, *exc):
        self.libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        for thread in self.threads:
            thread.join(10)


def installed_copy(directory, shebang):
    """atftpd.py copied into `directory` with its first line replaced, as an
    installer does; returns the path (mode 0755)."""
    with open(os.path.join(PROJECT, 'atftpd.py')) as f:
        lines = f.read().split('\n')
    path = os.path.join(directory, 'atftpd.py')
    with open(path, 'w') as f:
        f.write('\n'.join([shebang] + lines[1:]))
    os.chmod(path, 0o755)
    return path


def world_readable_root(directory):
    """A served tree nobody can read (the server drops to nobody as root)."""
    root = os.path.join(directory, 'root')
    os.mkdir(root)
    os.chmod(root, 0o755)
    files = {'hello.txt': b'hello from a router\n', 'big.bin': os.urandom(70000)}
    for name, data in files.items():
        with open(os.path.join(root, name), 'wb') as f:
            f.write(data)
        os.chmod(os.path.join(root, name), 0o644)
    return root, files


def shellcheck(*args):
    need_program('shellcheck', 'shellcheck')
    return run(['shellcheck', '-s', 'sh'] + list(args))
