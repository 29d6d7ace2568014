"""RFC 1350 on the wire: reads and writes, octet and netascii, errors, TIDs,
retransmission, block number rollover, and where files may come from or go."""

import os
import struct

import pytest

from wire_helpers import (OP_ACK, OP_DATA, OP_ERROR, client_for, error_of, expect_error,
                          lockstep_get, lockstep_put, netascii, part_files, start_upload)

TEXT = b'line one\nline two\r\nbare cr\r end\n'
TEXT_NETASCII = b'line one\r\nline two\r\0\r\nbare cr\r\0 end\r\n'


# -- RRQ, octet (RFC 1350 section 2, 6) ---------------------------------------

@pytest.mark.parametrize('name', ['small.txt', 'empty', 'exact512', 'exact1024', 'random.bin',
                                  'sub/inner.txt'])
def test_rrq_octet_byte_for_byte_rfc1350_s6(server, tftp_root, name):
    expected = (tftp_root / name).read_bytes()
    with client_for(server) as c:
        data, sizes, numbers, oack = lockstep_get(c, name)
    assert oack is None                         # no options asked, no OACK
    assert data == expected
    assert numbers == list(range(1, len(expected) // 512 + 2))
    assert all(size == 512 for size in sizes[:-1]) and sizes[-1] < 512


@pytest.mark.parametrize('name', ['exact512', 'exact1024', 'empty'])
def test_rrq_512_multiple_ends_with_empty_data_block_rfc1350_s6(server, tftp_root, name):
    size = (tftp_root / name).stat().st_size
    with client_for(server) as c:
        data, sizes, _numbers, _ = lockstep_get(c, name)
    assert sizes == [512] * (size // 512) + [0]
    assert data == (tftp_root / name).read_bytes()


def test_rrq_is_served_by_a_new_tid_rfc1350_s4(server):
    with client_for(server) as c:
        c.rrq('small.txt')
        opcode, number, payload, addr = c.recv()
        assert (opcode, number, payload) == (OP_DATA, 1, b'hello, tftp\n')
        assert addr[1] != server.port
        c.ack(1)


# -- netascii (RFC 1350 appendix, RFC 764) -------------------------------------

def test_rrq_netascii_converts_lf_and_cr_rfc1350_netascii(server, tftp_root):
    assert (tftp_root / 'text.txt').read_bytes() == TEXT
    with client_for(server) as c:
        data, _, _, _ = lockstep_get(c, 'text.txt', mode='netascii')
    assert data == TEXT_NETASCII
    assert netascii(TEXT) == TEXT_NETASCII


def test_rrq_netascii_mode_name_is_case_insensitive_rfc1350_s5(server):
    with client_for(server) as c:
        data, _, _, _ = lockstep_get(c, 'text.txt', mode='NetASCII')
    assert data == TEXT_NETASCII


def test_rrq_netascii_tsize_is_converted_size_rfc2349_rfc1350(server):
    with client_for(server) as c:
        data, _, _, oack = lockstep_get(c, 'text.txt', mode='netascii', options=[('tsize', '0')])
    assert oack == {'tsize': str(len(TEXT_NETASCII))}
    assert data == TEXT_NETASCII


def test_rrq_netascii_spanning_blocks_rfc1350_netascii(server, tftp_root):
    # 511 bytes and a LF: its CR LF straddles blocks 1 and 2.
    local = b'x' * 511 + b'\n' + b'y' * 510 + b'\r' + b'tail\r\nend\n' + bytes(range(256))
    (tftp_root / 'span.txt').write_bytes(local)
    with client_for(server) as c:
        data, sizes, _, _ = lockstep_get(c, 'span.txt', mode='netascii')
    assert data == netascii(local)
    assert data[511:513] == b'\r\n'


# -- errors and where files come from (RFC 1350 section 5, 7) ------------------

def test_rrq_missing_file_gets_error_1_rfc1350_s7(server):
    with client_for(server) as c:
        c.rrq('no-such-file')
        code, message = expect_error(c)
    assert code == 1
    assert message


@pytest.mark.parametrize('name', ['../secret', 'sub/../../secret', '..', '../root/small.txt',
                                  '..\\secret', 'sub\\..\\..\\secret'])
def test_rrq_dotdot_traversal_gets_error_2_rfc1350_s7(server, tftp_root, name):
    (tftp_root.parent / 'secret').write_bytes(b'outside\n')
    with client_for(server) as c:
        c.rrq(name)
        code, _ = expect_error(c)
    assert code == 2


def test_rrq_root_prefixed_dotdot_gets_error_2_rfc1350_s7(server, tftp_root):
    (tftp_root.parent / 'secret').write_bytes(b'outside\n')
    with client_for(server) as c:
        c.rrq(str(tftp_root) + '/../secret')
        code, _ = expect_error(c)
    assert code == 2


def test_rrq_absolute_path_outside_root_is_not_served_rfc1350_s7(server, tftp_root):
    # Documented policy (resolve_path): a leading '/' is dropped unless the
    # name starts with the root, so an outside absolute path names a file
    # under the root. Here that file does not exist: ERROR 1, never the
    # outside file's bytes.
    secret = tftp_root.parent / 'secret'
    secret.write_bytes(b'outside\n')
    for name in (str(secret), '/etc/passwd', '//etc/passwd'):
        with client_for(server) as c:
            c.rrq(name)
            code, _ = expect_error(c)
        assert code == 1, name


def test_rrq_sibling_directory_sharing_root_prefix_is_not_served_rfc1350_s7(server, tftp_root):
    sibling = tftp_root.parent / (tftp_root.name + '2')
    sibling.mkdir()
    (sibling / 'small.txt').write_bytes(b'not from the root\n')
    with client_for(server) as c:
        c.rrq(str(sibling / 'small.txt'))
        opcode, number, payload, _ = c.recv()
    assert opcode == OP_ERROR and number in (1, 2)


def test_rrq_symlink_out_of_root_gets_error_2_rfc1350_s7(server, tftp_root):
    secret = tftp_root.parent / 'secret'
    secret.write_bytes(b'outside\n')
    os.symlink(str(secret), str(tftp_root / 'link'))
    os.symlink('..', str(tftp_root / 'up'))
    for name in ('link', 'up/secret'):
        with client_for(server) as c:
            c.rrq(name)
            code, _ = expect_error(c)
        assert code == 2, name


def test_rrq_symlink_inside_root_is_followed_rfc1350_s7(server, tftp_root):
    os.symlink('sub/inner.txt', str(tftp_root / 'inlink'))
    with client_for(server) as c:
        data, _, _, _ = lockstep_get(c, 'inlink')
    assert data == b'inner file\n'


@pytest.mark.parametrize('form', ['/{name}', '{root}/{name}', '{root}//{name}', './{name}'])
def test_rrq_leading_slash_and_root_prefix_are_served_rfc1350_s7(server, tftp_root, form):
    name = form.format(root=str(tftp_root), name='sub/inner.txt')
    with client_for(server) as c:
        data, _, _, _ = lockstep_get(c, name)
    assert data == b'inner file\n'


@pytest.mark.parametrize('name', ['sub\\inner.txt', '\\sub\\inner.txt', 'sub/\\inner.txt'])
def test_rrq_backslash_is_a_separator_rfc1350_s7(server, name):
    with client_for(server) as c:
        data, _, _, _ = lockstep_get(c, name)
    assert data == b'inner file\n'


@pytest.mark.parametrize('name', ['sub', 'sub/', '/', '.'])
def test_rrq_directory_gets_error_2_rfc1350_s7(server, name):
    with client_for(server) as c:
        c.rrq(name)
        code, _ = expect_error(c)
    assert code == 2


# -- TIDs (RFC 1350 section 4) -------------------------------------------------

def test_packet_from_wrong_port_gets_error_5_and_transfer_completes_rfc1350_s4(start_server,
                                                                             tftp_root):
    server = start_server('--retry-timeout', '2')
    expected = (tftp_root / 'random.bin').read_bytes()
    with client_for(server) as c, client_for(server) as stranger:
        c.rrq('random.bin')
        opcode, number, payload, tid = c.recv()
        assert (opcode, number) == (OP_DATA, 1)
        stranger.send(struct.pack('!HH', OP_ACK, 1), tid)
        code, _ = expect_error(stranger)
        assert code == 5
        assert stranger.peer == tid             # the ERROR comes from the transfer's TID
        # The stranger's ACK changed nothing: block 2 is not sent on it.
        assert c.nothing_for(0.5)
        chunks = [payload]
        c.ack(1)
        for block in range(2, len(expected) // 512 + 2):
            opcode, number, payload, addr = c.recv()
            assert (opcode, number, addr) == (OP_DATA, block, tid)
            chunks.append(payload)
            if block == 3:
                stranger.send(struct.pack('!HH', OP_ACK, 3), tid)
                assert expect_error(stranger)[0] == 5
            c.ack(block)
    assert b''.join(chunks) == expected


# -- retransmission (RFC 1350 section 2, RFC 1123 4.2.3.1) ---------------------

def test_duplicate_ack_does_not_cause_resend_rfc1123_4_2_3_1(start_server, tftp_root):
    server = start_server('--retry-timeout', '2')
    expected = (tftp_root / 'random.bin').read_bytes()
    with client_for(server) as c:
        c.rrq('random.bin')
        opcode, number, first, _ = c.recv()
        assert (opcode, number) == (OP_DATA, 1)
        c.ack(1)
        opcode, number, second, _ = c.recv()
        assert (opcode, number) == (OP_DATA, 2)
        c.ack(1)                                # duplicate: Sorcerer's Apprentice bait
        assert c.nothing_for(0.5)
        chunks = [first, second]
        c.ack(2)
        for block in range(3, len(expected) // 512 + 2):
            opcode, number, payload, _ = c.recv()
            assert (opcode, number) == (OP_DATA, block)
            chunks.append(payload)
            c.ack(block)
    assert b''.join(chunks) == expected


def test_no_ack_makes_server_resend_same_block_rfc1350_s2(start_server, tftp_root):
    server = start_server('--retry-timeout', '1')
    expected = (tftp_root / 'exact1024').read_bytes()
    with client_for(server, timeout=5) as c:
        c.rrq('exact1024')
        assert c.recv()[:3] == (OP_DATA, 1, expected[:512])
        c.ack(1)
        assert c.recv()[:3] == (OP_DATA, 2, expected[512:])
        # No ACK: the same block comes again, same bytes.
        assert c.recv()[:3] == (OP_DATA, 2, expected[512:])
        c.ack(2)
        assert c.recv()[:3] == (OP_DATA, 3, b'')
        c.ack(3)


def test_block_number_rollover_past_65535_rfc1350_s6(start_server, tmp_path):
    root = tmp_path / 'big'
    root.mkdir()
    count = 65536 + 1
    path = root / 'rollover.bin'
    with open(path, 'wb') as f:
        for block in range(1, count):
            f.write(struct.pack('!I', block) * 128)
        f.write(b'\xa5' * 100)
    expected = path.read_bytes()
    assert len(expected) == 65536 * 512 + 100
    server = start_server(root=root)
    with client_for(server) as c:
        data, sizes, numbers, _ = lockstep_get(c, 'rollover.bin')
    assert len(numbers) == 65537
    assert numbers[65533:] == [65534, 65535, 0, 1]
    assert sizes[-1] == 100
    assert data == expected


# -- WRQ (RFC 1350 section 2, 7) ----------------------------------------------

def test_wrq_refused_without_allow_write_or_create_error_2_rfc1350_s7(server, tftp_root):
    for name in ('new.bin', 'small.txt'):
        with client_for(server) as c:
            code, _ = error_of(start_upload(c, name))
        assert code == 2
    assert not (tftp_root / 'new.bin').exists()
    assert (tftp_root / 'small.txt').read_bytes() == b'hello, tftp\n'
    assert part_files(tftp_root) == []


@pytest.mark.parametrize('size', [0, 1, 100, 511, 512, 513, 1024, 5000, 65536])
def test_wrq_allow_create_stores_exact_bytes_rfc1350_s2(start_server, tftp_root, size):
    server = start_server('--allow-create')
    payload = os.urandom(size)
    with client_for(server) as c:
        assert lockstep_put(c, 'upload.bin', payload) is None
    assert (tftp_root / 'upload.bin').read_bytes() == payload
    assert part_files(tftp_root) == []


def test_wrq_512_multiple_needs_final_empty_block_rfc1350_s6(start_server, tftp_root):
    server = start_server('--allow-create')
    payload = os.urandom(1024)
    with client_for(server) as c:
        opcode, number, _, _ = start_upload(c, 'two-blocks.bin')
        assert (opcode, number) == (OP_ACK, 0)
        for block in (1, 2):
            c.data(block, payload[(block - 1) * 512:block * 512])
            assert c.recv()[:2] == (OP_ACK, block)
        assert not (tftp_root / 'two-blocks.bin').exists()   # not complete yet
        c.data(3, b'')
        assert c.recv()[:2] == (OP_ACK, 3)
    assert (tftp_root / 'two-blocks.bin').read_bytes() == payload


def test_wrq_into_subdirectory_rfc1350_s2(start_server, tftp_root):
    server = start_server('--allow-create')
    with client_for(server) as c:
        lockstep_put(c, 'sub\\up.txt', b'in sub\n')
    assert (tftp_root / 'sub' / 'up.txt').read_bytes() == b'in sub\n'


def test_wrq_allow_write_replaces_existing_file_rfc1350_s2(start_server, tftp_root):
    server = start_server('--allow-write')
    target = tftp_root / 'replace.bin'
    target.write_bytes(os.urandom(3000))
    os.chmod(target, 0o666)     # as root without --permissive, writes need o+w (atftpd)
    payload = os.urandom(700)
    with client_for(server) as c:
        lockstep_put(c, 'replace.bin', payload)
    assert target.read_bytes() == payload
    assert part_files(tftp_root) == []


def test_wrq_allow_write_refuses_new_file_rfc1350_s7(start_server, tftp_root):
    server = start_server('--allow-write')
    with client_for(server) as c:
        code, _ = error_of(start_upload(c, 'brand-new.bin'))
    assert code == 2
    assert not (tftp_root / 'brand-new.bin').exists()
    assert part_files(tftp_root) == []


def test_wrq_aborted_by_client_error_leaves_no_file_rfc1350_s7(start_server, tftp_root):
    server = start_server('--allow-create')
    with client_for(server) as c:
        assert start_upload(c, 'aborted.bin')[:2] == (OP_ACK, 0)
        c.data(1, os.urandom(512))
        assert c.recv()[:2] == (OP_ACK, 1)
        assert len(part_files(tftp_root)) == 1          # the data goes to a temporary file
        c.error(0, 'user cancelled')
        server.wait_for_log(r'failed receiving aborted\.bin from .*aborted by client')
        assert c.nothing_for(0.3)                       # no ERROR answers an ERROR
    assert not (tftp_root / 'aborted.bin').exists()
    assert part_files(tftp_root) == []


def test_wrq_abandoned_by_client_leaves_no_file_after_timeout_rfc1350_s2(start_server,
                                                                        tftp_root):
    server = start_server('--allow-create', '--retry-timeout', '1')
    with client_for(server, timeout=5) as c:
        assert start_upload(c, 'abandoned.bin')[:2] == (OP_ACK, 0)
        c.data(1, os.urandom(512))
        assert c.recv()[:2] == (OP_ACK, 1)
        # Stop sending: the server resends ACK 1, then gives up with an ERROR.
        replies = []
        for _ in range(20):
            replies.append(c.recv()[:2])
            if replies[-1][0] == OP_ERROR:
                break
        assert replies[-1][0] == OP_ERROR
        assert set(replies[:-1]) == {(OP_ACK, 1)}
        server.wait_for_log(r'failed receiving abandoned\.bin from .*timeout')
    assert not (tftp_root / 'abandoned.bin').exists()
    assert part_files(tftp_root) == []


def test_wrq_aborted_keeps_existing_file_intact_rfc1350_s7(start_server, tftp_root):
    server = start_server('--allow-write')
    target = tftp_root / 'keep.bin'
    original = os.urandom(2000)
    target.write_bytes(original)
    os.chmod(target, 0o666)
    with client_for(server) as c:
        assert start_upload(c, 'keep.bin')[:2] == (OP_ACK, 0)
        c.data(1, b'\0' * 512)
        assert c.recv()[:2] == (OP_ACK, 1)
        c.error(0)
        server.wait_for_log(r'failed receiving keep\.bin')
    assert target.read_bytes() == original
    assert part_files(tftp_root) == []


def test_wrq_never_writes_outside_root_rfc1350_s7(start_server, tftp_root, tmp_path):
    server = start_server('--allow-create', '--allow-write')
    outside = tmp_path / 'outside'
    outside.mkdir()
    victim = outside / 'victim.txt'
    victim.write_bytes(b'precious\n')
    os.chmod(victim, 0o666)
    os.symlink(str(outside), str(tftp_root / 'linkdir'))
    os.symlink(str(victim), str(tftp_root / 'victimlink'))
    os.symlink(str(outside / 'dangling-target.txt'), str(tftp_root / 'dangling'))
    before = sorted(os.listdir(outside))
    names = ['../escape.txt', '..\\escape.txt', 'sub/../../escape.txt',
             str(tftp_root) + '/../escape.txt', str(outside / 'abs.txt'),
             'linkdir/through-link.txt', 'victimlink', 'dangling']
    for name in names:
        with client_for(server) as c:
            opcode, number, _, _ = start_upload(c, name)
            if opcode == OP_ERROR:
                assert number in (1, 2), (name, number)
                continue
            # Accepted: then whatever is written must land inside the root.
            assert (opcode, number) == (OP_ACK, 0), name
            c.data(1, b'attack\n')
            assert c.recv()[:2] == (OP_ACK, 1)
    assert not (tmp_path / 'escape.txt').exists()
    assert sorted(os.listdir(outside)) == before
    assert victim.read_bytes() == b'precious\n'
    assert part_files(tftp_root) == []
    assert part_files(outside) == []


@pytest.mark.parametrize('name', ['../escape.txt', 'linkdir/x.txt'])
def test_wrq_outside_root_gets_error_2_rfc1350_s7(start_server, tftp_root, tmp_path, name):
    server = start_server('--allow-create')
    (tmp_path / 'outside').mkdir()
    os.symlink(str(tmp_path / 'outside'), str(tftp_root / 'linkdir'))
    with client_for(server) as c:
        code, _ = error_of(start_upload(c, name))
    assert code == 2


def test_wrq_netascii_converts_crlf_and_crnul_rfc1350_netascii(start_server, tftp_root):
    server = start_server('--allow-create')
    # CR LF straddles blocks 1/2, CR NUL straddles blocks 2/3.
    local = b'x' * 511 + b'\n' + b'y' * 510 + b'\r' + b'tail\r\nend\n' + b'bare\rcr\n'
    wire = netascii(local)
    assert wire[511:513] == b'\r\n' and wire[1023:1025] == b'\r\0'
    with client_for(server) as c:
        lockstep_put(c, 'ascii.txt', wire, mode='netascii')
    assert (tftp_root / 'ascii.txt').read_bytes() == local


def test_wrq_netascii_simple_text_rfc1350_netascii(start_server, tftp_root):
    server = start_server('--allow-create')
    with client_for(server) as c:
        lockstep_put(c, 'simple.txt', TEXT_NETASCII, mode='netascii')
    assert (tftp_root / 'simple.txt').read_bytes() == TEXT


def test_wrq_duplicate_data_is_acked_not_written_twice_rfc1350_s2(start_server, tftp_root):
    server = start_server('--allow-create', '--retry-timeout', '2')
    payload = os.urandom(1500)
    with client_for(server) as c:
        assert start_upload(c, 'dup.bin')[:2] == (OP_ACK, 0)
        c.data(1, payload[:512])
        assert c.recv()[:2] == (OP_ACK, 1)
        c.data(1, payload[:512])                # our ACK "was lost": send again
        assert c.recv()[:2] == (OP_ACK, 1)
        c.data(2, payload[512:1024])
        assert c.recv()[:2] == (OP_ACK, 2)
        c.data(3, payload[1024:])
        assert c.recv()[:2] == (OP_ACK, 3)
    assert (tftp_root / 'dup.bin').read_bytes() == payload


def test_wrq_final_ack_lost_client_resends_last_block_gets_ack_again_rfc1350_s6(start_server,
                                                                               tftp_root):
    server = start_server('--allow-create', '--retry-timeout', '2')
    with client_for(server) as c:
        assert start_upload(c, 'dally.bin')[:2] == (OP_ACK, 0)
        c.data(1, b'a' * 512)
        assert c.recv()[:2] == (OP_ACK, 1)
        c.data(2, b'end')
        assert c.recv()[:2] == (OP_ACK, 2)
        c.data(2, b'end')                       # "the final ACK was lost"
        assert c.recv()[:2] == (OP_ACK, 2)
    assert (tftp_root / 'dally.bin').read_bytes() == b'a' * 512 + b'end'


def test_wrq_completed_upload_not_reported_failed_when_server_stops_during_dally_rfc1350_s6(
        start_server, tftp_root):
    # The upload is complete and ACKed; the server then stops while it still
    # waits (dallies) for a possible repeat of the last block. The client must
    # not get an ERROR for a transfer that succeeded, and the log must not
    # call it failed.
    server = start_server('--allow-create', '--retry-timeout', '5')
    with client_for(server) as c:
        assert start_upload(c, 'done.bin')[:2] == (OP_ACK, 0)
        c.data(1, b'complete')
        assert c.recv()[:2] == (OP_ACK, 1)
        assert (tftp_root / 'done.bin').read_bytes() == b'complete'
        assert server.stop() == 0
        replies = []
        for _ in range(5):
            if c.nothing_for(0.2):
                break
            replies.append(c.recv()[:2])
    assert replies == []
    assert 'failed receiving done.bin' not in server.log()
    assert 'received done.bin from ' in server.log()


def test_wrq_long_valid_filename_is_stored_rfc1350_s2(start_server, tftp_root):
    # 250 bytes is a valid file name (NAME_MAX is 255 on Linux).
    server = start_server('--allow-create')
    name = 'n' * 250
    with client_for(server) as c:
        lockstep_put(c, name, b'long name\n')
    assert (tftp_root / name).read_bytes() == b'long name\n'
    assert part_files(tftp_root) == []


def test_rrq_long_valid_filename_is_served_rfc1350_s2(server, tftp_root):
    name = 'r' * 255
    (tftp_root / name).write_bytes(b'long name\n')
    with client_for(server) as c:
        assert lockstep_get(c, name)[0] == b'long name\n'


def test_duplicate_rrq_from_same_port_does_not_start_second_transfer_rfc1350_s4(start_server,
                                                                             tftp_root):
    server = start_server('--retry-timeout', '2')
    expected = (tftp_root / 'exact1024').read_bytes()
    with client_for(server) as c:
        c.rrq('exact1024')
        opcode, number, payload, tid = c.recv()
        assert (opcode, number, payload) == (OP_DATA, 1, expected[:512])
        c.send(atftpd_request('exact1024'), c.server)   # the client retransmits its RRQ
        assert c.nothing_for(0.5)
        c.ack(1)
        assert c.recv()[:4] == (OP_DATA, 2, expected[512:], tid)
        c.ack(2)
        assert c.recv()[:3] == (OP_DATA, 3, b'')
        c.ack(3)
        assert c.nothing_for(0.3)


def test_rrq_fifo_gets_error_2_and_server_goes_on_rfc1350_s7(server, tftp_root):
    os.mkfifo(str(tftp_root / 'fifo'))
    with client_for(server) as c:
        c.rrq('fifo')
        code, _ = expect_error(c)
    assert code == 2
    with client_for(server) as c:
        assert lockstep_get(c, 'small.txt')[0] == b'hello, tftp\n'


def atftpd_request(name):
    return struct.pack('!H', 1) + name.encode() + b'\0octet\0'
