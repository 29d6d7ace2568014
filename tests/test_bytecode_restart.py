"""`python3 atftpd.py` restarts itself from cached bytecode.

A script is compiled at every start and the compiler's memory stays in the
heap (18.6 against 12.1 MiB idle, benchmarks/README.md, I). So the script
writes __pycache__/atftpd.*.pyc beside itself, as an import would, and
exec()s `python3 -c "... import atftpd ..." PATH ARGS`: the same process.
These tests run a copy of atftpd.py in a directory of their own, with the
environment a router has (no PYTHONDONTWRITEBYTECODE, which the rest of the
suite may inherit), and look at what is running: /proc/PID/cmdline.
"""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from conftest import IS_ROOT, SERVER, RawClient, ServerProcess
from process_support import inetd_socket, public_root  # noqa: F401 (fixture)

BOOT_WORDS = ['-c', 'import os, sys; sys.path.insert(0, os.path.dirname(sys.argv.pop(1))); '
              'import atftpd; sys.exit(atftpd.main())']


def router_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith('PYTHON')}
    env.update(extra)
    return env


@pytest.fixture
def program(tmp_path):
    """A copy of atftpd.py alone in a directory, as on a router's /usr/sbin."""
    directory = tmp_path / 'sbin'
    directory.mkdir()
    path = directory / 'atftpd.py'
    shutil.copy(SERVER, str(path))
    return path


def serve_args(root):
    user = ['--user', 'root.root'] if IS_ROOT else []
    return ['--logfile', '-', '--daemon', '--no-fork', '--port', '0',
            '--bind-address', '127.0.0.1'] + user + [str(root)]


def cmdline(pid):
    with open('/proc/%d/cmdline' % pid, 'rb') as f:
        return f.read().decode().split('\0')[:-1]


def cache_of(path, optimization=None):
    kwargs = {} if optimization is None else {'optimization': optimization}
    return importlib.util.cache_from_source(str(path), **kwargs)


def start(program, root, flags=(), env=None, python=sys.executable):
    argv = [python] + list(flags) + [str(program)] + serve_args(root)
    return ServerProcess(root, argv=argv, env=env if env is not None else router_env())


def assert_serves(server, tftp_root):
    with RawClient(server.host, server.port) as client:
        data, _ = client.download('random.bin', options=[('blksize', 1428)])
    assert data == (tftp_root / 'random.bin').read_bytes()


def assert_runs_as_script(program, tftp_root, cache_written, **kwargs):
    """Started as start(program, ...) would be, it stays a script, serves, and
    writes the cache or not."""
    server = start(program, tftp_root, **kwargs)
    try:
        assert cmdline(server.pid)[:2] == [sys.executable, str(program)]
        assert os.path.exists(os.path.dirname(cache_of(program))) == cache_written
        assert_serves(server, tftp_root)
    finally:
        assert server.stop() == 0, server.log()


def test_script_start_runs_from_the_bytecode_it_caches(program, tftp_root):
    server = start(program, tftp_root)
    try:
        # The same PID: exec, not a child. The script's path stays visible.
        assert cmdline(server.pid) == ([sys.executable] + BOOT_WORDS + [str(program)]
                                       + serve_args(tftp_root))
        assert os.path.exists(cache_of(program))
        assert_serves(server, tftp_root)
    finally:
        assert server.stop() == 0, server.log()


def test_second_start_uses_the_cache_and_a_changed_file_is_compiled_again(program, tftp_root):
    first = start(program, tftp_root)
    assert first.stop() == 0
    cache = cache_of(program)
    written = os.stat(cache).st_mtime_ns
    again = start(program, tftp_root)
    assert again.stop() == 0
    assert os.stat(cache).st_mtime_ns == written
    # An edited (here: touched) atftpd.py makes the cache stale.
    os.utime(str(program), (1, 1))
    edited = start(program, tftp_root)
    try:
        assert cmdline(edited.pid)[1:3] == BOOT_WORDS
        assert_serves(edited, tftp_root)
    finally:
        assert edited.stop() == 0
    assert os.stat(cache).st_mtime_ns != written


def test_interpreter_flags_are_kept(program, tftp_root):
    server = start(program, tftp_root, flags=['-OO', '-X', 'utf8'])
    try:
        assert cmdline(server.pid)[1:5] == ['-OO', '-X', 'utf8', '-c']
        assert os.path.exists(cache_of(program, optimization=2))
        assert_serves(server, tftp_root)
    finally:
        assert server.stop() == 0


def test_no_restart_where_bytecode_is_not_to_be_written(program, tftp_root):
    assert_runs_as_script(program, tftp_root, False, env=router_env(PYTHONDONTWRITEBYTECODE='1'))


def test_a_current_cache_is_used_even_without_writing(program, tftp_root):
    start(program, tftp_root).stop()
    server = start(program, tftp_root, env=router_env(PYTHONDONTWRITEBYTECODE='1'))
    try:
        # PYTHONDONTWRITEBYTECODE shows as the flag it sets.
        assert cmdline(server.pid)[1:4] == ['-B'] + BOOT_WORDS
    finally:
        assert server.stop() == 0


def test_a_file_named_otherwise_runs_as_a_script(program, tftp_root):
    renamed = program.with_name('tftpd.py')
    program.rename(renamed)
    assert_runs_as_script(renamed, tftp_root, False)


def test_module_start_is_not_restarted(program, tftp_root):
    argv = [sys.executable, '-m', 'atftpd'] + serve_args(tftp_root)
    server = ServerProcess(tftp_root, argv=argv,
                           env=router_env(PYTHONPATH=str(program.parent)))
    try:
        assert cmdline(server.pid)[:3] == [sys.executable, '-m', 'atftpd']
    finally:
        assert server.stop() == 0


def test_a_directory_others_can_write_is_not_trusted(program, tftp_root):
    """In /tmp-like directories anyone could plant a .pyc that would run as root."""
    os.chmod(str(program.parent), 0o1777)
    assert_runs_as_script(program, tftp_root, False)


@pytest.mark.parametrize('planted', ['cache-owned-by-nobody', 'cache-dir-group-writable'])
def test_a_cache_others_could_have_written_is_not_used(program, tftp_root, planted):
    if not IS_ROOT:
        pytest.skip('needs root to give the cache away')
    start(program, tftp_root).stop()
    cache = cache_of(program)
    if planted == 'cache-owned-by-nobody':
        os.chown(cache, 65534, 65534)
    else:
        os.chmod(os.path.dirname(cache), 0o775)
    assert_runs_as_script(program, tftp_root, True)


def test_without_the_private_flags_helper_it_runs_as_a_script(program, tftp_root, tmp_path):
    """subprocess._args_from_interpreter_flags is private: if a Python lacks it,
    the server starts as a script rather than failing."""
    site = tmp_path / 'site'
    site.mkdir()
    (site / 'sitecustomize.py').write_text(
        'import subprocess\ndel subprocess._args_from_interpreter_flags\n')
    assert_runs_as_script(program, tftp_root, True, env=router_env(PYTHONPATH=str(site)))


def test_under_a_runner_it_runs_as_a_script(program, tftp_root, tmp_path):
    """runpy.run_path (and coverage, and the python3-light launcher of the
    tests) wrap the script: an exec would leave the wrapper behind."""
    runner = tmp_path / 'runner.py'
    runner.write_text('import runpy, sys\nsys.argv = sys.argv[1:]\n'
                      'runpy.run_path(sys.argv[0], run_name="__main__")\n')
    argv = [sys.executable, str(runner), str(program)] + serve_args(tftp_root)
    server = ServerProcess(tftp_root, argv=argv, env=router_env())
    try:
        assert cmdline(server.pid) == argv
        assert not os.path.exists(os.path.dirname(cache_of(program)))
        assert_serves(server, tftp_root)
    finally:
        assert server.stop() == 0


def test_unwritable_directory_runs_as_a_script(public_root):
    """As nobody, in a root-owned directory: the cache cannot be written."""
    if not IS_ROOT:
        pytest.skip('needs root to run the program as nobody')
    python = '/usr/bin/python3'     # the test's own Python may live under /root
    sbin = os.path.join(public_root, 'sbin')
    os.mkdir(sbin, 0o755)
    program = os.path.join(sbin, 'atftpd.py')
    shutil.copy(SERVER, program)
    os.chmod(program, 0o644)
    argv = [python, program, '--logfile', '-', '--daemon', '--no-fork', '--port', '0',
            '--bind-address', '127.0.0.1', public_root]
    server = ServerProcess(public_root, argv=['setpriv', '--reuid=nobody', '--regid=nogroup',
                                              '--clear-groups'] + argv, env=router_env())
    try:
        assert cmdline(server.pid) == argv
        assert not os.path.exists(os.path.dirname(cache_of(program)))
        with RawClient(server.host, server.port) as client:
            assert client.download('pub.txt')[0] == b'world readable\n'
    finally:
        assert server.stop() == 0


def test_inetd_socket_survives_the_restart(program, tftp_root):
    sock = inetd_socket()
    try:
        argv = [sys.executable, str(program), '--logfile', '-'] + (
            ['--user', 'root.root'] if IS_ROOT else []) + [str(tftp_root)]
        server = ServerProcess(tftp_root, argv=argv, env=router_env(), stdin=sock.fileno())
        assert server.addresses == [sock.getsockname()]
    finally:
        sock.close()
    try:
        assert cmdline(server.pid)[1:3] == BOOT_WORDS
        assert_serves(server, tftp_root)
    finally:
        assert server.stop() == 0


def test_bad_option_after_the_restart_is_one_line_and_status_2(program):
    result = subprocess.run([sys.executable, str(program), '--no-such-option'],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, env=router_env(), timeout=30)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0].startswith('usage: atftpd.py ')
    assert lines[-1] == 'atftpd.py: error: unrecognized arguments: --no-such-option'
    assert os.path.exists(cache_of(program))


def test_help_names_the_program_not_dash_c(program):
    result = subprocess.run([sys.executable, str(program), '--help'], stdout=subprocess.PIPE,
                            universal_newlines=True, env=router_env(), timeout=30)
    assert result.returncode == 0
    assert result.stdout.startswith('usage: atftpd.py [options] [directory]')
