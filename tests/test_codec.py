"""Pure codec, negotiation, netascii and path tests: no sockets, no clock."""

import os

import pytest

import atftpd
from atftpd import (OP_RRQ, OP_WRQ, Limits, PacketError, encode_request, negotiate_options,
                    parse_request, resolve_path)


def req(name=b'file', mode=b'octet', *options, opcode=OP_RRQ, tail=b''):
    fields = [name, mode] + list(options)
    return bytes([0, opcode]) + b'\0'.join(fields) + b'\0' + tail


# -- requests ---------------------------------------------------------------

def test_rrq_with_options_keeps_request_order():
    request = parse_request(req(b'pxelinux.0', b'octet', b'tsize', b'0', b'blksize', b'1428'))
    assert request.opcode == OP_RRQ
    assert request.filename == 'pxelinux.0'
    assert request.mode == 'octet'
    assert request.options == [('tsize', '0'), ('blksize', '1428')]


def test_option_names_and_mode_are_case_insensitive():
    request = parse_request(req(b'f', b'NetASCII', b'BlkSize', b'1024'))
    assert request.mode == 'netascii'
    assert request.options == [('blksize', '1024')]


def test_unknown_mode_is_served_as_octet_like_atftpd():
    assert parse_request(req(b'f', b'binary')).mode == 'octet'


def test_wrq_is_parsed():
    assert parse_request(req(opcode=OP_WRQ)).opcode == OP_WRQ


def test_request_padded_to_516_bytes_is_accepted():
    """HP PA-RISC firmware sends fixed 516-byte requests with trailing garbage."""
    data = req(b'boot.img', b'octet')
    data += b'\0' * (516 - len(data))
    request = parse_request(data)
    assert request.filename == 'boot.img' and request.options == []


def test_incomplete_trailing_option_is_ignored():
    request = parse_request(req(b'f', b'octet', b'blksize', b'1024', tail=b'tsize'))
    assert request.options == [('blksize', '1024')]


def test_empty_option_value_does_not_shift_the_pairs():
    request = parse_request(req(b'f', b'octet', b'timeout', b'', b'blksize', b'1024'))
    assert request.options == [('timeout', ''), ('blksize', '1024')]


@pytest.mark.parametrize('data', [
    b'', b'\x00', b'\x00\x01', b'\x00\x01file', b'\x00\x01file\x00', b'\x00\x01file\x00octet',
    b'\x00\x01\x00octet\x00', b'\x00\x03\x00\x01data', b'\x00\x04\x00\x01', b'\x00\x07abc\x00x\x00',
    b'\xff\xff', req(b'f', b'mail'),
])
def test_malformed_requests_raise_packet_error_only(data):
    with pytest.raises(PacketError) as info:
        parse_request(data)
    assert info.value.code in (atftpd.ERR_ILLEGAL_OP, atftpd.ERR_ACCESS)


def test_request_round_trip():
    data = encode_request(OP_RRQ, 'a/b.cfg', 'netascii', [('blksize', 1428), ('tsize', 0)])
    request = parse_request(data)
    assert (request.filename, request.mode, request.options) == (
        'a/b.cfg', 'netascii', [('blksize', '1428'), ('tsize', '0')])


def test_encoders():
    assert atftpd.encode_ack(65536 + 3) == b'\x00\x04\x00\x03'
    assert atftpd.encode_data(65535, b'xy') == b'\x00\x03\xff\xffxy'
    assert atftpd.encode_oack([('blksize', 1428)]) == b'\x00\x06blksize\x001428\x00'
    assert atftpd.encode_error(1) == b'\x00\x05\x00\x01File not found\x00'
    assert len(atftpd.encode_error(0, 'x' * 5000)) < 512


def test_encode_data_run_numbers_and_cuts_the_blocks():
    run = atftpd.encode_data_run(65534, b'aaabbbc', 3, 3)
    assert run == [b'\x00\x03\xff\xfeaaa', b'\x00\x03\xff\xffbbb', b'\x00\x03\x00\x00c']


def test_encode_data_run_ends_with_an_empty_block_when_asked():
    run = atftpd.encode_data_run(1, b'aaabbb', 3, 3)
    assert run[-1] == b'\x00\x03\x00\x03'
    assert [len(d) for d in run] == [7, 7, 4]


def test_parse_error_escapes_the_message():
    code, message = atftpd.parse_error(b'\x00\x05\x00\x08bad\n\x1b[31m\x00')
    assert code == 8 and '\n' not in message and '\x1b' not in message


@pytest.mark.parametrize('wire, last, expected', [
    (5, 5, 5), (4, 5, 4), (65535, 65536, 65535), (0, 65536, 65536), (65535, 65537, 65535),
    (1, 65537, 65537), (65530, 131072 + 3, 131066),
])
def test_unwrap_block_across_rollover(wire, last, expected):
    assert atftpd.unwrap_block(wire, last) == expected


# -- negotiation --------------------------------------------------------------

LIMITS = Limits()


def negotiate(options, is_read=True, size=1000, limits=LIMITS):
    return negotiate_options(options, is_read, size, limits)


def test_only_requested_options_are_acknowledged():
    result = negotiate([('blksize', '1428')])
    assert result.acked == [('blksize', 1428)]
    assert result.blksize == 1428 and result.windowsize == 1 and result.timeout is None


def test_tsize_reports_the_file_size_on_read_and_echoes_on_write():
    assert negotiate([('tsize', '0')]).acked == [('tsize', 1000)]
    write = negotiate([('tsize', '4242')], is_read=False, size=None)
    assert write.acked == [('tsize', 4242)] and write.tsize == 4242


def test_tsize_is_left_out_when_the_size_is_unknown_or_zero():
    assert negotiate([('tsize', '0')], size=None).acked == []
    assert negotiate([('tsize', '0')], size=0).acked == []      # curl rejects "tsize 0"


@pytest.mark.parametrize('value, acked', [
    ('8', 8), ('512', 512), ('65464', 65464), ('65465', 65464), ('100000', 65464),
    ('7', None), ('0', None), ('-1', None), ('abc', None), ('', None), ('9' * 30, None),
])
def test_blksize_policy_clamps_down_and_ignores_invalid(value, acked):
    result = negotiate([('blksize', value)])
    assert result.acked == ([] if acked is None else [('blksize', acked)])
    assert result.blksize == (512 if acked is None else acked)


@pytest.mark.parametrize('options, windowsize', [
    ([('blksize', '65464'), ('windowsize', '64')], 16),
    ([('windowsize', '64'), ('blksize', '65464')], 16),     # blksize after windowsize
    ([('blksize', '1428'), ('windowsize', '64')], 64),      # 91 KiB: fits
    ([('blksize', '65464'), ('windowsize', '16')], 16),     # exactly 1 MiB at most
])
def test_windowsize_shrinks_so_a_window_fits_in_one_mib(options, windowsize):
    result = negotiate(options)
    assert result.windowsize == windowsize
    assert dict(result.acked)['windowsize'] == windowsize
    assert result.windowsize * result.blksize <= atftpd.MAX_WINDOW_BYTES


def test_blksize_is_capped_by_the_configured_maximum():
    result = negotiate([('blksize', '1468')], limits=Limits(max_blksize=1024))
    assert result.acked == [('blksize', 1024)]


@pytest.mark.parametrize('value, acked', [('1', 1), ('255', 255), ('0', None), ('256', None),
                                          ('x', None)])
def test_timeout_range_1_to_255(value, acked):
    assert negotiate([('timeout', value)]).acked == ([] if acked is None else [('timeout', acked)])


@pytest.mark.parametrize('value, acked', [('1', 1), ('8', 8), ('64', 64), ('65', 64),
                                          ('65535', 64), ('65536', None), ('0', None)])
def test_windowsize_is_accepted_up_to_65535_and_capped(value, acked):
    assert negotiate([('windowsize', value)]).acked == (
        [] if acked is None else [('windowsize', acked)])


def test_unknown_and_repeated_options():
    result = negotiate([('multicast', ''), ('blksize', '1024'), ('blksize', '2048'),
                        ('utimeout', '5000')])
    assert result.acked == [('blksize', 1024)]


def test_disabled_options_are_not_acknowledged():
    limits = Limits(blksize=False, timeout=False, tsize=False, windowsize=False)
    result = negotiate([('blksize', '1024'), ('timeout', '2'), ('tsize', '0'),
                        ('windowsize', '4')], limits=limits)
    assert result.acked == [] and result.blksize == 512 and result.windowsize == 1


# -- netascii -------------------------------------------------------------------

def test_netascii_encode():
    assert atftpd.netascii_encode(b'a\nb\r\nc\rd') == b'a\r\nb\r\0\r\nc\r\0d'


def test_netascii_decoder_handles_cr_split_across_blocks():
    decoder = atftpd.NetasciiDecoder()
    out = decoder.decode(b'one\r') + decoder.decode(b'\ntwo\r') + decoder.decode(b'\0x', True)
    assert out == b'one\ntwo\rx'


def test_netascii_round_trip():
    text = b'\r\n\n\r\r\0 plain \x00 end\r'
    encoded = atftpd.netascii_encode(text)
    decoder = atftpd.NetasciiDecoder()
    decoded = b''.join(decoder.decode(encoded[i:i + 3]) for i in range(0, len(encoded), 3))
    assert decoded + decoder.decode(b'', True) == text


def test_netascii_source_size_is_the_converted_size(tmp_path):
    path = tmp_path / 't'
    path.write_bytes(b'a\nb\r\n' * 100)
    fd = os.open(str(path), os.O_RDONLY)
    source = atftpd.NetasciiSource(atftpd.FileSource(fd, os.fstat(fd).st_size))
    data = b''
    while True:
        block = source.read_at(len(data), 7)
        data += block
        if len(block) < 7:
            break
    source.close()
    assert data == atftpd.netascii_encode(path.read_bytes())
    assert source.size == len(data)


# -- paths ------------------------------------------------------------------------

ROOT = '/srv/tftp'


@pytest.mark.parametrize('name, path', [
    ('pxelinux.0', '/srv/tftp/pxelinux.0'),
    ('/pxelinux.0', '/srv/tftp/pxelinux.0'),
    ('//a//b/./c', '/srv/tftp/a/b/c'),
    ('/srv/tftp/boot/x', '/srv/tftp/boot/x'),
    ('\\EFI\\BOOT\\bootx64.efi', '/srv/tftp/EFI/BOOT/bootx64.efi'),
    ('/srv/tftp2/x', '/srv/tftp/srv/tftp2/x'),
    ('..foo', '/srv/tftp/..foo'),
])
def test_resolve_path_inside_root(name, path):
    assert resolve_path(ROOT, name) == path


@pytest.mark.parametrize('name', ['..', '../etc/passwd', 'a/../../etc', '/srv/tftp/../x',
                                  '..\\windows', '', '/', '.', 'a/..'])
def test_resolve_path_refuses_escapes_and_the_root_itself(name):
    with pytest.raises(PacketError) as info:
        resolve_path(ROOT, name)
    assert info.value.code == atftpd.ERR_ACCESS


def test_symlink_inside_root_is_followed_and_outside_is_refused(tmp_path):
    root = tmp_path / 'root'
    root.mkdir()
    (root / 'real').write_text('x')
    (root / 'inside').symlink_to(root / 'real')
    (tmp_path / 'secret').write_text('y')
    (root / 'outside').symlink_to(tmp_path / 'secret')
    real_root = os.path.realpath(str(root))
    atftpd.check_inside_root(real_root, str(root / 'inside'))
    with pytest.raises(PacketError):
        atftpd.check_inside_root(real_root, str(root / 'outside'))
