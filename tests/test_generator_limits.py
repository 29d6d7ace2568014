"""What a generator may cost the server (issue "Hostile network, round 2"):
the cache of results is bounded per client and in total, a run that cannot
start for want of descriptors drops the request instead of answering "not
found", and any start failure frees the request's slot."""

import resource
import socket

import pytest

from conftest import IS_ROOT, RawClient, TftpError
from test_generator import fetch, make_generator, wait_for

import atftpd

RRQ_WAIT = 2.0      # a dropped request gets no answer within this


def client_from(server, address):
    """A RawClient whose datagrams come from `address` (any 127/8 is local)."""
    client = RawClient(server.host, server.port)
    client.sock.close()
    client.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.sock.bind((address, 0))
    return client


def fetch_from(server, address, name):
    with client_from(server, address) as client:
        return client.download(name)[0]


def test_cache_keeps_few_descriptors_and_other_hosts_entries(start_server, tmp_path):
    generator = make_generator(tmp_path, 'printf "%s %s" "$TFTP_REQUEST" "$$" >&3')
    server = start_server('--content-generator', generator, '--generator-cache', '60')
    before = len(server.open_fds())
    kept = fetch_from(server, '127.0.0.2', 'mine')
    # One client asking 60 distinct names, then eight clients 16 each.
    for index in range(60):
        fetch_from(server, '127.0.0.1', 'flood-%d' % index)
    # The last transfer may still be closing: wait for the count to settle.
    held = lambda: len(server.open_fds()) - before      # noqa: E731
    assert wait_for(lambda: held() <= atftpd.CACHE_PER_CLIENT + 1), held()
    for host in range(3, 11):
        for index in range(atftpd.CACHE_PER_CLIENT):
            fetch_from(server, '127.0.0.%d' % host, 'many-%d' % index)
    assert wait_for(lambda: held() <= atftpd.CACHE_DESCRIPTORS), held()
    # The first host's result is still the cached one (same generator pid).
    assert fetch_from(server, '127.0.0.2', 'mine') == kept


def lowest_limit_with_free_slots(fds, free):
    limit = 1
    while limit - sum(1 for fd in fds if fd < limit) < free:
        limit += 1
    return limit


def test_no_descriptor_for_the_generator_drops_the_request_and_recovers(start_server, tmp_path):
    if not IS_ROOT:
        pytest.skip('lowering another process limit with prlimit needs root here')
    generator = make_generator(tmp_path, 'printf generated >&3')
    server = start_server('--content-generator', generator)
    assert fetch(server, 'small.txt')[0] == b'hello, tftp\n'
    original = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)
    # One free descriptor: the run's temporary file, then no pipe for it.
    limit = lowest_limit_with_free_slots(server.open_fds(), 1)
    resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (limit, original[1]))
    with RawClient(server.host, server.port) as client:
        client.rrq('generated.cfg')
        assert client.nothing_for(RRQ_WAIT), 'a run that could not start was answered'
        server.wait_for_log(r'failed sending generated\.cfg .*dropped, the client may ask '
                            r'again \(generator: cannot run .*Too many open files')
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, original)
        client.rrq('generated.cfg')         # the client's retry, once descriptors are back
        opcode, block, payload, _ = client.recv()
        assert (opcode, block, payload) == (atftpd.OP_DATA, 1, b'generated')
        client.ack(1)
    assert fetch(server, 'small.txt')[0] == b'hello, tftp\n'


def test_start_failures_of_any_kind_free_the_slot(start_server, tmp_path):
    if not IS_ROOT:
        pytest.skip('lowering another process hard limit with prlimit needs root here')
    generator = make_generator(tmp_path, 'printf generated >&3')
    server = start_server('--content-generator', generator, '--maxthread', '2')
    # Below --generator-max-size: the child's setrlimit fails, which
    # subprocess reports as SubprocessError, not OSError.
    resource.prlimit(server.pid, resource.RLIMIT_FSIZE, (4096, 4096))
    for index in range(6):
        with pytest.raises(TftpError) as info:
            fetch(server, 'cfg-%d' % index)
        assert info.value.code == atftpd.ERR_NOT_FOUND
    server.wait_for_log(r'failed sending cfg-5 .*cannot run')
    assert fetch(server, 'small.txt')[0] == b'hello, tftp\n'
    assert wait_for(lambda: not server.children())


def test_requests_waiting_for_a_slow_generator_do_not_hold_static_files(start_server, tmp_path):
    marks = tmp_path / 'order'
    generator = make_generator(tmp_path, '''
        printf '%%s\\n' "$TFTP_REQUEST" >> %s
        sleep 1
        printf generated >&3
    ''' % marks)
    server = start_server('--content-generator', generator, '--maxthread', '4',
                          '--generator-max-running', '1', '--verbose=6')
    # As many requests as --maxthread wait for one generator at a time (more
    # would be dropped for their clients to ask again).
    waiting = [client_from(server, '127.0.0.%d' % (2 + index)) for index in range(4)]
    try:
        for index, client in enumerate(waiting):
            client.rrq('cfg-%d' % index)
        # A static file is served before the first of them has its content.
        assert fetch(server, 'small.txt')[0] == b'hello, tftp\n'
        assert 'generator for ' not in server.log(), server.log()
        for client in waiting:
            opcode, block, payload, _ = client.recv(timeout=20)
            assert (opcode, block, payload) == (atftpd.OP_DATA, 1, b'generated')
            client.ack(1)
    finally:
        for client in waiting:
            client.close()
    # Runs start in the order the requests came.
    assert marks.read_text().split() == ['cfg-%d' % index for index in range(4)]


def test_no_descriptor_for_a_static_file_drops_the_request(start_server):
    """An ERROR 0 "Too many open files" ends a client's try; no answer lets
    it ask again, and it is served once descriptors are back."""
    if not IS_ROOT:
        pytest.skip('lowering another process limit with prlimit needs root here')
    server = start_server()
    original = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (1, original[1]))     # none free
    try:
        with RawClient(server.host, server.port) as client:
            client.rrq('small.txt')
            assert client.nothing_for(RRQ_WAIT)
            server.wait_for_log(r'refused small\.txt: dropped, the client may ask again: '
                                r'Too many open files')
            resource.prlimit(server.pid, resource.RLIMIT_NOFILE, original)
            client.rrq('small.txt')
            assert client.recv()[:3] == (atftpd.OP_DATA, 1, b'hello, tftp\n')
            client.ack(1)
    finally:
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, original)


def test_a_generator_flooding_its_output_is_not_read_past_the_log_limit(start_server,
                                                                        tmp_path):
    """Past what the log keeps, the server stops reading the generator's
    output: the flood blocks on the full pipe until the timeout kills it,
    instead of costing the server a core for that long."""
    generator = make_generator(tmp_path, 'printf x >&3\nexec yes flood')
    server = start_server('--content-generator', generator, '--generator-timeout', '3')
    read_before = bytes_read(server.pid)
    with pytest.raises(TftpError) as info:
        fetch(server, 'noisy')
    assert info.value.code == atftpd.ERR_NOT_FOUND
    server.wait_for_log(r'failed sending noisy .*timed out after 3 s')
    # The log's 4 KiB and at most a pipe's worth at the end, not gigabytes.
    assert bytes_read(server.pid) - read_before < 1 << 20
    assert fetch(server, 'small.txt')[0] == b'hello, tftp\n'


def bytes_read(pid):
    """Bytes `pid` has read with read() and the like (/proc/PID/io rchar)."""
    with open('/proc/%d/io' % pid) as f:
        return int(dict(line.split(': ') for line in f.read().splitlines())['rchar'])
