#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""A stand-in for OpenWrt's /sbin/validate_data and `uci show`, for the
procd stub (tests/openwrt_stub.sh).

    uci_validate_data.py sections PACKAGE
        prints "TYPE NAME" for every section of $UCI_CONFIG_DIR/PACKAGE
    uci_validate_data.py validate PACKAGE TYPE NAME 'option:type[:default]'...
        as validate_data: prints "option='value'; " assignments for the shell
        to eval, reports every invalid value on stderr and exits 1 if any.
        With an empty NAME (procd_add_validation) it only checks that every
        type in the schema is one validate_data knows.

The types are checked the way procd's validate/validate.c does for the ones
the init script uses: bool, port, uinteger, integer, min(n), max(n),
range(a,b), string, directory, file, ipaddr, ip4addr, ip6addr, list(type),
or(type,...). An option that is not set takes the default, which, as in
procd, is not itself validated.
"""

import ipaddress
import os
import shlex
import sys

BOOLS = ('0', 'off', 'false', 'no', 'disabled', '1', 'on', 'true', 'yes', 'enabled')


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
            sections.append((words[1], name, {}))
        elif keyword in ('option', 'list') and len(words) == 3 and sections:
            values = sections[-1][2].setdefault(words[1], [])
            if keyword == 'option':
                values[:] = [words[2]]
            else:
                values.append(words[2])
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


def integer(value, signed=True):
    digits = value[1:] if signed and value[:1] == '-' else value
    if not digits.isdigit() or not digits.isascii():
        raise ValueError(value)
    return int(value)


def check(expr, value):
    """True if value is valid for the type expression; ValueError for an unknown type."""
    name, args = split_type(expr)
    try:
        if name == 'bool':
            return value.lower() in BOOLS
        if name == 'port':
            return 0 <= integer(value, False) <= 65535
        if name == 'uinteger':
            integer(value, False)
            return True
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
        return check(args[0], value)
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
    for name, expr, default in schema:
        values = options.get(name)
        if values is None:
            out.append('%s=%s; ' % (name, shlex.quote(default or '')))
            continue
        if split_type(expr)[0] == 'list':
            values = [word for value in values for word in value.split()]
        bad = [value for value in values if not check(expr, value)]
        for value in bad:
            print('%s.%s.%s=%s validates as %s with false'
                  % (package, section_name, name, value, expr), file=sys.stderr)
        failed |= bool(bad)
        out.append('%s=%s; ' % (name, shlex.quote((default or '') if bad else ' '.join(values))))
    print(''.join(out))
    return 1 if failed else 0


def main(argv):
    if argv[:1] == ['sections'] and len(argv) == 2:
        for stype, name, _ in load(argv[1]):
            print(stype, name)
        return 0
    if argv[:1] == ['validate'] and len(argv) >= 4:
        return validate(argv[1], argv[2], argv[3], argv[4:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
