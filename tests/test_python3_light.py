"""atftpd.py must run on OpenWrt's python3-light: Python 3.7 syntax, and none
of the modules listed in tests/python3-light-excluded.txt. Checked statically, then by running the real
server with those modules made unimportable, under this interpreter and
under Debian's /usr/bin/python3 -I when it is installed."""

import ast
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import SERVER, RawClient
from light_support import blocker_source, excluded_modules, write_launcher, write_sitecustomize
from process_support import argv_servers, user_args  # noqa: F401


DEBIAN_PYTHON = '/usr/bin/python3'


def server_source():
    with open(SERVER, 'rb') as f:
        return f.read()


def test_parses_as_python_3_7():
    ast.parse(server_source(), filename=SERVER, feature_version=(3, 7))


def imported_names(tree):
    """(line, top-level module) for every import anywhere in the file, lazy
    ones inside functions included, and __import__/import_module('x')."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split('.')[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                yield node.lineno, node.module.split('.')[0]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, 'id', None)
            first = node.args[0]
            if called in ('__import__', 'import_module') and isinstance(first, ast.Constant) \
                    and isinstance(first.value, str):
                yield node.lineno, first.value.split('.')[0]


def test_imports_no_module_missing_from_python3_light():
    excluded = set(excluded_modules())
    tree = ast.parse(server_source(), filename=SERVER)
    found = sorted(set((line, name) for line, name in imported_names(tree) if name in excluded))
    assert not found, 'atftpd.py imports modules python3-light lacks: %s' % ', '.join(
        '%s (line %d)' % (name, line) for line, name in found)


def test_excluded_list_names_the_usual_suspects():
    # Guard against an empty or truncated list making the checks vacuous.
    assert {'logging', 'email', 'urllib', 'asyncio', 'ssl', 'unittest'} <= set(excluded_modules())


def write_generator(tmp_path):
    path = tmp_path / 'generator'
    path.write_text(textwrap.dedent('''\
        #!/bin/sh
        printf 'generated for %s\\n' "$TFTP_REQUEST" >&3
        '''))
    path.chmod(0o755)
    return str(path)


def check_light_server(argv_servers, tmp_path, tftp_root, python_argv):
    launcher = write_launcher(tmp_path / 'python3_light.py')
    # The blocker itself works: the same finder, then 'import logging', fails.
    check = tmp_path / 'check.py'
    check.write_text(blocker_source() + 'import logging\n')
    result = subprocess.run(python_argv + [str(check)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True, timeout=30)
    assert result.returncode != 0 and 'python3-light' in result.stdout, result.stdout

    argv = python_argv + [launcher, SERVER, '--daemon', '--no-fork', '--port', '0', '--bind-address',
                          '127.0.0.1', '--logfile', '-', '--verbose=7', '--content-generator',
                          write_generator(tmp_path)] + user_args() + [str(tftp_root)]
    server = argv_servers(argv, root=tftp_root)
    with RawClient(server.host, server.port) as client:
        data, oack = client.download('random.bin', options=[('blksize', 1428), ('tsize', 0),
                                                            ('windowsize', 4)])
        assert data == (tftp_root / 'random.bin').read_bytes()
        assert oack == {'blksize': '1428', 'tsize': '300000', 'windowsize': '4'}
        data, _ = client.download('text.txt', mode='netascii')
        assert data == b'line one\r\nline two\r\0\r\nbare cr\r\0 end\r\n'
        data, _ = client.download('made/up.bin')
        assert data == b'generated for made/up.bin\n'
    server.proc.send_signal(signal.SIGUSR1)
    server.wait_for_log(r'stats: ')
    assert server.stop() == 0, server.log()
    assert 'python3-light' not in server.log(), server.log()
    assert 'internal error' not in server.log(), server.log()


def test_serves_with_excluded_modules_unimportable(argv_servers, tmp_path, tftp_root):
    check_light_server(argv_servers, tmp_path, tftp_root, [sys.executable])


def test_serves_under_debian_python_isolated(argv_servers, tmp_path, tftp_root):
    if not os.access(DEBIAN_PYTHON, os.X_OK):
        pytest.skip('%s is not installed' % DEBIAN_PYTHON)
    check_light_server(argv_servers, tmp_path, tftp_root, [DEBIAN_PYTHON, '-I'])


def test_script_restart_from_bytecode_under_python3_light(argv_servers, tmp_path, tftp_root):
    """`python3 atftpd.py` compiles itself and exec()s `python3 -c "import
    atftpd"` (README.md, "Memory"). The compile and the restart need
    importlib and py_compile: present in python3-light. The blocker comes as a
    sitecustomize on PYTHONPATH, so that the exec()ed interpreter has it too."""
    light = tmp_path / 'light'
    light.mkdir()
    write_sitecustomize(light)
    sbin = tmp_path / 'sbin'
    sbin.mkdir()
    program = sbin / 'atftpd.py'
    shutil.copy(SERVER, str(program))
    env = {k: v for k, v in os.environ.items() if not k.startswith('PYTHON')}
    env['PYTHONPATH'] = str(light)
    blocked = subprocess.run([sys.executable, '-c', 'import logging'], env=env,
                             stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
    assert blocked.returncode != 0 and 'python3-light' in blocked.stderr
    argv = [sys.executable, str(program), '--daemon', '--no-fork', '--port', '0',
            '--bind-address', '127.0.0.1', '--logfile', '-', '--content-generator',
            write_generator(tmp_path)] + user_args() + [str(tftp_root)]
    server = argv_servers(argv, root=tftp_root, env=env)
    with open('/proc/%d/cmdline' % server.proc.pid, 'rb') as f:
        assert f.read().split(b'\0')[1] == b'-c'
    with RawClient(server.host, server.port) as client:
        data, _ = client.download('random.bin', options=[('blksize', 1428)])
        assert data == (tftp_root / 'random.bin').read_bytes()
        assert client.download('made/up.bin')[0] == b'generated for made/up.bin\n'
    assert server.stop() == 0, server.log()
    assert 'python3-light' not in server.log(), server.log()
