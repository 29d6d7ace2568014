"""Shared fixtures: the real server as a subprocess, and a raw UDP client.

The server always runs as its own process (`python3 atftpd.py --daemon
--no-fork --port 0 --logfile -`): signals, the wakeup descriptor and child
processes behave as in production. The port is read from its start-up line,
never guessed. Every receive has a timeout; a hang becomes a failure.
"""

import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)
SERVER = os.path.join(PROJECT, 'atftpd.py')
sys.path.insert(0, PROJECT)

import atftpd  # noqa: E402  (the module under test, for its codec)

IS_ROOT = os.geteuid() == 0
IN_CI = os.environ.get('CI') == 'true'


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With CI=true a skipped test is a failed one: every tier (root, real
    clients, emulation, network boot) must really run there."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, 'wasxfail'):
        report.outcome = 'failed'
        report.longrepr = 'skipped, which CI=true does not allow: %s' % (report.longrepr,)
STARTED = re.compile(r'started, serving (.*) on (.*)$')
RECV_TIMEOUT = 10.0


class ServerProcess:
    """atftpd.py running in the foreground, its log collected line by line."""

    def __init__(self, root, args=(), bind=('127.0.0.1',), env=None, user_args=None,
                 stdin=None, wait_ready=True, daemon=True, argv=None):
        """Start `python3 atftpd.py --logfile - [daemon options] [user] ARGS ROOT`,
        or exactly `argv` when given (then `root` is only remembered)."""
        self.root = None if root is None else str(root)
        if argv is None:
            argv = [sys.executable, SERVER, '--logfile', '-']
            if daemon:
                argv += ['--daemon', '--no-fork', '--port', '0']
                for address in bind:
                    argv += ['--bind-address', address]
            if user_args is None:
                # As root the server drops to nobody by default; tests that are not
                # about privileges keep root so that pytest's 0700 tmp dirs work.
                user_args = ['--user', 'root.root'] if IS_ROOT else []
            argv += list(user_args) + list(args) + [self.root]
        self.argv = [str(arg) for arg in argv]
        self.lines = []
        self.ready = threading.Event()
        self.addresses = []
        self.proc = subprocess.Popen(self.argv, stdin=stdin if stdin is not None else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if wait_ready:
            if not self.ready.wait(20):
                self.kill()
                raise AssertionError('server did not start:\n' + self.log())
            if not self.addresses:
                status = self.proc.wait(10)
                raise AssertionError('server exited with %s before starting:\n%s'
                                     % (status, self.log()))

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode('utf-8', 'replace').rstrip('\n')
            self.lines.append(line)
            match = STARTED.search(line)
            if match:
                for item in match.group(2).split(', '):
                    host, port = item.rsplit(':', 1)
                    self.addresses.append((host.strip('[]'), int(port)))
                self.ready.set()
        self.ready.set()

    @property
    def port(self):
        return self.addresses[0][1]

    @property
    def host(self):
        host = self.addresses[0][0]
        return {'0.0.0.0': '127.0.0.1', '::': '::1'}.get(host, host)

    @property
    def pid(self):
        return self.proc.pid

    def log(self):
        return '\n'.join(self.lines)

    def wait_for_log(self, pattern, timeout=10.0):
        """Wait until a log line matches `pattern` (a regex); return the line."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            lines = self.lines[:]
            for line in lines[seen:]:
                if regex.search(line):
                    return line
            seen = len(lines)
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError('no log line matches %r:\n%s' % (pattern, self.log()))

    def alive(self):
        return self.proc.poll() is None

    def open_fds(self):
        return sorted(int(fd) for fd in os.listdir('/proc/%d/fd' % self.pid))

    def children(self):
        """Direct children of the server (generators)."""
        found = []
        for entry in os.listdir('/proc'):
            if entry.isdigit():
                try:
                    with open('/proc/%s/stat' % entry) as f:
                        fields = f.read().rsplit(')', 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == self.pid:
                    found.append(int(entry))
        return found

    def stop(self, sig=signal.SIGTERM, timeout=20):
        """Stop the server; return its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError('server did not stop on signal %d:\n%s' % (sig, self.log()))
        self.reader.join(5)
        return status

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait(10)


@pytest.fixture
def tftp_root(tmp_path):
    """A served directory with the usual suspects."""
    root = tmp_path / 'root'
    root.mkdir()
    (root / 'small.txt').write_bytes(b'hello, tftp\n')
    (root / 'empty').write_bytes(b'')
    (root / 'exact512').write_bytes(bytes(range(256)) * 2)
    (root / 'exact1024').write_bytes(os.urandom(1024))
    (root / 'random.bin').write_bytes(os.urandom(300000))
    (root / 'text.txt').write_bytes(b'line one\nline two\r\nbare cr\r end\n')
    (root / 'sub').mkdir()
    (root / 'sub' / 'inner.txt').write_bytes(b'inner file\n')
    return root


@pytest.fixture
def start_server(tftp_root):
    """Factory: start_server(*args, root=..., bind=...) -> ServerProcess.
    Every server started is stopped at the end and must exit with status 0."""
    servers = []

    def start(*args, root=None, **kwargs):
        server = ServerProcess(root or tftp_root, args, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.alive():
            status = server.stop()
            assert status == 0, 'server exited with %s:\n%s' % (status, server.log())


@pytest.fixture
def server(start_server):
    """One server on 127.0.0.1 with default options."""
    return start_server()


class RawClient:
    """A bare UDP TFTP client for wire-level tests: every byte is explicit."""

    def __init__(self, host='127.0.0.1', port=69, timeout=RECV_TIMEOUT):
        family = socket.AF_INET6 if ':' in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.server = (host, port)
        self.timeout = timeout
        self.peer = None            # the transfer's TID, learned from the first reply

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data, addr=None):
        self.sock.sendto(data, addr or self.peer or self.server)

    def rrq(self, name, mode='octet', options=()):
        self.peer = None
        self.send(atftpd.encode_request(atftpd.OP_RRQ, name, mode, options), self.server)

    def wrq(self, name, mode='octet', options=()):
        self.peer = None
        self.send(atftpd.encode_request(atftpd.OP_WRQ, name, mode, options), self.server)

    def recv(self, timeout=None):
        """(opcode, number, payload, addr); raises AssertionError on timeout."""
        ready, _, _ = select.select([self.sock], [], [], self.timeout if timeout is None else timeout)
        if not ready:
            raise AssertionError('timed out waiting for a datagram')
        data, addr = self.sock.recvfrom(70000)
        if self.peer is None:
            self.peer = addr
        if len(data) < 4:
            return None, None, data, addr
        opcode, number = struct.unpack('!HH', data[:4])
        if opcode == atftpd.OP_OACK:
            return opcode, 0, data[2:], addr       # OACK has no block number
        return opcode, number, data[4:], addr

    def nothing_for(self, seconds):
        """True if no datagram arrives within `seconds`."""
        ready, _, _ = select.select([self.sock], [], [], seconds)
        return not ready

    def ack(self, block):
        self.send(struct.pack('!HH', atftpd.OP_ACK, block & 0xFFFF))

    def error(self, code, message='client error'):
        self.send(atftpd.encode_error(code, message))

    def data(self, block, payload):
        self.send(struct.pack('!HH', atftpd.OP_DATA, block & 0xFFFF) + payload)

    def oack_options(self, payload):
        fields = payload.split(b'\0')[:-1]
        return {fields[i].decode(): fields[i + 1].decode() for i in range(0, len(fields), 2)}

    def download(self, name, mode='octet', options=(), limit_blocks=10 ** 7):
        """A complete, well-behaved read; returns (bytes, oack options or None)."""
        self.rrq(name, mode, options)
        opcode, number, payload, _ = self.recv()
        oack = None
        blksize, windowsize = 512, 1
        if opcode == atftpd.OP_OACK:
            oack = self.oack_options(payload)
            blksize = int(oack.get('blksize', 512))
            windowsize = int(oack.get('windowsize', 1))
            self.ack(0)
            opcode, number, payload, _ = self.recv()
        chunks = []
        expected = 1
        in_window = 0
        for _ in range(limit_blocks):
            if opcode == atftpd.OP_ERROR:
                raise TftpError(number, payload.rstrip(b'\0').decode('latin-1'))
            assert opcode == atftpd.OP_DATA, opcode
            if number == expected & 0xFFFF:
                chunks.append(payload)
                expected += 1
                in_window += 1
                last = len(payload) < blksize
                if last or in_window == windowsize:
                    self.ack(expected - 1)
                    in_window = 0
                if last:
                    return b''.join(chunks), oack
            opcode, number, payload, _ = self.recv()
        raise AssertionError('too many blocks')


class TftpError(Exception):
    def __init__(self, code, message):
        Exception.__init__(self, '%d: %s' % (code, message))
        self.code = code
        self.message = message


@pytest.fixture
def client(server):
    """A RawClient talking to the default server."""
    with RawClient(server.host, server.port) as c:
        yield c
