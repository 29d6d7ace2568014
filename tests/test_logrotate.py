"""Log rotation in the default setup, with the real logrotate and the
shipped snippet (logrotate/atftpd.py): a server started as root with
--logfile drops to nobody, and after `logrotate --force` (rename, `create`,
postrotate's SIGHUP) its next lines land in the new file."""

import os
import shutil
import subprocess
import tempfile

import pytest

from conftest import PROJECT, ServerProcess, RawClient
from process_support import (addresses_of, public_root, require_root,  # noqa: F401
                             wait_for_file_line)
from router_support import need_program

SNIPPET = os.path.join(PROJECT, 'logrotate', 'atftpd.py')


@pytest.fixture
def logdir():
    # Root-owned and 0755, as /var/log is: logrotate refuses to rotate in a
    # directory others may write, and nobody must reach the file in it.
    path = tempfile.mkdtemp(prefix='atftpd-logs-', dir='/tmp')
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def rotate(logdir, logfile, pidfile):
    with open(SNIPPET) as f:
        text = f.read()
    text = text.replace('/var/log/atftpd.py.log', logfile).replace('/run/atftpd.py.pid', pidfile)
    config = os.path.join(logdir, 'logrotate.conf')
    with open(config, 'w') as f:
        f.write(text)
    os.chmod(config, 0o644)
    state = os.path.join(logdir, 'state')
    return subprocess.run([need_program('logrotate', 'logrotate'), '--force', '--state', state,
                           config], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=30)


def test_lines_after_rotation_land_in_the_new_file(public_root, logdir):
    require_root()
    logfile = os.path.join(logdir, 'atftpd.py.log')
    pidfile = os.path.join(logdir, 'atftpd.py.pid')
    server = ServerProcess(public_root, ['--logfile', logfile, '--pidfile', pidfile],
                           user_args=[], wait_ready=False)
    try:
        line = wait_for_file_line(logfile, r'started, serving', timeout=20, proc=server.proc)
        host, port = addresses_of(line)[0]
        result = rotate(logdir, logfile, pidfile)
        assert result.returncode == 0, result.stdout
        assert os.path.exists(logfile + '.1'), os.listdir(logdir)
        wait_for_file_line(logfile, r'received SIGHUP, log reopened', proc=server.proc)
        with RawClient(host, port) as client:
            assert client.download('pub.txt')[0] == b'world readable\n'
        wait_for_file_line(logfile, r'sent pub\.txt to ', proc=server.proc)
        with open(logfile + '.1') as f:
            old = f.read()
        assert 'started, serving' in old and 'sent pub.txt' not in old
        assert 'cannot reopen' not in open(logfile).read()
    finally:
        server.stop()
