"""RFC 2347 option negotiation on the wire: what goes into the OACK, what is
ignored, padded requests from firmware, and the UEFI size probe."""

import os

import pytest

from wire_helpers import (OP_ACK, OP_DATA, OP_ERROR, OP_OACK, client_for, lockstep_get,
                          lockstep_put, raw_request)

OP_RRQ = 1


def first_reply(server, name, options, mode='octet'):
    with client_for(server) as c:
        c.rrq(name, mode, options)
        opcode, number, payload, _ = c.recv()
        if opcode == OP_OACK:
            return opcode, c.oack_options(payload)
        return opcode, (number, payload)


def test_oack_contains_only_requested_options_rfc2347(server):
    opcode, oack = first_reply(server, 'random.bin', [('blksize', '1024')])
    assert opcode == OP_OACK
    assert oack == {'blksize': '1024'}          # no tsize, timeout or windowsize unasked


def test_oack_keeps_request_order_and_values_rfc2347(server):
    opcode, oack = first_reply(server, 'random.bin',
                               [('windowsize', '4'), ('tsize', '0'), ('timeout', '3'),
                                ('blksize', '1428')])
    assert opcode == OP_OACK
    assert oack == {'windowsize': '4', 'tsize': '300000', 'timeout': '3', 'blksize': '1428'}


def test_oack_option_order_follows_request_rfc2347(server):
    with client_for(server) as c:
        c.rrq('random.bin', options=[('tsize', '0'), ('blksize', '1024')])
        opcode, _, payload, _ = c.recv()
        assert opcode == OP_OACK
        assert payload.split(b'\0')[0::2][:2] == [b'tsize', b'blksize']


def test_unknown_options_are_ignored_rfc2347(server, tftp_root):
    options = [('foo', 'bar'), ('blksize', '1024'), ('rollover', '0'), ('x' * 100, '1' * 100)]
    with client_for(server) as c:
        data, sizes, _, oack = lockstep_get(c, 'random.bin', options=options)
    assert oack == {'blksize': '1024'}
    assert data == (tftp_root / 'random.bin').read_bytes()
    assert set(sizes[:-1]) == {1024}


def test_option_names_are_case_insensitive_rfc2347(server, tftp_root):
    options = [('BlkSize', '1024'), ('TSIZE', '0')]
    with client_for(server) as c:
        data, sizes, _, oack = lockstep_get(c, 'random.bin', options=options)
    assert {k.lower(): v for k, v in oack.items()} == {'blksize': '1024', 'tsize': '300000'}
    assert set(sizes[:-1]) == {1024}
    assert data == (tftp_root / 'random.bin').read_bytes()


def test_repeated_option_first_wins_rfc2347(server, tftp_root):
    options = [('blksize', '1024'), ('blksize', '2048'), ('BLKSIZE', '8')]
    with client_for(server) as c:
        data, sizes, _, oack = lockstep_get(c, 'random.bin', options=options)
    assert oack == {'blksize': '1024'}
    assert set(sizes[:-1]) == {1024}
    assert data == (tftp_root / 'random.bin').read_bytes()


def test_all_options_unknown_means_no_oack_and_data_1_rfc2347(server, tftp_root):
    opcode, (number, payload) = first_reply(server, 'random.bin', [('foo', '1'), ('bar', '2')])
    assert (opcode, number) == (OP_DATA, 1)
    assert payload == (tftp_root / 'random.bin').read_bytes()[:512]


def test_mode_is_case_insensitive_and_octet_default_rfc1350_rfc2347(server):
    with client_for(server) as c:
        data, _, _, oack = lockstep_get(c, 'small.txt', mode='OCTET', options=[('tsize', '0')])
    assert oack == {'tsize': '12'}
    assert data == b'hello, tftp\n'


@pytest.mark.parametrize('padding', [
    b'\0' * 600,                                    # PA-RISC: NULs up to 516 bytes
    b'\xff\xfe garbage without nul' * 40,            # Apple OpenFirmware style junk
    b'junk\0more junk' + b'x' * 600,                 # an incomplete trailing pair
])
def test_padded_request_is_served_rfc2347(server, padding):
    request = (raw_request(OP_RRQ, b'small.txt', b'octet') + padding)[:516]
    assert len(request) == 516
    with client_for(server) as c:
        c.send(request)
        opcode, number, payload, _ = c.recv()
        assert (opcode, number, payload) == (OP_DATA, 1, b'hello, tftp\n')
        c.ack(1)


def test_padded_request_with_options_is_negotiated_rfc2347(server, tftp_root):
    request = raw_request(OP_RRQ, b'random.bin', b'octet', b'blksize', b'1024', b'tsize', b'0')
    request = request + b'\0' * (516 - len(request))
    with client_for(server) as c:
        c.send(request)
        opcode, _, payload, _ = c.recv()
        assert opcode == OP_OACK
        assert c.oack_options(payload) == {'blksize': '1024', 'tsize': '300000'}
        c.ack(0)
        opcode, number, payload, _ = c.recv()
        assert (opcode, number) == (OP_DATA, 1)
        assert payload == (tftp_root / 'random.bin').read_bytes()[:1024]
        c.error(0, 'done')


def test_client_error_8_after_oack_ends_probe_quietly_uefi_rfc2347(start_server, tftp_root):
    # UEFI: RRQ tsize=0 -> OACK -> ERROR 8 -> a new RRQ from a new port.
    server = start_server('--retry-timeout', '1')      # default log level: notice
    expected = (tftp_root / 'random.bin').read_bytes()
    with client_for(server, timeout=5) as probe, client_for(server) as real:
        probe.rrq('random.bin', options=[('tsize', '0')])
        opcode, _, payload, _ = probe.recv()
        assert opcode == OP_OACK
        assert probe.oack_options(payload) == {'tsize': str(len(expected))}
        probe.error(8, 'Option negotiation failed')
        data, oack = real.download('random.bin', options=[('tsize', '0'), ('blksize', '1428')])
        assert oack == {'tsize': str(len(expected)), 'blksize': '1428'}
        assert data == expected
        server.wait_for_log(r'sent random\.bin to ')
        # The probe's transfer is over: no OACK resent, no ERROR, even after
        # the 1 s retry timeout would have fired.
        assert probe.nothing_for(1.2)
    # Quiet: the declined probe is logged below the default level, not as a failure.
    assert 'failed sending' not in server.log()
    assert 'internal error' not in server.log()


def test_client_error_0_after_oack_also_ends_probe_rfc2347(start_server, tftp_root):
    server = start_server('--retry-timeout', '2', '--verbose=6')
    with client_for(server) as probe:
        probe.rrq('small.txt', options=[('tsize', '0')])
        assert probe.recv()[0] == OP_OACK
        probe.error(0, 'size only')
        server.wait_for_log(r'options declined by client \(0')
        probe.rrq('small.txt', options=[('tsize', '0')])    # same port, new request
        opcode, _, payload, _ = probe.recv()
        assert opcode == OP_OACK and probe.oack_options(payload) == {'tsize': '12'}
        probe.ack(0)
        assert probe.recv()[:3] == (OP_DATA, 1, b'hello, tftp\n')
        probe.ack(1)


ALL_OPTIONS = [('blksize', '1024'), ('tsize', '0'), ('timeout', '3'), ('windowsize', '2')]


@pytest.mark.parametrize('flag,option', [('--no-blksize', 'blksize'), ('--no-tsize', 'tsize'),
                                         ('--no-timeout', 'timeout'),
                                         ('--no-windowsize', 'windowsize')])
def test_disabled_option_is_not_acknowledged_rfc2347(start_server, tftp_root, flag, option):
    server = start_server(flag)
    with client_for(server) as c:
        data, oack = c.download('random.bin', options=ALL_OPTIONS)
    expected = {'blksize': '1024', 'tsize': '300000', 'timeout': '3', 'windowsize': '2'}
    del expected[option]
    assert oack == expected
    assert data == (tftp_root / 'random.bin').read_bytes()


def test_all_options_disabled_means_no_oack_rfc2347(start_server, tftp_root):
    server = start_server('--no-blksize', '--no-tsize', '--no-timeout', '--no-windowsize')
    with client_for(server) as c:
        data, sizes, _, oack = lockstep_get(c, 'exact1024', options=ALL_OPTIONS)
    assert oack is None
    assert sizes == [512, 512, 0]
    assert data == (tftp_root / 'exact1024').read_bytes()


def test_disabled_option_in_wrq_is_not_acknowledged_rfc2347(start_server, tftp_root):
    server = start_server('--allow-create', '--no-blksize')
    payload = os.urandom(1500)
    with client_for(server) as c:
        oack = lockstep_put(c, 'up.bin', payload, options=[('blksize', '1024'), ('tsize', '1500')])
    assert oack == {'tsize': '1500'}
    assert (tftp_root / 'up.bin').read_bytes() == payload


def test_wrq_without_acknowledged_options_gets_ack_0_rfc2347(start_server, tftp_root):
    server = start_server('--allow-create')
    with client_for(server) as c:
        c.wrq('plain.bin', options=[('unknown', '1')])
        assert c.recv()[:2] == (OP_ACK, 0)
        c.data(1, b'abc')
        assert c.recv()[:2] == (OP_ACK, 1)
    assert (tftp_root / 'plain.bin').read_bytes() == b'abc'


def test_no_error_8_for_any_option_value_rfc2347(server):
    # Policy: never refuse a client over an option.
    options = [('blksize', 'x'), ('tsize', 'y'), ('timeout', 'z'), ('windowsize', 'w')]
    opcode, reply = first_reply(server, 'small.txt', options)
    assert opcode != OP_ERROR
    assert (opcode, reply) == (OP_DATA, (1, b'hello, tftp\n'))
