"""atftpd.py in a foreign-architecture Debian root, run under qemu-user.

Shared by tests/test_emulation.py and benchmarks/emulation.py; no pytest here.

tests/emulation/build-rootfs.sh builds (or reuses) a Debian bookworm root for
mipsel or armel outside the clone, with python3 and its standard library, and
registers qemu-user with binfmt_misc (F flag), so that `chroot ROOT
/usr/bin/python3` runs the foreign python3 emulated, and so does every program
it starts (the generators' `#!/usr/bin/env python3` finds the root's python3).
The chroot shares the host's network namespace: the server binds 127.0.0.1
and the clients on the host reach it there.

install() copies the code under test into a fresh directory of the root's
/tmp, with a `sitecustomize.py` that makes every module of
tests/python3-light-excluded.txt unimportable. It is put on
PYTHONPATH, so it applies to the server and, through the environment the
server passes on, to the generators as well: all of them run as on OpenWrt's
python3-light.
"""

import os
import shutil
import subprocess
import tempfile

from light_support import EXCLUDED_LIST, excluded_modules, write_sitecustomize  # noqa: F401

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)
BUILD_SCRIPT = os.path.join(HERE, 'emulation', 'build-rootfs.sh')
GENERATORS = ('maclist', 'pxelinux')

# Debian architecture -> (qemu-user binary, the CPU it emulates, what
# platform.machine() and uname -m then say). mipsel: qemu's default, a MIPS32r2
# 24Kf *with* FPU; Debian's mipsel userland is hard-float, and on a 24Kc (the
# same core without FPU, as in many routers) its python3 dies of SIGILL.
# armel: an ARM926EJ-S (ARMv5TE, no VFP), a real router-class core; Debian's
# armel is soft-float ARMv5TE, so it runs there as it is (qemu's default CPU
# would be an ARMv7).
QEMU = {'mipsel': ('qemu-mipsel-static', '24Kf', 'mips'),
        'armel': ('qemu-arm-static', 'arm926', 'armv5tel')}
# The exit status of build-rootfs.sh for a missing prerequisite.
MISSING = 2
BUILD_TIMEOUT = 420

class Unavailable(Exception):
    """A prerequisite of the emulation tier is missing (not root, a package,
    binfmt_misc)."""


def build_rootfs(arch, timeout=BUILD_TIMEOUT):
    """The root's path, built when absent. Raises Unavailable for a missing
    prerequisite, AssertionError when the build fails."""
    if os.geteuid() != 0:
        raise Unavailable('the emulation tier needs root (chroot, debootstrap, binfmt_misc); '
                          'euid is %d' % os.geteuid())
    if not os.path.isfile(EXCLUDED_LIST):
        raise AssertionError('the list of modules missing from python3-light is not at %s'
                             % EXCLUDED_LIST)
    env = dict(os.environ)
    env['PATH'] = env.get('PATH', '/usr/bin:/bin') + ':/usr/sbin:/sbin'
    try:
        result = subprocess.run(['sh', BUILD_SCRIPT, arch], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True,
                                timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError('build-rootfs.sh %s did not finish within %d s:\n%s'
                             % (arch, timeout, exc.stderr))
    if result.returncode == MISSING:
        raise Unavailable(result.stderr.strip().splitlines()[-1] if result.stderr.strip()
                          else 'build-rootfs.sh %s: exit status 2' % arch)
    if result.returncode != 0:
        raise AssertionError('build-rootfs.sh %s failed (exit %d):\n%s'
                             % (arch, result.returncode, result.stderr[-6000:]))
    return result.stdout.strip().splitlines()[-1]


class Installed:
    """The code under test copied into ROOT/tmp/atftpd-test-XXXX.

    host(path) and inside(path) give a path below it as seen from the host
    and from inside the chroot."""

    def __init__(self, rootfs, arch):
        self.rootfs = rootfs
        self.arch = arch
        self.dir = tempfile.mkdtemp(prefix='atftpd-test-', dir=os.path.join(rootfs, 'tmp'))
        os.chmod(self.dir, 0o755)
        try:
            shutil.copy(os.path.join(PROJECT, 'atftpd.py'), self.dir)
            os.mkdir(self.host('generators'))
            for name in GENERATORS:
                shutil.copy(os.path.join(PROJECT, 'generators', name), self.host('generators'))
                os.chmod(self.host('generators', name), 0o755)
            os.mkdir(self.host('light'))
            write_sitecustomize(self.host('light'))
            os.mkdir(self.host('srv'))
        except BaseException:
            self.remove()
            raise

    def host(self, *parts):
        return os.path.join(self.dir, *parts)

    def inside(self, *parts):
        return '/' + os.path.relpath(os.path.join(self.dir, *parts), self.rootfs)

    def env(self, **extra):
        """The environment for a program in the root: python3-light on."""
        env = {'PATH': '/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin', 'LANG': 'C.UTF-8',
               'PYTHONPATH': self.inside('light'), 'PYTHONDONTWRITEBYTECODE': '1',
               'QEMU_CPU': QEMU[self.arch][1]}
        env.update(extra)
        return env

    def chroot_argv(self, *argv):
        return ['chroot', self.rootfs] + [str(arg) for arg in argv]

    def server_argv(self, *args, root=None):
        """atftpd.py in the foreground on 127.0.0.1, any free port, log on stdout."""
        return self.chroot_argv('/usr/bin/python3', self.inside('atftpd.py'), '--daemon',
                                '--no-fork', '--port', '0', '--bind-address', '127.0.0.1',
                                '--logfile', '-', '--user', 'root.root', *args,
                                root or self.inside('srv'))

    def run(self, argv, env=None, timeout=60):
        """Run argv (a list of words) in the root; CompletedProcess, text."""
        return subprocess.run(self.chroot_argv(*argv), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True,
                              env=env if env is not None else self.env(), timeout=timeout)

    def remove(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def rss_kib(pid):
    """VmRSS of a process in KiB (under qemu-user: the qemu process's RSS,
    the emulator and its translation cache included)."""
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    raise AssertionError('no VmRSS for process %d' % pid)
