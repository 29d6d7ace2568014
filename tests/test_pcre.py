"""--pcre: atftpd's pattern file, with Python's re, and its order with the generator."""

import signal
import subprocess
import sys

import pytest

import atftpd
from conftest import SERVER, RawClient, TftpError

# The shape of atftpd's own example (README.PCRE, test/pcre_pattern.txt).
ATFTPD_STYLE = '''\
^[p]?pxelinux.cfg/[0-9A-F]{1,8}$ pxelinux.cfg/default
^[p]?pxelinux.0$ pxelinux.0
^(boot)/(.+)-old$ $1/${2}-new
'''


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize('pcre, python', [
    ('$1', r'\g<1>'), ('${12}', r'\g<12>'), ('$0x', r'\g<0>x'), ('$$1', '$1'),
    ('a\\b', 'a\\\\b'), ('plain', 'plain'), ('${name}', r'\g<name>'),
])
def test_replacement_syntax_is_translated(pcre, python):
    assert atftpd.pcre_replacement(pcre) == python


def test_first_matching_rule_wins_and_replaces_the_first_match_only(tmp_path):
    rules = atftpd.Substitutions.load(write(tmp_path / 'p', 'a b\na c\n'))
    assert rules.apply('xaxa') == 'xbxa'
    assert rules.apply('zzz') is None


def test_comments_blank_lines_and_atftpd_files(tmp_path):
    rules = atftpd.Substitutions.load(write(tmp_path / 'p', '# a comment\n\n' + ATFTPD_STYLE))
    assert len(rules.rules) == 3
    assert rules.apply('pxelinux.cfg/C0A80A') == 'pxelinux.cfg/default'
    assert rules.apply('ppxelinux.0') == 'pxelinux.0'
    assert rules.apply('boot/vmlinuz-old') == 'boot/vmlinuz-new'


def test_named_groups_in_pcre_syntax(tmp_path):
    rules = atftpd.Substitutions.load(write(tmp_path / 'p', '^(?<d>[a-z]+)/x ${d}/y\n'))
    assert rules.apply('abc/x') == 'abc/y'


@pytest.mark.parametrize('line', ['only-one-field', 'a b c', '(unclosed x', 'a $2'])
def test_a_bad_line_is_reported_with_its_number(tmp_path, line):
    path = write(tmp_path / 'p', '# fine\ngood ok\n' + line + '\n')
    with pytest.raises(ValueError, match=r':3: '):
        atftpd.Substitutions.load(path)


def test_bad_file_refuses_to_start_with_exit_2(tmp_path, tftp_root):
    path = write(tmp_path / 'p', 'a b c\n')
    result = subprocess.run([sys.executable, SERVER, '--daemon', '--pcre', path, str(tftp_root)],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(':1: expected "pattern replacement"')


def test_pcre_test_prints_each_substitution_until_an_empty_line(tmp_path):
    path = write(tmp_path / 'p', ATFTPD_STYLE)
    result = subprocess.run([sys.executable, SERVER, '--pcre-test', path],
                            input='pxelinux.cfg/01AB\nnothing\n\nnot read\n',
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        'Substitution: "pxelinux.cfg/01AB" -> "pxelinux.cfg/default"',
        'No substitution: "nothing"']


def fetch(server, name):
    with RawClient(server.host, server.port) as client:
        return client.download(name)[0]


def test_substitution_applies_only_to_missing_files(start_server, tftp_root, tmp_path):
    (tftp_root / 'pxelinux.cfg').mkdir()
    (tftp_root / 'pxelinux.cfg' / 'default').write_bytes(b'DEFAULT menu\n')
    (tftp_root / 'pxelinux.cfg' / 'C0A80001').write_bytes(b'DEFAULT host1\n')
    server = start_server('--pcre', write(tmp_path / 'p', ATFTPD_STYLE))
    assert fetch(server, 'pxelinux.cfg/C0A80001') == b'DEFAULT host1\n'     # exists
    assert fetch(server, 'pxelinux.cfg/C0A80002') == b'DEFAULT menu\n'      # substituted
    with pytest.raises(TftpError) as info:
        fetch(server, 'pxelinux.cfg/not-hex')
    assert info.value.code == atftpd.ERR_NOT_FOUND


def test_a_substituted_name_is_checked_against_the_root_again(start_server, tmp_path):
    server = start_server('--pcre', write(tmp_path / 'p', '^escape$ ../../etc/passwd\n'))
    with pytest.raises(TftpError) as info:
        fetch(server, 'escape')
    assert info.value.code == atftpd.ERR_ACCESS


def test_generator_runs_on_the_substituted_name(start_server, tmp_path):
    generator = tmp_path / 'gen'
    generator.write_text('#!/bin/sh\nprintf "%s|%s" "$TFTP_REQUEST" "$TFTP_FILE" >&3\n')
    generator.chmod(0o755)
    server = start_server('--pcre', write(tmp_path / 'p', '^old/(.*)$ new/$1\n'),
                          '--content-generator', str(generator))
    data = fetch(server, 'old/host.cfg').decode()
    request, path = data.split('|')
    assert request == 'old/host.cfg'                # what the client sent
    assert path == '%s/new/host.cfg' % server.root   # what the pattern made of it


def test_sighup_reloads_the_pattern_file_and_keeps_it_when_bad(start_server, tftp_root,
                                                                tmp_path):
    rules = tmp_path / 'p'
    write(rules, '^a$ small.txt\n')
    server = start_server('--pcre', str(rules))
    assert fetch(server, 'a') == b'hello, tftp\n'
    write(rules, '^b$ exact512\n')
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for_log('pattern file .* reloaded: 1 rules')
    assert fetch(server, 'b') == (tftp_root / 'exact512').read_bytes()
    write(rules, 'broken line here\n')
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for_log('not reloaded, keeping the old rules: .*:1: ')
    assert fetch(server, 'b') == (tftp_root / 'exact512').read_bytes()
