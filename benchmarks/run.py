#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Benchmark atftpd.py against the C servers users would otherwise pick.

    sudo python3 benchmarks/run.py            # full run, ~20 minutes on 2 cores
    sudo python3 benchmarks/run.py --quick    # reduced set, under ~2 minutes

Servers, all serving the same files from the same directory, all in one
network namespace of our own (dnsmasq cannot move its TFTP port off 69):

    atftpd.py   this project, run by --python (default /usr/bin/python3)
    atftpd      Debian's atftpd 0.8 (/usr/sbin/atftpd)
    in.tftpd    tftp-hpa's, unpacked from its .deb (the packages conflict)
    dnsmasq     dnsmasq-base's TFTP server

Clients: the C client atftp (Debian's) for throughput and the 1 GiB file; a
Python raw client (one process, epoll, every loop bounded in count and time)
for storms, loss, and time to first byte; the same client for every server.

Runs are interleaved (every repetition visits every server, in a rotating
order) and the tables show medians. Ratios are to Debian's atftpd. Server CPU
comes from a cgroup-v1 cpuacct group per server (threads and children
included; in.tftpd's children are invisible to /proc/PID/stat because it
ignores SIGCHLD), falling back to utime+stime+cutime+cstime of the process
tree from /proc/PID/stat; it is summed over the repetitions and divided by
the bytes sent. Each timed measurement waits for a quiet machine and is
taken again if other processes used CPU meanwhile (see LoadMonitor).

Needs root (network namespace). Everything it starts is stopped, and the
namespace and the work directory are removed, in finally blocks. Results go
to benchmarks/results.md and results.json (results-quick.* with --quick).
"""

import argparse
import datetime
import hashlib
import itertools
import json
import os
import platform
import random
import resource
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ATFTPD_PY = os.path.join(os.path.dirname(HERE), 'atftpd.py')
ATFTPD_C = '/usr/sbin/atftpd'
IN_TFTPD_DEFAULT = '/tmp/tftpdhpa/usr/sbin/in.tftpd'
DNSMASQ = '/usr/sbin/dnsmasq'
HOST = '127.0.0.1'
MIB = 1 << 20
GIB = 1 << 30
TICK = os.sysconf('SC_CLK_TCK')

# Ports inside the namespace. dnsmasq's TFTP port is always 69.
PORTS = {'atftpd.py': 6970, 'atftpd': 6971, 'in.tftpd': 6972, 'dnsmasq': 69, 'candidate': 6973}
REFERENCE = 'atftpd'            # ratios are to Debian's atftpd

# name, blksize, windowsize
THROUGHPUT_CONFIGS = [
    ('lock-step 512', 512, 1),
    ('lock-step 1428', 1428, 1),
    ('lock-step 8192', 8192, 1),
    ('lock-step 65464', 65464, 1),
    ('windowsize 8 @1428', 1428, 8),
    ('windowsize 64 @1428', 1428, 64),
]

FULL = dict(reps=7, big=32 * MIB, configs=[c[0] for c in THROUGHPUT_CONFIGS],
            storm_reps=3, storm_sizes=(50, 200, 500), storm_blksizes=(None, 1428),
            loss_reps=3, loss_size=512 * 1024, random_loss_size=4 * MIB, huge=GIB,
            ttfb_reps=15, gen_reps=5, slow=4)
QUICK = dict(reps=2, big=8 * MIB, configs=['lock-step 512', 'lock-step 1428', 'windowsize 8 @1428'],
             storm_reps=1, storm_sizes=(200,), storm_blksizes=(None,),
             loss_reps=1, loss_size=256 * 1024, random_loss_size=1 * MIB, huge=256 * MIB,
             ttfb_reps=3, gen_reps=2, slow=2)

MAXTHREAD_ABOVE = 1000          # above every storm size
MAXTHREAD_BELOW = 40            # below every storm size
PXE_SIZE = 40 * 1024
UNIQUE = itertools.count()      # names for generated files, never twice

# The storm client behaves like a PXE ROM (iPXE's retry timer): a request or
# ACK is sent again after 0.5 s, doubling up to 4 s; 8 timeouts in a row
# without progress fail the transfer (~24 s of silence).
STORM_RTO, STORM_RTO_MAX, STORM_MAX_TIMEOUTS = 0.5, 4.0, 8
STORM_DEADLINE = 90.0           # a whole storm, whatever happens
LOSS_EVERY = 50                 # the client ignores every 50th DATA datagram
LOSS_CLIENT_RTO = 3.0           # longer than the requested timeout (1 s):
                                # recovery is the server's own timer

GENERATOR_SH = r'''#!/bin/sh
# Benchmark generator: serves the bytes of ttfb.txt; "slow-" names take
# $BENCH_SLOW_SECONDS, with a log line before and after.
case "$TFTP_FILE" in
*/slow-*) echo "slow generator started"; sleep "${BENCH_SLOW_SECONDS:-4}"; echo "slow generator done" ;;
esac
cat "$TFTP_ROOT/ttfb.txt" >&3
'''


###############################################################################
# /proc: CPU and memory of a server's process tree ###########################
###############################################################################

def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ''


def stat_fields(pid):
    """Fields after the command name of /proc/PID/stat (field 3 is index 0)."""
    text = _read('/proc/%d/stat' % pid)
    return text[text.rindex(')') + 2:].split() if text else None


def process_tree(pid):
    """pid and its live descendants (this kernel has no /proc/*/children)."""
    parents = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields:
                parents.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo and len(tree) < 100000:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, ()))
    return tree


def proc_cpu(pid):
    """CPU seconds of the tree from /proc/PID/stat: utime+stime of each live
    process (all its threads, live or ended) plus cutime+cstime (the children
    it has reaped). Blind to children the kernel reaps by itself: in.tftpd
    ignores SIGCHLD, so its per-transfer children's time is lost."""
    total = 0
    for member in process_tree(pid):
        fields = stat_fields(member)
        if fields:
            total += sum(int(x) for x in fields[11:15])
    return total / TICK


CPUACCT = '/sys/fs/cgroup/cpuacct'


def make_cgroup(name):
    """A cgroup-v1 cpuacct group for one server, or None where there is none.
    The server joins it before exec, so every thread and child is counted,
    to the nanosecond, exited ones included."""
    path = os.path.join(CPUACCT, name)
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    except OSError:
        return None
    return path


def remove_cgroups(parent):
    """The run's cgroup and the groups below it (all empty by now)."""
    top = os.path.join(CPUACCT, parent)
    try:
        names = [n for n in os.listdir(top) if os.path.isdir(os.path.join(top, n))]
    except OSError:
        return
    for path in [os.path.join(top, n) for n in names] + [top]:
        try:
            os.rmdir(path)
        except OSError:
            pass


def cgroup_usage(path):
    text = _read(os.path.join(path, 'cpuacct.usage')).strip()
    return int(text) / 1e9 if text else None


class LoadMonitor:
    """How much CPU the rest of the machine used meanwhile: busy time from
    /proc/stat (user+nice+system) minus our own (the run's cgroup: harness,
    clients, servers and their children). Other sessions on a shared host
    change lock-step timings a lot, so every section records it."""

    def __init__(self, cgroup):
        self.cgroup = cgroup
        self.disturbed = []         # measurements taken again, and why
        self.wait_budget = 1200.0   # seconds of waiting for quiet, for the whole run

    def snapshot(self):
        fields = _read('/proc/stat').splitlines()[0].split()[1:]
        busy = sum(int(x) for x in fields[:3]) / TICK
        steal = int(fields[7]) / TICK if len(fields) > 7 else 0.0
        ours = cgroup_usage(self.cgroup) if self.cgroup else None
        if ours is None:
            own = resource.getrusage(resource.RUSAGE_SELF)
            kids = resource.getrusage(resource.RUSAGE_CHILDREN)
            ours = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
        return time.monotonic(), busy, steal, ours

    def wait_for_quiet(self, limit=300.0):
        """Until the rest of the machine has used under 7% of a core for
        0.3 s (bounded: at most `limit` seconds each time, and 20 minutes
        of waiting in the whole run)."""
        begin = time.monotonic()
        end = begin + min(limit, self.wait_budget)
        try:
            while time.monotonic() < end:
                start = self.snapshot()
                time.sleep(0.3)
                if self.since(start)['other_cores'] < 0.07:
                    return
            progress('the machine did not get quiet; measuring anyway')
        finally:
            self.wait_budget = max(0.0, self.wait_budget - (time.monotonic() - begin - 0.3))

    def since(self, start):
        end = self.snapshot()
        wall = end[0] - start[0]
        other = max(0.0, (end[1] - start[1]) - (end[3] - start[3]))
        return {'seconds': round(wall, 1), 'other_cpu_s': round(other, 1),
                'other_cores': round(other / wall, 3) if wall else 0.0,
                'steal_s': round(end[2] - start[2], 1)}


def server_cpu(server):
    """CPU seconds: the cgroup's usage where we have one, else /proc."""
    usage = cgroup_usage(server.cgroup) if server.cgroup else None
    return proc_cpu(server.pid) if usage is None else usage


def rss_kib(pid):
    for line in _read('/proc/%d/status' % pid).splitlines():
        if line.startswith('VmRSS:'):
            return int(line.split()[1])
    return 0


def pss_kib(pid):
    for line in _read('/proc/%d/smaps_rollup' % pid).splitlines():
        if line.startswith('Pss:'):
            return int(line.split()[1])
    return 0


def tree_rss(pid):
    return sum(rss_kib(p) for p in process_tree(pid))


def tree_pss(pid):
    return sum(pss_kib(p) for p in process_tree(pid))


def wait_quiet(server, seconds=10.0):
    """Until the server has no child processes (in.tftpd forks one per
    transfer) or the time is up; a short settle for the others."""
    end = time.monotonic() + seconds
    while time.monotonic() < end and len(process_tree(server.pid)) > 1:
        time.sleep(0.02)
    time.sleep(0.05)


###############################################################################
# TFTP packets ################################################################
###############################################################################

def measured(args, what, function):
    """function() run on a quiet machine: wait until other processes are
    idle, and measure again (3 tries at most) if they woke up meanwhile.
    Lock-step timings on a shared VM change several-fold with that."""
    monitor = args.monitor
    for attempt in range(3):
        monitor.wait_for_quiet()
        start = monitor.snapshot()
        result = function()
        load = monitor.since(start)
        if load['other_cpu_s'] <= max(0.03, 0.05 * load['seconds']):
            return result
        monitor.disturbed.append({'what': what, 'attempt': attempt + 1, 'kept': attempt == 2,
                                  **load})
        progress('%s: other processes used %.2f CPU s meanwhile; measuring again' % (
            what, load['other_cpu_s']))
    return result


def rrq(name, options=()):
    body = name.encode() + b'\0octet\0'
    for key, value in options:
        body += key.encode() + b'\0' + str(value).encode() + b'\0'
    return b'\0\1' + body


def ack(block):
    return struct.pack('!HH', 4, block & 0xFFFF)


ERROR_UNKNOWN_TID = b'\0\5\0\5Unknown transfer ID\0'
ERROR_ABORT = b'\0\5\0\0benchmark done\0'


def parse_oack(data):
    fields = data[2:].split(b'\0')
    return {fields[i].decode().lower(): fields[i + 1].decode()
            for i in range(0, len(fields) - 1, 2)}


def udp_socket():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    return sock


def probe_options(port, options, timeout=3.0):
    """What a server grants: the OACK's options ({} = plain DATA), or None."""
    with udp_socket() as sock:
        sock.settimeout(timeout)
        sock.sendto(rrq('pxe.bin', options), (HOST, port))
        try:
            data, addr = sock.recvfrom(70000)
        except socket.timeout:
            return None
        sock.sendto(ERROR_ABORT, addr)
    return parse_oack(data) if data[:2] == b'\0\6' else {}


###############################################################################
# Servers #####################################################################
###############################################################################

class Server:
    """One server process in the namespace, its port, its command line."""

    def __init__(self, name, port, argv, workdir, env=None, windowsize=True):
        self.name = name
        self.port = port
        self.argv = argv
        self.env = env
        self.windowsize = windowsize
        self.log_path = os.path.join(workdir, 'log', name + '.out')
        self.proc = None
        self.pid = None
        self.cgroup = None

    def start(self, cgroup_prefix):
        self.cgroup = make_cgroup('%s/%s' % (cgroup_prefix, self.name))
        procs = self.cgroup and os.path.join(self.cgroup, 'cgroup.procs')

        def join_cgroup():
            if procs:
                with open(procs, 'w') as f:
                    f.write(str(os.getpid()))

        # From /, as a daemon runs: `python3 -m atftpd` looks in its working
        # directory first, and from a checkout it would import (and maybe
        # compile) the checkout's atftpd.py instead of the candidate's bytecode.
        with open(self.log_path, 'ab') as out:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=out, env=self.env, start_new_session=True,
                                         preexec_fn=join_cgroup, cwd='/')
        self.pid = self.proc.pid
        end = time.monotonic() + 10
        while not udp_port_bound(self.port):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError('%s did not start (see %s): %s' % (
                    self.name, self.log_path, ' '.join(self.argv)))
            time.sleep(0.05)
        time.sleep(1.0)     # settle before the idle RSS is read

    def stop(self):
        """SIGTERM, then SIGKILL, to the process and its children (by pid)."""
        if self.proc is None:
            return
        members = process_tree(self.pid) if self.proc.poll() is None else []
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in members:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            try:
                self.proc.wait(5)
                break
            except subprocess.TimeoutExpired:
                continue
        for pid in members[1:]:     # children the server did not reap
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.proc = None
        if self.cgroup:
            for _ in range(50):     # empty once the last member is gone
                try:
                    os.rmdir(self.cgroup)
                    break
                except OSError:
                    time.sleep(0.1)
            self.cgroup = None


def udp_port_bound(port):
    for table in ('/proc/net/udp',):
        for line in _read(table).splitlines()[1:]:
            local = line.split()[1]
            if int(local.split(':')[1], 16) == port:
                return True
    return False


def make_servers(args, workdir, maxthread):
    root = os.path.join(workdir, 'root')
    log = os.path.join(workdir, 'log')
    generator = os.path.join(workdir, 'generator.sh')
    env = dict(os.environ, BENCH_SLOW_SECONDS=str(args.profile['slow']))

    def python_server(name, script):
        # A copy named atftpd.py in a directory of its own, with bytecode
        # allowed: as a script it caches its bytecode beside it and restarts
        # from there, as on a router (README.md, "Memory").
        scriptdir = os.path.join(workdir, 'script-' + name)
        os.makedirs(scriptdir, exist_ok=True)
        shutil.copy2(script, os.path.join(scriptdir, 'atftpd.py'))
        launch = [args.python, os.path.join(scriptdir, 'atftpd.py')]
        server_env = dict(env)
        server_env.pop('PYTHONDONTWRITEBYTECODE', None)
        if name == 'candidate' and args.candidate_module:
            # `python3 -m atftpd` from bytecode compiled beforehand, as the
            # OpenWrt init script starts it.
            moddir = os.path.join(workdir, 'module')
            os.makedirs(moddir, exist_ok=True)
            shutil.copy(script, os.path.join(moddir, 'atftpd.py'))
            subprocess.run([args.python, '-m', 'py_compile', os.path.join(moddir, 'atftpd.py')],
                           check=True)
            launch = [args.python, '-m', 'atftpd']
            server_env = dict(env, PYTHONPATH=moddir)
            server_env.pop('PYTHONDONTWRITEBYTECODE', None)
        return Server(name, PORTS[name], launch + ['--daemon', '--no-fork', '--port', str(PORTS[name]),
            '--bind-address', HOST, '--logfile', os.path.join(log, name + '.log'),
            '--maxthread', str(maxthread), '--content-generator', generator,
            '--generator-timeout', '30', root], workdir, env=server_env)

    servers = {
        'atftpd.py': python_server('atftpd.py', ATFTPD_PY),
        'atftpd': Server('atftpd', PORTS['atftpd'], [
            ATFTPD_C, '--daemon', '--no-fork', '--port', str(PORTS['atftpd']),
            '--bind-address', HOST, '--logfile', os.path.join(log, 'atftpd.log'),
            '--maxthread', str(maxthread), root], workdir),
        # No concurrency limit: one forked child per request.
        'in.tftpd': Server('in.tftpd', PORTS['in.tftpd'], [
            args.in_tftpd, '-4', '-L', '-a', '%s:%d' % (HOST, PORTS['in.tftpd']),
            '-s', '-u', 'nobody', root], workdir, windowsize=False),
        'dnsmasq': Server('dnsmasq', PORTS['dnsmasq'], [
            DNSMASQ, '--keep-in-foreground', '--conf-file=/dev/null', '--port=0',
            '--enable-tftp', '--tftp-root=' + root, '--listen-address=' + HOST,
            '--bind-interfaces', '--tftp-max=%d' % maxthread, '--user=nobody',
            '--group=nogroup', '--pid-file=' + os.path.join(log, 'dnsmasq.pid'),
            '--log-facility=' + os.path.join(log, 'dnsmasq.log')], workdir, windowsize=False),
    }
    if args.candidate:
        servers['candidate'] = python_server('candidate', os.path.abspath(args.candidate))
    return {name: servers[name] for name in args.servers}


class ServerSet:
    """All servers at one --maxthread; started together, stopped together."""

    def __init__(self, args, workdir, maxthread):
        self.maxthread = maxthread
        self.cgroup_prefix = args.cgroup_prefix
        self.servers = make_servers(args, workdir, maxthread)
        self.idle = {}              # RSS in KiB right after start
        self.idle_pss = {}

    def __enter__(self):
        try:
            for server in self.servers.values():
                server.start(self.cgroup_prefix)
                self.idle[server.name] = rss_kib(server.pid)
                self.idle_pss[server.name] = pss_kib(server.pid)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        for server in self.servers.values():
            server.stop()

    def rotated(self, k):
        names = list(self.servers)
        k %= len(names)
        return [self.servers[n] for n in names[k:] + names[:k]]


###############################################################################
# The atftp client (throughput, the 1 GiB file) ##############################
###############################################################################

def run_atftp(workdir, port, name, out_path, blksize, windowsize, timeout, sample=None):
    """Run atftp -g; returns (seconds, exit status, client CPU s, samples).
    The end is seen through a pidfd, so the time is not rounded to a poll
    interval; `sample` (a callable) runs every 50 ms while atftp runs."""
    argv = ['atftp', '--option', 'blksize %d' % blksize]
    if windowsize > 1:
        argv += ['--option', 'windowsize %d' % windowsize]
    argv += ['-g', '-r', name, '-l', out_path, HOST, str(port)]
    samples = []
    with open(os.path.join(workdir, 'log', 'atftp.err'), 'ab') as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        pidfd = os.pidfd_open(proc.pid)
        try:
            end = time.monotonic() + timeout
            while True:
                left = end - time.monotonic()
                ready, _, _ = select.select([pidfd], [], [], min(0.05, max(0.0, left)))
                if ready:
                    break
                if left <= 0:
                    proc.kill()
                    break
                if sample:
                    samples.append(sample())
            seconds = time.perf_counter() - start
            _pid, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            os.close(pidfd)
    return seconds, proc.returncode, usage.ru_utime + usage.ru_stime, samples


def file_digest(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(4 * MIB), b''):
            h.update(chunk)
    return h.hexdigest()


###############################################################################
# The raw Python client: storms (many at once), loss, time to first byte #####
###############################################################################

class Fetch:
    """One download driven by the raw client. Lock-step, or RFC 7440 windows:
    ACK after `windowsize` blocks in order, and at once (once until progress)
    when a block is missing."""

    __slots__ = ('sock', 'port', 'request', 'tid', 'blksize', 'windowsize', 'expected',
                 'chunks', 'last', 'rto', 'rto_max', 'max_timeouts', 'timeouts', 'next_timeout',
                 'started', 'first_byte', 'ended', 'error', 'in_window', 'gap_acked',
                 'drop', 'data_seen', 'drops', 'retransmits', 'held', 'hold', 'rto0')

    def __init__(self, port, name, options, rto, rto_max, max_timeouts, drop=None,
                 hold=False):
        self.sock = udp_socket()
        self.sock.setblocking(False)
        self.port = port
        self.request = rrq(name, options)
        options = dict(options)
        self.blksize = 512
        self.windowsize = 1
        self.tid = None
        self.expected = 1
        self.chunks = []
        self.last = None
        self.rto0, self.rto_max, self.max_timeouts = rto, rto_max, max_timeouts
        self.rto = rto
        self.timeouts = 0
        self.next_timeout = float('inf')
        self.started = self.first_byte = self.ended = None
        self.error = None
        self.in_window = 0
        self.gap_acked = False
        self.drop = drop            # drop(n): ignore the n-th DATA datagram?
        self.data_seen = self.drops = self.retransmits = 0
        self.hold = hold            # storms: keep the first ACK until released
        self.held = None

    def start(self, now):
        self.started = now
        self.last = (self.request, (HOST, self.port))
        self.send(now)

    def send(self, now, packet=None):
        if packet is not None:
            self.last = (packet, self.tid)
        try:
            self.sock.sendto(*self.last)
        except OSError:
            pass                    # like a lost packet: the timer resends
        self.next_timeout = now + self.rto

    @property
    def done(self):
        return self.ended is not None or self.error is not None

    def reply(self, now, packet):
        if self.hold and self.held is None and self.first_byte is not None:
            self.held = packet      # established: ACK when released
            self.last = (packet, self.tid)
            self.next_timeout = float('inf')
        else:
            self.send(now, packet)

    def release(self, now):
        self.hold = False
        if self.held is not None and not self.done:
            self.send(now, self.held)

    def on_datagram(self, data, addr, now):
        if self.tid is None:
            self.tid = addr
        elif addr != self.tid:
            self.sock.sendto(ERROR_UNKNOWN_TID, addr)
            return
        if self.hold and self.held is not None:
            return                  # held: the server's resends are ignored
        opcode = data[1] if len(data) >= 4 else 0
        if opcode == 6 and self.expected == 1 and self.first_byte is None:
            options = parse_oack(data)
            self.blksize = int(options.get('blksize', 512))
            self.windowsize = int(options.get('windowsize', 1))
            self.first_byte = now
            self.reply(now, ack(0))
        elif opcode == 3:
            self.on_data(data, now)
        elif opcode == 5:
            self.error = 'ERROR %d %s' % (data[2] << 8 | data[3],
                                         data[4:].split(b'\0')[0].decode('latin-1'))

    def on_data(self, data, now):
        self.data_seen += 1
        if self.drop is not None and self.drop(self.data_seen):
            self.drops += 1
            return
        block = data[2] << 8 | data[3]
        if self.ended is not None:
            if block == (self.expected - 1) & 0xFFFF:
                self.send(now, ack(block))      # our final ACK was lost
            return
        if block != self.expected & 0xFFFF:
            ahead = 0 < (block - self.expected) & 0xFFFF < 0x8000
            if self.windowsize == 1:
                if block == (self.expected - 1) & 0xFFFF:
                    self.send(now, ack(block))  # a duplicate: ACK again
            elif ahead and not self.gap_acked:
                # A gap: ACK the last block in order, once until progress.
                # Blocks behind (copies still in flight) are ignored.
                self.gap_acked = True
                self.in_window = 0
                self.send(now, ack(self.expected - 1))
            return
        if self.first_byte is None:
            self.first_byte = now
        payload = data[4:]
        self.chunks.append(payload)
        self.expected += 1
        self.in_window += 1
        self.timeouts = 0
        self.rto = self.rto0
        self.gap_acked = False
        final = len(payload) < self.blksize
        if final:
            self.ended = now
            self.send(now, ack(block))
            self.next_timeout = float('inf')
        elif self.in_window >= self.windowsize:
            self.in_window = 0
            self.reply(now, ack(block))
        else:
            self.next_timeout = now + self.rto

    def on_timeout(self, now):
        self.timeouts += 1
        if self.timeouts > self.max_timeouts:
            self.error = 'timeout'
            return
        self.retransmits += 1
        self.rto = min(self.rto * 2, self.rto_max)
        self.send(now)

    def drain(self, now):
        for _ in range(256):
            try:
                data, addr = self.sock.recvfrom(70000)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return              # ICMP errors from an earlier send
            self.on_datagram(data, addr, now)
            if self.error is not None:
                return

    def content(self):
        return b''.join(self.chunks)


def run_fetches(fetches, deadline, server=None, hold=False):
    """Drive many fetches at once with epoll until all are done or the
    deadline passes. Returns the peak tree RSS seen (sampled every 100 ms)
    and, with hold=True, the memory with every transfer established."""
    poller = select.epoll()
    by_fd = {}
    for fetch in fetches:
        by_fd[fetch.sock.fileno()] = fetch
        poller.register(fetch.sock.fileno(), select.EPOLLIN)
    peak = 0
    held = None
    now = time.monotonic()
    for fetch in fetches:
        if fetch.started is None:
            fetch.start(time.monotonic())
    end = now + deadline
    next_check = next_sample = now
    try:
        for _ in range(10000000):
            now = time.monotonic()
            pending = [f for f in fetches if not f.done] if now >= next_check else None
            if pending is not None:
                if not pending or now >= end:
                    break
                if hold and held is None:
                    ready = all(f.held is not None or f.done for f in fetches)
                    if ready or now >= end - deadline / 2:
                        time.sleep(0.2)     # let the servers settle
                        held = {'rss': tree_rss(server.pid), 'pss': tree_pss(server.pid),
                                'established': sum(f.held is not None for f in fetches)}
                        for f in fetches:
                            f.release(time.monotonic())
                for fetch in pending:
                    if now >= fetch.next_timeout:
                        fetch.on_timeout(now)
                next_check = now + 0.05
            if server is not None and now >= next_sample:
                peak = max(peak, tree_rss(server.pid))
                next_sample = now + 0.05
            for fd, _event in poller.poll(0.05):
                by_fd[fd].drain(time.monotonic())
    finally:
        poller.close()
    return peak, held


def raw_fetch(port, name, options=(), drop=None, rto=LOSS_CLIENT_RTO, deadline=300.0):
    """One download by the raw client; returns the Fetch."""
    fetch = Fetch(port, name, options, rto, rto, 10, drop=drop)
    try:
        run_fetches([fetch], deadline)
    finally:
        fetch.sock.close()
    return fetch


###############################################################################
# Measurements ################################################################
###############################################################################

def measure_throughput(args, sset, workdir, results):
    profile = args.profile
    out_path = os.path.join(args.shm, 'out.bin')
    expected = results['files']['big.bin']
    table = results.setdefault('throughput', {})
    configs = [c for c in THROUGHPUT_CONFIGS if c[0] in profile['configs']]
    for rep in range(profile['reps']):
        for index, (label, blksize, windowsize) in enumerate(configs):
            for server in sset.rotated(rep + index):
                if windowsize > 1 and not server.windowsize:
                    continue

                def once(server=server, blksize=blksize, windowsize=windowsize):
                    wait_quiet(server)
                    cpu0, proc0 = server_cpu(server), proc_cpu(server.pid)
                    seconds, status, client_cpu, _ = run_atftp(
                        workdir, server.port, 'big.bin', out_path, blksize, windowsize, 300)
                    wait_quiet(server)
                    return (seconds, status, client_cpu, server_cpu(server) - cpu0,
                            proc_cpu(server.pid) - proc0)

                seconds, status, client_cpu, cpu, proc = measured(
                    args, 'throughput %s %s' % (label, server.name), once)
                ok = status == 0 and file_digest(out_path) == expected
                os.unlink(out_path)
                row = table.setdefault(label, {}).setdefault(server.name, {
                    'seconds': [], 'reps': [], 'server_cpu': [], 'proc_cpu': [], 'client_cpu': [],
                    'bytes': 0, 'failed': 0})
                if ok:
                    row['seconds'].append(seconds)
                    row['reps'].append(rep)
                    row['server_cpu'].append(cpu)
                    row['proc_cpu'].append(proc)
                    row['client_cpu'].append(client_cpu)
                    row['bytes'] += profile['big']
                else:
                    row['failed'] += 1
                progress('throughput %-20s %-10s %6.1f MB/s  cpu %.2f s%s' % (
                    label, server.name, profile['big'] / seconds / 1e6, cpu,
                    '' if ok else '  FAILED'))


def measure_storms(args, sset, results, below):
    profile = args.profile
    expected = results['content']['pxe.bin']
    table = results.setdefault('storms', {})
    for rep in range(profile['storm_reps']):
        k = 0
        for clients in profile['storm_sizes']:
            for blksize in profile['storm_blksizes']:
                label = '%d clients, blksize %s, maxthread %s' % (
                    clients, blksize or 'default', 'below (%d)' % sset.maxthread if below
                    else 'above (%d)' % sset.maxthread)
                for server in sset.rotated(rep + k):
                    k += 1
                    run = measured(args, 'storm %s %s' % (label, server.name),
                                   lambda s=server: storm(s, clients, blksize, expected))
                    table.setdefault(label, {}).setdefault(server.name, []).append(run)
                    progress('storm %-45s %-10s %3d ok %3d failed  %.2f s  p99 %.3f s' % (
                        label, server.name, run['completed'], run['failed'], run['wall'],
                        run['p99']))
                    time.sleep(0.3)


def storm(server, clients, blksize, expected, hold=False):
    options = [('blksize', blksize), ('tsize', 0)] if blksize else []
    wait_quiet(server)
    cpu0 = server_cpu(server)
    fetches = [Fetch(server.port, 'pxe.bin', options, STORM_RTO, STORM_RTO_MAX,
                     STORM_MAX_TIMEOUTS, hold=hold) for _ in range(clients)]
    try:
        start = time.monotonic()
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        peak, held = run_fetches(fetches, STORM_DEADLINE, server, hold=hold)
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        loop_end = time.monotonic()
        time.sleep(0.1)
        for f in fetches:           # answer a last resent block, if any
            f.drain(time.monotonic())
    finally:
        for f in fetches:
            f.sock.close()
    completed = [f for f in fetches if f.ended is not None and f.content() == expected]
    if len(completed) == clients:
        wall_end = max(f.ended for f in fetches)
    else:
        wall_end = loop_end         # the last failure's timeout, or the deadline
    times = sorted(f.ended - f.started for f in completed)
    errors = {}
    for f in fetches:
        if f not in completed:
            why = f.error or ('wrong content' if f.ended else 'unfinished at deadline')
            errors[why] = errors.get(why, 0) + 1
    wait_quiet(server, 30)
    return {
        'completed': len(completed), 'failed': clients - len(completed), 'errors': errors,
        'wall': wall_end - start, 'p50': percentile(times, 50), 'p99': percentile(times, 99),
        'client_retransmits': sum(f.retransmits for f in fetches),
        'client_cpu': (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime),
        'server_cpu': server_cpu(server) - cpu0, 'peak_rss_kib': peak, 'held': held,
        'bytes_checked': len(expected) * len(completed)}


def percentile(values, p):
    """Nearest rank; None for no values."""
    if not values:
        return None
    rank = max(1, -(-len(values) * p // 100))
    return values[int(rank) - 1]


def measure_loss(args, sset, results):
    """Each lossy download is paired with a clean one just before it; the
    seconds lost per drop are sum(lossy - clean) / sum(drops)."""
    profile = args.profile
    table = results.setdefault('loss', {})
    lock_step = [('blksize', 1428), ('timeout', 1)]
    windowed = lock_step + [('windowsize', 8)]
    modes = [
        ('lock-step 1428, every %dth' % LOSS_EVERY, 'loss.bin', lock_step, False, None),
        ('windowsize 8 @1428, every %dth' % LOSS_EVERY, 'loss.bin', windowed, True, None),
        # Every 50th is a fixed pattern: whether drops land on a window's
        # last block (only the server's timeout recovers that) depends on
        # how many datagrams each recovery adds. A random 2% is fairer.
        ('windowsize 8 @1428, random 2%', 'lossr.bin', windowed, True, 0.02),
    ]
    for rep in range(profile['loss_reps']):
        for index, (label, name, options, needs_window, rate) in enumerate(modes):
            expected = results['content'][name]
            for server in sset.rotated(rep + index):
                if needs_window and not server.windowsize:
                    continue
                row = table.setdefault(label, {}).setdefault(server.name, {
                    'clean': [], 'lossy': [], 'drops': [], 'bytes_checked': 0, 'failed': 0,
                    'client_retransmits': 0})
                if rate is None:
                    def drop(n):
                        return n % LOSS_EVERY == 0
                else:
                    def drop(n, rng=random.Random(rep), rate=rate):
                        return rng.random() < rate

                def pair(server=server, name=name, options=options, drop=drop):
                    runs = []
                    for dropping in (None, drop):
                        wait_quiet(server)
                        runs.append(raw_fetch(server.port, name, options, dropping))
                    return runs

                runs = measured(args, 'loss %s %s' % (label, server.name), pair)
                if not all(f.ended is not None and f.content() == expected for f in runs):
                    row['failed'] += 1
                    progress('loss %s %s: FAILED (%s)' % (label, server.name,
                                                          [f.error for f in runs]))
                    continue
                row['bytes_checked'] += 2 * len(expected)
                row['client_retransmits'] += sum(f.retransmits for f in runs)
                row['clean'].append(runs[0].ended - runs[0].started)
                row['lossy'].append(runs[1].ended - runs[1].started)
                row['drops'].append(runs[1].drops)
                progress('loss %-32s %-10s clean %.3f s, %d drops %.3f s' % (
                    label, server.name, row['clean'][-1], row['drops'][-1], row['lossy'][-1]))


def measure_memory(args, sset, workdir, results):
    profile = args.profile
    table = results.setdefault('memory', {})
    out_path = os.path.join(args.shm, 'huge.out')
    for server in sset.rotated(0):
        row = table.setdefault(server.name, {})
        row['idle_kib'] = sset.idle[server.name]
        row['idle_pss_kib'] = sset.idle_pss[server.name]
        # 500 transfers open at once: each client holds its first ACK.
        run = storm(server, 500, None, results['content']['pxe.bin'], hold=True)
        row['open500'] = run['held']
        row['open500_completed'] = run['completed']
        progress('memory %-10s idle %d KiB, 500 open: %s' % (server.name, row['idle_kib'],
                                                              run['held']))
        # The 1 GiB sparse file, one transfer.
        wait_quiet(server)
        base = tree_rss(server.pid)
        seconds, status, _, samples = run_atftp(
            workdir, server.port, 'huge.bin', out_path, 65464, 1, 600,
            sample=lambda s=server: tree_rss(s.pid))
        ok = status == 0 and os.path.getsize(out_path) == profile['huge'] and subprocess.run(
            ['cmp', '-s', '-n', str(profile['huge']), out_path, '/dev/zero']).returncode == 0
        os.unlink(out_path)
        row['huge'] = {'ok': ok, 'seconds': seconds, 'before_kib': base,
                       'peak_kib': max(samples or [0]), 'samples': len(samples)}
        progress('memory %-10s huge file: %s' % (server.name, row['huge']))


def measure_ttfb(args, sset, results):
    """Time to first byte of a static file, on every server, and of a
    generated one on the atftpd.py servers."""
    profile = args.profile
    table = results.setdefault('ttfb', {})
    content = results['content']['ttfb.txt']
    for rep in range(profile['ttfb_reps']):
        for server in sset.rotated(rep):
            kinds = ['static']
            if server.name in ('atftpd.py', 'candidate'):
                kinds.append('generated')
            for kind in kinds:
                def once(server=server, kind=kind):
                    # A generated name is new every time, so the cache never answers.
                    name = 'ttfb.txt' if kind == 'static' else 'gen/ttfb-%d' % next(UNIQUE)
                    return raw_fetch(server.port, name, deadline=30)

                wait_quiet(server)
                fetch = measured(args, 'ttfb %s %s' % (kind, server.name), once)
                row = table.setdefault(kind, {}).setdefault(server.name, [])
                if fetch.ended is not None and fetch.content() == content:
                    row.append(fetch.first_byte - fetch.started)
    for kind, rows in table.items():
        for name, values in rows.items():
            progress('ttfb %-9s %-10s median %.2f ms (%d)' % (
                kind, name, 1000 * statistics.median(values) if values else -1, len(values)))


def measure_generator(args, sset, workdir, results):
    """Throughput of a static download while a slow generator runs (its
    client waits for the generated file meanwhile), against without."""
    profile = args.profile
    out_path = os.path.join(args.shm, 'gen.out')
    expected = results['files']['big.bin']
    table = results.setdefault('generator', {})
    for server in sset.servers.values():
        if server.name not in ('atftpd.py', 'candidate'):
            continue
        for label, windowsize in (('lock-step 1428', 1), ('windowsize 8 @1428', 8)):
            row = table.setdefault(server.name, {}).setdefault(label, {
                'without': [], 'with': [], 'without_reps': [], 'with_reps': [],
                'overlapped': 0, 'failed': 0})
            for rep in range(profile['gen_reps']):
                for with_generator in (rep % 2 == 0, rep % 2 == 1):
                    def once(server=server, windowsize=windowsize, rep=rep,
                             with_generator=with_generator):
                        """(seconds, ok, overlapped) of one static download."""
                        slow = None
                        wait_quiet(server)
                        if with_generator:
                            once.tries += 1     # a new name each time: no cache
                            slow = Fetch(server.port, 'gen/slow-%d-%d-%d' % (
                                windowsize, rep, once.tries), (), 30.0, 30.0, 1)
                            slow.start(time.monotonic())
                            time.sleep(0.3)     # the generator is running now
                        seconds, status, _, _ = run_atftp(workdir, server.port, 'big.bin',
                                                          out_path, 1428, windowsize, 300)
                        ok = status == 0 and file_digest(out_path) == expected
                        os.unlink(out_path)
                        overlapped = False
                        if slow is not None:
                            slow.drain(time.monotonic())
                            overlapped = slow.first_byte is None    # still generating
                            run_fetches([slow], profile['slow'] + 10)
                            ok = ok and slow.content() == results['content']['ttfb.txt']
                            slow.sock.close()
                        return seconds, ok, overlapped
                    once.tries = 0

                    seconds, ok, overlapped = measured(
                        args, 'generator %s %s' % (label, server.name), once)
                    row['overlapped'] += overlapped
                    if ok:
                        kind = 'with' if with_generator else 'without'
                        row[kind].append(profile['big'] / seconds / 1e6)
                        row[kind + '_reps'].append(rep)
                    else:
                        row['failed'] += 1
                    progress('generator %-10s %-20s %s generator: %.1f MB/s%s' % (
                        server.name, label, 'with' if with_generator else 'without',
                        profile['big'] / seconds / 1e6, '' if ok else ' FAILED'))


def probe_all(sset, results):
    """The options each server grants for each client configuration."""
    table = results.setdefault('granted', {})
    for label, blksize, windowsize in THROUGHPUT_CONFIGS:
        options = [('blksize', blksize)] + ([('windowsize', windowsize)] if windowsize > 1 else [])
        for server in sset.servers.values():
            table.setdefault(label, {})[server.name] = probe_options(server.port, options)
    table['timeout 1'] = {s.name: probe_options(s.port, [('timeout', 1)])
                          for s in sset.servers.values()}
    for server in sset.servers.values():
        wait_quiet(server)


###############################################################################
# Report ######################################################################
###############################################################################

def med(values):
    return statistics.median(values) if values else None


def fmt(value, spec='%.1f', none='n/a'):
    return none if value is None else spec % value


def paired_ratio(rates, reps, ref_rates, ref_reps):
    """The median over repetitions of rate / reference rate, each pair taken
    in the same repetition: it cancels the machine's drift from one
    repetition to the next, which a ratio of two medians does not. `reps`
    is None in results from before it was recorded: samples in order."""
    reps = range(len(rates)) if reps is None else reps
    ref_reps = range(len(ref_rates)) if ref_reps is None else ref_reps
    reference = dict(zip(ref_reps, ref_rates))
    return med([rate / reference[r] for rate, r in zip(rates, reps) if r in reference])


def throughput_ratios(row, ref_row, big):
    """(ratio of the medians, paired ratio) of a throughput row to atftpd's."""
    if not row or not ref_row or not row['seconds'] or not ref_row['seconds']:
        return None, None
    rates = [big / s for s in row['seconds']]
    ref_rates = [big / s for s in ref_row['seconds']]
    return med(rates) / med(ref_rates), paired_ratio(rates, row.get('reps'), ref_rates,
                                                      ref_row.get('reps'))


def generator_ratios(row):
    """(ratio of the medians, paired ratio) of a download with a generator
    running to the same download without."""
    return med(row['with']) / med(row['without']), paired_ratio(
        row['with'], row.get('with_reps'), row['without'], row.get('without_reps'))


def ratio(value, reference, invert=False):
    if value is None or not reference:
        return ''
    return ' (%.2fx)' % ((reference / value) if invert else (value / reference))


def report(results, args):
    names = [n for n in args.servers]
    lines = []
    add = lines.append
    machine = results['machine']
    add('Run: `%s` on %s; %s; %s CPUs (%s); kernel %s; atftpd.py on %s.' % (
        results['command'], results['date'], machine['mode'], machine['nproc'], machine['cpu'],
        machine['kernel'], machine['python']))
    again = results.get('measured_again', [])
    if 'measured_again' in results:
        kept = [d['what'] for d in again if d['kept']]
        add('')
        add('Each timed measurement waited for a quiet machine and was taken again when other '
            'processes used CPU meanwhile: %d taken again, %d kept disturbed after 3 tries%s.' % (
                len(again) - len(kept), len(kept), (' (**%s**)' % '; '.join(kept)) if kept else ''))
    add('')
    header = '| | ' + ' | '.join(names) + ' |'
    rule = '|---|' + '---|' * len(names)

    add('### Throughput: one %d MiB file, atftp client (MB/s, median of %d; ratio to atftpd)'
        % (args.profile['big'] // MIB, args.profile['reps']))
    add('')
    add('In brackets: the ratio of the medians, then "paired": the median over repetitions of '
        'the ratio to atftpd in the same repetition, which cancels drift between repetitions.')
    add('')
    add(header)
    add(rule)
    tp = results.get('throughput', {})
    for label, rows in tp.items():
        ref = med([args.profile['big'] / s for s in rows.get(REFERENCE, {}).get('seconds', [])])
        cells = []
        for n in names:
            row = rows.get(n)
            if row is None:
                cells.append('n/a')
                continue
            value = med([args.profile['big'] / s for s in row['seconds']])
            granted = results['granted'].get(label, {}).get(n) or {}
            note = ''
            if int(granted.get('blksize', 512)) != dict(
                    (c[0], c[1]) for c in THROUGHPUT_CONFIGS)[label]:
                note = ' [blksize %s]' % granted.get('blksize', '512')
            of_medians, paired = throughput_ratios(row, rows.get(REFERENCE), args.profile['big'])
            if n == REFERENCE or paired is None:
                shown = ratio(value, ref)
            else:
                shown = ' (%.2fx, paired %.2fx)' % (of_medians, paired)
            cells.append(fmt(value and value / 1e6) + shown + note +
                         (' **%d failed**' % row['failed'] if row['failed'] else ''))
        add('| %s | %s |' % (label, ' | '.join(cells)))
    add('')
    add('### Server CPU seconds per GiB sent (%s, all repetitions; ratio to atftpd)'
        % results['cpu_source'])
    add('')
    add(header)
    add(rule)
    for label, rows in tp.items():
        def per_gib(row):
            return sum(row['server_cpu']) / row['bytes'] * GIB if row and row['bytes'] else None
        ref = per_gib(rows.get(REFERENCE))
        cells = [fmt(per_gib(rows.get(n)), '%.1f') + ratio(per_gib(rows.get(n)), ref)
                 for n in names]
        add('| %s | %s |' % (label, ' | '.join(cells)))
    add('')

    storms = results.get('storms', {})
    if storms:
        add('### PXE storms: %d KiB file, raw client pool (ok/failed, wall s (ratio), '
            'p50/p99 ms; median of %d)' % (PXE_SIZE // 1024, args.profile['storm_reps']))
        add('')
        add(header)
        add(rule)
        for label, rows in storms.items():
            ref = med([r['wall'] for r in rows.get(REFERENCE, [])])
            cells = []
            for n in names:
                runs = rows.get(n)
                if not runs:
                    cells.append('n/a')
                    continue
                wall = med([r['wall'] for r in runs])
                p50 = med([r['p50'] for r in runs if r['p50'] is not None])
                p99 = med([r['p99'] for r in runs if r['p99'] is not None])
                cells.append('%d/%d, %.2f s%s, %s/%s' % (
                    min(r['completed'] for r in runs), max(r['failed'] for r in runs),
                    wall, ratio(wall, ref), fmt(ms(p50), '%.0f'), fmt(ms(p99), '%.0f')))
            add('| %s | %s |' % (label, ' | '.join(cells)))
        add('')
        add('ok = fewest completed, failed = most failed over the repetitions. in.tftpd has no '
            'concurrency limit (one forked child per request); dnsmasq\'s is --tftp-max.')
        add('')

    loss = results.get('loss', {})
    if loss:
        add('### Loss: the client ignores DATA datagrams; timeout option 1 s (seconds lost '
            'per dropped packet over %d runs; bytes checked)' % args.profile['loss_reps'])
        add('')
        add(header)
        add(rule)
        for label, rows in loss.items():
            cells = []
            for n in names:
                row = rows.get(n)
                if not row or not row['lossy'] or not row['clean']:
                    cells.append('n/a' if not row else 'failed %d' % row['failed'])
                    continue
                lost = (sum(row['lossy']) - sum(row['clean'])) / sum(row['drops'])
                cells.append('%.3f s/drop (%d drops, %s B ok%s)' % (
                    lost, sum(row['drops']), row['bytes_checked'],
                    ', %d failed' % row['failed'] if row['failed'] else ''))
            add('| %s | %s |' % (label, ' | '.join(cells)))
        add('')

    memory = results.get('memory', {})
    if memory:
        add('### Memory (KiB; process tree RSS unless said)')
        add('')
        add(header)
        add(rule)

        def cell(fn):
            out = []
            for n in names:
                try:
                    out.append(fn(memory[n], n))
                except (KeyError, TypeError, ZeroDivisionError):
                    out.append('n/a')
            return ' | '.join(out)
        add('| idle RSS (fresh start) | %s |' % cell(lambda m, n: '%d' % m['idle_kib']))
        if storms:
            label = storm_500_label(storms)
            add('| peak RSS, %s storm | %s |' % (label.split(',')[0], cell(lambda m, n: '%d' % max(
                r['peak_rss_kib'] for r in storms[label][n]))))
        add('| 500 transfers open: RSS / PSS | %s |' % cell(
            lambda m, n: '%d / %d' % (m['open500']['rss'], m['open500']['pss'])))
        add('| per open transfer, RSS / PSS: (open - idle) / 500 | %s |' % cell(
            lambda m, n: '%.1f / %.1f' % (
                (m['open500']['rss'] - m['idle_kib']) / m['open500']['established'],
                (m['open500']['pss'] - m['idle_pss_kib']) / m['open500']['established'])))
        add('| %d MiB file: RSS before / peak during | %s |' % (
            args.profile['huge'] // MIB, cell(lambda m, n: '%d / %d%s' % (
                m['huge']['before_kib'], m['huge']['peak_kib'],
                '' if m['huge']['ok'] else ' **failed**'))))
        add('')
        add('A tree RSS counts shared pages once per process (in.tftpd forks one per '
            'transfer); PSS shares them out, but moves when another process of the same '
            'binary starts (two atftpd.py columns).')
        add('')

    ttfb = results.get('ttfb', {})
    gen = results.get('generator', {})
    if ttfb or gen:
        add('### Generator path (atftpd.py) and time to first byte (ms, median)')
        add('')
        add(header)
        add(rule)
        for kind, rows in ttfb.items():
            add('| time to first byte, %s file | %s |' % (kind, ' | '.join(
                fmt(ms(med(rows.get(n, []))), '%.2f') for n in names)))
        labels = sorted({label for rows in gen.values() for label in rows})
        for label in labels:
            cells = []
            for n in names:
                row = gen.get(n, {}).get(label)
                if not row or not row['with'] or not row['without']:
                    cells.append('n/a')
                    continue
                of_medians, paired = generator_ratios(row)
                cells.append('%.1f vs %.1f MB/s = %.2f, paired %.2f (%d/%d overlapped)' % (
                    med(row['with']), med(row['without']), of_medians, paired,
                    row['overlapped'], len(row['with'])))
            add('| static %s download while a slow generator runs vs without | %s |' % (
                label, ' | '.join(cells)))
        add('')
    return '\n'.join(lines)


def ms(value):
    return None if value is None else value * 1000


def storm_500_label(storms):
    for label in storms:
        if label.startswith('500 clients, blksize default, maxthread above'):
            return label
    return max(storms, key=lambda l: int(l.split()[0]))


def targets(results, args):
    """The issue's targets for atftpd.py, met or not."""
    out = []
    me = 'atftpd.py'
    tp = results.get('throughput', {})
    big = args.profile['big']

    def cpu(label, name):
        row = tp.get(label, {}).get(name)
        return sum(row['server_cpu']) / row['bytes'] * GIB if row and row['bytes'] else None

    for label in ('lock-step 512', 'lock-step 1428'):
        if label in tp:
            r, paired = throughput_ratios(tp[label].get(me), tp[label].get(REFERENCE), big)
            c = cpu(label, me) / cpu(label, REFERENCE)
            out.append(('%s: throughput >= 0.8x atftpd (both ratios)' % label,
                        '%.2fx, paired %.2fx' % (r, paired), min(r, paired) >= 0.8))
            out.append(('%s: server CPU/GiB <= 2x atftpd' % label, '%.2fx' % c, c <= 2.0))
    for label in ('windowsize 8 @1428', 'windowsize 64 @1428'):
        if label in tp:
            r, paired = throughput_ratios(tp[label].get(me), tp[label].get(REFERENCE), big)
            out.append(('%s: throughput >= 1.0x atftpd (both ratios)' % label,
                        '%.2fx, paired %.2fx' % (r, paired), min(r, paired) >= 1.0))
    storms = results.get('storms', {})
    for label, rows in storms.items():
        if not label.startswith('500 ') or me not in rows:
            continue
        failed = max(r['failed'] for r in rows[me])
        if 'above' in label and REFERENCE in rows:
            r = med([x['wall'] for x in rows[me]]) / med([x['wall'] for x in rows[REFERENCE]])
            out.append(('storm %s: 0 failures, wall <= 1.5x atftpd' % label,
                        '%d failed, %.2fx' % (failed, r), failed == 0 and r <= 1.5))
        else:
            out.append(('storm %s: 0 failures' % label, '%d failed' % failed, failed == 0))
    for label, rows in storms.items():
        if 'below' in label and not label.startswith('500 ') and me in rows:
            failed = max(r['failed'] for r in rows[me])
            out.append(('storm %s: 0 failures' % label, '%d failed' % failed, failed == 0))
    memory = results.get('memory', {}).get(me)
    if memory:
        idle = memory['idle_kib'] / 1024
        out.append(('idle RSS <= 11.5 MiB', '%.1f MiB' % idle, idle <= 11.5))
        held = memory.get('open500')
        if held:
            per = (held['rss'] - memory['idle_kib']) / held['established']
            out.append(('< 2 KiB RSS per concurrent transfer', '%.1f KiB (%d open)' % (
                per, held['established']), per < 2.0))
        huge = memory.get('huge')
        if huge:
            growth = huge['peak_kib'] - huge['before_kib']
            out.append(('RSS flat while serving the %d MiB file' % (args.profile['huge'] // MIB),
                        '+%d KiB' % growth, huge['ok'] and growth < 1024))
    for label, row in results.get('generator', {}).get(me, {}).items():
        if row['with'] and row['without']:
            r, paired = generator_ratios(row)
            out.append(('%s download while a generator runs ~1.0x (0.9-1.1, both ratios)'
                        % label, '%.2f, paired %.2f' % (r, paired),
                        0.9 <= min(r, paired) and max(r, paired) <= 1.1))
    lines = ['| target (atftpd.py) | measured | met |', '|---|---|---|']
    for what, value, met in out:
        lines.append('| %s | %s | %s |' % (what, value, 'met' if met else '**not met**'))
    return '\n'.join(lines)


###############################################################################
# Setup, namespace, main #####################################################
###############################################################################

def progress(text):
    print(text, file=sys.stderr, flush=True)


def machine_info(args):
    cpu = 'unknown'
    for line in _read('/proc/cpuinfo').splitlines():
        if line.startswith('model name'):
            cpu = line.split(':', 1)[1].strip()
            break
    python = subprocess.run([args.python, '-c', 'import sys; print(sys.version.split()[0])'],
                            capture_output=True, text=True).stdout.strip()
    return {'nproc': os.cpu_count(), 'cpu': cpu, 'kernel': platform.release(),
            'python': '%s %s' % (args.python, python), 'harness_python': sys.version.split()[0],
            'mode': 'quick' if args.quick else 'full'}


def make_files(workdir, profile):
    """The served tree; returns ({name: sha256}, {name: bytes for small files})."""
    root = os.path.join(workdir, 'root')
    os.makedirs(os.path.join(root, 'gen'))     # gen/ stays empty: names there are generated
    content = {'pxe.bin': os.urandom(PXE_SIZE), 'loss.bin': os.urandom(profile['loss_size']),
               'lossr.bin': os.urandom(profile['random_loss_size']),
               'ttfb.txt': (b'generated or static, the same 1 KiB of text\n' * 24)[:1024]}
    digests = {}
    for name, data in content.items():
        with open(os.path.join(root, name), 'wb') as f:
            f.write(data)
    h = hashlib.sha256()
    with open(os.path.join(root, 'big.bin'), 'wb') as f:
        for _ in range(profile['big'] // MIB):
            chunk = os.urandom(MIB)
            h.update(chunk)
            f.write(chunk)
    digests['big.bin'] = h.hexdigest()
    with open(os.path.join(root, 'huge.bin'), 'wb') as f:
        f.truncate(profile['huge'])             # sparse
    for name in os.listdir(root):
        os.chmod(os.path.join(root, name), 0o755 if name == 'gen' else 0o644)
    generator = os.path.join(workdir, 'generator.sh')
    with open(generator, 'w') as f:
        f.write(GENERATOR_SH)
    os.chmod(generator, 0o755)
    return digests, content


def write_report(results, args):
    table = report(results, args) + '\n### Targets from the issue\n\n' + targets(results, args)
    print(table)
    with open(args.out + '.md', 'w') as f:
        f.write(table + '\n')
    progress('wrote %s.md (samples in %s.json)' % (args.out, args.out))


def rerender(args):
    """--report FILE.json: the markdown again, from a run's samples."""
    with open(args.report) as f:
        results = json.load(f)
    quick = results['machine']['mode'] == 'quick'
    args.profile = results.get('profile') or dict(QUICK if quick else FULL)
    args.servers = results.get('servers') or [
        n for n in ('atftpd.py', 'atftpd', 'in.tftpd', 'dnsmasq', 'candidate')
        if any(n in rows for rows in results.get('throughput', {}).values())]
    args.out = args.report[:-5] if args.report.endswith('.json') else args.report
    write_report(results, args)


def enter_netns(name):
    """setns(2) into /run/netns/NAME (os.setns is Python 3.12+)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open('/run/netns/' + name, os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:        # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), 'setns %s' % name)
    finally:
        os.close(fd)


def inner(args):
    """Runs inside the namespace: files, servers, measurements, report."""
    enter_netns(args.inner)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))   # the same for every server
    workdir = tempfile.mkdtemp(prefix='tftpbench.')
    args.shm = tempfile.mkdtemp(prefix='tftpbench.', dir='/dev/shm')
    try:
        os.chmod(workdir, 0o755)
        os.makedirs(os.path.join(workdir, 'log'))
        os.chmod(os.path.join(workdir, 'log'), 0o1777)
        results = {'date': datetime.datetime.now().strftime('%Y-%m-%d %H:%M'),
                   'profile': args.profile, 'servers': args.servers,
                   'cpu_source': 'cgroup v1 cpuacct.usage' if os.path.isdir(CPUACCT)
                   else '/proc/PID/stat',
                   'command': args.command, 'machine': machine_info(args)}
        progress('workdir %s; writing files' % workdir)
        results['files'], content = make_files(workdir, args.profile)
        results['content'] = content
        sections = set(args.sections)
        monitor = args.monitor = LoadMonitor(os.path.join(CPUACCT, args.inner) if os.path.isdir(
            os.path.join(CPUACCT, args.inner)) else None)
        results['measured_again'] = monitor.disturbed
        load = results['other_load'] = {}

        def section(name, function, *more):
            if name.split()[0] in sections:
                start = monitor.snapshot()
                function(*more)
                load[name] = monitor.since(start)
                progress('%s: other load %s' % (name, load[name]))

        with ServerSet(args, workdir, MAXTHREAD_ABOVE) as sset:
            probe_all(sset, results)
            section('memory', measure_memory, args, sset, workdir, results)
            section('throughput', measure_throughput, args, sset, workdir, results)
            section('storms (above)', measure_storms, args, sset, results, False)
            section('loss', measure_loss, args, sset, results)
            section('generator (ttfb)', measure_ttfb, args, sset, results)
            section('generator', measure_generator, args, sset, workdir, results)
        if 'storms' in sections:
            with ServerSet(args, workdir, MAXTHREAD_BELOW) as sset:
                section('storms (below)', measure_storms, args, sset, results, True)
        del results['content']
        with open(args.out + '.json', 'w') as f:
            json.dump(results, f, indent=1, default=str)
        write_report(results, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(args.shm, ignore_errors=True)


def outer(args, argv):
    """Make the namespace, run the measurements inside it, always clean up."""
    if os.geteuid() != 0:
        sys.exit('run.py: needs root (it makes a network namespace)')
    for path in (args.in_tftpd, ATFTPD_C, DNSMASQ, shutil.which('atftp') or 'atftp',
                 args.python):
        if not os.access(path, os.X_OK):
            sys.exit('run.py: %s is missing (see benchmarks/README.md, "Setup")' % path)
    ns = 'tftpbench%d' % os.getpid()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    created = False
    try:
        subprocess.run(['ip', 'netns', 'add', ns], check=True)
        created = True
        for cmd in (['ip', 'link', 'set', 'lo', 'up'],
                    # glibc's AI_ADDRCONFIG (used by in.tftpd -a) wants one IPv4
                    # address other than 127.0.0.1; a second loopback address.
                    ['ip', 'addr', 'add', '127.0.0.2/8', 'dev', 'lo']):
            subprocess.run(['ip', 'netns', 'exec', ns] + cmd, check=True)
        # The run's own cgroup (servers get groups below it): everything we
        # start is counted, so the rest of the machine's load can be told.
        harness = make_cgroup(ns) and make_cgroup(ns + '/harness')

        def join_cgroup():
            if harness:
                with open(os.path.join(harness, 'cgroup.procs'), 'w') as f:
                    f.write(str(os.getpid()))

        # Not `ip netns exec`: it mounts a fresh /sys, without the cgroups.
        status = subprocess.run([sys.executable, os.path.abspath(__file__), '--inner', ns] +
                                argv, preexec_fn=join_cgroup).returncode
        return status
    finally:
        if created:
            leftovers = subprocess.run(['ip', 'netns', 'pids', ns], capture_output=True,
                                       text=True).stdout.split()
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in leftovers:
                    try:
                        os.kill(int(pid), sig)
                    except OSError:
                        pass
                if leftovers:
                    time.sleep(0.5)
            subprocess.run(['ip', 'netns', 'del', ns])
            remove_cgroups(ns)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='reduced set, under ~2 minutes')
    parser.add_argument('--python', default='/usr/bin/python3',
                        help='interpreter for atftpd.py (default /usr/bin/python3)')
    parser.add_argument('--in-tftpd', default=IN_TFTPD_DEFAULT, help='tftp-hpa in.tftpd binary')
    parser.add_argument('--candidate', metavar='PATH',
                        help='also run this copy of atftpd.py (as "candidate")')
    parser.add_argument('--candidate-module', action='store_true',
                        help='start the candidate (default: atftpd.py) as `python3 -m atftpd` '
                             'from precompiled bytecode, as the OpenWrt init script does')
    parser.add_argument('--servers', default=None,
                        help='comma-separated subset of atftpd.py,atftpd,in.tftpd,dnsmasq,candidate')
    parser.add_argument('--sections', default='throughput,storms,loss,memory,generator')
    parser.add_argument('--reps', type=int, help='override throughput repetitions')
    parser.add_argument('--out', help='output prefix (default benchmarks/results[-quick])')
    parser.add_argument('--report', metavar='FILE.json',
                        help='only write FILE.md again from the samples of an earlier run')
    parser.add_argument('--inner', metavar='NETNS', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.candidate_module and not args.candidate:
        args.candidate = ATFTPD_PY
    args.profile = dict(QUICK if args.quick else FULL)
    if args.reps:
        args.profile['reps'] = args.reps
    default = ['atftpd.py', 'atftpd', 'in.tftpd', 'dnsmasq'] + (
        ['candidate'] if args.candidate else [])
    args.servers = args.servers.split(',') if args.servers else default
    args.sections = args.sections.split(',')
    args.out = args.out or os.path.join(HERE, 'results-quick' if args.quick else 'results')
    shown = list(argv)
    if '--inner' in shown:
        del shown[shown.index('--inner'):shown.index('--inner') + 2]
    args.command = ' '.join(['python3 benchmarks/run.py'] + shown)
    args.cgroup_prefix = args.inner
    return args


def main():
    argv = sys.argv[1:]
    args = parse_args(argv)
    if args.report:
        rerender(args)
        return 0
    if args.inner:
        inner(args)
        return 0
    return outer(args, argv)


if __name__ == '__main__':
    sys.exit(main())
