"""Uploads never leave a truncated file under the final name, and never
overwrite a file they were not allowed to (test_rfc1350.py has the basic
cases; these are the hostile ones):

  * the permission matrix: no flag, --allow-write, --allow-create, both,
    against new files, world-writable and private files, read-only files,
    directories, symlinks out of the root and missing directories;
  * real clients killed mid-upload, a server stopped (SIGTERM) or killed
    (SIGKILL) mid-upload, a file-size limit hit mid-upload (prlimit --fsize);
  * two uploads to the same name at once, and an upload whose every datagram
    is duplicated and reordered;
  * a download in progress while its file is replaced;
  * a name too long for the file system.
"""

import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import clients
import conftest
from conftest import IS_ROOT, ServerProcess
from process_support import strace_attached
from hostile_support import (OP_ACK, OP_DATA, OP_ERROR, OP_OACK, OP_WRQ, data, fd_targets,
                             part_files_under, request, tree_snapshot, wait_for_fd_baseline,
                             wait_until)
from wire_helpers import TftpError, client_for, lockstep_put

FLAG_SETS = {
    'no-flag': (),
    'allow-write': ('--allow-write',),
    'allow-create': ('--allow-create',),
    'both': ('--allow-write', '--allow-create'),
}


def upload_outcome(server, name, payload):
    """'ok' or 'error N' for a complete lock-step upload of `payload`."""
    with client_for(server, timeout=5) as c:
        try:
            lockstep_put(c, name, payload)
            return 'ok'
        except TftpError as exc:
            return 'error %d' % exc.code


def matrix_root(base):
    root = base / 'matrix'
    outside = base / 'outside'
    (root / 'sub').mkdir(parents=True)
    outside.mkdir()
    for name, mode in (('shared', 0o666), ('private', 0o644), ('readonly', 0o444)):
        path = root / name
        path.write_bytes(b'original %s\n' % name.encode())
        os.chmod(str(path), mode)
    (root / 'adir').mkdir()
    (outside / 'victim').write_bytes(b'outside the root\n')
    os.chmod(str(outside / 'victim'), 0o666)
    os.symlink(str(outside / 'victim'), str(root / 'link-out'))
    os.symlink(str(outside), str(root / 'dirlink-out'))
    return root, outside


def expected_outcome(flags, target):
    """What README.md promises, as root (conftest keeps root as root) or not."""
    write = '--allow-write' in flags or '--allow-create' in flags
    create = '--allow-create' in flags
    if not write:
        return 'refused'
    if target in ('new', 'sub/new'):
        return 'stored' if create else 'refused'
    if target == 'shared':
        return 'stored'
    if target == 'private':
        # As root only world-writable files may be replaced (tftp-hpa's rule).
        return 'refused' if IS_ROOT else 'stored'
    return 'refused'        # readonly, adir, link-out, dirlink-out/x, nodir/new


MATRIX_TARGETS = ['new', 'sub/new', 'shared', 'private', 'readonly', 'adir', 'link-out',
                  'dirlink-out/new', 'nodir/new']


@pytest.mark.parametrize('flags', list(FLAG_SETS), ids=list(FLAG_SETS))
def test_upload_permission_matrix_never_writes_what_it_may_not(flags, tmp_path):
    root, outside = matrix_root(tmp_path)
    server = ServerProcess(root, list(FLAG_SETS[flags]) + ['--retry-timeout', '1'])
    try:
        results = {}
        for target in MATRIX_TARGETS:
            before = tree_snapshot(root), tree_snapshot(outside)
            mode_before = (os.stat(str(root / target)).st_mode
                           if os.path.isfile(str(root / target)) else None)
            payload = b'new bytes for %s ' % target.encode() * 100
            outcome = upload_outcome(server, target, payload)
            after = tree_snapshot(root), tree_snapshot(outside)
            want = expected_outcome(FLAG_SETS[flags], target)
            results[target] = outcome
            if want == 'stored':
                assert outcome == 'ok', (target, outcome)
                assert (root / target).read_bytes() == payload, target
                if mode_before is not None:         # a replaced file keeps its mode
                    assert os.stat(str(root / target)).st_mode == mode_before
            else:
                assert outcome.startswith('error'), (target, outcome)
                assert after == before, 'refused upload of %s changed %s' % (
                    target, set(after[0].items()) ^ set(before[0].items()) or
                    set(after[1].items()) ^ set(before[1].items()))
            assert not part_files_under(root) and not part_files_under(outside)
        assert (outside / 'victim').read_bytes() == b'outside the root\n'
        assert server.alive() and 'internal error' not in server.log()
        print('\nflags %s: %s' % (flags, results))
    finally:
        assert server.stop() == 0


# -- interruptions -----------------------------------------------------------------------

def big_payload(size, seed):
    return random.Random(seed).randbytes(size)


def test_real_clients_killed_mid_upload_leave_old_file_or_nothing(start_server, tftp_root,
                                                                   tmp_path):
    """atftp and curl are killed (SIGKILL) while uploading: a new name never
    appears, a replaced file keeps its old bytes the whole time, and after
    the timeout the temporary files are gone."""
    for name in ('atftp', 'curl'):
        clients.require(name)
    (tftp_root / 'incoming').mkdir()
    shared = tftp_root / 'shared.bin'
    shared.write_bytes(b'the old shared file\n')
    os.chmod(str(shared), 0o666)
    source = tmp_path / 'big.src'
    source.write_bytes(big_payload(48 << 20, 1))
    # --no-timeout: curl asks for 'timeout 6', which would make the server wait
    # 6 x 6 s for the vanished client; --retry-timeout 1 bounds it to ~6 s.
    server = start_server('--allow-create', '--retry-timeout', '1', '--no-timeout',
                          '--verbose=6')
    baseline = fd_targets(server.pid)
    port = str(server.port)
    commands = {
        'incoming/new-atftp': ['atftp', '-p', '-l', str(source), '-r', 'incoming/new-atftp',
                               server.host, port],
        'shared.bin': ['curl', '--silent', '--upload-file', str(source),
                       'tftp://%s:%s/shared.bin' % (server.host, port)],
    }
    procs = {}
    try:
        for remote, argv in commands.items():
            procs[remote] = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL)
        # Wait until both temporary files hold data, checking the final names.
        for _ in range(400):
            parts = part_files_under(tftp_root)
            sizes = [os.path.getsize(p) for p in parts if os.path.exists(p)]
            assert not (tftp_root / 'incoming' / 'new-atftp').exists()
            assert shared.read_bytes() == b'the old shared file\n'
            if len(sizes) == 2 and min(sizes) > 1 << 20:
                break
            time.sleep(0.02)
        else:
            pytest.fail('the uploads did not get going: %s' % part_files_under(tftp_root))
        for proc in procs.values():
            proc.kill()
            proc.wait(10)
        assert not (tftp_root / 'incoming' / 'new-atftp').exists()
        assert shared.read_bytes() == b'the old shared file\n'
        wait_until(lambda: sum('failed receiving' in l for l in server.lines) >= 2, 15)
        leaked = wait_for_fd_baseline(server, baseline, 10)
        assert not leaked, leaked
        assert not part_files_under(tftp_root)
        assert not (tftp_root / 'incoming' / 'new-atftp').exists()
        assert shared.read_bytes() == b'the old shared file\n'
        assert sum('failed receiving' in l and ': timeout;' in l for l in server.lines) == 2
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


class SlowUpload:
    """A raw lock-step upload that stops after `blocks` blocks (and waits)."""

    def __init__(self, server, name, payload, blksize=512):
        self.client = client_for(server, timeout=5)
        self.name, self.payload, self.blksize = name, payload, blksize
        self.sent = 0

    def start(self, blocks):
        self.client.wrq(self.name)
        assert self.client.recv()[:2] == (OP_ACK, 0)
        self.more(blocks)

    def more(self, blocks):
        count = len(self.payload) // self.blksize + 1
        for _ in range(blocks):
            if self.sent == count:
                return True
            self.sent += 1
            b = self.sent
            self.client.data(b, self.payload[(b - 1) * self.blksize:b * self.blksize])
            opcode, number, _, _ = self.client.recv()
            assert (opcode, number) == (OP_ACK, b & 0xFFFF), (opcode, number, b)
        return self.sent == count

    def finish(self):
        for _ in range(10 ** 6):
            if self.more(1000):
                return

    def close(self):
        self.client.close()


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGKILL], ids=['SIGTERM', 'SIGKILL'])
def test_server_stopped_mid_upload_leaves_old_file_or_nothing(tftp_root, sig):
    (tftp_root / 'incoming').mkdir()
    shared = tftp_root / 'shared.bin'
    shared.write_bytes(b'old\n')
    os.chmod(str(shared), 0o666)
    server = ServerProcess(tftp_root, ['--allow-create', '--retry-timeout', '5'])
    uploads = [SlowUpload(server, 'incoming/new.bin', big_payload(100000, 2)),
               SlowUpload(server, 'shared.bin', big_payload(100000, 3))]
    try:
        for upload in uploads:
            upload.start(50)
        assert len(part_files_under(tftp_root)) == 2
        if sig == signal.SIGTERM:
            assert server.stop(sig) == 0
            for upload in uploads:       # each client is told (ERROR 0), not left hanging
                opcode, number, _, _ = upload.client.recv()
                assert (opcode, number) == (OP_ERROR, 0)
            assert not part_files_under(tftp_root)
        else:
            server.kill()
            # A killed process cannot clean up: its temporary files may stay,
            # but never under the final name.
        assert not (tftp_root / 'incoming' / 'new.bin').exists()
        assert shared.read_bytes() == b'old\n'
        print('\n%s mid-upload: final names untouched; .part files left: %s' % (
            signal.Signals(sig).name, [os.path.basename(p) for p in part_files_under(tftp_root)]))
    finally:
        for upload in uploads:
            upload.close()
        if server.alive():
            server.kill()


def test_upload_over_the_file_size_limit_is_refused_cleanly(tftp_root):
    """prlimit --fsize: the write fails mid-upload (EFBIG, like a full disk):
    ERROR 3 to the client, the old file or nothing under the final name, no
    temporary file, and the server goes on."""
    assert shutil.which('prlimit'), 'prlimit (util-linux) is needed'
    (tftp_root / 'incoming').mkdir()
    shared = tftp_root / 'shared.bin'
    shared.write_bytes(b'old\n')
    os.chmod(str(shared), 0o666)
    argv = ['prlimit', '--fsize=100000', sys.executable, conftest.SERVER, '--logfile', '-',
            '--daemon', '--no-fork', '--port', '0', '--bind-address', '127.0.0.1']
    argv += (['--user', 'root.root'] if IS_ROOT else []) + ['--allow-create', str(tftp_root)]
    server = ServerProcess(tftp_root, argv=argv)
    try:
        for name in ('incoming/new.bin', 'shared.bin'):
            with client_for(server) as c:
                with pytest.raises(TftpError) as info:
                    lockstep_put(c, name, big_payload(300000, 4))
                assert info.value.code == 3, info.value     # disk full or allocation exceeded
        assert not (tftp_root / 'incoming' / 'new.bin').exists()
        assert shared.read_bytes() == b'old\n'
        assert not part_files_under(tftp_root)
        with client_for(server) as c:                   # and uploads within the limit work
            lockstep_put(c, 'incoming/small.bin', b'x' * 5000)
        assert (tftp_root / 'incoming' / 'small.bin').read_bytes() == b'x' * 5000
        assert server.alive() and 'internal error' not in server.log()
    finally:
        assert server.stop() == 0


def test_failed_upload_temporary_file_is_gone_before_the_error_is_sent(tftp_root, tmp_path):
    """The order of the system calls: a client that acts on ERROR 3 at once
    (retries, or looks at the directory) never finds the .part file."""
    if not IS_ROOT:
        pytest.skip('strace -p needs root (or ptrace rights) on the server')
    (tftp_root / 'incoming').mkdir()
    argv = ['prlimit', '--fsize=100000', sys.executable, conftest.SERVER, '--logfile', '-',
            '--daemon', '--no-fork', '--port', '0', '--bind-address', '127.0.0.1',
            '--user', 'root.root', '--allow-create', str(tftp_root)]
    server = ServerProcess(tftp_root, argv=argv)
    trace = tmp_path / 'strace.txt'
    try:
        with strace_attached(server.pid, 'unlink,unlinkat,sendto', trace):
            with client_for(server) as c:
                with pytest.raises(TftpError) as info:
                    lockstep_put(c, 'incoming/new.bin', big_payload(300000, 5))
            assert info.value.code == 3, info.value
    finally:
        assert server.stop() == 0
    lines = trace.read_text().splitlines()
    unlinked = [i for i, line in enumerate(lines) if 'unlink' in line and '.part' in line]
    errors = [i for i, line in enumerate(lines) if 'sendto(' in line and '"\\0\\5' in line]
    assert unlinked and errors, lines
    assert unlinked[0] < errors[0], lines


# -- duplicates --------------------------------------------------------------------------

def test_two_uploads_to_one_name_last_complete_one_wins_never_a_mix(start_server, tftp_root):
    (tftp_root / 'incoming').mkdir()
    server = start_server('--allow-create', '--retry-timeout', '2')
    target = tftp_root / 'incoming' / 'same.bin'
    first, second = big_payload(60000, 5), big_payload(70000, 6)
    a = SlowUpload(server, 'incoming/same.bin', first)
    b = SlowUpload(server, 'incoming/same.bin', second)
    c = SlowUpload(server, 'incoming/same.bin', big_payload(80000, 7))
    try:
        a.start(10)
        b.start(10)
        c.start(10)
        for _ in range(20):                             # interleaved, block by block
            a.more(5)
            b.more(5)
            c.more(5)
            assert not target.exists() or target.read_bytes() in (first, second)
        a.finish()
        assert target.read_bytes() == first
        b.finish()
        assert target.read_bytes() == second
        c.client.error(0, 'changed my mind')            # the third one aborts
        time.sleep(0.2)
        assert target.read_bytes() == second
        assert not part_files_under(tftp_root)
    finally:
        for upload in (a, b, c):
            upload.close()


def test_upload_with_every_datagram_duplicated_and_reordered_stores_exact_bytes(
        start_server, tftp_root):
    """A network that duplicates and reorders everything, in a windowed
    upload: WRQ twice, each window sent twice with neighbours swapped. The
    file is exact, and the server saw one upload."""
    (tftp_root / 'incoming').mkdir()
    server = start_server('--allow-create', '--retry-timeout', '2', '--verbose=6')
    payload = big_payload(50000, 8)
    blksize, windowsize = 1024, 4
    count = len(payload) // blksize + 1
    rng = random.Random(8)
    with client_for(server) as c:
        wrq = request(OP_WRQ, b'incoming/dup.bin', b'octet',
                      [(b'blksize', b'1024'), (b'windowsize', b'4')])
        c.send(wrq)
        c.send(wrq)
        opcode, _, _, _ = c.recv()
        assert opcode == OP_OACK
        acked = 0
        for _ in range(count * 4):
            if acked == count:
                break
            window = [data(n, payload[(n - 1) * blksize:n * blksize])
                      for n in range(acked + 1, min(acked + windowsize, count) + 1)]
            burst = window + window
            for i in range(0, len(burst) - 1, 2):
                if rng.random() < 0.5:
                    burst[i], burst[i + 1] = burst[i + 1], burst[i]
            for datagram in burst:
                c.send(datagram)
            # Take every ACK this burst caused; go on from the highest.
            for _ in range(len(burst)):
                ready, _, _ = select.select([c.sock], [], [], 0.3)
                if not ready:
                    break
                opcode, number, _, _ = c.recv()
                if opcode == OP_ACK:
                    acked = max(acked, number)
        assert acked == count
    target = tftp_root / 'incoming' / 'dup.bin'
    wait_until(lambda: target.exists(), 5)
    assert target.read_bytes() == payload
    server.wait_for_log(r'received incoming/dup\.bin')
    assert sum('receiving incoming/dup.bin' in l for l in server.lines) == 1
    assert not part_files_under(tftp_root)


# -- replacing a file while it is downloaded ---------------------------------------------

def test_download_in_progress_keeps_the_old_bytes_while_the_file_is_replaced(
        start_server, tftp_root):
    shared = tftp_root / 'shared.bin'
    old, new = big_payload(200000, 9), big_payload(150000, 10)
    shared.write_bytes(old)
    os.chmod(str(shared), 0o666)
    server = start_server('--allow-write', '--retry-timeout', '2')
    with client_for(server) as reader:
        reader.rrq('shared.bin')
        chunks = []
        for block in range(1, 100):
            opcode, number, payload, _ = reader.recv()
            assert (opcode, number) == (OP_DATA, block)
            chunks.append(payload)
            reader.ack(block)
        with client_for(server) as writer:
            lockstep_put(writer, 'shared.bin', new)
        assert shared.read_bytes() == new
        for block in range(100, 10 ** 4):
            opcode, number, payload, _ = reader.recv()
            assert (opcode, number) == (OP_DATA, block & 0xFFFF)
            chunks.append(payload)
            reader.ack(block)
            if len(payload) < 512:
                break
    assert b''.join(chunks) == old                      # one consistent file, the old one
    with client_for(server) as c:
        assert c.download('shared.bin')[0] == new


# -- names the file system refuses --------------------------------------------------------

def test_upload_name_too_long_for_the_file_system_gets_an_error(start_server, tftp_root):
    """A component over NAME_MAX (255 bytes) makes os.stat() raise
    ENAMETOOLONG: that must become an ERROR to the client, like any other
    refusal, not an internal error with no answer at all."""
    (tftp_root / 'incoming').mkdir()
    server = start_server('--allow-create')
    for name in ('incoming/' + 'x' * 300, 'y' * 300):
        with client_for(server, timeout=3) as c:
            c.wrq(name)
            try:
                reply = c.recv()
            except AssertionError:
                reply = None
        assert reply is not None and reply[0] == OP_ERROR, (
            'no ERROR for a %d-byte name: %r\n%s' % (len(name), reply, '\n'.join(
                l for l in server.lines if 'internal error' in l)[:600]))
    assert 'internal error' not in server.log()
    assert not part_files_under(tftp_root)


# -- a client that loses its place: the size it announced is the only witness -------------

class DuplicatingRelay(threading.Thread):
    """A one-transfer UDP relay between a real client and the server that
    delivers the server's first OACK twice, as a network that duplicates
    (or a server that resends it after losing DATA 1) would. Loopback only;
    bounded in time."""

    def __init__(self, server, seconds=20):
        threading.Thread.__init__(self, daemon=True)
        self.server = (server.host, server.port)
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)   # the client's view
        self.front.bind(('127.0.0.1', 0))
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)    # the server's view
        self.back.bind(('127.0.0.1', 0))
        self.port = self.front.getsockname()[1]
        self.deadline = time.monotonic() + seconds
        self.oacks_duplicated = 0

    def run(self):
        client = tid = None
        try:
            while time.monotonic() < self.deadline:
                ready, _, _ = select.select([self.front, self.back], [], [], 0.2)
                for sock in ready:
                    datagram, addr = sock.recvfrom(70000)
                    if sock is self.front:
                        client = addr
                        self.back.sendto(datagram, tid or self.server)
                    elif client is not None:
                        tid = tid or addr
                        self.front.sendto(datagram, client)
                        if datagram[:2] == b'\x00\x06' and not self.oacks_duplicated:
                            self.oacks_duplicated += 1
                            time.sleep(0.05)                # after the client's DATA 1
                            self.front.sendto(datagram, client)
        except OSError:
            pass
        finally:
            self.front.close()
            self.back.close()


def test_upload_of_a_client_that_skips_a_block_is_not_stored_as_complete(start_server,
                                                                          tftp_root):
    """curl (7.88) treats every OACK as 'send the next block': when the OACK
    of its upload arrives twice, it sends its second block as DATA 1 and is
    one block ahead from then on. The server then receives one block less
    than curl announced in 'tsize'. It must not store that under the final
    name and report success: the announced size is the only witness."""
    clients.require('curl')
    (tftp_root / 'incoming').mkdir()
    server = start_server('--allow-create', '--retry-timeout', '1', '--verbose=6')
    source = tftp_root.parent / 'upload.src'
    payload = big_payload(20 * 1428 + 100, 11)
    source.write_bytes(payload)
    relay = DuplicatingRelay(server)
    relay.start()
    cp = subprocess.run(['curl', '--silent', '--show-error', '--tftp-blksize', '1428',
                         '--max-time', '30', '--upload-file', str(source),
                         'tftp://127.0.0.1:%d/incoming/skipped.bin' % relay.port],
                        capture_output=True, text=True, timeout=60)
    relay.deadline = 0
    relay.join(5)
    target = tftp_root / 'incoming' / 'skipped.bin'
    stored = target.read_bytes() if target.exists() else None
    received = [l for l in server.lines if 'incoming/skipped.bin' in l]
    print('\nduplicated OACK to curl: curl rc %d; server stored %s of %d bytes; %s' % (
        cp.returncode, None if stored is None else len(stored), len(payload),
        received[-1].split(': ', 1)[-1] if received else ''))
    assert relay.oacks_duplicated == 1
    if stored is not None:
        assert stored == payload, (
            'stored %d bytes under the final name, %d announced in tsize (curl rc %d): '
            'silently wrong' % (len(stored), len(payload), cp.returncode))
    if cp.returncode == 0:
        assert stored == payload


def test_upload_to_a_file_system_out_of_inodes_gets_disk_full(start_server, tftp_root):
    """A full inode table is a full disk (ERROR 3), not a refusal (ERROR 2):
    the operator must look at the disk, not the permissions."""
    if not IS_ROOT:
        pytest.skip('mounting a tiny tmpfs needs root')
    full = tftp_root / 'full'
    full.mkdir()
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m,nr_inodes=2', 'tmpfs', str(full)],
                   check=True, timeout=30)
    try:
        for index in range(10):                 # use up the inodes, however many are left
            try:
                (full / ('taken%d' % index)).write_bytes(b'')
            except OSError:
                break
        server = start_server('--allow-create')
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.settimeout(10)
            sock.sendto(request(OP_WRQ, b'full/new.bin'), (server.host, server.port))
            reply = sock.recv(600)
        assert reply[:4] == b'\x00\x05\x00\x03', reply          # ERROR 3
        server.wait_for_log(r'cannot create temporary file: .*No space left on device')
    finally:
        subprocess.run(['umount', str(full)], timeout=30)
