"""The manual page atftpd.py.8: it formats without a warning, and it
documents exactly the options and generator variables that --help prints.

--help is read when the test runs, never copied here, so a change to the
command line fails this test until the man page follows it.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import IN_CI, PROJECT, SERVER

MANPAGE = os.path.join(PROJECT, 'atftpd.py.8')
# An option name: one or two dashes, a letter, then letters, digits, - or _.
# '-v[N]' and '--verbose[=N]' give '-v' and '--verbose'.
OPTION = re.compile(r'(?<![\w-])--?[A-Za-z][\w-]*')
VARIABLE = re.compile(r'\bTFTP_[A-Z_]+\b')


def help_text():
    # Wide, so that no option line wraps, whatever the terminal.
    env = dict(os.environ, COLUMNS='250')
    return subprocess.run([sys.executable, SERVER, '--help'], stdout=subprocess.PIPE,
                          check=True, env=env, universal_newlines=True).stdout


def manpage():
    with open(MANPAGE) as f:
        return f.read()


def plain(roff):
    """Roff source as text: font escapes dropped, \\- and \\e turned back."""
    return re.sub(r'\\f[BIRP]', '', roff).replace('\\-', '-').replace('\\e', '\\')


def need(program):
    if shutil.which(program) is None:
        message = '%s is not installed (Debian: groff-base, tests/debian-packages.txt)' % program
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def test_groff_formats_it_without_warnings():
    """groff with every warning on; then mandoc's linter, where it is installed
    (it is optional: not a skip, which CI=true would count as a failure)."""
    need('groff')
    result = subprocess.run(['groff', '-man', '-ww', '-z', MANPAGE], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True)
    assert result.returncode == 0 and result.stderr == '', result.stderr
    if shutil.which('mandoc'):
        result = subprocess.run(['mandoc', '-T', 'lint', '-W', 'warning', MANPAGE],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                universal_newlines=True)
        assert result.returncode == 0 and result.stdout == '', result.stdout


def help_options():
    """Every name on an option line of --help. argparse indents an option's
    invocation ('-t S, --tftpd-timeout S') by exactly two spaces and ends it
    with two spaces or the line; wrapped descriptions and the epilog are
    indented otherwise or do not start with a dash."""
    found = set()
    for line in help_text().splitlines():
        match = re.match(r'  (-\S.*?)(?:\s{2,}|$)', line)
        if match:
            found.update(OPTION.findall(match.group(1)))
    return found


def manpage_options():
    """Every name on a .TP tag line of the OPTIONS section: the line after
    each .TP, up to the next .SH. Only tags count, not options named in the
    text (\\-\\-allow\\-write in "implies \\-\\-allow\\-write"), so an option
    that is merely mentioned is not taken as documented."""
    section = re.search(r'^\.SH OPTIONS\n(.*?)^\.SH ', manpage(), re.S | re.M).group(1)
    tags = re.findall(r'^\.TP[^\n]*\n([^\n]*)', section, re.M)
    return {name for tag in tags for name in OPTION.findall(plain(tag))}


def test_every_option_of_help_is_documented_and_no_other():
    shown, documented = help_options(), manpage_options()
    assert '--help' in shown and '--mcast_ttl' in shown, shown     # the parse works
    assert shown == documented, ('in --help, not in atftpd.py.8: %s; in atftpd.py.8, not in '
                                 '--help: %s' % (sorted(shown - documented),
                                                 sorted(documented - shown)))


def test_the_generator_environment_is_the_one_help_describes():
    """TFTP_* names anywhere in --help (only its epilog has them) against
    TFTP_* names anywhere in the man page."""
    shown, documented = set(VARIABLE.findall(help_text())), set(VARIABLE.findall(manpage()))
    assert 'TFTP_FILE' in shown, shown
    assert shown == documented, ('in --help, not in atftpd.py.8: %s; in atftpd.py.8, not in '
                                 '--help: %s' % (sorted(shown - documented),
                                                 sorted(documented - shown)))
