"""A real, throw-away PostgreSQL server for the tests: Debian's postgresql
package, initdb and pg_ctl in a temporary directory, listening on a Unix
socket in that directory only (no TCP port).

initdb refuses to run as root, so as root the cluster belongs to the
`postgres` user (made by postgresql-common) or else `nobody`. Debian does
not put initdb and pg_ctl on PATH: they are looked for there first, then in
/usr/lib/postgresql/<newest version>/bin. Without them the tests skip, except
with CI=true, where they fail.
"""

import glob
import os
import pwd
import shutil
import subprocess
import tempfile

import pytest

SUPERUSER = 'pxe'
DATABASE = 'inventory'
COMMAND_TIMEOUT = 60


def find_program(name):
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob('/usr/lib/postgresql/*/bin/' + name),
                        key=lambda p: int(p.split('/')[4]) if p.split('/')[4].isdigit() else 0)
    return candidates[-1] if candidates else None


def require_postgresql():
    missing = [name for name in ('initdb', 'pg_ctl', 'psql') if not find_program(name)]
    if missing:
        reason = 'needs the Debian packages postgresql and postgresql-client (%s missing)' % (
            ', '.join(missing))
        if os.environ.get('CI') == 'true':
            pytest.fail(reason)
        pytest.skip(reason + ' (a failure when CI=true)')


class PostgreSQL:
    """One running cluster; `conninfo` is what PXE_SOURCE and psql -d take."""

    def __init__(self):
        require_postgresql()
        self.directory = tempfile.mkdtemp(prefix='atftpd-pg-')
        os.chmod(self.directory, 0o755)
        self.data = os.path.join(self.directory, 'data')
        self.log = os.path.join(self.directory, 'postgres.log')
        self.owner = None
        if os.geteuid() == 0:
            for name in ('postgres', 'nobody'):
                try:
                    self.owner = pwd.getpwnam(name)
                    break
                except KeyError:
                    continue
            os.chown(self.directory, self.owner.pw_uid, self.owner.pw_gid)
        self.conninfo = 'host=%s dbname=%s user=%s' % (self.directory, DATABASE, SUPERUSER)
        self.as_owner([find_program('initdb'), '-D', self.data, '-U', SUPERUSER, '-A', 'trust',
                       '-E', 'UTF8', '--locale=C', '--no-sync'])
        self.as_owner([find_program('pg_ctl'), '-D', self.data, '-l', self.log, '-w', '-t', '60',
                       '-o', "-k %s -c listen_addresses='' -F" % self.directory, 'start'])
        self.psql('CREATE DATABASE %s' % DATABASE, database='postgres')

    def as_owner(self, argv):
        def switch():
            if self.owner is not None:
                os.setgid(self.owner.pw_gid)
                os.setgroups([])
                os.setuid(self.owner.pw_uid)
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, preexec_fn=switch, cwd=self.directory,
                                timeout=COMMAND_TIMEOUT, universal_newlines=True)
        if result.returncode != 0:
            log = ''
            if os.path.exists(self.log):
                with open(self.log) as f:
                    log = f.read()
            raise AssertionError('%s failed:\n%s\n%s' % (argv, result.stdout, log))
        return result.stdout

    def psql(self, sql, database=DATABASE):
        """Run SQL (several statements allowed) as the superuser; return the output."""
        result = subprocess.run(
            [find_program('psql'), '-X', '-q', '-A', '-t', '-v', 'ON_ERROR_STOP=1',
             '-d', 'host=%s dbname=%s user=%s' % (self.directory, database, SUPERUSER)],
            input=sql, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            timeout=COMMAND_TIMEOUT, universal_newlines=True)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def stop(self):
        try:
            self.as_owner([find_program('pg_ctl'), '-D', self.data, '-m', 'immediate', '-w',
                           'stop'])
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope='session')
def postgresql():
    """A PostgreSQL server for the whole session (starting one takes seconds)."""
    server = PostgreSQL()
    try:
        yield server
    finally:
        server.stop()
