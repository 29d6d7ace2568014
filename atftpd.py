#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""atftpd.py: a TFTP server in one file that can generate missing files on demand.

A drop-in replacement for atftpd 0.8 (same command line, same protocol choices
where clients depend on them), written for the Python standard library alone so
that it runs on OpenWrt's python3-light as well as on a PXE boot server.

Protocols: RFC 1350 (TFTP, octet and netascii, reads and writes), RFC 2347
(option negotiation), RFC 2348 (blksize), RFC 2349 (timeout, tsize) and
RFC 7440 (windowsize). Block numbers roll over past 65535, so any file size
works. RFC 2090 multicast and PXE MTFTP as atftpd does them (IPv4).

The content generator. When a read request names a file that does not exist
under the root, and --content-generator is set, the server opens an anonymous
temporary file and runs

    GENERATOR --file <root>/<requested name>

with that file on descriptor 3. Exit status 0 and at least one byte written:
the bytes are served (tsize is known). Anything else: "File not found". Facts
about the request are passed in TFTP_* environment variables, never in argv.

Design. One thread, one selector, an explicit table of transfers. Every
transfer has its own socket (its own TID), bound to the address the request
arrived on, and a deadline instead of a thread or a timer object. The event
loop waits only in select(): signals and child exits arrive through
signal.set_wakeup_fd, generators run as child processes whose exit wakes the
loop, files are read one block at a time.

A read transfer:

    GENERATING --(content ready)--> OACK_SENT --(ACK 0)--> SENDING
         |                 \\__(no options acknowledged)__/     |
         +--(generator failed: ERROR 1)             (final ACK) +--> DONE

Licence: GPL-2.0-or-later, like atftpd.
"""

import argparse
import errno
import grp
import itertools
import os
import pwd
import re
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import syslog
import time

__version__ = '0.1.0'

###############################################################################
# Protocol constants ##########################################################
###############################################################################

OP_RRQ, OP_WRQ, OP_DATA, OP_ACK, OP_ERROR, OP_OACK = 1, 2, 3, 4, 5, 6

ERR_UNDEFINED = 0       # RFC 1350
ERR_NOT_FOUND = 1       # RFC 1350
ERR_ACCESS = 2          # RFC 1350
ERR_DISK_FULL = 3       # RFC 1350
ERR_ILLEGAL_OP = 4      # RFC 1350
ERR_UNKNOWN_TID = 5     # RFC 1350
ERR_FILE_EXISTS = 6     # RFC 1350
ERR_NO_USER = 7         # RFC 1350
ERR_BAD_OPTION = 8      # RFC 2347

ERROR_TEXT = {
    ERR_UNDEFINED: 'Undefined error',
    ERR_NOT_FOUND: 'File not found',
    ERR_ACCESS: 'Access violation',
    ERR_DISK_FULL: 'Disk full or allocation exceeded',
    ERR_ILLEGAL_OP: 'Illegal TFTP operation',
    ERR_UNKNOWN_TID: 'Unknown transfer ID',
    ERR_FILE_EXISTS: 'File already exists',
    ERR_NO_USER: 'No such user',
    ERR_BAD_OPTION: 'Option negotiation failed',
}

DEFAULT_BLKSIZE = 512           # RFC 1350
MIN_BLKSIZE = 8                 # RFC 2348
MAX_BLKSIZE = 65464             # RFC 2348: 65535 - 20 (IP) - 8 (UDP) - 4 (TFTP)
MIN_TIMEOUT, MAX_TIMEOUT = 1, 255          # RFC 2349
MIN_WINDOWSIZE, MAX_WINDOWSIZE = 1, 65535  # RFC 7440
MAX_DATAGRAM = 65536
RETRIES = 5                     # atftpd's NB_OF_RETRY
# A client that has never answered may be a forged source: its transfer gets
# the first reply and one resend, on a timer no longer than --retry-timeout
# whatever timeout it asked for, so that it cannot hold a slot for long nor
# turn one datagram into many. Past UNVERIFIED_GRACE seconds such a transfer
# makes way for a new request when every slot is taken.
UNVERIFIED_RETRIES = 1
UNVERIFIED_GRACE = 1.0
# Errors that say the server is short of something, not that a file is
# missing or forbidden: such a request gets no answer, and its client asks again.
OUT_OF_DESCRIPTORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM}
OUT_OF_RESOURCES = OUT_OF_DESCRIPTORS | {errno.EAGAIN, errno.ENOSPC, errno.EDQUOT}
MAX_OPTION_DIGITS = 20          # longer numbers are garbage, not sizes
# A window is read with one pread and sent as one burst; the kernel queues it
# and a netascii source keeps it until it is acknowledged. Without a bound, a
# client asking for 64 blocks of 64 KiB would make that 4 MiB a transfer:
# more than a receive buffer holds, and too much for a router.
MAX_WINDOW_BYTES = 1 << 20

# tsize in netascii is the converted size, which means reading the file once
# to count line ends; above this size tsize is left out instead.
NETASCII_TSIZE_LIMIT = 1 << 20

HEADER = struct.Struct('!HH')   # opcode + block number (or error code)

# UDP GSO (Linux 4.18+): one sendmsg() carries a run of datagrams of one size,
# the last maybe shorter, and the kernel cuts them apart again; the wire sees
# the same datagrams. A large window then costs a few system calls, not one
# per block. Python's socket module does not name the option.
SOL_UDP = getattr(socket, 'SOL_UDP', 17)
UDP_SEGMENT = 103
GSO_MAX_SEGMENTS = 64           # the kernel's UDP_MAX_SEGMENTS (some allow 128)
GSO_MAX_BYTES = 65000           # a UDP datagram's 64 KiB, headers included
# The first datagrams of a window go one by one: a GSO batch reaches a client
# on the same host only when it is complete, and time the client spends
# waiting for the start of its window is lost. Measured on loopback with
# atftp (benchmarks/README.md, G): GSO for all of a window of 8 cost 6% of its
# throughput, GSO after the first 4 cost 4%, after the first 8 nothing; a
# window of 64 gains about 25%, with a third of the CPU.
GSO_AFTER = 8

###############################################################################
# Logging #####################################################################
###############################################################################

# Levels are syslog priorities, so atftpd's --verbose=N maps one to one.
LOG_ERR, LOG_WARNING, LOG_NOTICE, LOG_INFO, LOG_DEBUG = 3, 4, 5, 6, 7


def escape(text):
    """Make a string from the network safe to log: printable ASCII, no newlines."""
    if isinstance(text, bytes):
        text = text.decode('latin-1')
    out = ascii(text)[1:-1]
    return out if len(out) <= 256 else out[:256] + '...'


class Log:
    """A tiny logger: syslog, a file, or stdout ('-'). No `logging` module on
    python3-light, and atftpd's three sinks are all we need."""

    def __init__(self, level=LOG_NOTICE, logfile=None, trace=False):
        self.level = level
        self.trace = trace
        self.logfile = logfile
        self.stream = None
        self.host = socket.gethostname().split('.')[0]
        self.open()

    def open(self):
        """Open (or reopen, on SIGHUP) the sink. If a reopen fails (the file
        is no longer writable after the privilege drop), the old one stays."""
        if self.logfile == '-':
            self.stream = sys.stdout
        elif self.logfile:
            stream = open(self.logfile, 'a', buffering=1, errors='replace')
            self.close()
            self.stream = stream
        else:
            syslog.openlog('atftpd', syslog.LOG_PID, syslog.LOG_DAEMON)

    def give_to(self, uid):
        """Started as root, the server reopens its log on SIGHUP as --user:
        make that user the owner of the log file, so that logrotate's
        `create` (which copies owner and mode from the rotated file) makes
        a new file the server can open. Group and mode are kept."""
        if self.stream is None or self.stream is sys.stdout:
            return
        try:
            if stat.S_ISREG(os.fstat(self.stream.fileno()).st_mode):
                os.fchown(self.stream.fileno(), uid, -1)
        except OSError as exc:
            self.warning('cannot give the log to uid %d (SIGHUP may not reopen it): %s',
                         uid, exc.strerror)

    def close(self):
        if self.stream is not None and self.stream is not sys.stdout:
            self.stream.close()
        self.stream = None

    def log(self, level, fmt, *args):
        if level > self.level:
            return
        message = fmt % args if args else fmt
        if self.stream is None:
            syslog.syslog(level, message)
            return
        stamp = time.strftime('%b %d %H:%M:%S')
        try:
            self.stream.write('%s %s atftpd[%d]: %s\n' % (stamp, self.host, os.getpid(), message))
            self.stream.flush()
        except (OSError, ValueError):
            pass  # A full disk or a closed stdout must not stop the server.

    def error(self, fmt, *args):
        self.log(LOG_ERR, fmt, *args)

    def warning(self, fmt, *args):
        self.log(LOG_WARNING, fmt, *args)

    def notice(self, fmt, *args):
        self.log(LOG_NOTICE, fmt, *args)

    def info(self, fmt, *args):
        self.log(LOG_INFO, fmt, *args)

    def debug(self, fmt, *args):
        self.log(LOG_DEBUG, fmt, *args)

    def packet(self, fmt, *args):
        """Per-packet lines: only with --trace, whatever the level."""
        if self.trace:
            self.log(min(self.level, LOG_DEBUG), fmt, *args)


###############################################################################
# Packet codec ################################################################
###############################################################################

# On the wire (busybox's comment style):
#   RRQ   00 01 "pxelinux.0" 00 "octet" 00 "blksize" 00 "1428" 00 "tsize" 00 "0" 00
#   OACK  00 06 "blksize" 00 "1428" 00 "tsize" 00 "26758" 00
#   ACK   00 04 00 00                 (acknowledges the OACK)
#   DATA  00 03 00 01 <1428 bytes>    ... the last block is shorter, maybe empty
#   ERROR 00 05 00 01 "File not found" 00


class PacketError(Exception):
    """A malformed or unacceptable request: `code` and `message` go to the
    client in an ERROR, `reason` (default: the message) goes to the log."""

    def __init__(self, code, message, reason=None):
        Exception.__init__(self, message)
        self.code = code
        self.message = message
        self.reason = reason or message


class Request:
    """A parsed RRQ or WRQ. `options` keeps request order: [(name, value)],
    names lower-cased (RFC 2347: case-insensitive), values as sent."""

    __slots__ = ('opcode', 'filename', 'mode', 'options')

    def __init__(self, opcode, filename, mode, options):
        self.opcode = opcode
        self.filename = filename
        self.mode = mode
        self.options = options

    def __repr__(self):
        return 'Request(%r, %r, %r, %r)' % (self.opcode, self.filename, self.mode, self.options)


def parse_request(data):
    """Parse an RRQ/WRQ datagram into a Request, or raise PacketError.

    The file name and mode must each end in a NUL. Options are read in pairs
    while both strings are complete; an incomplete trailing pair is ignored,
    because real firmware pads requests (HP PA-RISC sends 516 bytes with
    trailing garbage, Apple OpenFirmware appends junk). Modes other than
    netascii and mail are served as octet, as atftpd does; an empty one is
    refused (a 5-byte request would otherwise buy a whole first block).
    """
    if len(data) < 2:
        raise PacketError(ERR_ILLEGAL_OP, 'Packet too short')
    opcode = data[0] << 8 | data[1]
    if opcode not in (OP_RRQ, OP_WRQ):
        raise PacketError(ERR_ILLEGAL_OP, 'Not a request')
    fields = data[2:].split(b'\0')
    if len(fields) < 3:                 # name, mode and what follows the mode's NUL
        raise PacketError(ERR_ILLEGAL_OP, 'Malformed request')
    filename = os.fsdecode(fields[0])
    if not filename:
        raise PacketError(ERR_ILLEGAL_OP, 'Empty file name')
    mode = fields[1].decode('latin-1').lower()
    if not mode:
        raise PacketError(ERR_ILLEGAL_OP, 'Empty mode')
    if mode == 'mail':
        raise PacketError(ERR_ILLEGAL_OP, 'Mail mode not supported')
    if mode != 'netascii':
        mode = 'octet'
    options = []
    pairs = fields[2:-1]                # the last field follows the final NUL
    for i in range(0, len(pairs) - 1, 2):
        name = pairs[i].decode('latin-1').lower()
        if not name:
            break                       # padding: a run of NULs
        options.append((name, pairs[i + 1].decode('latin-1')))
    return Request(opcode, filename, mode, options)


def parse_header(data):
    """Opcode and block number (or error code) of DATA/ACK/ERROR, or None."""
    if len(data) < 4:
        return None
    return HEADER.unpack_from(data)


def parse_error(data):
    """(code, message) of an ERROR datagram; the message is escaped for logs."""
    code = data[2] << 8 | data[3] if len(data) >= 4 else ERR_UNDEFINED
    return code, escape(data[4:].split(b'\0', 1)[0])


def encode_request(opcode, filename, mode='octet', options=()):
    """For tests and tools: an RRQ/WRQ datagram."""
    parts = [os.fsencode(filename), mode.encode()]
    for name, value in options:
        parts += [name.encode(), str(value).encode()]
    return struct.pack('!H', opcode) + b'\0'.join(parts) + b'\0'


def encode_data(block, payload):
    return HEADER.pack(OP_DATA, block & 0xFFFF) + payload


def encode_data_run(first_block, chunk, blksize, count):
    """`count` DATA datagrams for the blocks from `first_block` on, cut from
    `chunk` (the last one short, maybe empty, when `chunk` ends)."""
    return [encode_data(first_block + i, chunk[i * blksize:(i + 1) * blksize])
            for i in range(count)]


def encode_ack(block):
    return HEADER.pack(OP_ACK, block & 0xFFFF)


def encode_oack(options):
    body = b''.join(name.encode() + b'\0' + str(value).encode() + b'\0'
                    for name, value in options)
    return struct.pack('!H', OP_OACK) + body


def encode_error(code, message=None):
    if message is None:
        message = ERROR_TEXT.get(code, ERROR_TEXT[ERR_UNDEFINED])
    text = message.encode('ascii', 'replace')[:200]   # stay far below 512 bytes
    return HEADER.pack(OP_ERROR, code) + text + b'\0'


def unwrap_block(wire, last):
    """Map a 16-bit block number from the wire to the internal counter: the
    largest number <= `last` whose low 16 bits are `wire`. Windows are below
    65536 blocks, so this is unambiguous for any ACK of a block in flight."""
    return last - ((last - wire) & 0xFFFF)


###############################################################################
# Option negotiation ##########################################################
###############################################################################

class Limits:
    """What the server allows; set from the command line."""

    __slots__ = ('blksize', 'timeout', 'tsize', 'windowsize', 'max_blksize', 'max_windowsize')

    def __init__(self, blksize=True, timeout=True, tsize=True, windowsize=True,
                 max_blksize=MAX_BLKSIZE, max_windowsize=64):
        self.blksize = blksize
        self.timeout = timeout
        self.tsize = tsize
        self.windowsize = windowsize
        self.max_blksize = max_blksize
        self.max_windowsize = max_windowsize


class Negotiated:
    """The effective transfer parameters after negotiation."""

    __slots__ = ('blksize', 'timeout', 'windowsize', 'tsize', 'acked')

    def __init__(self):
        self.blksize = DEFAULT_BLKSIZE
        self.timeout = None             # None: the server's --retry-timeout
        self.windowsize = 1
        self.tsize = None               # WRQ: the size the client announced
        self.acked = []                 # [(name, value)] for the OACK, request order


def _option_number(value, low):
    """An option value as int if it is a plain decimal >= low, else None."""
    value = value.strip()
    if not value.isascii() or not value.isdigit() or len(value) > MAX_OPTION_DIGITS:
        return None
    number = int(value)
    return number if number >= low else None


def negotiate_options(options, is_read, size, limits):
    """Decide the OACK for a request. Pure: no sockets, no clock.

    Policy (documented in the README): values that RFC 2348 and RFC 7440 let a
    server lower (blksize, windowsize) are clamped to the configured maximum;
    values that are invalid (blksize < 8, timeout outside 1..255, windowsize 0,
    not a number) are left out of the OACK and the default applies. The server
    never answers ERROR 8, so no client is refused over an option. Unknown
    options are ignored, repeated options count once (the first), tsize is
    acknowledged only when requested and only when the size is known.
    """
    result = Negotiated()
    seen = set()
    for name, value in options:
        if name in seen:
            continue
        seen.add(name)
        if name == 'blksize' and limits.blksize:
            number = _option_number(value, MIN_BLKSIZE)       # RFC 2348
            if number is not None:
                result.blksize = min(number, limits.max_blksize, MAX_BLKSIZE)
                result.acked.append((name, result.blksize))
        elif name == 'timeout' and limits.timeout:
            number = _option_number(value, MIN_TIMEOUT)       # RFC 2349
            if number is not None and number <= MAX_TIMEOUT:
                result.timeout = number
                result.acked.append((name, number))
        elif name == 'tsize' and limits.tsize:
            number = _option_number(value, 0)                 # RFC 2349
            if number is None:
                continue
            if not is_read:
                result.tsize = number
                result.acked.append((name, number))
            elif size:
                # Known and not zero: curl rejects an OACK saying "tsize 0",
                # so an empty file is sent without it.
                result.acked.append((name, size))
        elif name == 'windowsize' and limits.windowsize:
            number = _option_number(value, MIN_WINDOWSIZE)    # RFC 7440
            if number is not None and number <= MAX_WINDOWSIZE:
                result.windowsize = min(number, limits.max_windowsize)
                result.acked.append((name, result.windowsize))
    fit_window(result)
    return result


def fit_window(result):
    """Shrink the windowsize until the window fits MAX_WINDOW_BYTES. RFC 7440
    lets the server answer a smaller windowsize than asked for; blksize may
    come after windowsize in a request, so this runs once both are known."""
    fit = max(1, MAX_WINDOW_BYTES // result.blksize)
    if result.windowsize > fit:
        result.windowsize = fit
        result.acked = [(name, fit if name == 'windowsize' else value)
                        for name, value in result.acked]


###############################################################################
# Netascii ####################################################################
###############################################################################

def netascii_encode(chunk):
    """Local text to netascii: LF -> CR LF, CR -> CR NUL (RFC 764). Each byte
    maps on its own, so chunks can be encoded independently."""
    return chunk.replace(b'\r', b'\r\0').replace(b'\n', b'\r\n')


class NetasciiDecoder:
    """Netascii to local text: CR LF -> LF, CR NUL -> CR. A CR at the end of
    one block is held until the next block shows what follows it."""

    __slots__ = ('pending_cr',)

    def __init__(self):
        self.pending_cr = False

    def decode(self, chunk, final=False):
        if self.pending_cr:
            chunk = b'\r' + chunk
        self.pending_cr = chunk.endswith(b'\r') and not final
        if self.pending_cr:
            chunk = chunk[:-1]
        return chunk.replace(b'\r\n', b'\n').replace(b'\r\0', b'\r')


###############################################################################
# Paths #######################################################################
###############################################################################

def resolve_path(root, name):
    """The file a request names, as a path under `root`, or PacketError.

    `root` is an absolute path without a trailing slash. Backslashes (Windows
    and UEFI clients) count as slashes. A name that already starts with the
    root is taken as that absolute path, as atftpd and dnsmasq do; any other
    leading slash is dropped, so "/pxelinux.0" is "<root>/pxelinux.0". Empty
    and "." components are dropped; a ".." component anywhere is refused.
    Symlinks are checked by check_inside_root() once the file is found.
    """
    name = name.replace('\\', '/')
    if name == root or name.startswith(root + '/'):
        name = name[len(root):]
    parts = []
    for part in name.split('/'):
        if part == '..':
            raise PacketError(ERR_ACCESS, 'Access violation', 'outside the root')
        if part and part != '.':
            parts.append(part)
    if not parts:
        raise PacketError(ERR_ACCESS, 'Access violation', 'the root itself')
    return root + '/' + '/'.join(parts)


CASE_SCAN_LIMIT = 10000          # directory entries read per component, at most


def case_insensitive_path(root, path):
    """`path` (under `root`, from resolve_path) with each missing component
    replaced by the one entry of its directory that matches it ignoring
    case: WDS and some UEFI menus ask \\Boot\\BCD for boot/bcd. None if a
    component has no match; PacketError if it has several (which file was
    meant cannot be known) or the directory is too large to scan."""
    current = root
    for part in path[len(root) + 1:].split('/'):
        candidate = current + '/' + part
        if not os.path.lexists(candidate):
            try:
                with os.scandir(current) as entries:
                    names = [e.name for e in itertools.islice(entries, CASE_SCAN_LIMIT + 1)]
            except OSError:
                return None
            if len(names) > CASE_SCAN_LIMIT:
                raise PacketError(ERR_NOT_FOUND, None, 'too many entries for a case-insensitive '
                                  'match in %s' % current)
            matches = [name for name in names if name.lower() == part.lower()]
            if len(matches) > 1:
                raise PacketError(ERR_NOT_FOUND, None, 'ambiguous case-insensitive match: %s'
                                  % ', '.join(sorted(matches)))
            if not matches:
                return None
            candidate = current + '/' + matches[0]
        current = candidate
    return current


def client_mac(address, arp='/proc/net/arp'):
    """The MAC address of an IPv4 client on a local link, spelled as dnsmasq
    does for tftp-unique-root (01-02-03-04-aa-bb), from the ARP table; None
    if it is not there (IPv6, a routed client, no such table)."""
    host = plain_peer((address, 0))[0]
    try:
        with open(arp) as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 4 and fields[0] == host and fields[2] != '0x0':
            return fields[3].lower().replace(':', '-')
    return None


def check_inside_root(root_real, path):
    """Refuse a path whose symlinks lead out of the root (ERROR 2). Links that
    stay inside the root are followed."""
    real = os.path.realpath(path)
    if real != root_real and not real.startswith(root_real.rstrip('/') + '/'):
        raise PacketError(ERR_ACCESS, 'Access violation', 'outside the root')


###############################################################################
# Name substitution (--pcre) ##################################################
###############################################################################

class Substitutions:
    """atftpd's --pcre file: one `pattern replacement` pair a line. When a
    requested file cannot be found, the first pattern that matches the name
    as the client sent it has its match (the first one, as Perl's s///
    without /g) replaced; the new name is checked against the root again and
    opened, and only if that fails too is the content generator asked, with
    the substituted name.

    atftpd's files work as they are: PCRE's `$1`, `${1}` and `$0` in the
    replacement, and `(?<name>...)` in the pattern, are translated to Python's
    re. Beyond atftpd: blank lines and lines starting with '#' are skipped,
    and a bad line is reported with its number (atftpd drops the whole file).
    """

    def __init__(self, rules, path=None):
        self.rules = rules          # [(compiled pattern, re replacement template)]
        self.path = path

    @classmethod
    def load(cls, path):
        """Read a pattern file; ValueError('FILE:N: why') for a bad line."""
        rules = []
        with open(path, encoding='utf-8', errors='surrogateescape') as f:
            for number, line in enumerate(f, 1):
                fields = line.split()
                if not fields or fields[0].startswith('#'):
                    continue
                if len(fields) != 2:
                    raise ValueError('%s:%d: expected "pattern replacement"' % (path, number))
                try:
                    pattern = re.compile(re.sub(r'\(\?<(?=[A-Za-z_])', '(?P<', fields[0]))
                    template = pcre_replacement(fields[1])
                    pattern.sub(template, '')       # refers to groups that exist?
                except (re.error, IndexError) as exc:
                    raise ValueError('%s:%d: %s' % (path, number, exc))
                rules.append((pattern, template))
        return cls(rules, path)

    def apply(self, name):
        """The substituted name, or None when no pattern matches."""
        for pattern, template in self.rules:
            try:
                new, count = pattern.subn(template, name, count=1)
            except (re.error, IndexError):
                continue            # a group that did not take part in the match
            if count:
                return new
        return None


def pcre_replacement(text):
    """A PCRE2 substitution string as a template for Python's re.sub:
    $N and ${N} are groups, $$ is a dollar, a backslash is literal."""
    out = []
    i = 0
    while i < len(text):
        char = text[i]
        match = re.match(r'\$(?:(\d+)|\{(\w+)\})', text[i:])
        if match:
            out.append('\\g<%s>' % (match.group(1) or match.group(2)))
            i += match.end()
            continue
        if text.startswith('$$', i):
            out.append('$')
            i += 2
            continue
        out.append('\\\\' if char == '\\' else char)
        i += 1
    return ''.join(out)


###############################################################################
# Content sources #############################################################
###############################################################################

class FileSource:
    """Bytes to send, read where they lie with pread(): no file position, so
    one open descriptor can serve many transfers, and a resend reads its
    blocks again rather than keeping them. Memory does not grow with the file."""

    __slots__ = ('fd', 'size')

    def __init__(self, fd, size):
        self.fd = fd
        self.size = size

    def read_at(self, offset, count):
        return os.pread(self.fd, count, offset)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class NetasciiSource:
    """A FileSource seen through netascii_encode; `size` is the converted size
    when it was cheap to count, else None (then tsize is not offered).

    Converted offsets do not map to file offsets, so this source reads the
    file in order and keeps the converted bytes from the last offset asked
    for: a transfer asks again only from the block after the last ACK."""

    __slots__ = ('raw', 'raw_offset', 'size', 'buffer', 'buffer_offset')

    def __init__(self, raw):
        self.raw = raw
        self.raw_offset = 0
        self.buffer = b''
        self.buffer_offset = 0      # where self.buffer lies in the converted stream
        self.size = None
        if raw.size <= NETASCII_TSIZE_LIMIT:
            text = os.pread(raw.fd, raw.size, 0)
            self.size = len(text) + text.count(b'\n') + text.count(b'\r')

    def read_at(self, offset, count):
        """Converted bytes from `offset`, which is never before the last one."""
        self.buffer = self.buffer[offset - self.buffer_offset:]
        self.buffer_offset = offset
        while len(self.buffer) < count:
            chunk = self.raw.read_at(self.raw_offset, max(count, 4096))
            if not chunk:
                break
            self.raw_offset += len(chunk)
            self.buffer += netascii_encode(chunk)
        return self.buffer[:count]

    def close(self):
        self.raw.close()


# Temporary files. tempfile.mkstemp and TemporaryFile do what these two do,
# but importing tempfile pulls in shutil, random, bz2 and lzma: 0.9 MiB of
# resident memory (measured, benchmarks/README.md) for two system calls.

_temp_names = itertools.count(1)


def create_private_file(directory, prefix, suffix):
    """Create a new file under an unused name, mode 0600; return (fd, path).
    O_EXCL and O_NOFOLLOW make a planted file or symlink fail the open
    rather than be written through. The name need not be secret, only
    unused, so it comes from the clock and a counter: os.urandom could
    block a router's only thread at boot, before the entropy pool is ready."""
    flags = (os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, 'O_NOFOLLOW', 0)
             | getattr(os, 'O_CLOEXEC', 0))
    for _ in range(100):
        path = os.path.join(directory, '%s%x%x%s' % (
            prefix, time.time_ns() & 0xFFFFFFFF, next(_temp_names), suffix))
        try:
            return os.open(path, flags, 0o600), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, 'no unused temporary name', directory)


def open_anonymous_file(directory):
    """A read-write file with no name, freed when its last descriptor closes:
    O_TMPFILE where the filesystem has it (tmpfs, ext4), else a private file
    unlinked at once (jffs2, or a kernel before 3.11)."""
    if getattr(os, 'O_TMPFILE', 0):
        try:
            return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError:
            pass                # the fallback reports a real error
    fd, path = create_private_file(directory, '.atftpd-', '.tmp')
    os.unlink(path)
    return fd


def open_source(path, root_real, require_world_readable):
    """Open a file to serve. Returns a FileSource, None if it does not exist,
    or raises PacketError. Open first, then fstat the descriptor: no
    stat-then-open race, and O_NONBLOCK so a FIFO cannot hang the loop."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, 'O_CLOEXEC', 0))
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        if exc.errno == errno.EACCES:
            raise PacketError(ERR_ACCESS, 'Access violation', 'permission denied')
        if exc.errno in OUT_OF_DESCRIPTORS:
            raise PacketError(None, None, 'dropped, the client may ask again: %s'
                              % os.strerror(exc.errno))
        raise PacketError(ERR_UNDEFINED, os.strerror(exc.errno))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PacketError(ERR_ACCESS, 'Access violation', 'not a regular file')
        if require_world_readable and not info.st_mode & stat.S_IROTH:
            raise PacketError(ERR_ACCESS, 'Access violation',
                              'not world-readable (running as root; see --permissive)')
        check_inside_root(root_real, path)
    except BaseException:
        os.close(fd)
        raise
    return FileSource(fd, info.st_size)


###############################################################################
# Transfers ###################################################################
###############################################################################

# Transfer states.
GENERATING, WAITING, OACK_SENT, SENDING, RECEIVING, DALLYING, DONE = (
    'generating', 'waiting', 'oack-sent', 'sending', 'receiving', 'dallying', 'done')


class Transfer:
    """What read and write transfers share: the socket (the server's TID for
    this client), the deadline, the retry count, the single way out (finish).

    Handlers update state and send at once; on_timeout() resends the saved
    datagrams verbatim. A packet from any other address or port gets ERROR 5
    and changes nothing (RFC 1350 section 4)."""

    __slots__ = ('server', 'sock', 'peer', 'local', 'request', 'path', 'state', 'params',
                 'timeout', 'deadline', 'retries', 'started', 'bytes', 'blocks_resent',
                 'last_sent', 'outcome', 'quiet', 'confirmed')

    def __init__(self, server, peer, local, request, path):
        self.server = server
        self.sock = None
        self.peer = peer
        self.local = local
        self.request = request
        self.path = path
        self.state = WAITING
        self.params = Negotiated()
        self.timeout = server.config.retry_timeout
        self.deadline = None
        self.retries = 0
        self.started = time.monotonic()
        self.bytes = 0
        self.blocks_resent = 0
        self.last_sent = ()
        self.outcome = None
        self.quiet = False
        self.confirmed = False      # the client has answered our first reply

    # -- sending and timing --

    def send(self, datagram):
        try:
            self.sock.sendto(datagram, self.peer)
            return True
        except (BlockingIOError, InterruptedError):
            return False        # Like a lost packet: the timer or the peer recovers.
        except OSError as exc:
            self.server.log.debug('%s: send failed: %s', self.client_text(), exc)
            return False

    def send_saved(self, datagrams, now):
        """Send and remember datagrams for a verbatim resend on timeout."""
        self.last_sent = datagrams
        for datagram in datagrams:
            if not self.send(datagram):
                break
        self.arm(now)

    def arm(self, now):
        seconds = self.params.timeout or self.timeout
        if not self.confirmed:
            seconds = min(seconds, self.timeout)
        self.deadline = now + seconds
        self.server.note_deadline(self.deadline)

    def on_timeout(self, now):
        if self.retries >= (RETRIES if self.confirmed else UNVERIFIED_RETRIES):
            self.on_gave_up()
            return
        self.retries += 1
        self.resend(now)

    def resend(self, now):
        """The peer did not answer in time: send the saved datagrams again."""
        self.count_resend(len(self.last_sent), 'timeout')
        self.send_saved(self.last_sent, now)

    def count_resend(self, datagrams, reason):
        self.blocks_resent += datagrams
        self.server.log.packet('%s: %s, resending %d datagram(s)', self.client_text(),
                               reason, datagrams)

    def on_gave_up(self):
        if self.confirmed:
            self.finish('timeout', ERR_UNDEFINED, 'Timeout')
        else:
            # No ERROR: a forged source gets nothing more, and a real client
            # that lost both replies asks again and is served.
            self.finish('timeout (no answer from the client)')

    def on_repeated_request(self):
        """The client sent its request again while this transfer runs."""
        self.server.log.packet('%s: duplicate request ignored', self.client_text())

    def confirm(self):
        """The client answered: ACK of the OACK or of a block (read), a DATA
        block (write). From now on a request from its port is a new client."""
        if not self.confirmed:
            self.confirmed = True
            self.server.on_confirmed(self)

    def prepare_socket(self, sock):
        """Set socket options before the first send (MTFTP's multicast TTL)."""

    def open_socket(self):
        """This transfer's socket (its TID). Without one (EMFILE in a storm,
        an exhausted --port-range) the request ends with no ERROR, which
        clients take as final: unanswered, the client asks again."""
        self.sock = self.server.open_transfer_socket(self)
        if self.sock is None:
            self.finish('dropped: no socket, the client may ask again')
        return self.sock is not None

    # -- receiving --

    # A receiver gets a window of DATA per wakeup and drains them together.
    # A sender gets one ACK per window: a second recvfrom() would nearly
    # always fail with EAGAIN, a syscall and an exception per ACK. The
    # selector is level-triggered, so anything left queued wakes us again.
    datagrams_per_wakeup = 64

    def on_readable(self):
        """Read what is queued on the transfer socket, up to a bound."""
        for index in range(self.datagrams_per_wakeup):
            if self.sock is None:
                return
            try:
                data, addr = self.sock.recvfrom(self.recv_size())
            except (BlockingIOError, InterruptedError):
                if index == 0:
                    self.on_icmp_errors()       # woken by the error queue alone
                return
            except OSError:
                self.on_icmp_errors()           # ECONNREFUSED and the like
                return
            if addr[:2] != self.peer[:2]:
                self.on_stranger(data, addr)
                continue
            self.on_datagram(data, time.monotonic())

    def on_icmp_errors(self):
        """Read the ICMP errors IP_RECVERR queued (unread, they would wake the
        loop for ever). Port or host unreachable from a client that has never
        answered ends its transfer at once: a forged source, or a client gone.
        From a client that answers, an ICMP error is easy to forge and proves
        nothing; errors about strangers (our ERROR 5 replies) are ignored."""
        for _ in range(16):
            try:
                addr = self.sock.recvmsg(1, 1024, MSG_ERRQUEUE)[3]
            except OSError:
                return
            if not self.confirmed and addr and addr[:2] == self.peer[:2]:
                self.finish('client unreachable (ICMP error)')
                return

    def on_stranger(self, data, addr):
        """RFC 1350 section 4: answer ERROR 5, leave the transfer alone."""
        self.server.log.info('%s: packet from unknown TID %s', self.client_text(),
                             format_addr(addr))
        if parse_header(data) is None or data[1] != OP_ERROR:
            try:
                self.sock.sendto(encode_error(ERR_UNKNOWN_TID), addr)
            except OSError:
                pass

    def on_client_error(self, data):
        if self.state == DALLYING:
            self.finish('received')     # the file is in place; the client is done
            return
        code, message = parse_error(data)
        # The UEFI size probe: RRQ with tsize, our OACK, then the client's
        # ERROR 8 (or 0) and a new RRQ for the real transfer. Not a failure.
        if self.state == OACK_SENT:
            self.quiet = True
            self.finish('options declined by client (%d: %s)' % (code, message))
        else:
            self.finish('aborted by client (%d: %s)' % (code, message))

    # -- ending --

    def finish(self, outcome, error_code=None, error_text=None):
        """The one way out: at most one ERROR to the client, sockets and files
        closed, one log line, the slot freed for a waiting request."""
        if self.state == DONE:
            return
        self.state = DONE
        self.outcome = outcome
        # Files first, then the ERROR: a client that acts on it at once finds
        # a failed upload's temporary file already gone.
        self.release()
        if error_code is not None:
            if self.sock is not None:
                self.send(encode_error(error_code, error_text))
            else:
                self.server.answer_error(self.peer, error_code, error_text, self.local)
        if self.sock is not None:
            self.server.forget_socket(self.sock)
            self.sock.close()
            self.sock = None
        self.server.on_transfer_done(self)

    def release(self):
        """Close what the subclass holds (files, temporary files)."""

    def client_text(self):
        return format_addr(self.peer)

    def log_negotiation(self):
        log = self.server.log
        if log.level >= LOG_DEBUG:
            log.debug('%s: %s %s mode %s, options %s, acknowledged %s, from %s',
                      self.client_text(), 'RRQ' if self.request.opcode == OP_RRQ else 'WRQ',
                      escape(self.request.filename), self.request.mode,
                      escape(str(self.request.options)), self.params.acked,
                      format_addr(self.sock.getsockname()))

    def recv_size(self):
        # Read transfers only receive ACKs and ERRORs. Asking for 64 KiB per
        # datagram would cost an allocation that large per ACK.
        return 1024

    def summary(self):
        seconds = time.monotonic() - self.started
        text = '%d bytes in %.3f s, blksize %d, windowsize %d' % (
            self.bytes, seconds, self.params.blksize, self.params.windowsize)
        if self.blocks_resent:
            text += ', %d blocks resent' % self.blocks_resent
        return text


class ReadTransfer(Transfer):
    """An RRQ: the server sends DATA, the client ACKs.

    The window is the `in_flight` blocks sent and not yet acknowledged,
    numbered from `acked + 1`. Their bytes are not kept: a resend reads them
    again with one pread, so a transfer that waits for an ACK holds no data
    (a PXE storm is thousands of such waits). `final` is the number of the
    last block once a read has reached the end of the file.

    An ACK for the last block in flight moves the window on; an ACK for an
    earlier block means the client lost the rest (RFC 7440 section 4), so
    the window restarts after it at once. In lock-step a
    duplicate ACK (for a block already acknowledged) is ignored: resending on
    it would start the Sorcerer's Apprentice cycle (RFC 1123 4.2.3.1). With a
    window, a repeated ACK of the previous window's end means the first block
    of this window was lost (RFC 7440 section 4): the window is resent at
    once, but only once until the client makes progress again, so a stream of
    duplicated ACKs cannot multiply the traffic."""

    __slots__ = ('source', 'in_flight', 'acked', 'final', 'generation', 'restarted', 'gso',
                 'generated')
    datagrams_per_wakeup = 1

    def __init__(self, server, peer, local, request, path):
        Transfer.__init__(self, server, peer, local, request, path)
        self.source = None
        self.in_flight = 0
        self.acked = 0
        self.final = None
        self.generation = None
        self.restarted = False      # the window was resent on a repeated ACK
        self.gso = server.config.gso    # until the kernel refuses a GSO send
        self.generated = False      # the content came from the generator

    def begin(self, source, now):
        """Content is ready: negotiate options, send the OACK or block 1."""
        if self.request.mode == 'netascii':
            source = NetasciiSource(source)
        self.source = source
        self.params = negotiate_options(self.request.options, True, source.size,
                                        self.server.limits)
        if not self.open_socket():
            return
        self.log_negotiation()
        if self.params.acked:
            self.state = OACK_SENT
            self.send_saved([encode_oack(self.params.acked)], now)
        else:
            self.state = SENDING
            self.send_window(now)

    def send_window(self, now):
        """Send the window: up to windowsize blocks after the last ACK, read
        with one pread. A short read is the end of the file: its last block
        is short, maybe empty.

        A window of 2..GSO_AFTER blocks first reads and sends its first block
        alone: the client, the slower side, starts on it while the server
        reads and cuts the others (ws 8 gained 7-10%). A larger window does
        not: there the client sat idle after the first block while the rest
        was read (ws 16 lost 5%; benchmarks/README.md, H)."""
        blksize = self.params.blksize
        windowsize = self.params.windowsize
        offset = self.acked * blksize
        early = 0
        if 1 < windowsize <= GSO_AFTER:
            head = self.source.read_at(offset, blksize)
            if len(head) == blksize and self.send(encode_data(self.acked + 1, head)):
                early = 1
        chunk = self.source.read_at(offset, windowsize * blksize)
        self.bytes = max(self.bytes, offset + len(chunk))
        blocks = len(chunk) // blksize
        if blocks < windowsize and self.source.size and offset + len(chunk) < self.source.size:
            # Truncated under us: a short last block would pass for the
            # whole file (and contradict the tsize we told the client).
            self.finish('file shrank while being sent (%d of %d bytes)'
                        % (offset + len(chunk), self.source.size), ERR_UNDEFINED, 'File changed')
            return
        if blocks < windowsize:
            blocks += 1
            self.final = self.acked + blocks
        else:
            self.final = None       # the file may have grown since a resend
        self.in_flight = blocks
        if self.server.log.trace:
            self.server.log.packet('%s: sending blocks %d..%d', self.client_text(),
                                   self.acked + 1, self.acked + blocks)
        self.send_blocks(self.acked + 1, chunk, blocks, early)
        self.arm(now)

    def send_blocks(self, first, chunk, count, done):
        """Send blocks `done`..`count - 1` of `chunk`, numbered from `first`:
        up to GSO_AFTER one by one, each as soon as it is cut, then GSO
        batches. A failed send stops the window, as a lost datagram would."""
        blksize = self.params.blksize
        per_call = min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // (blksize + 4))
        alone = min(count, GSO_AFTER) if self.gso and per_call > 1 else count
        for i in range(done, alone):
            if not self.send(encode_data(first + i, chunk[i * blksize:(i + 1) * blksize])):
                return
        if alone == count:
            return
        view = memoryview(chunk)
        for start in range(alone, count, per_call):
            batch = encode_data_run(first + start, view[start * blksize:], blksize,
                                    min(per_call, count - start))
            if not self.send_gso(batch):
                return

    def send_gso(self, datagrams):
        """Send datagrams of one size (the last may be shorter) with one
        sendmsg(). Where the kernel refuses GSO (before Linux 4.18, a block
        above the path MTU, IPsec, no checksum offload) they go one by one,
        and so does the rest of this transfer."""
        if self.gso:
            size = len(datagrams[0])
            try:
                self.sock.sendmsg([b''.join(datagrams)],
                                  [(SOL_UDP, UDP_SEGMENT, size.to_bytes(2, sys.byteorder))],
                                  0, self.peer)
                return True
            except (BlockingIOError, InterruptedError):
                return False            # Like a lost window: the timer or the peer recovers.
            except OSError as exc:
                self.gso = False
                self.server.log.debug('%s: no GSO, sending block by block: %s',
                                      self.client_text(), exc)
        return all(self.send(datagram) for datagram in datagrams)

    def resend(self, now):
        if self.state != SENDING:
            Transfer.resend(self, now)      # the OACK
            return
        self.count_resend(self.in_flight, 'timeout')
        self.send_window(now)

    def on_datagram(self, data, now):
        header = parse_header(data)
        if header is None:
            return                      # Too short to mean anything: drop it.
        opcode, number = header
        if opcode == OP_ACK:
            self.on_ack(number, now)
        elif opcode == OP_ERROR:
            self.on_client_error(data)

    def on_ack(self, wire_block, now):
        if self.state == OACK_SENT:
            if wire_block == 0:
                self.state = SENDING
                self.retries = 0
                self.confirm()
                self.send_window(now)
            return
        if self.state != SENDING:
            return
        block = unwrap_block(wire_block, self.acked + self.in_flight)
        if block < self.acked:
            return                      # Stale: no resend.
        if block == self.acked:
            if self.params.windowsize > 1 and not self.restarted and self.in_flight:
                self.restarted = True
                self.count_resend(self.in_flight, 'repeated ACK')
                self.send_window(now)
            return                      # Lock-step duplicate: no resend (SAS).
        self.acked = block
        self.retries = 0
        self.restarted = False
        self.confirm()
        if block == self.final:
            self.finish('sent')
            return
        self.send_window(now)

    def on_gave_up(self):
        # Some clients never send the last ACK (dnsmasq's comment says the
        # same): when only the final block is unacknowledged, call it sent.
        if self.state == SENDING and self.final == self.acked + 1:
            self.finish('sent (final ACK not received)')
        else:
            Transfer.on_gave_up(self)

    def summary(self):
        return Transfer.summary(self) + (', generated' if self.generated else '')

    def release(self):
        if self.source is not None:
            self.source.close()
            self.source = None
        if self.generation is not None:
            # Others may wait for the same run; it goes on and fills the cache.
            if self in self.generation.transfers:
                self.generation.transfers.remove(self)
            self.generation = None


class WriteTransfer(Transfer):
    """A WRQ: the client sends DATA, the server ACKs. The data goes to a hidden
    temporary file beside the target, renamed over it only when the last block
    has arrived, so a failed upload never leaves a partial file under the
    final name."""

    __slots__ = ('fd', 'temp_path', 'received', 'decoder', 'gap_acked', 'final_mode',
                 'last_acked')

    def __init__(self, server, peer, local, request, path, final_mode):
        Transfer.__init__(self, server, peer, local, request, path)
        self.fd = -1
        self.temp_path = None
        self.received = 0
        self.decoder = NetasciiDecoder() if request.mode == 'netascii' else None
        self.gap_acked = False
        self.final_mode = final_mode
        self.last_acked = 0         # windows are counted from the last ACK sent

    def begin(self, now):
        directory, base = os.path.split(self.path)
        try:
            # The name is cut so that a 255-byte name still leaves room.
            self.fd, self.temp_path = create_private_file(directory, '.%s.' % base[:64],
                                                          '.part')
        except OSError as exc:
            if exc.errno in OUT_OF_DESCRIPTORS:
                self.finish('dropped: cannot create temporary file: %s' % exc.strerror)
                return
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)    # blocks or inodes
            self.server.refuse(self, ERR_DISK_FULL if full else ERR_ACCESS,
                               'cannot create temporary file: %s' % exc)
            return
        self.params = negotiate_options(self.request.options, False, None, self.server.limits)
        if not self.open_socket():
            return
        self.log_negotiation()
        self.state = RECEIVING
        first = encode_oack(self.params.acked) if self.params.acked else encode_ack(0)
        self.send_saved([first], now)

    def recv_size(self):
        return self.params.blksize + 4

    def on_datagram(self, data, now):
        header = parse_header(data)
        if header is None:
            return
        opcode, number = header
        if opcode == OP_DATA:
            self.on_data(number, data, now)
        elif opcode == OP_ERROR:
            self.on_client_error(data)

    def on_data(self, wire_block, data, now):
        expected = (self.received + 1) & 0xFFFF
        if self.state == DALLYING:
            if wire_block == self.received & 0xFFFF:
                self.send(encode_ack(self.received))    # our last ACK was lost
            return
        if self.state != RECEIVING:
            return
        if wire_block != expected:
            # A duplicate (our ACK was lost) or a gap (a block was lost): ACK
            # the last block received in order, once until progress resumes.
            if not self.gap_acked:
                self.gap_acked = True
                self.ack(now)
            return
        payload = data[4:]
        final = len(payload) < self.params.blksize
        if not self.write(payload, final):
            return
        self.received += 1
        self.retries = 0
        self.gap_acked = False
        self.confirm()
        if final:
            self.complete(now)
        elif self.received - self.last_acked >= self.params.windowsize:
            self.ack(now)
        else:
            self.arm(now)

    def ack(self, now):
        self.last_acked = self.received
        self.send_saved([encode_ack(self.received)], now)

    def write(self, payload, final):
        if self.decoder is not None:
            payload = self.decoder.decode(payload, final)
        try:
            while payload:
                written = os.write(self.fd, payload)
                payload = payload[written:]
        except OSError as exc:
            code = ERR_DISK_FULL if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) \
                else ERR_ACCESS
            self.finish('write failed: %s' % os.strerror(exc.errno), code)
            return False
        return True

    def complete(self, now):
        """Last block: put the file in place, ACK, then dally in case that ACK
        is lost and the client sends the last block again."""
        try:
            self.bytes = os.fstat(self.fd).st_size
            if (self.params.tsize is not None and self.decoder is None
                    and self.bytes != self.params.tsize):
                self.finish('size %d differs from tsize %d' % (self.bytes, self.params.tsize),
                            ERR_UNDEFINED, 'Size differs from tsize')
                return
            os.fchmod(self.fd, self.final_mode)
            os.close(self.fd)
            self.fd = -1
            os.replace(self.temp_path, self.path)
            self.temp_path = None
        except OSError as exc:
            self.finish('could not store file: %s' % os.strerror(exc.errno), ERR_ACCESS)
            return
        self.send(encode_ack(self.received))
        self.state = DALLYING
        self.last_sent = []
        self.outcome = 'received'
        self.arm(now)

    def on_timeout(self, now):
        if self.state == DALLYING:
            self.finish('received')
            return
        if self.received:
            self.last_sent = [encode_ack(self.received)]   # the latest, not the last sent
        Transfer.on_timeout(self, now)

    def release(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.temp_path is not None:
            try:
                os.unlink(self.temp_path)
            except OSError:
                pass
            self.temp_path = None


def describe_traceback(tb):
    """Where an exception was raised, innermost frame last. Not the traceback
    module: importing it after the privileges are dropped can fail (an
    interpreter whose library only root can read), and an error report
    must not raise."""
    frames = []
    while tb is not None:
        code = tb.tb_frame.f_code
        frames.append('%s:%d %s()' % (os.path.basename(code.co_filename), tb.tb_lineno,
                                      code.co_name))
        tb = tb.tb_next
    return ' > '.join(frames)


def format_addr(addr):
    host, port = addr[0], addr[1]
    return '[%s]:%d' % (host, port) if ':' in host else '%s:%d' % (host, port)


###############################################################################
# Content generator ###########################################################
###############################################################################

class Generation:
    """One run of the content generator for one missing file.

    The child gets an anonymous temporary file as descriptor 3 and
    /dev/null as stdin; stdout and stderr come back through one pipe that
    the event loop reads (bounded) into the log. It runs in its own session
    so the whole process group can be killed. The loop learns of its exit
    through SIGCHLD on the wakeup descriptor and then polls this child only.
    """

    __slots__ = ('server', 'transfers', 'key', 'env', 'argv', 'proc', 'temp_fd', 'pipe',
                 'output', 'deadline', 'result', 'started', 'reason', 'dropped')

    OUTPUT_LOG_LIMIT = 4096

    def __init__(self, server, key, argv, env):
        self.server = server
        self.key = key              # (client address, path): the cache key
        self.argv = argv
        self.env = env
        self.transfers = []         # ReadTransfers waiting for this content
        self.proc = None
        self.temp_fd = None
        self.pipe = None
        self.output = b''
        self.deadline = None
        self.result = None          # a FileSource's fd, or None for not found
        self.started = None
        self.reason = ''
        self.dropped = False        # could not start for want of resources

    def start(self, now):
        config = self.server.config
        self.temp_fd = temp_fd = open_anonymous_file(config.generator_tmpdir)
        limit = config.generator_max_size

        def child_setup():
            # Runs in the child between fork and exec. The server keeps fds
            # 0-3 occupied (see reserve_low_fds), so temp_fd is never 3 and
            # subprocess's own error pipe is never 3 either.
            os.dup2(temp_fd, 3)
            if limit and resource is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit + 1, limit + 1))

        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, pass_fds=(3,), preexec_fn=child_setup,
            start_new_session=True, env=self.env, cwd='/')
        self.pipe = self.proc.stdout
        os.set_blocking(self.pipe.fileno(), False)
        self.server.watch(self.pipe, self.on_output, self)
        self.started = now
        self.deadline = now + config.generator_timeout
        self.server.note_deadline(self.deadline)

    def on_output(self):
        try:
            chunk = os.read(self.pipe.fileno(), 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b''
        if not chunk:
            self.close_pipe()
            return
        if len(self.output) < self.OUTPUT_LOG_LIMIT:
            self.output += chunk[:self.OUTPUT_LOG_LIMIT - len(self.output)]
        if len(self.output) >= self.OUTPUT_LOG_LIMIT:
            # Enough for the log: stop reading. A generator that goes on
            # writing fills the pipe and waits, costing us nothing, until it
            # exits or its timeout kills it.
            self.server.forget_socket(self.pipe)

    def close_pipe(self):
        if self.pipe is not None:
            self.server.forget_socket(self.pipe)
            self.pipe.close()
            self.pipe = None

    def poll(self, now):
        """Called after SIGCHLD and on the deadline. True when finished."""
        if self.proc is None:
            return True
        status = self.proc.poll()
        if status is None:
            if now >= self.deadline:
                self.kill_group()
                self.reason = 'timed out after %g s' % self.server.config.generator_timeout
                self.proc.wait()
                self.conclude(None)
                return True
            return False
        self.kill_group()   # leftovers must not keep writing to descriptor 3
        self.conclude(status)
        return True

    def kill_group(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass

    def conclude(self, status):
        if self.pipe is not None:
            self.on_output()
            self.close_pipe()
        size = os.fstat(self.temp_fd).st_size
        limit = self.server.config.generator_max_size
        if status is None:
            pass
        elif status == -getattr(signal, 'SIGXFSZ', 25) or (limit and size > limit):
            self.reason = 'output exceeded %d bytes' % limit
        elif status < 0:
            self.reason = 'killed by signal %d' % -status
        elif status > 0:
            self.reason = 'exit status %d' % status
        elif size == 0:
            self.reason = 'no output'
        else:
            self.result = os.dup(self.temp_fd)
            self.reason = 'ok'
        os.close(self.temp_fd)
        self.temp_fd = None
        self.proc = None
        self.log_output()

    def log_output(self):
        if not self.output:
            return
        for line in self.output.splitlines()[:20]:
            self.server.log.notice('generator: %s', escape(line))

    def cancel(self):
        """Nobody waits for this content any more (server stopping)."""
        if self.proc is not None:
            self.kill_group()
            self.proc.wait()
            self.proc = None
        self.close_pipe()
        if self.temp_fd is not None:
            os.close(self.temp_fd)
            self.temp_fd = None
        if self.result is not None:
            os.close(self.result)
            self.result = None


# Bounds of the generator cache (see GeneratorPool.trim). Per client: a PXE
# boot probes about ten names, the UEFI size probe asks one twice.
CACHE_PER_CLIENT = 16
CACHE_ENTRIES = 1024            # "not found" results hold no descriptor
CACHE_DESCRIPTORS = 64
CACHE_BYTES = 64 << 20


def oldest_of_heaviest(keys):
    """The first of `keys` (oldest first) whose client has the most of them."""
    counts = {}
    for key in keys:
        counts[key[0]] = counts.get(key[0], 0) + 1
    heaviest = max(counts, key=counts.get)
    return next(key for key in keys if key[0] == heaviest)


class GeneratorPool:
    """All generator runs of a server: the ones running, the ones waiting for
    a free slot (--generator-max-running), and the short per-client cache of
    results (--generator-cache)."""

    def __init__(self, server):
        self.server = server
        self.config = server.config
        self.runs = {}              # (client address, path) -> Generation, running or queued
        self.queue = []             # Generations waiting for a free slot, oldest first
        self.cache = {}             # (client address, path) -> (expiry, fd or None, reason, size)
        # Descriptors are for transfers first: the cache keeps an eighth.
        self.cache_descriptors = CACHE_DESCRIPTORS
        if resource is not None:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            if soft != resource.RLIM_INFINITY:
                self.cache_descriptors = max(1, min(CACHE_DESCRIPTORS, soft // 8))

    def busy(self):
        return bool(self.runs)

    def waiting(self):
        """Requests waiting for a run's result."""
        return sum(len(run.transfers) for run in self.runs.values())

    def request(self, transfer, now):
        """Find or start the generator run for a missing file. A cached result
        for the same client and name is reused (the UEFI size probe asks
        twice and must see the same bytes); a run already going for them is
        joined rather than started again."""
        key = (transfer.peer[0], transfer.path)
        cached = self.cache.get(key)
        if cached is not None and cached[0] > now:
            self.deliver(transfer, cached[1], now, cached[2] + ', cached')
            return
        transfer.state = GENERATING
        generation = self.runs.get(key)
        if generation is not None:
            transfer.generation = generation
            generation.transfers.append(transfer)
            return
        generation = Generation(self.server, key, [self.config.generator, '--file', transfer.path],
                                self.environment(transfer))
        transfer.generation = generation
        generation.transfers.append(transfer)
        self.runs[key] = generation
        if self.running() < self.config.generator_max_running:
            self.start(generation, now)
        else:
            self.queue.append(generation)

    def environment(self, transfer):
        env = {key: value for key, value in os.environ.items() if not key.startswith('TFTP_')}
        env.update({
            'TFTP_CLIENT_ADDR': transfer.peer[0],
            'TFTP_CLIENT_PORT': str(transfer.peer[1]),
            'TFTP_SERVER_ADDR': transfer.local[0],
            'TFTP_REQUEST': transfer.request.filename,
            'TFTP_FILE': transfer.path,
            'TFTP_ROOT': self.config.root,
            'TFTP_MODE': transfer.request.mode,
            'TFTP_OPTIONS': ' '.join('%s=%s' % pair for pair in transfer.request.options),
            'TFTP_CLIENT_MAC': (client_mac(transfer.peer[0]) or '').replace('-', ':'),
        })
        return env

    def running(self):
        return sum(1 for run in self.runs.values() if run.proc is not None)

    def start(self, generation, now):
        try:
            generation.start(now)
        except OSError as exc:
            generation.reason = 'cannot run %s: %s' % (self.config.generator, exc.strerror or exc)
            if exc.errno in OUT_OF_RESOURCES:
                # Says nothing about the file: "not found" would boot a PXE
                # host's default config. Drop the request (the client asks
                # again) and give the cache's descriptors back.
                self.drop_cache()
                generation.dropped = True
            self.end(generation, now, cache=False)
        except Exception as exc:    # e.g. subprocess's report of a preexec_fn failure
            generation.reason = 'cannot run %s: %s' % (self.config.generator, exc)
            self.end(generation, now, cache=False)

    def poll_all(self, now):
        """After SIGCHLD: which of our children has ended?"""
        for generation in list(self.runs.values()):
            self.poll(generation, now)

    def poll(self, generation, now):
        if generation.proc is not None and generation.poll(now):
            self.end(generation, now)

    def sweep(self, now):
        """Enforce the timeouts, expire the cache; return the next deadline."""
        soonest = float('inf')
        for generation in list(self.runs.values()):
            if generation.deadline is not None and generation.deadline <= now:
                self.poll(generation, now)
            if generation.proc is not None:
                soonest = min(soonest, generation.deadline)
        return min(soonest, self.expire_cache(now))

    def end(self, generation, now, cache=True):
        """A run is over: hand its result to every transfer that waits for it.
        A run that could not start (no memory, no file descriptors) says
        nothing about the file, so it is not cached: the next request tries
        again."""
        if generation.temp_fd is not None:     # it could not even start
            os.close(generation.temp_fd)
            generation.temp_fd = None
        self.runs.pop(generation.key, None)
        seconds = now - (generation.started or now)
        self.server.log.info('generator for %s: %s (%.3f s)', escape(generation.argv[2]),
                             generation.reason, seconds)
        fd = generation.result
        generation.result = None
        cache = cache and self.config.generator_cache > 0
        if cache:
            self.store(generation.key, fd, generation.reason, now)
        for transfer in generation.transfers:
            if transfer.state == GENERATING and generation.dropped:
                transfer.generation = None
                transfer.finish('dropped, the client may ask again (generator: %s)'
                                % generation.reason)
            elif transfer.state == GENERATING:
                transfer.generation = None
                self.server.dispatch(lambda t=transfer: self.deliver(t, fd, now, generation.reason),
                                     transfer)
        if fd is not None and not cache:
            os.close(fd)
        while self.queue and self.running() < self.config.generator_max_running \
                and not self.server.stopping:   # no fork after SIGTERM
            self.start(self.queue.pop(0), now)

    def deliver(self, transfer, fd, now, reason):
        if fd is None:
            # "Not mine" (exit 1, or nothing written) is routine: PXELINUX
            # probes ten names per boot. Anything else is worth a notice.
            transfer.quiet = self.config.quiet_misses and \
                reason.split(',')[0] in ('exit status 1', 'no output')
            transfer.finish('not found (generator: %s)' % reason, ERR_NOT_FOUND)
            return
        own = os.dup(fd)
        transfer.generated = True
        transfer.begin(FileSource(own, os.fstat(own).st_size), now)

    def store(self, key, fd, reason, now):
        self.forget(key)
        size = 0 if fd is None else os.fstat(fd).st_size
        self.cache[key] = (now + self.config.generator_cache, fd, reason, size)
        self.server.note_deadline(now + self.config.generator_cache)
        self.trim(key[0])

    def forget(self, key):
        entry = self.cache.pop(key, None)
        if entry is not None and entry[1] is not None:
            os.close(entry[1])

    def trim(self, client):
        """Hold the cache within its bounds: one client asking distinct names
        must not take the descriptors, the disk or another host's entries.
        Over a bound, the client with the most entries loses its oldest
        (dicts keep insertion order)."""
        while True:
            entries = list(self.cache.items())
            mine = [key for key, _entry in entries if key[0] == client]
            held = [(key, entry[3]) for key, entry in entries if entry[1] is not None]
            if len(mine) > CACHE_PER_CLIENT:
                self.forget(mine[0])
            elif len(entries) > CACHE_ENTRIES:
                self.forget(oldest_of_heaviest([key for key, _entry in entries]))
            elif held and (len(held) > self.cache_descriptors
                           or sum(size for _key, size in held) > CACHE_BYTES):
                self.forget(oldest_of_heaviest([key for key, _size in held]))
            else:
                return

    def drop_cache(self):
        for key in list(self.cache):
            self.forget(key)

    def expire_cache(self, now):
        soonest = float('inf')
        for key, entry in list(self.cache.items()):
            if entry[0] <= now:
                self.forget(key)
            else:
                soonest = min(soonest, entry[0])
        return soonest

    def close(self):
        """Server stopping: kill every run, drop the cache."""
        for generation in list(self.runs.values()):
            generation.cancel()
        self.runs.clear()
        self.queue = []
        self.drop_cache()


###############################################################################
# Multicast: RFC 2090 and PXE MTFTP ###########################################
###############################################################################
#   RRQ   "pxelinux.0" "octet" "blksize" "1428" "multicast" ""
#   OACK  "blksize" "1428" "multicast" "239.255.0.0,1758,1"   (1: master client)
#   ACK 0 from the master, then DATA 1, 2, ... to 239.255.0.0:1758, sent from
#   the session's socket; an ACK n from the master asks for block n + 1.
# IPv4 only: requests that arrive over IPv6 are served by unicast.

MCAST_DEFAULT_ADDR = '239.255.0.0-255'  # atftpd's default (RFC 2365 local scope)
MCAST_DEFAULT_PORT = '1758'             # tftp-mcast, the port RFC 2090 recommends
MTFTP_DEFAULT_PORT = 75                 # atftpd's --mtftp-port default
MCAST_MAX_BLOCKS = 65535                # multicast block numbers never roll over
MTFTP_BLKSIZE = DEFAULT_BLKSIZE         # MTFTP negotiates nothing


def _number_range(text, low, high):
    """'n' or 'n-m' (plain decimals) as a range within low..high, or ValueError."""
    first, dash, last = text.strip().partition('-')
    parts = (first, last) if dash else (first,)
    for part in parts:
        if not (part.isascii() and part.isdigit()) or len(part) > 5:
            raise ValueError('%r is not a number or a range' % text)
    start, end = int(parts[0]), int(parts[-1])
    if not low <= start <= end <= high:
        raise ValueError('%r is outside %d..%d (or reversed)' % (text, low, high))
    return range(start, end + 1)


def parse_mcast_addresses(text):
    """--mcast-addr as atftpd reads it: a multicast IPv4 address whose last
    byte may be a range, then after commas more last bytes or ranges with the
    same first three bytes: '239.255.0.0-31,128-132,200'. An item with dots
    starts a new prefix. Returns the addresses in order, each once; raises
    ValueError."""
    addresses = []
    prefix = None
    for item in text.split(','):
        item = item.strip()
        if '.' in item:
            head, _, item = item.rpartition('.')
            octets = head.split('.')
            if len(octets) != 3:
                raise ValueError('%r is not an IPv4 address' % head)
            prefix = '.'.join(str(_number_range(octet, 0, 255)[0]) for octet in octets)
            if len(_number_range(octets[0], 224, 239)) != 1:
                raise ValueError('%r is not a multicast address' % head)
            if any('-' in octet for octet in octets):
                raise ValueError('only the last byte may be a range: %r' % head)
        elif prefix is None:
            raise ValueError('%r: the first item must be a full address' % text)
        for last in _number_range(item, 0, 255):
            address = '%s.%d' % (prefix, last)
            if address not in addresses:
                addresses.append(address)
    return addresses


def parse_port_list(text):
    """--mcast-port: ports and ranges separated by commas ('1758-2000,8000');
    returns the ports in order, each once; raises ValueError."""
    ports = []
    seen = set()
    for item in text.split(','):
        for port in _number_range(item, 1, 65535):
            if port not in seen:
                seen.add(port)
                ports.append(port)
    return ports


def is_multicast_ipv4(address):
    try:
        first = socket.inet_aton(address)[0]
    except OSError:
        return False
    return 224 <= first <= 239 and address.count('.') == 3


def oack_with_multicast(request_options, acked, value):
    """The OACK options in request order (RFC 2347) with `multicast` added."""
    granted = dict(acked)
    granted['multicast'] = value
    options = []
    for name, _ in request_options:
        if name in granted:
            options.append((name, granted.pop(name)))
    return options


def set_multicast_sending(sock, local_address, ttl):
    """Send to groups on the interface of `local_address` with our TTL, and
    loop the datagrams back to members on this host (IP_MULTICAST_LOOP)."""
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    if local_address != '0.0.0.0':
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                        socket.inet_aton(local_address))


def open_multicast_socket(local_address, ttl):
    """A UDP socket bound to the address the request came to (so that clients
    see the TID they expect: RFC 2090 clients check the source of group
    DATA), sending to groups (set_multicast_sending)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((local_address, 0))
        sock.setblocking(False)
        set_multicast_sending(sock, local_address, ttl)
    except OSError:
        sock.close()
        raise
    return sock


class MulticastMember(Transfer):
    """One client of a MulticastSession. It has no socket of its own (the
    session's socket is its TID) and no deadline (the session's covers the
    master). It sits in the server's transfer table so that --maxthread,
    repeated requests, shutdown and the log treat it as any other read."""

    __slots__ = ('session',)

    def __init__(self, server, peer, local, request, path, session, params):
        Transfer.__init__(self, server, peer, local, request, path)
        self.session = session
        self.params = params
        self.state = OACK_SENT

    def oack(self, master):
        group, port = self.session.group
        value = '%s,%d,%d' % (group, port, 1 if master else 0)
        return encode_oack(oack_with_multicast(self.request.options, self.params.acked, value))

    def send(self, datagram):
        return self.session.send_to(datagram, self.peer)

    def on_repeated_request(self):
        # The client did not get its OACK: send it again, master or not.
        self.send(self.oack(self.session.master is self))

    def finish(self, outcome, error_code=None, error_text=None):
        if self.state != DONE and error_code is not None:
            self.send(encode_error(error_code, error_text))
        Transfer.finish(self, outcome)

    def release(self):
        self.session.leave(self)

    def summary(self):
        return Transfer.summary(self) + ', multicast %s:%d' % self.session.group


class MulticastSession:
    """One file sent to one multicast group (RFC 2090).

    One socket is the TID of every member; members are kept in arrival
    order and the oldest is the master, the only one that ACKs. DATA goes to
    the group, lock-step with the master. An ACK n from the master asks for
    block n + 1, so a new master ACKs the block before its first gap and the
    file is sent again from there. Any member that ACKs the last block (or
    sends an ERROR) is done. A master that stops answering is retried
    RETRIES times and dropped, or, with --mcast-switch-client, sent to the
    back of the queue after one timeout (atftpd sends it an OACK with mc=0)."""

    def __init__(self, service, key, group, source, blksize, sock):
        self.service = service
        self.server = service.server
        self.key = key
        self.group = group
        self.source = source
        self.blksize = blksize
        self.sock = sock
        self.blocks = source.size // blksize + 1    # the last one is short, maybe empty
        self.members = []
        self.master = None
        self.answered = -1          # the master's last ACK that was answered
        self.outstanding = None     # (datagram, destination) to resend on timeout
        self.deadline = None
        self.blocks_sent = 0
        self.server.watch(sock, self.on_readable, self)

    # -- members --

    def join(self, member, now):
        self.members.append(member)
        self.server.log.info('%s: joins multicast group %s:%d for %s (%d members)',
                             member.client_text(), self.group[0], self.group[1],
                             escape(member.request.filename), len(self.members))
        if self.master is None:
            self.promote(member, now)
        else:
            member.send(member.oack(False))

    def promote(self, member, now):
        """Make `member` the master: an OACK with mc=1 (RFC 2090)."""
        self.master = member
        self.answered = -1
        member.state = OACK_SENT
        self.server.log.info('%s: master client of multicast group %s:%d',
                             member.client_text(), self.group[0], self.group[1])
        self.send_saved(member.oack(True), member.peer, now)

    def leave(self, member):
        if member in self.members:
            self.members.remove(member)
        if not self.members:
            self.close()
        elif member is self.master:
            self.master = None
            if not self.server.stopping:
                self.promote(self.members[0], time.monotonic())

    def switch_master(self, now):
        """--mcast-switch-client: the silent master goes to the back of the
        queue (told so by an OACK with mc=0) and the next member takes over."""
        old = self.master
        old.send(old.oack(False))
        self.members.remove(old)
        self.members.append(old)
        self.promote(self.members[0], now)

    # -- sending --

    def send_to(self, datagram, destination):
        if self.sock is None:
            return False
        try:
            self.sock.sendto(datagram, destination)
            return True
        except OSError as exc:      # a full buffer is a lost packet: the timer resends
            self.server.log.debug('multicast %s:%d: send failed: %s', self.group[0],
                                  self.group[1], exc)
            return False

    def send_saved(self, datagram, destination, now):
        self.outstanding = (datagram, destination)
        self.send_to(datagram, destination)
        master = self.master
        self.deadline = now + (master.params.timeout or master.timeout)
        self.server.note_deadline(self.deadline)

    def send_block(self, block, now):
        payload = self.source.read_at((block - 1) * self.blksize, self.blksize)
        self.blocks_sent += 1
        self.send_saved(encode_data(block, payload), self.group, now)

    # -- receiving --

    def on_readable(self):
        for _ in range(64):
            if self.sock is None:
                return
            try:
                data, addr = self.sock.recvfrom(1024)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            member = self.member_at(addr)
            if member is None:
                self.on_stranger(data, addr)
            else:
                self.on_datagram(member, data, time.monotonic())

    def member_at(self, addr):
        for member in self.members:
            if member.peer[:2] == addr[:2]:
                return member
        return None

    def on_stranger(self, data, addr):
        self.server.log.info('multicast %s:%d: packet from unknown TID %s', self.group[0],
                             self.group[1], format_addr(addr))
        if parse_header(data) is None or data[1] != OP_ERROR:
            self.send_to(encode_error(ERR_UNKNOWN_TID), addr)

    def on_datagram(self, member, data, now):
        header = parse_header(data)
        if header is None:
            return
        opcode, number = header
        if opcode == OP_ACK:
            self.on_ack(member, number, now)
        elif opcode == OP_ERROR:
            member.on_client_error(data)        # ends that member only

    def on_ack(self, member, block, now):
        if block > self.blocks:
            return                  # No such block: garbage, ignored.
        if block == self.blocks:
            member.bytes = self.source.size
            member.finish('sent')   # this client has the whole file
            return
        if member is not self.master:
            member.send(member.oack(False))     # atftpd: mc=0 quiets an ACK out of turn
            return
        if block <= self.answered:
            return                  # A duplicate: no resend (Sorcerer's Apprentice).
        member.state = SENDING
        member.retries = 0
        self.answered = block
        self.send_block(block + 1, now)

    def on_timeout(self, now):
        master = self.master
        self.deadline = None
        if master is None:
            return
        if master.retries >= RETRIES:
            master.finish('timeout', ERR_UNDEFINED, 'Timeout')     # the next one takes over
            return
        master.retries += 1
        if self.service.switch_client and len(self.members) > 1:
            self.switch_master(now)
            return
        master.blocks_resent += 1
        self.send_saved(self.outstanding[0], self.outstanding[1], now)

    # -- ending --

    def finish(self, outcome, error_code=None, error_text=None):
        """Internal error or shutdown: end every member, close the group."""
        for member in list(self.members):
            member.finish(outcome, error_code, error_text)
        self.close()

    def close(self):
        if self.sock is None:
            return
        self.server.log.info('multicast group %s:%d for %s closed, %d blocks sent',
                             self.group[0], self.group[1], escape(self.key[0]),
                             self.blocks_sent)
        self.service.sessions.pop(self.key, None)
        self.deadline = None
        self.server.forget_socket(self.sock)
        self.sock.close()
        self.sock = None
        self.source.close()


class MulticastService:
    """The RFC 2090 side of the server: which requests are served by
    multicast, and the sessions (one per file, blksize and server address)."""

    def __init__(self, server):
        config = server.config
        self.server = server
        self.enabled = config.multicast
        self.addresses = config.mcast_addresses
        self.ports = config.mcast_ports
        self.ttl = config.mcast_ttl
        self.switch_client = config.mcast_switch_client
        self.sessions = {}

    def wanted(self, request, peer):
        """The client asked for multicast (RFC 2090: the value is empty; any
        other value is invalid and ignored, as for other options) and it can
        be done: octet mode (atftpd does not multicast netascii), IPv4."""
        if not self.enabled or request.mode != 'octet' or ':' in peer[0]:
            return False
        for name, value in request.options:
            if name == 'multicast':
                return value == ''
        return False

    def offer(self, request, peer, local, path, source, now):
        """Serve a read by multicast if asked and possible. True: taken (the
        source now belongs to a session or is closed); False: serve by unicast."""
        if not self.wanted(request, peer):
            return False
        options = [(n, v) for n, v in request.options if n not in ('multicast', 'windowsize')]
        params = negotiate_options(options, True, source.size, self.server.limits)
        client = format_addr(peer)
        if source.size // params.blksize + 1 > MCAST_MAX_BLOCKS:
            self.server.log.info('%s: %s has too many blocks for multicast, sending by '
                                 'unicast', client, escape(request.filename))
            return False
        info = os.fstat(source.fd)
        key = (path, info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size,
               params.blksize, local[0])
        session = self.sessions.get(key)
        if session is None:
            session = self.start_session(key, source, params.blksize, local[0], client)
            if session is None:
                return False
        else:
            source.close()          # the session serves its own copy
        member = MulticastMember(self.server, peer, local, request, path, session, params)
        self.server.transfers[peer] = member
        session.join(member, now)
        return True

    def start_session(self, key, source, blksize, local_address, client):
        group = self.free_group()
        if group is None:
            self.server.log.warning('%s: no free multicast address and port, sending by '
                                    'unicast', client)
            return None
        try:
            sock = open_multicast_socket(local_address, self.ttl)
        except OSError as exc:
            self.server.log.warning('%s: cannot open a multicast socket: %s', client, exc)
            return None
        session = MulticastSession(self, key, group, source, blksize, sock)
        self.sessions[key] = session
        return session

    def free_group(self):
        """The first (address, port) no session uses: every address on the
        first port, then the next port (different files get different group
        addresses, which switches and NICs can filter)."""
        used = set(session.group for session in self.sessions.values())
        for port in self.ports:
            for address in self.addresses:
                if (address, port) not in used:
                    return (address, port)
        return None

    def sweep(self, now):
        soonest = float('inf')
        for session in list(self.sessions.values()):
            if session.deadline is not None and session.deadline <= now:
                self.server.dispatch(lambda s=session: s.on_timeout(now), session)
            if session.sock is not None and session.deadline is not None:
                soonest = min(soonest, session.deadline)
        return soonest

    def close(self):
        for session in list(self.sessions.values()):
            session.finish('server stopping', ERR_UNDEFINED, 'Server shutting down')


class MtftpTransfer(ReadTransfer):
    """PXE MTFTP, as atftpd does it: no options, 512-byte blocks, lock-step
    with the one client whose request started it. Block 1 goes to that
    client and to the group (atftpd 0.8 does both), later blocks to the
    group only, where every listening client takes them; a client that
    missed blocks asks for the file again once this transfer has ended."""

    __slots__ = ('group',)

    def __init__(self, server, peer, local, request, path, group):
        plain = Request(OP_RRQ, request.filename, 'octet', [])
        ReadTransfer.__init__(self, server, peer, local, plain, path)
        self.group = group

    def prepare_socket(self, sock):
        set_multicast_sending(sock, self.local[0], self.server.config.mcast_ttl)

    def send(self, datagram):
        opcode, block = HEADER.unpack_from(datagram)
        if opcode != OP_DATA:
            return Transfer.send(self, datagram)
        if block == 1:
            Transfer.send(self, datagram)
        try:
            self.sock.sendto(datagram, self.group)
            return True
        except OSError as exc:
            self.server.log.debug('%s: send to group failed: %s', self.client_text(), exc)
            return False

    def release(self):
        ReadTransfer.release(self)
        self.server.mtftp.running.pop(self.path, None)

    def summary(self):
        return ReadTransfer.summary(self) + ', MTFTP %s:%d' % self.group


def parse_mtftp_config(lines, root):
    """atftpd's --mtftp file: `filename group port` a line ('#' comments,
    blank lines skipped). Returns ([(name, path, (group, port))], problems):
    a bad line is reported as (line number, reason) and skipped, as atftpd
    does; so is a second line for the same file or the same group and port."""
    entries, problems = [], []
    paths, groups = set(), set()
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith('#'):
            continue
        if len(fields) < 3:
            problems.append((number, 'expected: filename address port'))
            continue
        name, address, port_text = fields[:3]
        try:
            path = resolve_path(root, name)
            port = _number_range(port_text, 1, 65535)[0]
            if '-' in port_text:
                raise ValueError('one port, not a range')
        except (PacketError, ValueError) as exc:
            problems.append((number, getattr(exc, 'reason', None) or str(exc)))
            continue
        if not is_multicast_ipv4(address):
            problems.append((number, '%s is not an IPv4 multicast address' % address))
        elif path in paths or (address, port) in groups:
            problems.append((number, 'duplicate file or group'))
        else:
            paths.add(path)
            groups.add((address, port))
            entries.append((name, path, (address, port)))
    return entries, problems


class MtftpService:
    """The --mtftp listener: requests on --mtftp-port for the files the
    configuration names; each file has at most one transfer at a time."""

    def __init__(self, server, listener):
        self.server = server
        self.listener = listener
        self.entries = {}           # path -> (group, port)
        self.running = {}           # path -> MtftpTransfer
        if listener is not None:
            self.load(server.config.mtftp_file)
            server.watch(listener.sock, self.on_listener, None)

    def load(self, path):
        log = self.server.log
        try:
            # Bytes, decoded here: open(encoding='latin-1') looks the codec up
            # in the stdlib, which the user we run as may not be able to read.
            with open(path, 'rb') as f:
                lines = f.read().decode('latin-1').splitlines(True)
            entries, problems = parse_mtftp_config(lines, self.server.config.root)
        except OSError as exc:
            log.error('mtftp: cannot read %s: %s; MTFTP serves nothing', path, exc.strerror)
            return
        for number, reason in problems:
            log.warning('mtftp: %s line %d ignored: %s', path, number, escape(reason))
        for name, file_path, group in entries:
            problem = self.check_file(file_path)
            if problem:
                log.warning('mtftp: %s ignored: %s', escape(name), problem)
                continue
            self.entries[file_path] = group
            log.info('mtftp: will serve %s on %s:%d', escape(name), group[0], group[1])
        log.notice('mtftp: listening on %s, %d files',
                   format_addr(self.listener.sock.getsockname()), len(self.entries))

    def check_file(self, path):
        try:
            size = os.stat(path).st_size
        except OSError as exc:
            return exc.strerror
        if size // MTFTP_BLKSIZE + 1 > MCAST_MAX_BLOCKS:
            return 'too big for MTFTP (more than %d blocks of %d bytes)' % (
                MCAST_MAX_BLOCKS, MTFTP_BLKSIZE)
        return None

    def on_listener(self):
        for data, peer, local in self.listener.requests(self.server.log):
            self.on_request(data, peer, local)

    def on_request(self, data, peer, local):
        server = self.server
        client = format_addr(peer)
        if not client_allowed(server.config, peer[0]):
            server.log.info('mtftp: %s: refused by --allow/--deny', client)
            return
        try:
            request = parse_request(data)
        except PacketError as exc:
            server.log.info('mtftp: %s: bad request: %s', client, exc.message)
            server.answer_error(peer, exc.code, exc.message, local)
            return
        if request.opcode != OP_RRQ:
            server.log.info('mtftp: %s: only reads are served', client)
            server.answer_error(peer, ERR_ILLEGAL_OP, None, local)
            return
        problem = self.refusal(request, peer)
        if problem:
            server.log.info('mtftp: %s: %s not served: %s', client,
                            escape(request.filename), problem)
            return      # atftpd stays silent: the client listens or tries again
        self.start(request, peer, local)

    def refusal(self, request, peer):
        """Why a request is dropped, or None."""
        if request.mode != 'octet':
            return 'MTFTP is octet mode only'
        try:
            path = resolve_path(self.server.config.root, request.filename)
        except PacketError as exc:
            return exc.reason
        if path not in self.entries:
            return 'not in the MTFTP file'
        if path in self.running:
            return 'already being sent'
        if peer in self.server.transfers:
            return 'that client port has a transfer running'
        return None

    def start(self, request, peer, local):
        server = self.server
        path = resolve_path(server.config.root, request.filename)
        try:
            source = open_source(path, server.root_real, server.config.world_readable_only)
        except PacketError as exc:
            server.log.notice('mtftp: %s: refused %s: %s', format_addr(peer),
                              escape(request.filename), exc.reason)
            return
        if source is None:
            server.log.notice('mtftp: %s: %s not found', format_addr(peer),
                              escape(request.filename))
            return
        group = self.entries[path]
        transfer = MtftpTransfer(server, peer, local, request, path, group)
        server.transfers[peer] = transfer
        self.running[path] = transfer
        server.log.info('mtftp: serving %s to %s and group %s:%d', escape(request.filename),
                        format_addr(peer), group[0], group[1])
        now = time.monotonic()
        server.dispatch(lambda: transfer.begin(source, now), transfer)

    def close(self):
        if self.listener is not None:
            self.server.forget_socket(self.listener.sock)
            self.listener.sock.close()
            self.listener = None


###############################################################################
# Server ######################################################################
###############################################################################

IP_PKTINFO = getattr(socket, 'IP_PKTINFO', 8)                   # Linux values
IPV6_RECVPKTINFO = getattr(socket, 'IPV6_RECVPKTINFO', 49)
IPV6_PKTINFO = getattr(socket, 'IPV6_PKTINFO', 50)


def local_address(ancdata, listener_addr):
    """(address, scope id) the request was sent to, from IP(V6)_PKTINFO.

    For IPv4 it is ipi_spec_dst: the destination address for unicast, and
    the interface's own address when the request was a broadcast, which is
    the address we must answer from. Mapped IPv4 on a dual-stack socket
    comes back as plain IPv4."""
    found = (listener_addr, 0)
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            return socket.inet_ntop(socket.AF_INET, data[4:8]), 0   # preferred: spec_dst
        if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= 20:
            address = socket.inet_ntop(socket.AF_INET6, data[:16])
            ifindex = struct.unpack('@I', data[16:20])[0]
            if address.startswith('::ffff:') and '.' in address:
                found = (address[7:], 0)
            else:
                found = (address, ifindex if address.startswith('fe80') else 0)
    return found


def plain_peer(addr):
    """A peer address with IPv4-mapped IPv6 turned into plain IPv4."""
    host = addr[0]
    if host.startswith('::ffff:') and '.' in host:
        return (host[7:], addr[1])
    if len(addr) == 4:
        return (host, addr[1], 0, addr[3])     # flowinfo may vary per packet
    return addr


# Linux values; the socket module names them from Python 3.12 (IP_RECVERR).
IP_RECVERR, IPV6_RECVERR, MSG_ERRQUEUE = 11, 25, 0x2000


def receive_icmp_errors(sock, family):
    """Ask the kernel to report ICMP errors on an unconnected socket (without
    this Linux drops them), so a forged or vanished client is noticed at once."""
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
    except OSError:
        pass                # not Linux: errors are not reported, timers still work


class Listener:
    """A bound request socket: port 69 (or --port), or the inetd socket."""

    def __init__(self, sock):
        self.sock = sock
        self.family = sock.family
        self.address = sock.getsockname()[0]
        sock.setblocking(False)
        # Learn each request's destination address; where the platform lacks
        # this, replies come from the listener's own address.
        options = [(socket.IPPROTO_IP, IP_PKTINFO)]
        if self.family == socket.AF_INET6:
            options.insert(0, (socket.IPPROTO_IPV6, IPV6_RECVPKTINFO))
        for level, name in options:
            try:
                sock.setsockopt(level, name, 1)
            except OSError:
                pass

    def requests(self, log, limit=64):
        """The queued datagrams as (data, client, local address), at most
        `limit` per readiness event so one busy socket cannot starve the rest."""
        for _ in range(limit):
            try:
                data, ancdata, _flags, addr = self.sock.recvmsg(MAX_DATAGRAM, 256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug('recvmsg on %s: %s', format_addr(self.sock.getsockname()), exc)
                return
            yield data, plain_peer(addr), local_address(ancdata, self.address)


STATS_HELP = (
    ('requests', 'Requests received.'),
    ('sent', 'Files sent whole.'),
    ('received', 'Files received whole.'),
    ('failed', 'Transfers that failed.'),
    ('aborted', 'Transfers the client aborted.'),
    ('refused', 'Requests refused.'),
    ('bytes_sent', 'Bytes of files sent.'),
    ('bytes_received', 'Bytes of files received.'),
)


class Server:
    """The event loop and the table of transfers."""

    def __init__(self, config, listeners, log):
        self.config = config
        self.listeners = listeners
        self.log = log
        self.limits = config.limits
        self.selector = selectors.DefaultSelector()
        self.transfers = {}         # client (address, port) -> Transfer
        self.superseded = {}        # client -> its confirmed Transfer, while a newer one is not
        self.waiting = {}           # client -> (listener, request datagram, local, seen), FIFO
        self.generators = GeneratorPool(self)
        self.multicast = MulticastService(self)
        self.mtftp = MtftpService(self, config.mtftp_listener)
        self.substitutions = config.substitutions
        self.next_sweep = float('inf')
        self.stopping = False
        self.starting_waiting = False
        self.next_port = config.port_range[0] if config.port_range else 0
        self.exit_status = 0
        self.last_activity = time.monotonic()
        self.root_real = os.path.realpath(config.root)
        self.stats = {'requests': 0, 'sent': 0, 'received': 0, 'failed': 0, 'aborted': 0,
                      'bytes_sent': 0, 'bytes_received': 0, 'refused': 0}
        self.started = time.time()
        self.wakeup_r, self.wakeup_w = socket.socketpair()
        for sock in (self.wakeup_r, self.wakeup_w):
            sock.setblocking(False)
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, (self.on_signal, None))
        for listener in listeners:
            self.selector.register(listener.sock, selectors.EVENT_READ,
                                   (lambda l=listener: self.on_listener(l), None))

    # -- the loop --

    def serve_forever(self):
        self.install_signals()
        self.log.notice('atftpd.py %s started, serving %s on %s', __version__, self.config.root,
                        ', '.join(format_addr(l.sock.getsockname()) for l in self.listeners))
        while not self.stopping:
            now = time.monotonic()
            timeout = max(0.0, min(self.next_sweep, now + 60) - now)
            if self.config.idle_timeout and self.is_quiet():
                timeout = min(timeout, max(0.0, self.last_activity + self.config.idle_timeout - now))
            registered = self.selector.get_map()
            for key, _ in self.selector.select(timeout):
                # An earlier handler of this batch may have closed this
                # descriptor (a generator's pipe when its run ended).
                if registered.get(key.fd) is key:
                    self.dispatch(*key.data)
            now = time.monotonic()
            if now >= self.next_sweep:
                self.sweep(now)
            if self.config.idle_timeout and self.is_idle(now):
                self.log.notice('idle for %g s, exiting', self.config.idle_timeout)
                break
        self.shutdown()
        return self.exit_status

    def dispatch(self, handler, owner):
        """Run one event handler. An unexpected exception ends the transfer it
        belongs to, never the server (socketserver's handle_error)."""
        try:
            handler()
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - isolation is the point
            self.log.error('internal error: %s: %s', type(exc).__name__, escape(str(exc)))
            if self.log.level >= LOG_DEBUG:
                self.log.debug('traceback: %s', escape(describe_traceback(exc.__traceback__)))
            if isinstance(owner, (Transfer, MulticastSession)):
                owner.finish('internal error', ERR_UNDEFINED, 'Internal error')

    def sweep(self, now):
        """Run every due deadline and find the next one."""
        next_sweep = float('inf')
        for transfer in self.all_transfers():
            if transfer.deadline is not None:
                if transfer.deadline <= now and transfer.state != DONE:
                    self.dispatch(lambda t=transfer: t.on_timeout(now), transfer)
                if transfer.state != DONE and transfer.deadline is not None:
                    next_sweep = min(next_sweep, transfer.deadline)
        while self.waiting and self.running() >= self.config.maxthread \
                and self.evict_unverified():
            pass                        # each end starts one waiting request
        next_sweep = min(next_sweep, self.generators.sweep(now), self.expire_waiting(now),
                         self.multicast.sweep(now))
        if self.waiting:
            next_sweep = min(next_sweep, now + UNVERIFIED_GRACE)
        self.next_sweep = next_sweep

    def note_deadline(self, deadline):
        if deadline < self.next_sweep:
            self.next_sweep = deadline

    def is_quiet(self):
        return not self.running() and not self.waiting and not self.generators.busy()

    def is_idle(self, now):
        return self.is_quiet() and now - self.last_activity >= self.config.idle_timeout

    def watch(self, fileobj, handler, owner):
        self.selector.register(fileobj, selectors.EVENT_READ, (handler, owner))

    def forget_socket(self, fileobj):
        try:
            self.selector.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    # -- signals --

    def install_signals(self):
        signal.set_wakeup_fd(self.wakeup_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD,
                       signal.SIGUSR1):
            signal.signal(signum, lambda *_: None)    # the wakeup fd carries the number
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def on_signal(self):
        data = b''
        for _ in range(64):         # a flood of one signal must not hide another
            try:
                data += self.wakeup_r.recv(512)
            except (BlockingIOError, InterruptedError):
                break
        for signum in set(data):
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.log.notice('received signal %d, stopping', signum)
                self.stopping = True
            elif signum == signal.SIGHUP:
                try:
                    self.log.open()
                    self.log.notice('received SIGHUP, log reopened')
                except OSError as exc:
                    self.log.error('received SIGHUP, cannot reopen the log: %s', exc)
                self.reload_substitutions()
            elif signum == signal.SIGUSR1:
                self.log_stats()
        # Every wakeup looks at every child: a full wakeup buffer drops
        # signal numbers, and a lost SIGCHLD would leave a run to its timeout.
        self.generators.poll_all(time.monotonic())

    def log_stats(self):
        s = self.stats
        if self.config.stats_file:
            self.write_stats_file()
        self.log.notice('stats: %d requests, %d files sent, %d received, %d failed, '
                        '%d aborted by clients, %d refused, %d bytes sent, %d received, '
                        'up %.0f s, cpu %.2f s',
                        s['requests'], s['sent'], s['received'], s['failed'], s['aborted'],
                        s['refused'], s['bytes_sent'], s['bytes_received'],
                        time.time() - self.started, sum(os.times()[:2]))

    def write_stats_file(self):
        """The counters in Prometheus' text format, for node_exporter's
        textfile collector: written beside, then renamed over, so that a
        reader never sees half a file."""
        lines = []
        for key, help_text in STATS_HELP:
            name = 'atftpd_%s_total' % key
            lines += ['# HELP %s %s' % (name, help_text), '# TYPE %s counter' % name,
                      '%s %d' % (name, self.stats[key])]
        lines += ['# HELP atftpd_start_time_seconds When the server started.',
                  '# TYPE atftpd_start_time_seconds gauge',
                  'atftpd_start_time_seconds %.0f' % self.started]
        path = self.config.stats_file
        temporary = '%s.%d.tmp' % (path, os.getpid())
        try:
            with open(temporary, 'w') as f:
                f.write('\n'.join(lines) + '\n')
            os.rename(temporary, path)
        except OSError as exc:
            self.log.warning('cannot write --stats-file %s: %s', path, exc.strerror)

    # -- requests --

    def on_listener(self, listener):
        """Read queued requests from a listening socket (bounded per event)."""
        if self.stopping:
            return                      # SIGTERM came in this batch: start nothing
        for data, peer, local in listener.requests(self.log):
            self.last_activity = time.monotonic()
            self.on_request(listener, data, peer, local)

    def on_request(self, listener, data, peer, local):
        self.stats['requests'] += 1
        if not client_allowed(self.config, peer[0]):
            # No answer, as tcp-wrappers in.tftpd: nothing to reflect, nothing told.
            self.stats['refused'] += 1
            self.log.info('%s: refused by --allow/--deny', format_addr(peer))
            return
        try:
            request = parse_request(data)
        except PacketError as exc:
            self.log.info('%s: bad request: %s', format_addr(peer), exc.message)
            self.answer_error(peer, exc.code, exc.message)
            return
        if self.is_retransmission(request, peer):
            return
        if self.running() >= self.config.maxthread:
            self.evict_unverified()     # the freed slot goes to the oldest waiting request
        if self.running() >= self.config.maxthread:
            self.queue_request(listener, data, peer, local)
            return
        self.start_transfer(listener, request, peer, local)

    def evict_unverified(self):
        """Every slot is taken: end the oldest transfer whose client has not
        answered within UNVERIFIED_GRACE (forged sources never do), so that
        real clients are not queued behind them. True if a slot was freed."""
        now = time.monotonic()
        stale = [t for t in self.all_transfers()
                 if not t.confirmed and t.sock is not None and now - t.started >= UNVERIFIED_GRACE]
        if not stale:
            return False
        oldest = min(stale, key=lambda t: t.started)
        oldest.quiet = True
        oldest.finish('dropped: no answer from the client, slot given to a new request')
        return True

    def running(self):
        """Transfers that hold a slot. One waiting for its generator holds no
        socket or file yet, so it must not keep static files waiting; those
        are bounded apart (see start_transfer)."""
        return len(self.transfers) + len(self.superseded) - self.generators.waiting()

    def all_transfers(self):
        return list(self.transfers.values()) + list(self.superseded.values())

    def is_retransmission(self, request, peer):
        """A request from the port of a running transfer. Boot firmware that
        is reset mid-download (PXELINUX numbers its ports from 49152, GRUB
        from 25300) asks again from the same port: that is a new client once
        the old transfer has been answered, and it must be served at once,
        not fed the old transfer's stale blocks until they time out. Before
        that answer, the same request is the client's retransmission.

        A request may also be spoofed, so it never ends a confirmed transfer
        by itself: the new transfer starts beside it, and the old one ends
        only when the new one is confirmed by an ACK (see on_confirmed). A
        client that goes on ACKing the old one keeps its download; the new
        transfer's packets get ERROR 5 from it, or time out."""
        current = self.transfers.get(peer)
        if current is None or current.confirmed:
            return False
        if (current.request.filename, current.request.opcode) == (request.filename,
                                                                  request.opcode):
            current.on_repeated_request()
            return True
        current.finish('replaced by a new request from the same port')
        return False

    def on_confirmed(self, transfer):
        """Its client answered: a transfer this one superseded is over (the
        client was reset and asked again). No ERROR: the port is the new one's."""
        if self.transfers.get(transfer.peer) is transfer:
            old = self.superseded.pop(transfer.peer, None)
            if old is not None:
                old.finish('aborted by client (a new request from its port was answered)')

    def queue_request(self, listener, data, peer, local):
        """--maxthread reached: the request waits (FIFO, bounded) for a free
        slot; a client retransmitting the same request refreshes its place.
        atftpd drops such requests, which makes PXE storms slow to finish."""
        now = time.monotonic()
        if peer in self.waiting:
            self.waiting[peer] = (listener, data, local, now)   # keeps its place
        elif len(self.waiting) < 4 * self.config.maxthread:
            self.waiting[peer] = (listener, data, local, now)
            self.log.info('%s: %d transfers running, request queued', format_addr(peer),
                          len(self.transfers))
            self.note_deadline(now + self.config.retry_timeout * 2)
        else:
            self.log.info('%s: request dropped, queue full', format_addr(peer))
            return
        self.note_deadline(now + UNVERIFIED_GRACE)     # a slot may be evicted by then

    def expire_waiting(self, now):
        """Forget queued requests whose client has stopped asking."""
        horizon = self.config.retry_timeout * 2
        for peer, entry in list(self.waiting.items()):
            if now - entry[3] > horizon:
                del self.waiting[peer]
        if self.waiting:
            return min(entry[3] for entry in self.waiting.values()) + horizon
        return float('inf')

    def start_waiting(self):
        """Start queued requests while slots are free. Not re-entered: a
        transfer that ends at once (no socket) calls back here through
        on_transfer_done, and the loop already running takes the next one,
        instead of a recursion as deep as the queue."""
        if self.stopping or self.starting_waiting:
            return                      # ending transfers must not start queued ones
        self.starting_waiting = True
        try:
            while self.waiting and self.running() < self.config.maxthread:
                peer = next(iter(self.waiting))
                listener, data, local, _seen = self.waiting.pop(peer)
                request = parse_request(data)
                if not self.is_retransmission(request, peer):
                    self.start_transfer(listener, request, peer, local)
        finally:
            self.starting_waiting = False

    def start_transfer(self, listener, request, peer, local):
        now = time.monotonic()
        config = self.config
        client = format_addr(peer)
        name = escape(request.filename)
        try:
            path = resolve_path(config.root, request.filename)
            if request.opcode == OP_WRQ:
                self.start_write(listener, request, peer, local, path)
                return
            path, source = self.open_for_read(request.filename, path, peer)
        except PacketError as exc:
            self.log.notice('%s: refused %s: %s', client, name, exc.reason)
            self.stats['refused'] += 1
            self.answer_error(peer, exc.code, exc.message, local)
            return
        if source is not None and self.multicast.offer(request, peer, local, path, source, now):
            return
        if source is None and config.generator and self.generators.waiting() >= config.maxthread:
            self.log.info('%s: %s: %d requests wait for the generator, request dropped',
                          client, name, self.generators.waiting())
            return                      # the client asks again
        transfer = ReadTransfer(self, peer, local, request, path)
        self.add_transfer(transfer)
        if source is not None:
            self.log.info('serving %s to %s', name, client)
            self.dispatch(lambda: transfer.begin(source, now), transfer)
        elif config.generator:
            self.generators.request(transfer, now)
        else:
            self.remove_transfer(transfer)
            self.log.log(LOG_INFO if config.quiet_misses else LOG_NOTICE,
                         '%s: %s not found', client, name)
            self.stats['failed'] += 1
            self.answer_error(peer, ERR_NOT_FOUND, None, local)

    def open_for_read(self, name, path, peer):
        """(path, FileSource or None): the file in the client's own root
        (--unique-root), else in the root, else the one --pcre names."""
        client = format_addr(peer)
        own = self.unique_root(peer)
        if own is not None:
            own_path, source = self.open_in(own, resolve_path(own, name))
            if source is not None:
                return own_path, source
        path, source = self.open_in(self.config.root, path)
        if source is None and self.substitutions is not None:
            new_name = self.substitutions.apply(name)
            if new_name is not None:
                self.log.info('%s: %s substituted by %s', client, escape(name), escape(new_name))
                path = resolve_path(self.config.root, new_name)
                source = open_source(path, self.root_real, self.config.world_readable_only)
        return path, source

    def open_in(self, root, path):
        """(path, FileSource or None) for `path` under `root`, matched
        ignoring case if --case-insensitive and the exact name is missing."""
        source = open_source(path, self.root_real, self.config.world_readable_only)
        if source is None and self.config.case_insensitive:
            found = case_insensitive_path(root, path)
            if found is not None:
                path = found
                source = open_source(path, self.root_real, self.config.world_readable_only)
        return path, source

    def unique_root(self, peer):
        """<root>/<client ip> or <root>/<client mac>, if that directory exists."""
        if self.config.unique_root is None:
            return None
        address = peer[0].partition('%')[0]      # peers are plain already (plain_peer)
        key = address if self.config.unique_root == 'ip' else client_mac(address)
        if not key:
            return None
        directory = self.config.root + '/' + key
        return directory if os.path.isdir(directory) else None

    def reload_substitutions(self):
        """SIGHUP: read the --pcre file again; keep the old rules if it is bad."""
        if self.substitutions is None or not self.substitutions.path:
            return
        try:
            self.substitutions = Substitutions.load(self.substitutions.path)
            self.log.notice('pattern file %s reloaded: %d rules', self.substitutions.path,
                            len(self.substitutions.rules))
        except (OSError, ValueError) as exc:
            self.log.error('pattern file not reloaded, keeping the old rules: %s', exc)

    def start_write(self, listener, request, peer, local, path):
        client = format_addr(peer)
        name = escape(request.filename)
        try:
            mode = self.check_upload(path)
        except PacketError as exc:
            self.log.notice('%s: upload of %s refused: %s', client, name, exc.reason)
            self.stats['refused'] += 1
            self.answer_error(peer, exc.code, exc.message, local)
            return
        transfer = WriteTransfer(self, peer, local, request, path, mode)
        self.add_transfer(transfer)
        self.log.info('receiving %s from %s', name, client)
        self.dispatch(lambda: transfer.begin(time.monotonic()), transfer)

    def check_upload(self, path):
        """The mode the uploaded file will have, or PacketError. Uploads need
        --allow-write (replace existing files) or --allow-create (also make
        new ones); the directory must already exist inside the root."""
        config = self.config
        if not (config.allow_write or config.allow_create):
            raise PacketError(ERR_ACCESS, 'Uploads are not allowed')
        directory = os.path.dirname(path)
        if not os.path.isdir(directory):
            raise PacketError(ERR_NOT_FOUND, 'Directory not found')
        check_inside_root(self.root_real, directory)
        try:
            info = os.stat(path)
        except FileNotFoundError:
            if not config.allow_create:
                raise PacketError(ERR_ACCESS, 'Creating files is not allowed')
            return 0o666 & ~config.umask
        except OSError as exc:
            raise PacketError(ERR_ACCESS, 'Access violation', os.strerror(exc.errno))
        check_inside_root(self.root_real, path)
        if not stat.S_ISREG(info.st_mode):
            raise PacketError(ERR_ACCESS, 'Access violation')
        if config.world_readable_only and not info.st_mode & stat.S_IWOTH:
            raise PacketError(ERR_ACCESS, 'Access violation')
        if not os.access(path, os.W_OK):
            raise PacketError(ERR_ACCESS, 'Access violation')
        return stat.S_IMODE(info.st_mode)

    def refuse(self, transfer, code, text):
        self.log.notice('%s: %s', transfer.client_text(), text)
        transfer.state = DONE
        self.remove_transfer(transfer)
        self.answer_error(transfer.peer, code, ERROR_TEXT.get(code), transfer.local)
        self.start_waiting()

    def answer_error(self, peer, code, message, local=None):
        """An ERROR for a request we will not serve, sent from a new socket on
        the address the request came to (a new TID, as for a transfer). Code
        None: no answer (the server is short of something; the client asks
        again, where an ERROR would end its try)."""
        if code is None:
            return
        family = socket.AF_INET6 if ':' in peer[0] else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                if local is not None:
                    try:
                        sock.bind((local[0], 0, 0, local[1]) if family == socket.AF_INET6
                                  else (local[0], 0))
                    except OSError:
                        pass
                sock.sendto(encode_error(code, message), peer)
        except OSError as exc:
            self.log.debug('%s: cannot send error: %s', format_addr(peer), exc)

    def open_transfer_socket(self, transfer):
        """A new socket (a new TID) bound to the address the request came to,
        so a multi-homed host answers from the address the client used."""
        address, scope = transfer.local
        family = socket.AF_INET6 if ':' in address else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError as exc:
            self.log.warning('%s: cannot open a socket: %s', transfer.client_text(), exc)
            return None
        try:
            self.bind_transfer_socket(sock, address, scope)
            sock.setblocking(False)
            receive_icmp_errors(sock, family)
            if self.config.listen_local:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            window_bytes = transfer.params.windowsize * (transfer.params.blksize + 64)
            if window_bytes > 200000:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, min(window_bytes, 4 << 20))
            transfer.prepare_socket(sock)
        except OSError as exc:
            sock.close()
            self.log.warning('%s: cannot bind to %s: %s', transfer.client_text(), address, exc)
            return None
        self.watch(sock, transfer.on_readable, transfer)
        return sock

    def bind_transfer_socket(self, sock, address, scope):
        """Any free port, or with --port-range the next free one in it (in
        turn, so a port just closed is the last to be reused). Raises
        OSError(EADDRINUSE) when the whole range is taken."""
        def bind(port):
            sock.bind((address, port, 0, scope) if sock.family == socket.AF_INET6
                      else (address, port))
        if self.config.port_range is None:
            bind(0)
            return
        low, high = self.config.port_range
        for _ in range(high - low + 1):
            port = self.next_port
            self.next_port = low if port >= high else port + 1
            try:
                bind(port)
                return
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
        raise OSError(errno.EADDRINUSE, 'every port of --port-range %d:%d is in use'
                      % (low, high))

    def add_transfer(self, transfer):
        """A confirmed transfer from the same port runs on beside it."""
        current = self.transfers.get(transfer.peer)
        if current is not None:
            self.superseded[transfer.peer] = current
        self.transfers[transfer.peer] = transfer

    def remove_transfer(self, transfer):
        """Free its slot; a transfer it superseded is the port's own again."""
        peer = transfer.peer
        if self.transfers.get(peer) is transfer:
            del self.transfers[peer]
            old = self.superseded.pop(peer, None)
            if old is not None:
                self.transfers[peer] = old
        elif self.superseded.get(peer) is transfer:
            del self.superseded[peer]

    def on_transfer_done(self, transfer):
        self.last_activity = time.monotonic()     # inetd mode: idle from now on
        self.remove_transfer(transfer)
        self.record(transfer)
        self.start_waiting()

    def record(self, transfer):
        """The one log line per transfer, and the counters."""
        name = escape(transfer.request.filename)
        client = transfer.client_text()
        outcome = transfer.outcome or 'ended'
        reading = transfer.request.opcode == OP_RRQ
        if outcome.startswith('sent') or outcome == 'received':
            self.stats['sent' if reading else 'received'] += 1
            self.stats['bytes_sent' if reading else 'bytes_received'] += transfer.bytes
            self.log.notice('%s %s %s %s: %s', outcome, name, 'to' if reading else 'from',
                            client, transfer.summary())
            return
        self.stats['aborted' if 'client' in outcome else 'failed'] += 1
        level = LOG_INFO if transfer.quiet else LOG_NOTICE
        self.log.log(level, 'failed %s %s %s %s: %s; %s', 'sending' if reading else 'receiving',
                     name, 'to' if reading else 'from', client, outcome, transfer.summary())

    # -- stopping --

    def shutdown(self):
        """End every transfer with an ERROR to its client, stop generators,
        close everything we opened."""
        self.stopping = True            # also after an idle exit: start nothing now
        self.waiting.clear()
        for transfer in self.all_transfers():
            if transfer.state == DALLYING:
                transfer.finish('received')     # complete; only waiting for a repeat
            else:
                transfer.finish('server stopping', ERR_UNDEFINED, 'Server shutting down')
        self.generators.close()
        self.multicast.close()
        self.mtftp.close()
        self.log_stats()
        for listener in self.listeners:
            self.forget_socket(listener.sock)
            listener.sock.close()
        signal.set_wakeup_fd(-1)
        self.selector.close()
        self.wakeup_r.close()
        self.wakeup_w.close()


###############################################################################
# Process setup ###############################################################
###############################################################################

try:
    import resource         # Present on Linux builds, python3-light included.
except ImportError:         # pragma: no cover
    resource = None


def reserve_low_fds():
    """Make sure descriptors 0-3 are open (on /dev/null if nothing else), so
    that nothing the server opens later lands on 0-3. Generators get their
    output file as fd 3, and this way dup2() onto 3 never hits one of ours."""
    while True:
        fd = os.open(os.devnull, os.O_RDWR)
        if fd > 3:
            os.close(fd)
            return


def make_listeners(addresses, port):
    """Bind the request sockets. With no address: '::' for both families,
    or 0.0.0.0 when the host has no IPv6 (routers often disable it)."""
    listeners = []
    for address in addresses or [None]:
        listeners.append(Listener(bind_request_socket(address, port)))
    return listeners


def parse_network(text):
    """'192.0.2.0/24', '2001:db8::/32' or a single address, as (width,
    network, mask) integers, or ValueError. inet_pton, not ipaddress: a
    router has the module, but not the memory to spare for it."""
    host, slash, bits = text.partition('/')
    for family, width in ((socket.AF_INET, 32), (socket.AF_INET6, 128)):
        try:
            value = int.from_bytes(socket.inet_pton(family, host), 'big')
        except OSError:
            continue
        if not slash:
            bits = str(width)
        if not bits.isdigit() or int(bits) > width:
            raise ValueError('bad prefix length in %s' % text)
        mask = ((1 << width) - 1) ^ ((1 << (width - int(bits))) - 1)
        return width, value & mask, mask
    raise ValueError('not an address or network: %s' % text)


def address_value(address):
    """(width, integer) of a client address; an IPv4-mapped IPv6 address
    (a dual-stack socket's view of an IPv4 client) counts as IPv4."""
    host = plain_peer((address.partition('%')[0], 0))[0]
    family, width = (socket.AF_INET6, 128) if ':' in host else (socket.AF_INET, 32)
    return width, int.from_bytes(socket.inet_pton(family, host), 'big')


def in_networks(address, networks):
    width, value = address_value(address)
    return any(w == width and value & mask == network for w, network, mask in networks)


def client_allowed(config, address):
    """--allow (if given) must match, and no --deny may."""
    if not (config.allow or config.deny):
        return True
    if config.allow and not in_networks(address, config.allow):
        return False
    return not in_networks(address, config.deny)


def numeric_address(address, port=0):
    """(family, sockaddr) for a numeric IPv4 or IPv6 address, 'fe80::1%eth0'
    included, or ValueError. inet_pton, not getaddrinfo: a str host makes
    getaddrinfo load the idna codec, which needs unicodedata, which
    python3-light does not have."""
    host, _, scope = address.partition('%')
    try:
        socket.inet_pton(socket.AF_INET, host)
        if not scope:
            return socket.AF_INET, (host, port)
    except OSError:
        pass
    try:
        socket.inet_pton(socket.AF_INET6, host)
    except OSError:
        raise ValueError('not a numeric IP address: %s' % address)
    try:
        scope_id = int(scope) if scope.isdigit() else socket.if_nametoindex(scope) if scope else 0
    except OSError:
        raise ValueError('no such interface: %s' % scope)
    return socket.AF_INET6, (host, port, 0, scope_id)


def bind_request_socket(address, port):
    if address is None:
        try:
            return bind_request_socket('::', port)
        except OSError:
            return bind_request_socket('0.0.0.0', port)
    family, sockaddr = numeric_address(address, port)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if address == '::' else 1)
        sock.bind(sockaddr)
    except OSError:
        sock.close()
        raise
    return sock


def mtftp_listener(config):
    """The --mtftp-port socket, bound before privileges are dropped (port 75
    needs root): IPv4 only, on the first IPv4 --bind-address or on all."""
    addresses = [a for a in config.bind_address or [] if numeric_address(a)[0] == socket.AF_INET]
    return Listener(bind_request_socket(addresses[0] if addresses else '0.0.0.0',
                                        config.mtftp_port))


def inetd_listener():
    """inetd 'wait' mode: the datagram socket is descriptor 0 (and, under
    classic inetd, 1 and 2). Move it away and put /dev/null on 0-2 so that
    nothing we or a generator print can land in the socket."""
    try:
        sock = socket.socket(fileno=os.dup(0))
    except OSError:
        return None
    if sock.type != socket.SOCK_DGRAM:
        sock.close()
        return None
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.dup2(null, fd)
        except OSError:
            os.dup2(null, fd)
    os.close(null)
    return Listener(sock)


def group_given(user_spec, group_name):
    return bool(group_name and group_name != 'nogroup') or '.' in user_spec


def lookup_identity(user_spec, group_name):
    """(uid, gid, name) for --user user[.group] and --group, or ValueError."""
    user, _, group = user_spec.partition('.')
    if group_name:
        group = group_name
    try:
        entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise ValueError('no such user: %s' % user)
    if not group:
        gid = entry.pw_gid
    elif group == 'nogroup' and not group_given(user_spec, group_name):
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            gid = entry.pw_gid      # not every system has nogroup
    elif group.isdigit():
        gid = int(group)
    else:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError('no such group: %s' % group)
    return entry.pw_uid, gid, entry.pw_name


def drop_privileges(config):
    """Bind first, then this: as root, switch to --user/--group (atftpd's
    default nobody.nogroup), in daemon and inetd mode alike. Not root: only
    an explicit --user/--group asks for a switch, and failing it is fatal.
    Returns 'name (uid U, gid G)' when it switched."""
    if os.geteuid() != 0 and not config.user_given:
        return None
    uid, gid, name = lookup_identity(config.user, config.group)
    if os.geteuid() == uid and os.getegid() == gid:
        return None
    if os.geteuid() == 0:
        os.initgroups(name, gid)
    os.setgid(gid)
    os.setuid(uid)
    return '%s (uid %d, gid %d)' % (name, uid, gid)


def problem_as_service_user(config):
    """What the server could not do once it runs as --user: a root under
    /root, a generator only root may run. Checked at start in a child that
    switches as the server will (supplementary groups included), so that
    the start fails with one line instead of every request later."""
    script = False
    if config.generator:
        with open(config.generator, 'rb') as f:
            script = f.read(2) == b'#!'     # the interpreter must read it too
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(reader)
        try:
            identity = drop_privileges(config)
            problem = check_root(config)
            generator_access = os.X_OK | (os.R_OK if script else 0)
            if not problem and config.generator and not os.access(config.generator,
                                                                  generator_access):
                problem = 'cannot run the content generator %s' % config.generator
            if problem and identity:
                problem = 'as %s: %s' % (identity, problem)
        except (OSError, ValueError) as exc:
            problem = 'cannot switch to user %s: %s' % (config.user, exc)
        os.write(writer, (problem or '').encode('utf-8', 'replace'))
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader, 'rb') as f:
        problem = f.read().decode('utf-8', 'replace')
    os.waitpid(pid, 0)
    return problem or None


def daemonize():
    """Detach: fork, new session, fork again; the grandchild serves."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir('/')
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def write_pidfile(path, uid_gid):
    with open(path, 'w') as f:
        f.write('%d\n' % os.getpid())
    if uid_gid is not None and os.geteuid() == 0:
        try:
            os.chown(path, *uid_gid)
        except OSError:
            pass


###############################################################################
# Command line ################################################################
###############################################################################

GENERATOR_HELP = '''content generator:
  When a read request names a missing file, --content-generator runs
      GENERATOR --file <root>/<requested name>
  with an anonymous temporary file on descriptor 3, stdin on /dev/null and
  stdout/stderr going to the log. Exit 0 with at least one byte written:
  those bytes are served. Any other outcome: "File not found". Environment:
    TFTP_CLIENT_ADDR  client IP address      TFTP_CLIENT_PORT  client UDP port
    TFTP_SERVER_ADDR  address asked          TFTP_REQUEST      name as sent
    TFTP_FILE         full path (= --file)   TFTP_ROOT         server root
    TFTP_MODE         octet or netascii      TFTP_OPTIONS      name=value ...
    TFTP_CLIENT_MAC   aa:bb:cc:dd:ee:ff from the ARP table (IPv4 on a local link), or empty
'''

def positive_int(text):
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse sizes its help with shutil.get_terminal_size, and builds a
    formatter for every add_argument: that would import shutil (with bz2
    and lzma) into every server for good. os tells the width as well."""

    def __init__(self, prog):
        try:
            columns = int(os.environ.get('COLUMNS') or os.get_terminal_size().columns)
        except (ValueError, OSError):
            columns = 80
        argparse.RawDescriptionHelpFormatter.__init__(self, prog, width=columns - 2)

    def _format_action_invocation(self, action):
        # The level is only ever attached (see normalise_verbose); argparse
        # would print '-v N, --verbose N', which '-v 7' then contradicts.
        if action.dest == 'verbose':
            return '-v[N], --verbose[=N]'
        return argparse.RawDescriptionHelpFormatter._format_action_invocation(self, action)


def build_parser():
    parser = argparse.ArgumentParser(
        prog='atftpd.py',
        usage='%(prog)s [options] [directory]',
        description='TFTP server (RFC 1350, 2090, 2347, 2348, 2349, 7440, PXE MTFTP), '
                    'a drop-in for atftpd, '
                    'that can generate missing files with a program of your choice.',
        epilog=GENERATOR_HELP, formatter_class=HelpFormatter)
    opt = parser.add_argument
    opt('directory', nargs='*', help='root of the served tree (default /srv/tftp)')
    opt('-t', '--tftpd-timeout', type=positive_int, default=300, metavar='S',
        help='inetd mode: exit after S idle seconds, 0 = never (default 300)')
    opt('-r', '--retry-timeout', type=positive_int, default=5, metavar='S',
        help='seconds before a packet is sent again (default 5); 5 tries')
    opt('-m', '--maxthread', type=positive_int, default=100, metavar='N',
        help='transfers at once (default 100); more requests wait in a queue')
    opt('-v', '--verbose', metavar='N', action='append',
        help='log level 0-7 (default 5), attached: -v7 or --verbose=7; -v alone adds 1 '
             '(so -v 7 is -v and a directory 7, as in atftpd)')
    opt('--trace', action='store_true', help='log every packet sent and received')
    opt('--no-timeout', action='store_true', help='do not acknowledge the timeout option')
    opt('--no-tsize', action='store_true', help='do not acknowledge the tsize option')
    opt('--no-blksize', action='store_true', help='do not acknowledge the blksize option')
    opt('--no-windowsize', action='store_true', help='do not acknowledge the windowsize option')
    opt('--max-blksize', type=positive_int, default=MAX_BLKSIZE, metavar='N',
        help='largest blksize granted (%d..%d, default %d); larger requests are lowered'
             % (MIN_BLKSIZE, MAX_BLKSIZE, MAX_BLKSIZE))
    opt('--max-windowsize', type=positive_int, default=64, metavar='N',
        help='largest windowsize granted (1..65535, default 64); larger requests are lowered')
    opt('--no-gso', action='store_true',
        help='send each DATA datagram with its own system call, never a UDP GSO batch '
             '(for a kernel or network driver that mishandles GSO)')
    opt('--logfile', metavar='FILE', help="log to FILE ('-' = stdout) instead of syslog")
    opt('--pidfile', metavar='FILE', help='write the process id to FILE')
    opt('--daemon', action='store_true', help='run standalone (default: inetd mode on stdin)')
    opt('--no-fork', action='store_true', help='with --daemon, stay in the foreground')
    opt('--user', metavar='USER[.GROUP]', help='run as this user when started as root '
        '(default nobody)')
    opt('--group', metavar='GROUP', help='run with this group (default nogroup)')
    opt('--port', type=int, default=69, metavar='PORT',
        help='daemon mode: UDP port (default 69; 0 = any free port, logged)')
    opt('--bind-address', action='append', metavar='ADDR',
        help='daemon mode: listen on this IPv4 or IPv6 address (repeatable; '
             "default '::', both families)")
    opt('--port-range', type=port_range, metavar='LOW:HIGH',
        help='bind every transfer socket to a port in LOW..HIGH (firewalls, NAT, '
             'containers); when all are in use, requests get no answer until one frees')
    opt('--unique-root', choices=('ip', 'mac'), metavar='ip|mac',
        help='look a file up in <root>/<client IP> (or <client MAC>, 01-02-03-04-aa-bb, '
             'from the ARP table) first, if that directory exists, then in the root')
    opt('--case-insensitive', action='store_true',
        help='when a name is missing, serve the one file that matches it ignoring case, '
             'component by component (ambiguous matches are refused)')
    opt('--allow', type=network, action='append', default=[], metavar='CIDR',
        help='serve only clients in this IPv4 or IPv6 network (repeatable)')
    opt('--deny', type=network, action='append', default=[], metavar='CIDR',
        help='never serve clients in this network (repeatable; wins over --allow); '
             'refused requests get no answer')
    opt('--listen-local', action='store_true', help='set SO_BROADCAST on transfer sockets')
    opt('--allow-write', action='store_true', help='accept uploads that replace existing files')
    opt('--allow-create', action='store_true',
        help='accept uploads that create new files (implies --allow-write)')
    opt('--permissive', action='store_true',
        help='as root, also serve files that are not world-readable')
    opt('--prevent-sas', action='store_true', help='accepted for atftpd; always on here')
    opt('--no-source-port-checking', action='store_true',
        help='accepted for atftpd; ignored (TIDs are always checked)')
    opt('--content-generator', metavar='PATH', help='program that makes missing files (below)')
    opt('--generator-timeout', type=float, default=10.0, metavar='S',
        help='kill a generator still running after S seconds (default 10)')
    opt('--generator-max-size', type=positive_int, default=16 << 20, metavar='BYTES',
        help='largest output a generator may write (default 16 MiB, 0 = no limit)')
    opt('--generator-max-running', type=positive_int, default=4, metavar='N',
        help='generators running at once (default 4); more requests wait')
    opt('--generator-cache', type=float, default=10.0, metavar='S',
        help='reuse a generated result for the same client and name for S seconds '
             '(default 10, 0 = off)')
    opt('--quiet-misses', action='store_true',
        help='log a request for a missing file (and a generator\'s "not mine") at info '
             'level, not notice')
    opt('--stats-file', metavar='PATH',
        help='on SIGUSR1 and at exit, also write the statistics to PATH in Prometheus '
             'text format (node_exporter textfile collector), atomically')
    opt('--no-multicast', action='store_true', help='do not acknowledge the RFC 2090 '
        'multicast option')
    opt('--mcast-switch-client', action='store_true',
        help='multicast: a master client that times out makes way for the next at once')
    # atftpd spells these with '-' and with '_'.
    opt('--mcast-ttl', '--mcast_ttl', default='1', metavar='N',
        help='multicast TTL (default 1: the local network)')
    opt('--mcast-addr', '--mcast_addr', default=MCAST_DEFAULT_ADDR, metavar='LIST',
        help='multicast groups, e.g. 239.255.0.0-31,128-132,200 (default %s)'
             % MCAST_DEFAULT_ADDR)
    opt('--mcast-port', '--mcast_port', default=MCAST_DEFAULT_PORT, metavar='LIST',
        help='multicast ports, e.g. 1758-2000,8000 (default %s)' % MCAST_DEFAULT_PORT)
    opt('--mtftp', metavar='FILE',
        help="PXE MTFTP: serve the files FILE lists ('filename group port' a line); "
             'daemon mode only')
    opt('--mtftp-port', '--mtftp_port', default=str(MTFTP_DEFAULT_PORT), metavar='PORT',
        help='PXE MTFTP: UDP port for requests (default %d)' % MTFTP_DEFAULT_PORT)
    opt('--pcre', metavar='FILE', help='rename missing files by pattern (atftpd format; '
        'SIGHUP reloads)')
    opt('--pcre-test', metavar='FILE', help='read names on stdin, print what --pcre FILE '
        'makes of them, exit')
    opt('-V', '--version', action='version', version='atftpd.py %s' % __version__)
    return parser


def port_range(text):
    low, colon, high = text.partition(':')
    if not (colon and low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high) <= 65535):
        raise argparse.ArgumentTypeError('%r is not LOW:HIGH with 1 <= LOW <= HIGH <= 65535'
                                         % text)
    return int(low), int(high)


def network(text):
    try:
        return parse_network(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def normalise_verbose(argv):
    """atftpd's -v/--verbose takes its value only attached (-v7, --verbose=7);
    '--verbose /srv/tftp' is verbosity + 1 and the directory. argparse would
    take the next word, so rewrite every form to '--verbose=VALUE' first,
    an empty value meaning 'add one'. Long-option abbreviations count."""
    out = []
    for index, arg in enumerate(argv):
        if arg == '--':
            return out + argv[index:]
        name, eq, value = arg.partition('=')
        if len(name) >= 6 and '--verbose'.startswith(name):
            out.append('--verbose=' + value if eq else '--verbose=')
        elif arg.startswith('-v') and not arg.startswith('--'):
            out.append('--verbose=' + arg[2:])
        else:
            out.append(arg)
    return out


class Config:
    """Everything the server needs from the command line, checked."""


def config_from_args(parser, argv):
    args = parser.parse_args(normalise_verbose(argv))
    config = Config()
    level = LOG_NOTICE
    for value in args.verbose or []:
        if value == '':
            level += 1
        elif value.isdigit():
            level = int(value)
        else:
            parser.error('argument -v/--verbose: invalid level %r (0-7)' % value)
    config.log_level = min(level, LOG_DEBUG)
    root = args.directory[0] if args.directory else '/srv/tftp'
    config.root = os.path.abspath(root).rstrip('/') or '/'
    config.extra_directories = args.directory[1:]
    if not 0 <= args.port <= 65535:
        parser.error('argument --port: %d is not a UDP port' % args.port)
    if not MIN_BLKSIZE <= args.max_blksize <= MAX_BLKSIZE:
        parser.error('argument --max-blksize: must be %d..%d' % (MIN_BLKSIZE, MAX_BLKSIZE))
    if not MIN_WINDOWSIZE <= args.max_windowsize <= MAX_WINDOWSIZE:
        parser.error('argument --max-windowsize: must be 1..65535')
    if not 1 <= args.retry_timeout <= MAX_TIMEOUT:
        parser.error('argument --retry-timeout: must be 1..255')
    if args.maxthread < 1:
        parser.error('argument --maxthread: must be at least 1')
    if args.generator_timeout <= 0 or args.generator_max_running < 1:
        parser.error('argument --generator-timeout/--generator-max-running: must be positive')
    for address in args.bind_address or []:
        try:
            numeric_address(address)
        except ValueError as exc:
            parser.error('argument --bind-address: %s' % exc)
    config.user_given = args.user is not None or args.group is not None
    config.user = args.user or 'nobody'
    config.group = args.group or ('' if args.user and '.' in args.user else 'nogroup')
    if config.user_given:
        try:
            lookup_identity(config.user, config.group)
        except ValueError as exc:
            parser.error('argument --user/--group: %s' % exc)
    config.limits = Limits(not args.no_blksize, not args.no_timeout, not args.no_tsize,
                           not args.no_windowsize, args.max_blksize, args.max_windowsize)
    for name in ('daemon', 'no_fork', 'port', 'pidfile', 'logfile', 'trace', 'retry_timeout',
                 'maxthread', 'allow_write', 'allow_create', 'listen_local', 'bind_address',
                 'port_range', 'allow', 'deny', 'unique_root', 'case_insensitive',
                 'quiet_misses', 'stats_file',
                 'generator_timeout', 'generator_max_size', 'generator_max_running',
                 'generator_cache'):
        setattr(config, name, getattr(args, name))
    config.gso = not args.no_gso
    config.generator = args.content_generator
    if config.generator:
        config.generator = os.path.abspath(config.generator)
        if not (os.path.isfile(config.generator) and os.access(config.generator, os.X_OK)):
            parser.error('argument --content-generator: %s is not an executable file'
                         % config.generator)
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1] if resource else -1
        if config.generator_max_size and hard not in (-1, resource.RLIM_INFINITY) \
                and hard <= config.generator_max_size:
            # The child lowers its file size limit to max-size + 1 bytes; it
            # cannot raise it above the hard limit it inherits.
            parser.error('argument --generator-max-size: %d is not below the hard file size '
                         'limit (ulimit -Hf) of %d bytes' % (config.generator_max_size, hard))
    config.generator_tmpdir = os.environ.get('TMPDIR') or '/tmp'    # as tempfile's first choice
    config.substitutions = None
    config.pcre_test = args.pcre_test
    for path in (args.pcre, args.pcre_test):
        if path:
            try:
                config.substitutions = Substitutions.load(path)
            except (OSError, ValueError) as exc:
                parser.error('argument --pcre: %s' % exc)
    config.permissive = args.permissive
    config.umask = os.umask(0)
    os.umask(config.umask)
    multicast_from_args(parser, args, config)
    config.idle_timeout = 0 if args.daemon else args.tftpd_timeout
    return config


def multicast_from_args(parser, args, config):
    """The RFC 2090 and MTFTP settings, checked (atftpd exits on bad ones too)."""
    config.multicast = not args.no_multicast
    config.mcast_switch_client = args.mcast_switch_client
    try:
        config.mcast_addresses = parse_mcast_addresses(args.mcast_addr)
    except ValueError as exc:
        parser.error('argument --mcast-addr: %s' % exc)
    try:
        config.mcast_ports = parse_port_list(args.mcast_port)
    except ValueError as exc:
        parser.error('argument --mcast-port: %s' % exc)
    try:
        config.mcast_ttl = _number_range(args.mcast_ttl, 0, 255)[0]
        config.mtftp_port = _number_range(args.mtftp_port, 0, 65535)[0]
    except ValueError as exc:
        parser.error('argument --mcast-ttl/--mtftp-port: %s' % exc)
    config.mtftp_file = args.mtftp
    config.mtftp_listener = None


def check_root(config):
    """A missing or unreadable root is reported at start, not per request."""
    try:
        info = os.stat(config.root)
    except FileNotFoundError:
        return 'directory %s does not exist' % config.root
    except OSError as exc:
        return 'directory %s is not accessible: %s' % (config.root, exc.strerror)
    if not stat.S_ISDIR(info.st_mode):
        return '%s is not a directory' % config.root
    if not os.access(config.root, os.R_OK | os.X_OK):
        return 'directory %s is not readable' % config.root
    return None


TCP_WRAPPER_FILES = ('/etc/hosts.allow', '/etc/hosts.deny')
TCP_WRAPPER_DAEMONS = {'in.tftpd', 'tftpd', 'atftpd', 'all'}


def tcp_wrapper_mentions(paths=TCP_WRAPPER_FILES):
    """The files among `paths` with a rule for a TFTP daemon (or ALL):
    Debian's atftpd honours them through libwrap, atftpd.py does not."""
    found = []
    for path in paths:
        try:
            with open(path, errors='replace') as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            daemons = line.split('#', 1)[0].partition(':')[0].replace(',', ' ').split()
            if TCP_WRAPPER_DAEMONS.intersection(word.lower() for word in daemons):
                found.append(path)
                break
    return found


def start_warnings(config):
    """What an operator must hear at start, on stderr and in the log."""
    warnings = []
    if config.logfile is None and not os.path.exists('/dev/log'):
        warnings.append('/dev/log is missing: syslog lines are lost (in a container use '
                        '--logfile -, else --logfile FILE)')
    if not config.allow and not config.deny:
        for path in tcp_wrapper_mentions():
            warnings.append('%s has rules for TFTP, which atftpd.py does not read: use '
                            '--allow/--deny' % path)
    return warnings


def tell_at_start(config, text):
    """Also on stderr, for whoever started a daemon (a shell, an init
    script), unless the log is stdout already; in inetd mode stderr may be
    the socket."""
    if config.daemon and config.logfile != '-':
        print('atftpd.py: %s' % text, file=sys.stderr)


def pcre_test(substitutions, lines, out):
    """--pcre-test: what the pattern file makes of each name, until an
    empty line or the end of input (atftpd's output format)."""
    for line in lines:
        name = line.rstrip('\r\n')
        if not name:
            break
        new_name = substitutions.apply(name)
        if new_name is None:
            out.write('No substitution: "%s"\n' % name)
        else:
            out.write('Substitution: "%s" -> "%s"\n' % (name, new_name))
        out.flush()
    return 0


def main(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    config = config_from_args(parser, argv)
    if config.pcre_test:
        return pcre_test(config.substitutions, sys.stdin, sys.stdout)
    problem = check_root(config)
    if problem:
        parser.error(problem)
    if not config.daemon and sys.stdin is not None and sys.stdin.isatty():
        parser.error('stdin is a terminal: use --daemon to run standalone (or start from inetd)')
    reserve_low_fds()
    try:
        log = Log(config.log_level, config.logfile, config.trace)
    except OSError as exc:
        parser.error('argument --logfile: %s' % exc)
    if config.daemon:
        try:
            listeners = make_listeners(config.bind_address, config.port)
        except OSError as exc:
            print('atftpd.py: cannot bind port %d: %s' % (config.port, exc.strerror),
                  file=sys.stderr)
            return 1
        if config.mtftp_file:
            try:
                config.mtftp_listener = mtftp_listener(config)
            except OSError as exc:
                print('atftpd.py: cannot bind the MTFTP port %d: %s'
                      % (config.mtftp_port, exc.strerror), file=sys.stderr)
                return 1
    else:
        listener = inetd_listener()
        if listener is None:
            parser.error('stdin is not a datagram socket: use --daemon, or start from inetd')
        listeners = [listener]
    for warning in start_warnings(config):
        log.warning('%s', warning)
        tell_at_start(config, 'warning: ' + warning)
    problem = problem_as_service_user(config)
    if problem:
        log.error('not started: %s', problem)
        tell_at_start(config, problem)
        return 2
    return run(config, log, listeners)


def run(config, log, listeners):
    if config.daemon and not config.no_fork:
        daemonize()
    owner = None
    if os.geteuid() == 0 or config.user_given:
        uid, gid, _name = lookup_identity(config.user, config.group)
        owner = (uid, gid)
    if config.pidfile:
        write_pidfile(config.pidfile, owner)
    if owner and os.geteuid() == 0 and owner[0] != 0:
        log.give_to(owner[0])
    try:
        identity = drop_privileges(config)
    except (OSError, ValueError) as exc:
        log.error('cannot switch to user %s: %s', config.user, exc)
        return 1
    if identity:
        log.info('running as %s', identity)
    config.world_readable_only = os.geteuid() == 0 and not config.permissive
    config.allow_write = config.allow_write or config.allow_create
    if config.mtftp_file and config.mtftp_listener is None:
        log.error('--mtftp needs --daemon (as with atftpd); MTFTP is not started')
    if config.extra_directories:
        log.warning('only the first directory is served; ignored: %s',
                    ' '.join(config.extra_directories))
    server = Server(config, listeners, log)
    try:
        return server.serve_forever()
    finally:
        if config.pidfile:
            try:
                os.unlink(config.pidfile)
            except OSError:
                pass
        log.close()


def bytecode_is_current(cache, source):
    """Whether the import would take `cache` as it is: the checks importlib
    makes of a timestamp .pyc (magic number, source mtime and size)."""
    import importlib.util
    try:
        with open(cache, 'rb') as f:
            header = f.read(16)
        info = os.stat(source)
    except OSError:
        return False
    if len(header) < 16 or header[:4] != importlib.util.MAGIC_NUMBER:
        return False
    flags, mtime, size = struct.unpack('<III', header[4:])
    return (flags == 0 and mtime == int(info.st_mtime) & 0xFFFFFFFF
            and size == info.st_size & 0xFFFFFFFF)


def owned_safely(path):
    """Only root or this user can have written `path`: bytecode found there
    may be run (a planted .pyc in a shared directory would run as root)."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    return info.st_uid in (0, os.geteuid()) and not info.st_mode & 0o022


def restart_from_bytecode():
    """`python3 atftpd.py` compiles the whole file at every start, and what
    the compiler used stays in the heap: 18.6 MiB idle, against 12.1 when
    it is imported from cached bytecode (benchmarks/README.md, I). So a
    script start compiles the file into __pycache__ beside it, as an import
    would, and exec()s the interpreter again to import it from there. exec
    keeps the process: its PID, its descriptors (inetd's socket on stdin),
    the interpreter flags given (-O, -X ...).

    It returns, and the script runs on, where the bytecode cannot be cached
    (a file named otherwise, PYTHONDONTWRITEBYTECODE, a directory it cannot
    write), where others could have written the cache (a directory or file
    writable by group or others, or owned by another user), and where Python
    did not run this file itself: `-m atftpd` runs from bytecode already,
    and a runner (runpy.run_path, coverage) would be lost in the exec."""
    from importlib.machinery import SourceFileLoader
    if __spec__ is not None or not isinstance(__loader__, SourceFileLoader):
        return
    script = os.path.abspath(sys.argv[0])
    if (os.path.basename(script) != 'atftpd.py' or not sys.executable
            or not owned_safely(os.path.dirname(script))):
        return
    import importlib.util
    try:
        cache = importlib.util.cache_from_source(script)
    except NotImplementedError:         # an interpreter without a bytecode cache
        return
    if not bytecode_is_current(cache, script):
        if sys.dont_write_bytecode:
            return
        import py_compile
        try:
            py_compile.compile(script, doraise=True)
        except (OSError, py_compile.PyCompileError):
            return
    if not (owned_safely(os.path.dirname(cache)) and owned_safely(cache)):
        return
    # The script's path, not only its directory, stays in the command line
    # for ps and pgrep -f.
    boot = ('import os, sys; sys.path.insert(0, os.path.dirname(sys.argv.pop(1))); '
            'import atftpd; sys.exit(atftpd.main())')
    try:
        # Private, but multiprocessing has used it since Python 3.2.
        flags = subprocess._args_from_interpreter_flags()
        os.execv(sys.executable, [sys.executable] + flags + ['-c', boot, script] + sys.argv[1:])
    except (AttributeError, OSError):
        return


if __name__ == '__main__':
    restart_from_bytecode()
    sys.exit(main())
