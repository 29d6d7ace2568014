"""Drive real TFTP clients as subprocesses, for the test suite.

Plain functions, no fixtures:

    require(client)                      -> pytest.fail() if the binary is missing
    supports(client, ...)                -> bool: can this client do that combination?
    fetch(client, host, port, remote, local, ...)  -> subprocess.CompletedProcess
    upload(client, host, port, local, remote, ...) -> subprocess.CompletedProcess

fetch()/upload() raise NotSupported for combinations the client cannot do
(check with supports() first when parametrizing).  They never raise on a failed
transfer: they return the CompletedProcess (text mode, check=False) so tests
can assert on returncode / stdout / stderr.

Normalised results (the raw clients are inconsistent, see GOTCHAS below):
  * returncode 0 means the client reported success; any failure is non-zero.
    Where a client exits 0 although the transfer failed, returncode is set to 1
    and a line starting with "clients.py:" is appended to stderr.
  * a client that runs longer than timeout_s is killed; returncode is then 124
    (like timeout(1)) and stderr says so.  No TimeoutExpired escapes.

What each client puts on the wire (checked against a sniffer on loopback):
  atftp     RRQ/WRQ "octet"/"netascii"; options only those asked for:
            blksize, windowsize (RFC 7440), tsize ("0" in RRQ, size in WRQ).
  tftp-hpa  never sends any option (no blksize/tsize/windowsize at all).
  curl      by default always "tsize 0, blksize 512, timeout 6" (tsize = file
            size on upload).  --tftp-no-options sends none.  No windowsize.
  busybox   always "tsize 0" (file size on upload), "blksize N" only if N != 512.
            Mode always "octet".  No windowsize.

GOTCHAS found with atftp 0.8.0, tftp-hpa 5.2, curl 7.88.1, busybox 1.35.0
(Debian bookworm), against Debian's atftpd and tftp-hpa's in.tftpd:
  * tftp-hpa exits 0 on almost every failure (server ERROR packet, unknown
    host, unreadable/unwritable local file); only "Transfer timed out." (after
    25 s, seen on a get) exits non-zero (69).  Server errors go to STDOUT as "Error code N:
    msg", local errors to stderr.  With our flags it prints nothing at all on
    success, so fetch()/upload() treat any output from it as a failure.
  * tftp-hpa's default mode is netascii (!): we always pass -m.
  * tftp-hpa treats "host:file" in names specially: we always pass -l (literal).
  * atftp gives up after 6 retries of 5 s; curl keeps trying for minutes.
  * upload() returning only means the client got the last ACK: atftpd was
    seen with the uploaded file still half written (32768 of 34272 bytes) at
    that moment.  Checking the file right away is reliable only against a
    server that writes and closes it before sending that last ACK.
  * atftp batch mode (-g/-p) has no way to set the mode, so netascii goes
    through its interactive mode fed on stdin, which exits 0 on failure;
    failure is detected from stderr ("tftp: ..." / "timeout: ..." lines).
    Interactive mode splits on whitespace, so names with spaces are refused
    (NotSupported) on that path, and it asks "Overwrite local file [y/n]?" if
    the local file exists, so fetch() deletes local_path first.
  * atftp --option "tsize enable" (as in its man page) sends the literal string
    "enable" as the tsize value: a protocol error.  We use --option "tsize",
    which sends "tsize 0".
  * atftp wants a bare IPv6 address (::1); "[::1]" is "unknown host".
  * atftp prints "Option blksize = 1428" etc. on stderr even when it succeeds.
  * atftp and tftp-hpa leave an empty local file behind when a get fails;
    busybox and curl do not.
  * curl fails (exit 71, CURLE_TFTP_ILLEGAL) when the OACK carries "tsize 0",
    i.e. when fetching an EMPTY file with options on.  So fetch(curl,
    tsize=False) without blksize uses --tftp-no-options.  Its netascii mode
    needs --tftp-no-options too: in.tftpd refuses tsize in netascii (ERROR 8),
    atftpd answers "tsize 0".
  * curl does NOT translate netascii: ";mode=netascii" writes the raw wire
    bytes (CRLF, CR NUL) to the local file and sends local bytes unchanged.
    See NETASCII_DECODED.
  * curl 7.88's error text is often bogus ("getpeername() failed with errno
    107") whatever the real error: trust its exit code (68 file not found,
    69 access violation, 71 illegal operation, 28 timeout...).
  * curl wants IPv6 as tftp://[::1]:PORT/name and percent-decodes the path, so
    remote names are percent-encoded here.
  * busybox prints a progress bar on stderr even when it succeeds.
"""

import os
import re
import shutil
import subprocess
import urllib.parse

CLIENTS = ('atftp', 'tftp-hpa', 'curl', 'busybox')

# client -> (binary, Debian package that ships it)
BINARIES = {
    'atftp': ('atftp', 'atftp'),
    'tftp-hpa': ('tftp', 'tftp-hpa'),
    'curl': ('curl', 'curl'),
    'busybox': ('busybox', 'busybox'),
}

# Does fetch(mode='netascii') give back the decoded file (True) or the raw
# netascii bytes from the wire (False)?  busybox has no netascii at all.
NETASCII_DECODED = {'atftp': True, 'tftp-hpa': True, 'curl': False}

TIMEOUT_RC = 124


class NotSupported(Exception):
    """The client cannot do the requested combination of options."""


def require(client):
    """Fail (never skip) the current test if the client's binary is missing."""
    binary, package = BINARIES[client]
    if shutil.which(binary) is None:
        import pytest
        pytest.fail(f'TFTP client {client!r} needs {binary!r} on PATH: '
                    f'apt-get install {package} (see tests/debian-packages.txt)',
                    pytrace=False)


def _why_not(client, blksize=None, windowsize=None, mode='octet', ipv6=False,
             upload=False, tsize=False):
    """Return None if supported, else the reason why not."""
    if client not in CLIENTS:
        return f'unknown client {client!r}; expected one of {CLIENTS}'
    if mode not in ('octet', 'netascii'):
        return f'unknown mode {mode!r}'
    if windowsize is not None and client != 'atftp':
        return f'{client} has no windowsize option'
    if windowsize is not None and upload:
        return 'upload() takes no windowsize'
    if client == 'tftp-hpa' and (blksize is not None or tsize):
        return 'tftp-hpa client sends no options (no blksize, no tsize)'
    if client == 'busybox' and mode != 'octet':
        return 'busybox tftp only does octet'
    if client == 'curl' and mode == 'netascii' and (blksize is not None or tsize):
        return ('curl netascii needs --tftp-no-options (servers refuse or '
                'zero tsize in netascii), so no blksize/tsize')
    return None


def supports(client, blksize=None, windowsize=None, mode='octet', ipv6=False,
             upload=False, tsize=False):
    """True if fetch()/upload() can run this combination (all do IPv6)."""
    return _why_not(client, blksize, windowsize, mode, ipv6, upload, tsize) is None


def _check(client, **kw):
    why = _why_not(client, **kw)
    if why:
        raise NotSupported(why)


def _curl_url(host, port, remote_name, mode):
    h = f'[{host}]' if ':' in host else host
    url = f'tftp://{h}:{port}/{urllib.parse.quote(remote_name, safe="/")}'
    return url + (';mode=netascii' if mode == 'netascii' else '')


def _atftp_options(blksize, windowsize, tsize):
    opts = []
    if blksize is not None:
        opts.append(f'blksize {blksize}')
    if windowsize is not None:
        opts.append(f'windowsize {windowsize}')
    if tsize:
        opts.append('tsize')  # NOT "tsize enable": that sends "enable" (bug)
    return opts


def _atftp_interactive(host, port, verb, first, second, mode, options):
    """atftp batch mode cannot set the mode: feed its prompt on stdin."""
    for name in (first, second):
        if not name or re.search(r'\s', name):
            raise NotSupported(f'atftp interactive mode cannot handle name {name!r}')
    script = [f'mode {mode}'] + [f'option {o}' for o in options]
    script += [f'{verb} {first} {second}', 'quit']
    return ['atftp', host, str(port)], '\n'.join(script) + '\n'


def _run(client, argv, timeout_s, stdin_text=None):
    try:
        cp = subprocess.run(argv, input=stdin_text, capture_output=True, text=True,
                            errors='replace', timeout=timeout_s, check=False,
                            stdin=None if stdin_text is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        def _s(b):
            return b.decode(errors='replace') if isinstance(b, bytes) else (b or '')
        return subprocess.CompletedProcess(
            argv, TIMEOUT_RC, _s(e.stdout),
            _s(e.stderr) + f'\nclients.py: {client} killed after {timeout_s} s\n')
    failed_silently = False
    if cp.returncode == 0 and client == 'tftp-hpa':
        # Exits 0 on failure; prints nothing on success (see GOTCHAS).
        failed_silently = bool(cp.stdout.strip() or cp.stderr.strip())
    if cp.returncode == 0 and client == 'atftp' and stdin_text is not None:
        # Interactive mode exits 0 on failure; errors are "tftp: ..." or
        # "timeout: ..." lines on stderr ("Option ..." lines are harmless).
        failed_silently = bool(re.search(r'^(tftp|timeout):', cp.stderr, re.M))
    if failed_silently:
        cp.returncode = 1
        cp.stderr += f'\nclients.py: {client} exited 0 but reported a failure; returncode set to 1\n'
    return cp


def fetch(client, host, port, remote_name, local_path, blksize=None,
          windowsize=None, tsize=False, mode='octet', timeout_s=60):
    """Download remote_name from host:port into local_path.

    host is '127.0.0.1' or '::1' (any literal address works).  tsize=True
    makes the client ask for tsize; tsize=False asks for none where the client
    allows it (busybox always asks; curl asks whenever blksize is given).
    """
    _check(client, blksize=blksize, windowsize=windowsize, mode=mode,
           ipv6=':' in host, tsize=tsize)
    local_path, port = os.fspath(local_path), str(port)
    stdin_text = None
    if client == 'atftp':
        opts = _atftp_options(blksize, windowsize, tsize)
        if mode == 'octet':
            argv = ['atftp']
            for o in opts:
                argv += ['--option', o]
            argv += ['-g', '-r', remote_name, '-l', local_path, host, port]
        else:
            if os.path.lexists(local_path):
                os.unlink(local_path)  # else it prompts "Overwrite local file?"
            argv, stdin_text = _atftp_interactive(host, port, 'get', remote_name,
                                                  local_path, mode, opts)
    elif client == 'tftp-hpa':
        argv = ['tftp', '-6' if ':' in host else '-4', '-l', '-m', mode, host, port,
                '-c', 'get', remote_name, local_path]
    elif client == 'curl':
        argv = ['curl', '--silent', '--show-error', '--output', local_path]
        if blksize is not None:
            argv += ['--tftp-blksize', str(blksize)]
        elif not tsize:
            argv += ['--tftp-no-options']
        argv.append(_curl_url(host, port, remote_name, mode))
    else:  # busybox
        argv = ['busybox', 'tftp', '-g', '-r', remote_name, '-l', local_path]
        if blksize is not None:
            argv += ['-b', str(blksize)]
        argv += [host, port]
    return _run(client, argv, timeout_s, stdin_text)


def upload(client, host, port, local_path, remote_name, blksize=None,
           mode='octet', timeout_s=60):
    """Upload local_path to host:port as remote_name (a WRQ).

    All four clients can put.  curl and busybox send tsize with the WRQ
    (curl only when options are on, i.e. octet mode); atftp and tftp-hpa not.
    """
    _check(client, blksize=blksize, mode=mode, ipv6=':' in host, upload=True)
    local_path, port = os.fspath(local_path), str(port)
    stdin_text = None
    if client == 'atftp':
        opts = _atftp_options(blksize, None, False)
        if mode == 'octet':
            argv = ['atftp']
            for o in opts:
                argv += ['--option', o]
            argv += ['-p', '-l', local_path, '-r', remote_name, host, port]
        else:
            argv, stdin_text = _atftp_interactive(host, port, 'put', local_path,
                                                  remote_name, mode, opts)
    elif client == 'tftp-hpa':
        argv = ['tftp', '-6' if ':' in host else '-4', '-l', '-m', mode, host, port,
                '-c', 'put', local_path, remote_name]
    elif client == 'curl':
        argv = ['curl', '--silent', '--show-error', '--upload-file', local_path]
        if blksize is not None:
            argv += ['--tftp-blksize', str(blksize)]
        elif mode == 'netascii':
            argv += ['--tftp-no-options']
        argv.append(_curl_url(host, port, remote_name, mode))
    else:  # busybox
        argv = ['busybox', 'tftp', '-p', '-l', local_path, '-r', remote_name]
        if blksize is not None:
            argv += ['-b', str(blksize)]
        argv += [host, port]
    return _run(client, argv, timeout_s, stdin_text)
