#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Start-up time and memory of atftpd.py, native and under qemu-user.

    sudo python3 benchmarks/emulation.py                  # native, mipsel, armel
    sudo python3 benchmarks/emulation.py --arch mipsel --reps 3

In one run, for each target (native: Debian's /usr/bin/python3 on the host;
mipsel and armel: the root's python3 in the Debian bookworm roots that
tests/emulation/build-rootfs.sh builds, run in a chroot under qemu-user, with
the CPU tests/test_emulation.py uses), every module of
tests/python3-light-excluded.txt unimportable (the same sitecustomize as
the tests):

  - `python3 -c pass`: wall time, spawn to exit (median of --reps);
  - compiling atftpd.py alone (`compile(source)`, minus nothing: a
    `python3 -c` that reads and compiles it), since a script is compiled at
    every start (no .pyc for __main__);
  - atftpd.py: spawn to the first served request (the 'started' line is read
    from its stdout, then one RRQ for a one-block file is sent; the time is
    taken when its DATA arrives), median of --reps, after one start that
    writes the bytecode cache (shown apart). Bytecode is allowed, as on a
    router: the script compiles itself and restarts from its cache;
  - memory: a bare interpreter at rest (`python3 -c` sleeping), the idle
    server after one request, the server with 50 transfers open (each client
    holds its first ACK), and the peak while those 50 run to the end (50
    lock-step transfers of 256 KiB at blksize 512, sampled every 20 ms).

Memory is VmRSS of the process. Under qemu-user that is the qemu process:
the emulator, its translated-code cache and the guest together. The guest's
own share is shown as well ("guest"): the resident pages of the mappings in
the guest's 4 GiB address space (qemu 7.2 puts a 32-bit guest at
guest_base 0 on x86_64; checked by finding the root's python3.11 mapped
below 4 GiB, else "n/a"). That is the best estimate here of what the same
32-bit glibc python3 would use on the router; musl and OpenWrt's build
differ.

Needs root (chroot; build-rootfs.sh builds a missing root). Results go to
benchmarks/EMULATION.md (--output). Traffic only on 127.0.0.1. Every wait is
bounded; every process started is stopped in a finally block.
"""

import argparse
import datetime
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(PROJECT, 'tests'))

from emulation_support import (QEMU, Installed, Unavailable,  # noqa: E402
                               build_rootfs, rss_kib)
from light_support import write_sitecustomize  # noqa: E402

NATIVE_PYTHON = '/usr/bin/python3'
SMALL = b'first served request\n'
LOAD_SIZE = 256 * 1024
TRANSFERS = 50
GUEST_SPACE = 1 << 32
# The budget set in tests/emulation/README.md.
BUDGET_STARTUP_RATIO = 3.0
BUDGET_IDLE_KIB = 16 * 1024
BUDGET_TRANSFERS_KIB = 1 * 1024


# ---------------------------------------------------------------------------
# Targets: where python3 runs
# ---------------------------------------------------------------------------

class Native:
    """The host's Debian python3, with the same python3-light blocker."""

    name = 'native x86_64'

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix='atftpd-bench-')
        os.chmod(self.dir, 0o755)
        shutil.copy(os.path.join(PROJECT, 'atftpd.py'), self.dir)
        os.mkdir(os.path.join(self.dir, 'light'))
        write_sitecustomize(os.path.join(self.dir, 'light'))
        os.mkdir(os.path.join(self.dir, 'srv'))

    def host(self, *parts):
        return os.path.join(self.dir, *parts)

    inside = host

    def env(self):
        return {'PATH': '/usr/bin:/bin:/usr/sbin:/sbin', 'LANG': 'C.UTF-8',
                'PYTHONPATH': self.host('light'), 'PYTHONDONTWRITEBYTECODE': '1'}

    def python(self, *args):
        return [NATIVE_PYTHON] + list(args)

    def guest_rss_kib(self, pid):
        return None

    def check(self, pid):
        pass

    def remove(self):
        shutil.rmtree(self.dir, ignore_errors=True)


class Emulated:
    """A foreign root's python3 in a chroot, under qemu-user."""

    def __init__(self, arch):
        self.arch = arch
        self.rootfs = build_rootfs(arch)
        self.installed = Installed(self.rootfs, arch)
        self.name = '%s (qemu %s, CPU %s)' % (arch, QEMU[arch][0], QEMU[arch][1])
        self.host = self.installed.host
        self.inside = self.installed.inside
        self.env = self.installed.env

    def python(self, *args):
        return self.installed.chroot_argv('/usr/bin/python3', *args)

    def check(self, pid):
        """The process really is qemu-user's."""
        exe = os.readlink('/proc/%d/exe' % pid)
        if os.path.basename(exe) != QEMU[self.arch][0]:
            raise AssertionError('pid %d runs %s, not %s' % (pid, exe, QEMU[self.arch][0]))

    def guest_rss_kib(self, pid):
        """Resident KiB of the mappings in the guest's address space, or None
        when the guest is not at guest_base 0 (see the module docstring)."""
        python = os.path.join(self.rootfs, 'usr', 'bin', 'python3.11')
        total = 0
        located = False
        start = end = 0
        with open('/proc/%d/smaps' % pid) as f:
            for line in f:
                first = line.split(' ', 1)[0]
                if '-' in first and not line.startswith(('Rss:', 'Pss:')) and \
                        all(c in '0123456789abcdef-' for c in first):
                    start, end = (int(x, 16) for x in first.split('-'))
                    if line.rstrip().endswith(python) and end <= GUEST_SPACE:
                        located = True
                elif line.startswith('Rss:') and end <= GUEST_SPACE:
                    total += int(line.split()[1])
        return total if located else None

    def remove(self):
        self.installed.remove()


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------

class Server:
    """atftpd.py in the foreground, logging to stdout, read by a thread."""

    def __init__(self, target, port, launch):
        """launch: 'script' (`python3 atftpd.py`) or 'module' (`python3 -m
        atftpd` with atftpd.py's directory on PYTHONPATH, as the init scripts)."""
        program = ([target.inside('atftpd.py')] if launch == 'script' else ['-m', 'atftpd'])
        argv = target.python(*program, '--daemon', '--no-fork', '--port',
                             str(port), '--bind-address', '127.0.0.1', '--logfile', '-',
                             '--user', 'root.root', '--maxthread', '100',
                             target.inside('srv'))
        self.lines = []
        self.started = threading.Event()
        self.spawned = time.monotonic()
        # Bytecode allowed (an empty PYTHONDONTWRITEBYTECODE is unset), as on a
        # router: the script caches its bytecode and restarts from it (README.md,
        # "Memory"). The first start writes the cache; the medians are of the rest.
        env = dict(target.env(), PYTHONDONTWRITEBYTECODE='')
        if launch == 'module':
            env['PYTHONPATH'] += ':' + os.path.dirname(target.inside('atftpd.py'))
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode('utf-8', 'replace').rstrip('\n')
            self.lines.append(line)
            if 'started, serving' in line:
                self.started.set()
        self.started.set()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.reader.join(5)
        return self.proc.returncode


LAUNCHES = {'script': '`python3 atftpd.py`', 'module': '`python3 -m atftpd`'}


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def timed_run(argv, env, timeout=120):
    started = time.monotonic()
    result = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            timeout=timeout)
    if result.returncode != 0:
        raise AssertionError('%s failed: %s' % (argv, result.stdout[-2000:]))
    return time.monotonic() - started


def rrq(name):
    return struct.pack('!H', 1) + name.encode() + b'\0octet\0'


def first_request(server, port, timeout=60.0):
    """Seconds from spawn to the DATA of the first request."""
    if not server.started.wait(timeout) or server.proc.poll() is not None:
        raise AssertionError('server did not start:\n' + '\n'.join(server.lines))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(('127.0.0.1', 0))
        sock.sendto(rrq('small.txt'), ('127.0.0.1', port))
        ready, _, _ = select.select([sock], [], [], timeout)
        if not ready:
            raise AssertionError('no answer to the first request')
        data, addr = sock.recvfrom(1024)
        elapsed = time.monotonic() - server.spawned
        if data[:4] != b'\0\3\0\1' or data[4:] != SMALL:
            raise AssertionError('unexpected answer %r' % data[:64])
        sock.sendto(b'\0\4\0\1', addr)
    return elapsed


class Fetch:
    """One lock-step read at blksize 512 on its own socket."""

    def __init__(self, port):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(('127.0.0.1', 0))
        self.sock.setblocking(False)
        self.port = port
        self.peer = None
        self.expected = 1
        self.chunks = []
        self.held = None            # the first DATA, not yet acknowledged
        self.done = False
        self.last_sent = 0.0

    def start(self):
        self.sock.sendto(rrq('load.bin'), ('127.0.0.1', self.port))
        self.last_sent = time.monotonic()

    def on_readable(self, hold):
        for _ in range(64):
            try:
                data, addr = self.sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            opcode, number = struct.unpack('!HH', data[:4])
            if opcode == 5:
                raise AssertionError('server error %r' % data)
            if opcode != 3 or number != self.expected & 0xFFFF:
                continue                # a retransmission
            self.peer = addr
            self.chunks.append(data[4:])
            self.expected += 1
            if hold and self.expected == 2:
                self.held = number
                return
            self.ack(number)
            if len(data) - 4 < 512:
                self.done = True
                return

    def ack(self, number):
        self.sock.sendto(struct.pack('!HH', 4, number), self.peer)
        self.last_sent = time.monotonic()

    def close(self):
        self.sock.close()


def fifty_transfers(server, port, target, deadline=120.0):
    """(rss with all open, guest rss then, peak rss running, peak guest rss)."""
    fetches = [Fetch(port) for _ in range(TRANSFERS)]
    try:
        by_fd = {f.sock.fileno(): f for f in fetches}
        for f in fetches:
            f.start()
        end = time.monotonic() + deadline
        # Phase 1: every transfer open, each client holding its first ACK.
        while any(f.held is None for f in fetches):
            if time.monotonic() > end:
                raise AssertionError('not all %d transfers opened' % TRANSFERS)
            ready, _, _ = select.select(list(by_fd), [], [], 0.5)
            for fd in ready:
                by_fd[fd].on_readable(hold=True)
        time.sleep(0.3)
        held = (rss_kib(server.proc.pid), target.guest_rss_kib(server.proc.pid))
        # Phase 2: release them all and sample while they run.
        for f in fetches:
            f.ack(f.held)
        peak = held[0]
        peak_guest = held[1]
        next_sample = 0.0
        while not all(f.done for f in fetches):
            now = time.monotonic()
            if now > end:
                raise AssertionError('the %d transfers did not finish' % TRANSFERS)
            if now >= next_sample:
                peak = max(peak, rss_kib(server.proc.pid))
                guest = target.guest_rss_kib(server.proc.pid)
                if guest is not None:
                    peak_guest = max(peak_guest or 0, guest)
                next_sample = now + 0.02
            ready, _, _ = select.select(list(by_fd), [], [], 0.02)
            for fd in ready:
                by_fd[fd].on_readable(hold=False)
        expected = load_content()
        bad = sum(b''.join(f.chunks) != expected for f in fetches)
        if bad:
            raise AssertionError('%d of %d transfers got wrong bytes' % (bad, TRANSFERS))
        return held[0], held[1], peak, peak_guest
    finally:
        for f in fetches:
            f.close()


def load_content():
    return bytes((i * 7 + i // 512) & 0xFF for i in range(LOAD_SIZE))


def bare_rss(target, settle=1.0, timeout=60):
    """(VmRSS, guest RSS) of `python3 -c` sleeping, after `settle` seconds."""
    proc = subprocess.Popen(target.python('-c', 'import time; time.sleep(60)'),
                            env=target.env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(settle)
        return rss_kib(proc.pid), target.guest_rss_kib(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


# ---------------------------------------------------------------------------
# Measuring and reporting
# ---------------------------------------------------------------------------

def measure(target, reps, launch):
    with open(target.host('srv', 'small.txt'), 'wb') as f:
        f.write(SMALL)
    with open(target.host('srv', 'load.bin'), 'wb') as f:
        f.write(load_content())
    env = target.env()
    row = {'name': '%s, %s' % (target.name, LAUNCHES[launch])}
    row['pass'] = [timed_run(target.python('-c', 'pass'), env) for _ in range(reps)]
    compile_code = ('with open(%r, "rb") as f: compile(f.read(), "atftpd.py", "exec")'
                    % target.inside('atftpd.py'))
    row['compile'] = [timed_run(target.python('-c', compile_code), env) for _ in range(reps)]
    row['startup'] = []
    for rep in range(reps + 1):     # the first start compiles and writes the cache
        port = free_port()
        server = Server(target, port, launch)
        try:
            seconds = first_request(server, port)
        finally:
            status = server.stop()
        if status != 0:
            raise AssertionError('server exited with %s:\n%s' % (status, '\n'.join(server.lines)))
        if rep == 0:
            row['first_startup'] = seconds
        else:
            row['startup'].append(seconds)
    row['bare_rss'], row['bare_guest'] = bare_rss(target)
    port = free_port()
    server = Server(target, port, launch)
    try:
        first_request(server, port)
        target.check(server.proc.pid)
        time.sleep(1.0)
        row['idle_rss'] = rss_kib(server.proc.pid)
        row['idle_guest'] = target.guest_rss_kib(server.proc.pid)
        (row['open_rss'], row['open_guest'], row['run_rss'],
         row['run_guest']) = fifty_transfers(server, port, target)
    finally:
        status = server.stop()
    if status != 0:
        raise AssertionError('server exited with %s:\n%s' % (status, '\n'.join(server.lines)))
    return row


def seconds(values):
    return '%.3f s (%.3f-%.3f)' % (statistics.median(values), min(values), max(values))


def mib(kib, guest=None, show_guest=False):
    text = '%.1f MiB' % (kib / 1024.0)
    if show_guest:
        text += ' (guest %s)' % ('n/a' if guest is None else '%.1f MiB' % (guest / 1024.0))
    return text


def report(rows, reps, argv):
    now = datetime.datetime.now().strftime('%Y-%m-%d %H:%M')
    cpu = 'unknown CPU'
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    qemu = subprocess.run(['qemu-mipsel-static', '--version'], stdout=subprocess.PIPE,
                          universal_newlines=True).stdout.split('\n')[0] \
        if shutil.which('qemu-mipsel-static') else 'qemu-user not installed'
    native = subprocess.run([NATIVE_PYTHON, '--version'], stdout=subprocess.PIPE,
                            universal_newlines=True).stdout.strip()
    out = []
    out.append('# atftpd.py under emulation: start-up and memory\n')
    out.append('Run: `%s` on %s; %d CPUs (%s); kernel %s; native %s (%s); %s; '
               'Debian bookworm roots from tests/emulation/build-rootfs.sh. '
               'Median of %d, (min-max). The CPUs were shared with other work during the '
               'run: times are noisy, compare rows of the same run only.\n'
               % (' '.join(argv), now, os.cpu_count(), cpu, platform.release(), native,
                  NATIVE_PYTHON, qemu, reps))
    out.append('Every run has the python3-light blocker on (the modules OpenWrt\'s python3-light '
               'lacks are unimportable), as in tests/test_emulation.py.\n')
    out.append('## Start-up\n')
    out.append('| | `python3 -c pass` | compile atftpd.py (`python3 -c` + compile) '
               '| atftpd.py: spawn to first served request | the same, first start |')
    out.append('|---|---|---|---|---|')
    for row in rows:
        out.append('| %s | %s | %s | %s | %.3f s |' % (
            row['name'], seconds(row['pass']), seconds(row['compile']), seconds(row['startup']),
            row['first_startup']))
    out.append('')
    out.append('Bytecode is allowed, as on a router. `python3 atftpd.py` compiles itself into '
               '__pycache__ and restarts from that bytecode (README.md, "Memory"): two '
               'interpreter starts and a compile. `python3 -m atftpd`, as the init scripts '
               'start it, loads the bytecode at once. The first start writes the cache; the '
               'others find it.\n')
    out.append('## Memory (VmRSS)\n')
    out.append('Under qemu-user, VmRSS is the qemu process\'s: emulator, translated-code cache '
               'and guest together. "guest" is the resident part of the guest\'s own 4 GiB '
               'address space: the 32-bit program\'s memory, the best estimate here of its '
               'size on the router. 50 open: each of 50 clients holds its first ACK; '
               '50 running: the peak while those 50 lock-step transfers of %d KiB at blksize '
               '512 run to the end (sampled every 20 ms).\n' % (LOAD_SIZE // 1024))
    out.append('| | bare python3 (`-c` sleeping) | atftpd.py idle | 50 transfers open '
               '| 50 transfers running (peak) |')
    out.append('|---|---|---|---|---|')
    for row in rows:
        guest = row['idle_guest'] is not None or row['bare_guest'] is not None
        out.append('| %s | %s | %s | %s | %s |' % (
            row['name'], mib(row['bare_rss'], row['bare_guest'], guest),
            mib(row['idle_rss'], row['idle_guest'], guest),
            mib(row['open_rss'], row['open_guest'], guest),
            mib(row['run_rss'], row['run_guest'], guest)))
    out.append('')
    out.append('## Budget (tests/emulation/README.md)\n')
    out.append('Start-up to first served request at most %gx `python3 -c pass` on the same CPU; '
               'guest memory of the idle server at most %d MiB, and at most %d MiB more with '
               '50 transfers running. The guest figures exist only for emulated rows.\n'
               % (BUDGET_STARTUP_RATIO, BUDGET_IDLE_KIB // 1024, BUDGET_TRANSFERS_KIB // 1024))
    out.append('| | start-up ratio | idle guest | 50 running, added | kept? |')
    out.append('|---|---|---|---|---|')
    for row in rows:
        ratio = statistics.median(row['startup']) / statistics.median(row['pass'])
        kept = ratio <= BUDGET_STARTUP_RATIO
        if row['idle_guest'] is None:
            idle = added = 'n/a'
        else:
            grown = max(row['run_guest'], row['open_guest']) - row['idle_guest']
            idle, added = mib(row['idle_guest']), mib(grown)
            kept = kept and row['idle_guest'] <= BUDGET_IDLE_KIB and \
                grown <= BUDGET_TRANSFERS_KIB
        if row['idle_guest'] is None:
            verdict = 'n/a (the budget is for router CPUs)'
        else:
            verdict = 'yes' if kept else '**no**'
        out.append('| %s | %.1fx | %s | %s | %s |' % (row['name'], ratio, idle, added, verdict))
    out.append('')
    return '\n'.join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', action='append', choices=sorted(QEMU),
                        help='emulated architecture (repeatable; default: all)')
    parser.add_argument('--reps', type=int, default=5, help='repetitions for times (default 5)')
    parser.add_argument('--output', default=os.path.join(HERE, 'EMULATION.md'))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error('needs root (chroot)')
    arches = args.arch or ['mipsel', 'armel']
    rows = []
    targets = []
    try:
        try:
            targets.append(Native())
            for arch in arches:
                targets.append(Emulated(arch))
        except Unavailable as exc:
            parser.error(str(exc))
        for target in targets:
            print('measuring %s ...' % target.name, file=sys.stderr, flush=True)
            for launch in LAUNCHES:
                rows.append(measure(target, args.reps, launch))
                print('  %r' % rows[-1], file=sys.stderr, flush=True)
    finally:
        for target in targets:
            target.remove()
    text = report(rows, args.reps, ['python3', 'benchmarks/emulation.py']
                  + (argv if argv is not None else sys.argv[1:]))
    with open(args.output, 'w') as f:
        f.write(text)
    print(text)


if __name__ == '__main__':
    main()
