#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""A stand-in for OpenWrt's /sbin/validate_data and uci_load (config_load),
for the procd stub (tests/openwrt_stub.sh).

    uci_validate_data.py load PACKAGE
        prints the shell assignments functions.sh's config_load makes from
        $UCI_CONFIG_DIR/PACKAGE: CONFIG_SECTIONS, CONFIG_<s>_TYPE,
        CONFIG_<s>_<option> (a list: its items joined by spaces) and, for a
        list, CONFIG_<s>_<option>_ITEM<n> and CONFIG_<s>_<option>_LENGTH
    uci_validate_data.py show PACKAGE
        as `uci show PACKAGE` (what reload_config checksums)
    uci_validate_data.py check TYPE VALUE
        validate_data's two-argument form: prints "TYPE - VALUE = true" (or
        false) and exits 0 (or 1)
    uci_validate_data.py validate PACKAGE TYPE NAME 'option:type[:default]'...
        as validate_data: prints "option='value'; " assignments for the shell
        to eval, reports every option on stderr and exits 1 if the section
        fails. With an empty NAME (procd_add_validation) it only checks that
        every type in the schema is one validate_data knows.

What it encodes was observed on OpenWrt's real ubox validate_data (issue 15,
a 64-bit build, where C's long has 64 bits):

- numbers are C's: `port` is strtoul(v, &e, 10) stored in an int, then
  compared with <= 65535, so -1 and 4294967365 (2**32 + 69) pass;
  `uinteger`, `integer`, `min()`, `max()` and `range()` are strtol(v, &e, 0)
  stored in an int, so 0x10 and 010 (octal) pass, and leading blanks too.
- `bool` compares with strcasecmp, so No and YES pass, but the exported
  value of such a mixed-case word is empty (so enabled 'No' reaches the init
  script as '').
- stderr gets one line for every option, valid or not:
  `atftpd.service.enabled=1 validates as bool with true`,
  `atftpd.service.maxthread is unset and defaults to ...` (the tail of that
  line was not recorded; this prints the type and default), and for a UCI
  list one line per item, with its index:
  `atftpd.service.bind_address[0]=router.lan validates as list(ipaddr) with false`.
- a UCI list is judged by its last item only: router.lan then 127.0.0.1
  passes (status 0), and the bad item is left out of the exported value.
  An option holding several words, validated as list(...), must have every
  word valid.

An option that is not set takes the default, which, as in procd, is not
itself validated.
"""

import ipaddress
import os
import shlex
import sys

BOOLS = ('0', 'off', 'false', 'no', 'disabled', '1', 'on', 'true', 'yes', 'enabled')


class Options(dict):
    """{option: [values]}, and .lists: the options given with `list`."""

    def __init__(self):
        super().__init__()
        self.lists = set()


def parse_uci(text):
    """[(type, name, {option: [values]})] from a UCI file (config/option/list)."""
    sections = []
    for number, line in enumerate(text.splitlines(), 1):
        words = shlex.split(line, comments=True)
        if not words:
            continue
        keyword = words[0]
        if keyword == 'config' and len(words) in (2, 3):
            name = words[2] if len(words) == 3 else 'cfg%02x%04x' % (len(sections), number)
            sections.append((words[1], name, Options()))
        elif keyword in ('option', 'list') and len(words) == 3 and sections:
            values = sections[-1][2].setdefault(words[1], [])
            if keyword == 'option':
                values[:] = [words[2]]
                sections[-1][2].lists.discard(words[1])
            else:
                values.append(words[2])
                sections[-1][2].lists.add(words[1])
        elif keyword == 'package':
            continue
        else:
            raise SystemExit('uci: parse error on line %d: %r' % (number, line))
    return sections


def load(package):
    path = os.path.join(os.environ.get('UCI_CONFIG_DIR', '/etc/config'), package)
    with open(path) as f:
        return parse_uci(f.read())


def split_type(expr):
    """'range(0,7)' -> ('range', ['0', '7']); 'port' -> ('port', [])."""
    if '(' not in expr:
        return expr, []
    if not expr.endswith(')'):
        raise ValueError('bad type %r' % expr)
    name, inner = expr[:-1].split('(', 1)
    args, depth, current = [], 0, ''
    for char in inner:
        if char == ',' and depth == 0:
            args.append(current)
            current = ''
            continue
        depth += (char == '(') - (char == ')')
        current += char
    args.append(current)
    return name, args


LONG_MAX = 2 ** 63 - 1
ULONG_MAX = 2 ** 64 - 1


def c_parse(value, base, unsigned):
    """C's strtol()/strtoul() with the end pointer required at the end of
    the string (*e == 0), the result stored in a C int (32 bits, two's
    complement). ValueError when no digits or trailing junk."""
    i = 0
    while i < len(value) and value[i] in ' \t\n\v\f\r':
        i += 1
    negative = False
    if value[i:i + 1] in ('+', '-'):
        negative = value[i] == '-'
        i += 1
    if base == 0:
        if value[i:i + 2].lower() == '0x' and value[i + 2:i + 3].lower() in tuple('0123456789abcdef'):
            base, i = 16, i + 2
        elif value[i:i + 1] == '0':
            base = 8
        else:
            base = 10
    elif base == 16 and value[i:i + 2].lower() == '0x':
        i += 2
    digits = '0123456789abcdef'[:base]
    start = i
    while i < len(value) and value[i].lower() in digits:
        i += 1
    if i == start or i != len(value):
        raise ValueError(value)
    number = int(value[start:i], base)
    if unsigned:
        number = ULONG_MAX if number > ULONG_MAX else (-number % 2 ** 64 if negative else number)
    else:
        number = -number if negative else number
        number = max(-LONG_MAX - 1, min(LONG_MAX, number))
    return (number + 2 ** 31) % 2 ** 32 - 2 ** 31


def integer(value):
    return c_parse(value, 0, False)


def check(expr, value):
    """True if value is valid for the type expression; ValueError for an unknown type."""
    name, args = split_type(expr)
    try:
        if name == 'bool':
            return value.lower() in BOOLS
        if name == 'port':
            return c_parse(value, 10, True) <= 65535
        if name == 'uinteger':
            return integer(value) >= 0
        if name == 'integer':
            integer(value)
            return True
        if name == 'min':
            return integer(value) >= int(args[0])
        if name == 'max':
            return integer(value) <= int(args[0])
        if name == 'range':
            return int(args[0]) <= integer(value) <= int(args[1])
    except ValueError:
        return False
    if name == 'string':
        return True
    if name == 'directory':
        return os.path.isdir(value)
    if name == 'file':
        return os.path.isfile(value)
    if name in ('ipaddr', 'ip4addr', 'ip6addr'):
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            return False
        return name == 'ipaddr' or address.version == (4 if name == 'ip4addr' else 6)
    if name == 'or':
        return any(check(arg, value) for arg in args)
    if name == 'list':
        words = value.split()
        return bool(words) and all(check(args[0], word) for word in words)
    raise ValueError('unknown type %r' % expr)


def known(expr):
    name, args = split_type(expr)
    if name in ('list', 'or'):
        return bool(args) and all(known(arg) for arg in args)
    try:
        check(expr, '0')
    except ValueError:
        return False
    return True


def parse_spec(spec):
    name, rest = spec.split(':', 1)
    depth = 0
    for index, char in enumerate(rest):
        depth += (char == '(') - (char == ')')
        if char == ':' and depth == 0:
            return name, rest[:index], rest[index + 1:]
    return name, rest, None


def validate(package, section_type, section_name, specs):
    schema = [parse_spec(spec) for spec in specs]
    if not section_name:
        unknown = [expr for _, expr, _ in schema if not known(expr)]
        for expr in unknown:
            print('validate_data: unknown type %s' % expr, file=sys.stderr)
        return 1 if unknown else 0
    options = {}
    for stype, sname, opts in load(package):
        if sname == section_name and stype == section_type:
            options = opts
            break
    else:
        print('validate_data: %s.%s not found' % (package, section_name), file=sys.stderr)
        return 1
    failed = 0
    out = []
    where = '%s.%s.' % (package, section_name)
    for name, expr, default in schema:
        values = options.get(name)
        if values is None:
            print('%s%s is unset and defaults to %s %s' % (where, name, expr, default or ''),
                  file=sys.stderr)
            out.append('%s=%s; ' % (name, shlex.quote(default or '')))
            continue
        kind = split_type(expr)[0]
        if kind == 'list' and name in options.lists:
            # One line per item, the result is the last item's; bad items
            # are left out of the value.
            good, ok = [], True
            for index, value in enumerate(values):
                ok = check(expr, value)
                print('%s%s[%d]=%s validates as %s with %s'
                      % (where, name, index, value, expr, str(ok).lower()), file=sys.stderr)
                if ok:
                    good.append(value)
            failed |= not ok
            out.append('%s=%s; ' % (name, shlex.quote(' '.join(good))))
            continue
        value = values[-1]
        ok = check(expr, value)
        print('%s%s=%s validates as %s with %s' % (where, name, value, expr, str(ok).lower()),
              file=sys.stderr)
        failed |= not ok
        if kind == 'bool' and value not in BOOLS:
            value = ''                      # No, YES: valid, but exported empty
        out.append('%s=%s; ' % (name, shlex.quote((default or '') if not ok else value)))
    print(''.join(out))
    return 1 if failed else 0


def shell_load(package):
    """The variables config_load leaves behind (functions.sh's config_*)."""
    lines, names = [], []
    for stype, sname, opts in load(package):
        names.append(sname)
        lines.append('CONFIG_%s_TYPE=%s' % (sname, shlex.quote(stype)))
        for option, values in opts.items():
            lines.append('CONFIG_%s_%s=%s' % (sname, option, shlex.quote(' '.join(values))))
            if option in opts.lists:
                for index, value in enumerate(values, 1):
                    lines.append('CONFIG_%s_%s_ITEM%d=%s' % (sname, option, index,
                                                              shlex.quote(value)))
                lines.append('CONFIG_%s_%s_LENGTH=%d' % (sname, option, len(values)))
    return ['CONFIG_SECTIONS=%s' % shlex.quote(' '.join(names))] + lines


def uci_show(package):
    """`uci show PACKAGE`: package.section=type, package.section.option='value'
    (a list: its values quoted one by one, separated by spaces)."""
    lines = []
    for stype, sname, opts in load(package):
        lines.append('%s.%s=%s' % (package, sname, stype))
        for option, values in opts.items():
            quoted = ' '.join("'%s'" % value.replace("'", "'\\''") for value in values)
            lines.append('%s.%s.%s=%s' % (package, sname, option, quoted))
    return lines


def main(argv):
    if argv[:1] == ['load'] and len(argv) == 2:
        print('\n'.join(shell_load(argv[1])))
        return 0
    if argv[:1] == ['show'] and len(argv) == 2:
        print('\n'.join(uci_show(argv[1])))
        return 0
    if argv[:1] == ['check'] and len(argv) == 3:
        ok = check(argv[1], argv[2])
        print('%s - %s = %s' % (argv[1], argv[2], str(ok).lower()))
        return 0 if ok else 1
    if argv[:1] == ['validate'] and len(argv) >= 4:
        return validate(argv[1], argv[2], argv[3], argv[4:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
