"""busybox-init/: S50atftpd run by Debian's `busybox sh` with busybox's own
start-stop-daemon (its applet links first in PATH), on a high port with a
temporary pidfile and settings file; and the inetd line, xinetd stanza and
inittab line, each run as shipped with only the port (and the paths of the
program and the served tree) changed. Needs root."""

import glob
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from conftest import PROJECT
from router_support import (Subreaper, busybox_tftp_get, free_udp_port, installed_copy,
                            kill_pids, need, need_program, need_root, pid_alive, pids_with,
                            run, shellcheck, udp_port_bound, wait_until,
                            world_readable_root)

BUSYBOX_INIT = os.path.join(PROJECT, 'busybox-init')
S50 = os.path.join(BUSYBOX_INIT, 'S50atftpd')
DEFAULTS = os.path.join(BUSYBOX_INIT, 'default.atftpd')
INETD_CONF = os.path.join(BUSYBOX_INIT, 'inetd.conf')
XINETD = os.path.join(BUSYBOX_INIT, 'xinetd.atftpd')
INITTAB = os.path.join(BUSYBOX_INIT, 'inittab.line')
SERVER = os.path.join(PROJECT, 'atftpd.py')
READY_TIMEOUT = 30


def shipped_lines(path):
    """The non-comment, non-blank lines of a shipped file."""
    with open(path) as f:
        return [line.rstrip('\n') for line in f if line.strip() and not line.startswith('#')]


# Lint and shape ##############################################################

def test_s50atftpd_is_shellcheck_clean():
    result = shellcheck(S50)
    assert result.returncode == 0, result.stdout + result.stderr


def test_default_file_is_shellcheck_clean():
    # Sourced by S50atftpd, which uses the variables (hence SC2034).
    result = shellcheck('-e', 'SC2034', DEFAULTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_s50atftpd_has_the_buildroot_shape():
    with open(S50) as f:
        text = f.read()
    assert text.startswith('#!/bin/sh\n')
    assert re.search(r'^DAEMON="atftpd"$', text, re.M)
    assert re.search(r'^PIDFILE="\$\{ATFTPD_PIDFILE:-/var/run/\$DAEMON\.pid\}"$', text, re.M)
    assert re.search(r'^\[ -r "\$DEFAULTS" \] && \. "\$DEFAULTS"$', text, re.M)
    for number, line in enumerate(text.splitlines(), 1):
        assert not re.match(r'^ +\S', line), 'line %d: indent with tabs' % number
    # Long options only, and never --exec to find the running script.
    calls = re.findall(r'start-stop-daemon([^\n]*(?:\\\n[^\n]*)*)', text)
    assert calls
    for call in calls:
        assert not re.search(r'\s-[a-zA-Z]\b', call), call
        if '--start' not in call:
            assert '--exec' not in call, call
    assert os.stat(S50).st_mode & 0o111


# S50atftpd under busybox #####################################################

class Box:
    """What one S50atftpd test needs: the environment, port, files."""

    def __init__(self, tmp_path):
        need_root()
        busybox = need_program('busybox', 'busybox')
        applets = run([busybox, '--list']).stdout.split()
        need('start-stop-daemon' in applets and 'tftp' in applets,
             'busybox has no start-stop-daemon or tftp applet')
        self.tmp = tmp_path
        bindir = tmp_path / 'bin'
        bindir.mkdir()
        for applet in applets:
            os.symlink(os.path.realpath(busybox), str(bindir / applet))
        self.bindir = str(bindir)
        self.port = free_udp_port()
        self.root = tmp_path / 'root'
        self.root.mkdir()
        self.files = {'hello.txt': b'hello from busybox init\n', 'big.bin': os.urandom(100000)}
        for name, data in self.files.items():
            (self.root / name).write_bytes(data)
        self.log = tmp_path / 'atftpd.log'
        self.pidfile = tmp_path / 'atftpd.pid'
        self.defaults = tmp_path / 'default.atftpd'
        with open(DEFAULTS) as f:
            shipped = f.read()
        args = '--port %d --bind-address 127.0.0.1 --user root.root --logfile %s %s' % (
            self.port, self.log, self.root)
        text, count = re.subn(r'^ATFTPD_ARGS=".*"$', 'ATFTPD_ARGS="%s"' % args, shipped,
                              flags=re.M)
        assert count == 1, 'default.atftpd: one ATFTPD_ARGS line expected'
        self.defaults.write_text(text)
        self.env = dict(os.environ, PATH=self.bindir + ':' + os.environ.get('PATH', ''),
                        ATFTPD_DEFAULTS=str(self.defaults), ATFTPD_PIDFILE=str(self.pidfile),
                        ATFTPD_PROG=SERVER)

    def script(self, action):
        return run(['busybox', 'sh', S50, action], env=self.env)

    def pid(self):
        return int(self.pidfile.read_text())

    def wait_serving(self):
        wait_until(lambda: udp_port_bound(self.port), READY_TIMEOUT,
                   'the server to bind port %d' % self.port)

    def fetch(self, name='hello.txt'):
        data = busybox_tftp_get(str(self.tmp / 'download'), name, self.port)
        assert data == self.files[name]

    def leftovers(self):
        return pids_with(str(self.root))


@pytest.fixture
def box(tmp_path):
    box = Box(tmp_path)
    with Subreaper() as reaper:
        box.reaper = reaper
        try:
            yield box
        finally:
            left = box.leftovers()
            kill_pids(left)
            for pid in left:
                reaper.watch(pid)
    assert not left, 'processes left behind: %s' % left


def test_applet_links_come_first_in_path(box):
    result = run(['busybox', 'sh', '-c', 'command -v start-stop-daemon'], env=box.env)
    assert result.stdout.strip() == os.path.join(box.bindir, 'start-stop-daemon')


def test_start_fetch_status_restart_reload_stop(box):
    result = box.script('start')
    assert (result.returncode, result.stdout) == (0, 'Starting atftpd: OK\n'), result.stderr
    first = box.pid()
    box.reaper.watch(first)
    box.wait_serving()
    with open('/proc/%d/cmdline' % first, 'rb') as f:
        argv = f.read().decode().split('\0')[:-1]
    # Started as a module from the program's directory, so that Python caches
    # its bytecode (see S50atftpd).
    assert argv == ['/usr/bin/python3', '-m', 'atftpd', '--daemon', '--no-fork',
                    '--port', str(box.port), '--bind-address', '127.0.0.1',
                    '--user', 'root.root', '--logfile', str(box.log), str(box.root)]
    with open('/proc/%d/environ' % first, 'rb') as f:
        environ = f.read().decode().split('\0')
    assert 'PYTHONPATH=%s' % os.path.dirname(SERVER) in environ
    box.fetch('hello.txt')

    result = box.script('status')
    assert (result.returncode, result.stdout) == (0, 'atftpd is running (pid %d)\n' % first)

    result = box.script('restart')
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == 'Stopping atftpd: OK\nStarting atftpd: OK\n'
    assert not pid_alive(first), 'stop returned before the old server was gone'
    second = box.pid()
    box.reaper.watch(second)
    assert second != first
    box.wait_serving()
    box.fetch('big.bin')

    # reload = SIGHUP: same process, log file reopened (moved away first).
    os.rename(str(box.log), str(box.log) + '.1')
    result = box.script('reload')
    assert (result.returncode, result.stdout) == (0, 'Reloading atftpd: OK\n'), result.stderr
    assert box.pid() == second and pid_alive(second)
    box.fetch('hello.txt')
    wait_until(lambda: box.log.exists() and 'sent hello.txt' in box.log.read_text(), 10,
               'the transfer line in the reopened log')

    result = box.script('stop')
    assert (result.returncode, result.stdout) == (0, 'Stopping atftpd: OK\n'), result.stderr
    assert not pid_alive(second), 'stop returned before the server was gone'
    assert not box.pidfile.exists()
    assert box.leftovers() == []

    result = box.script('status')
    assert (result.returncode, result.stdout) == (3, 'atftpd is not running\n')


def test_second_start_keeps_the_one_server(box):
    assert box.script('start').returncode == 0
    box.reaper.watch(box.pid())
    result = box.script('start')
    assert (result.returncode, result.stdout) == (0, 'Starting atftpd: already running\n')
    box.wait_serving()
    assert box.leftovers() == [box.pid()]
    assert box.script('stop').returncode == 0


def test_stop_and_reload_when_not_running_fail_quietly(box):
    for action, word in (('stop', 'Stopping'), ('reload', 'Reloading')):
        result = box.script(action)
        assert result.returncode == 1
        assert result.stdout == '%s atftpd: FAIL (not running)\n' % word
        assert result.stderr == ''


def test_stale_pidfile_is_not_a_running_server(box):
    finished = subprocess.Popen(['true'])
    finished.wait()
    box.pidfile.write_text('%d\n' % finished.pid)
    result = box.script('status')
    assert (result.returncode, result.stdout, result.stderr) == (3, 'atftpd is not running\n', '')
    assert box.script('start').returncode == 0
    box.reaper.watch(box.pid())
    box.wait_serving()
    box.fetch()
    assert box.script('stop').returncode == 0


def test_start_reports_a_server_that_exits_at_once(box):
    text = box.defaults.read_text().replace('ATFTPD_ARGS="', 'ATFTPD_ARGS="--no-such-option ')
    box.defaults.write_text(text)
    start = subprocess.Popen(['busybox', 'sh', S50, 'start'], env=box.env,
                             stdout=subprocess.PIPE, universal_newlines=True)
    # The server is our child here (subreaper): reap it as init would.
    wait_until(lambda: box.pidfile.exists() and box.pidfile.read_text().strip(), 10,
               'the pidfile')
    box.reaper.watch(box.pid())
    out, _ = start.communicate(timeout=30)
    assert (start.returncode, out) == (1, 'Starting atftpd: FAIL (exited at once; see its log)\n')
    assert not box.pidfile.exists()
    assert box.script('status').returncode == 3


def test_stop_gives_up_on_a_process_that_never_goes(box):
    # A zombie: signals reach it and change nothing, and it stays in /proc
    # until its parent (this test) reaps it.
    zombie = subprocess.Popen(['true'])
    try:
        wait_until(lambda: process_state(zombie.pid) == 'Z', 10, 'the child to be a zombie')
        box.pidfile.write_text('%d\n' % zombie.pid)
        result = box.script('stop')
        assert (result.returncode, result.stdout) == (
            1, 'Stopping atftpd: FAIL (pid %d still there after SIGKILL)\n' % zombie.pid)
    finally:
        zombie.wait()


def process_state(pid):
    with open('/proc/%d/stat' % pid) as f:
        return f.read().rsplit(')', 1)[1].split()[0]


def test_unknown_action_prints_usage(box):
    result = box.script('frobnicate')
    assert result.returncode == 1
    assert result.stdout.startswith('Usage: ')
    assert '{start|stop|restart|reload|status}' in result.stdout


# inetd, xinetd, inittab ######################################################

@pytest.fixture
def installed(tmp_path):
    """A world-readable place (the server drops to nobody) with the server
    installed as a router would have it and a served tree.
    {'dir', 'prog', 'python', 'root', 'files', 'port'}; every process whose command
    line names the place is killed at the end."""
    need_root()
    need_program('busybox', 'busybox')
    place = tempfile.mkdtemp(prefix='atftpd-inetd-', dir='/tmp')
    os.chmod(place, 0o755)
    # The interpreter must stay readable after the switch to nobody.
    python = '/usr/bin/python3' if os.access('/usr/bin/python3', os.X_OK) else sys.executable
    info = {'dir': place, 'prog': installed_copy(place, '#!' + python),
            'port': free_udp_port(), 'python': python}
    info['root'], info['files'] = world_readable_root(place)
    try:
        with Subreaper() as reaper:
            info['reaper'] = reaper
            yield info
            left = pids_with(place)
            assert not left, 'processes left behind: %s' % left
    finally:
        kill_pids(pids_with(place))
        shutil.rmtree(place, ignore_errors=True)


def module_launch(info, words):
    """A shipped `python3 -m atftpd` command with the test's paths: the
    interpreter, the directory on PYTHONPATH and the served tree."""
    assert 'PYTHONPATH=/usr/sbin' in words and '/usr/bin/python3' in words, words
    swap = {'PYTHONPATH=/usr/sbin': 'PYTHONPATH=' + info['dir'],
            '/usr/bin/python3': info['python'], '/srv/tftp': info['root']}
    return [swap.get(word, word) for word in words]


def boot_environment():
    """The environment init or a superserver would have: none of the test
    run's Python settings (PYTHONDONTWRITEBYTECODE would keep the cache out)."""
    return {name: value for name, value in os.environ.items()
            if not name.startswith('PYTHON')}


def server_pids(info):
    """The servers: `python3 -m atftpd ... ROOT` names no program path, so
    they are found by their served tree."""
    return pids_with(info['root'])


def assert_bytecode_cached(info):
    """Started as a module, the server left its bytecode beside atftpd.py."""
    cache = os.path.join(info['dir'], '__pycache__')
    assert [n for n in os.listdir(cache) if n.startswith('atftpd.')], os.listdir(cache)


def fetch_all(info):
    for name, data in info['files'].items():
        got = busybox_tftp_get(os.path.join(info['dir'], 'download'), name, info['port'])
        assert got == data, name


def assert_runs_as_nobody(pids):
    nobody = pwd.getpwnam('nobody').pw_uid
    for pid in pids:
        with open('/proc/%d/status' % pid) as f:
            uids = re.search(r'^Uid:\s+(.*)$', f.read(), re.M).group(1).split()
        assert set(map(int, uids)) == {nobody}, (pid, uids)


def stop_superserver(proc, info):
    """End the servers inetd started (inetd reaps them), then inetd."""
    servers = server_pids(info)
    kill_pids(servers, signal.SIGTERM)
    wait_until(lambda: not [pid for pid in servers if pid_alive(pid)], 20,
               'the inetd-started servers to exit')
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def test_inetd_line_under_openbsd_inetd(installed):
    inetd = need_program('inetd', 'openbsd-inetd')
    lines = shipped_lines(INETD_CONF)
    assert len(lines) == 1
    fields = lines[0].split(None, 6)
    assert fields[:6] == ['tftp', 'dgram', 'udp', 'wait', 'root', '/usr/bin/env']
    argv = fields[6].split()
    assert argv == ['env', 'PYTHONPATH=/usr/sbin', '/usr/bin/python3', '-m', 'atftpd',
                    '/srv/tftp']
    fields[0] = str(installed['port'])
    fields[6] = ' '.join(module_launch(installed, argv))
    conf = os.path.join(installed['dir'], 'inetd.conf')
    with open(conf, 'w') as f:
        f.write('\t'.join(fields) + '\n')
    # From /, as a daemon runs: -m looks in the working directory first.
    with open(os.path.join(installed['dir'], 'inetd.out'), 'w') as out:
        proc = subprocess.Popen([inetd, '-d', '-i', conf], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, cwd='/',
                                env=boot_environment())
    try:
        wait_until(lambda: udp_port_bound(installed['port']), READY_TIMEOUT, 'inetd to bind')
        fetch_all(installed)
        servers = server_pids(installed)
        assert len(servers) == 1, servers          # wait mode: one server for all
        assert_runs_as_nobody(servers)
        assert_bytecode_cached(installed)
    finally:
        stop_superserver(proc, installed)


def xinetd_binary(tmp_path):
    """Debian's xinetd conflicts with openbsd-inetd (both provide
    inet-superserver), so one machine cannot have both installed: when
    xinetd is not, its binary is taken from the package with apt-get
    download and dpkg-deb -x (it needs no library openbsd-inetd lacks)."""
    path = shutil.which('xinetd')
    if path:
        return path
    need(shutil.which('apt-get') and shutil.which('dpkg-deb'), 'no apt-get/dpkg-deb for xinetd')
    result = run(['apt-get', 'download', 'xinetd'], cwd=str(tmp_path), timeout=300)
    need(result.returncode == 0, 'xinetd not installed and apt-get download xinetd failed: '
         + result.stderr.strip())
    debs = glob.glob(str(tmp_path / 'xinetd_*.deb'))
    assert len(debs) == 1, debs
    unpacked = str(tmp_path / 'xinetd')
    assert run(['dpkg-deb', '-x', debs[0], unpacked]).returncode == 0
    path = os.path.join(unpacked, 'usr', 'sbin', 'xinetd')
    missing = [line for line in run(['ldd', path]).stdout.splitlines() if 'not found' in line]
    need(not missing, 'xinetd from its package lacks libraries: %s' % missing)
    return path


def test_xinetd_stanza_under_xinetd(installed, tmp_path):
    xinetd = xinetd_binary(tmp_path)
    with open(XINETD) as f:
        text = f.read()
    stanza = text[text.index('service tftp'):]
    replacements = [
        (r'^(\tport\t+= )69$', r'\g<1>%d' % installed['port']),
        (r'^(\tserver\t+= )/usr/bin/python3$', r'\g<1>' + installed['python']),
        (r'^(\tserver_args\t+= -m atftpd )/srv/tftp$', r'\g<1>' + installed['root']),
        (r'^(\tenv\t+= PYTHONPATH=)/usr/sbin$', r'\g<1>' + installed['dir']),
    ]
    for pattern, replacement in replacements:
        stanza, count = re.subn(pattern, replacement, stanza, flags=re.M)
        assert count == 1, pattern
    conf = os.path.join(installed['dir'], 'xinetd.conf')
    with open(conf, 'w') as f:
        f.write(stanza)
    log = os.path.join(installed['dir'], 'xinetd.log')
    open(log, 'w').close()
    with open(os.path.join(installed['dir'], 'xinetd.out'), 'w') as out:
        proc = subprocess.Popen([xinetd, '-dontfork', '-stayalive', '-filelog', log, '-f', conf],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                cwd='/', env=boot_environment())
    try:
        wait_until(lambda: udp_port_bound(installed['port']) or proc.poll() is not None,
                   READY_TIMEOUT, 'xinetd to bind')
        assert proc.poll() is None, open(log).read()
        fetch_all(installed)
        servers = server_pids(installed)
        assert len(servers) == 1, servers
        assert_runs_as_nobody(servers)
        assert_bytecode_cached(installed)
    finally:
        stop_superserver(proc, installed)
    assert 'ERROR' not in open(log).read()


def test_inittab_line_runs_the_server_in_the_foreground(installed):
    lines = shipped_lines(INITTAB)
    assert len(lines) == 1
    tty, runlevel, action, process = lines[0].split(':', 3)
    assert (tty, runlevel, action) == ('', '', 'respawn')
    argv = shlex.split(process)
    assert argv == ['/usr/bin/env', 'PYTHONPATH=/usr/sbin', '/usr/bin/python3', '-m', 'atftpd',
                    '--daemon', '--no-fork', '--port', '69', '/srv/tftp']
    argv = module_launch(installed, argv)
    argv[argv.index('69')] = str(installed['port'])
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd='/', env=boot_environment())
    try:
        wait_until(lambda: udp_port_bound(installed['port']) or proc.poll() is not None,
                   READY_TIMEOUT, 'the server to bind')
        assert proc.poll() is None, 'exited with %s' % proc.returncode
        fetch_all(installed)
        assert_runs_as_nobody(server_pids(installed))
        assert_bytecode_cached(installed)
    finally:
        proc.terminate()
        try:
            status = proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise
    assert status == 0
