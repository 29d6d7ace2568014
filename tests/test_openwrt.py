"""openwrt/: the procd init script run against a recording stand-in for
rc.common, procd and UCI (tests/openwrt_stub.sh), the feed Makefile, and
the .ipk that build-ipk.sh makes, unpacked and its server run for real."""

import hashlib
import os
import pwd
import py_compile
import re
import shlex
import stat
import sys
import syslog
import tarfile

import pytest

from conftest import PROJECT, RawClient
from router_support import (ForegroundServer, IS_ROOT, need_program, run, shellcheck)

import atftpd

OPENWRT = os.path.join(PROJECT, 'openwrt')
INIT = os.path.join(OPENWRT, 'files', 'atftpd.init')
CONFIG = os.path.join(OPENWRT, 'files', 'atftpd.config')
MAKEFILE = os.path.join(OPENWRT, 'Makefile')
BUILD_IPK = os.path.join(OPENWRT, 'build-ipk.sh')
STUB = os.path.join(PROJECT, 'tests', 'openwrt_stub.sh')
PROG = '/usr/sbin/atftpd.py'
# procd runs the server as a module from PROG's directory (bytecode cached).
LAUNCH = ['/usr/bin/python3', '-m', 'atftpd']
MODULE_ENV = ['PYTHONPATH=/usr/sbin']
FRAMEWORK_CODES = 'SC2034,SC2154,SC3043'


# shellcheck ###################################################################

@pytest.mark.parametrize('path', [INIT, BUILD_IPK, STUB], ids=os.path.basename)
def test_script_is_shellcheck_clean(path):
    result = shellcheck(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_init_disables_only_the_procd_framework_warnings():
    with open(INIT) as f:
        directives = [line for line in f if 'shellcheck' in line]
    assert len(directives) == 1, directives
    match = re.match(r'# shellcheck disable=(\S+) # \S.*', directives[0])
    assert match and match.group(1) == FRAMEWORK_CODES, directives[0]


def test_init_header_is_procd_shaped():
    with open(INIT) as f:
        text = f.read()
    assert text.startswith('#!/bin/sh /etc/rc.common\n')
    assert re.search(r'^START=\d\d$', text, re.M)
    assert re.search(r'^USE_PROCD=1$', text, re.M)
    assert re.search(r'^PROG=%s$' % re.escape(PROG), text, re.M)
    assert os.stat(INIT).st_mode & 0o111, 'init script must be executable (scp keeps the mode)'


# The init script under the stub ##############################################

class InitRun:
    """The result of `/etc/init.d/atftpd ACTION` under the stub."""

    def __init__(self, result, calls):
        self.result = result
        self.calls = calls                  # [(function, [args])]

    @property
    def stdout(self):
        return self.result.stdout

    @property
    def stderr(self):
        return self.result.stderr

    def named(self, function):
        return [args for name, args in self.calls if name == function]

    def instances(self):
        """{instance name: {param: [values]}} as procd would hold them."""
        found = {}
        current = None
        for name, args in self.calls:
            if name == 'procd_open_instance':
                current = found.setdefault(args[0] if args else 'instance', {})
            elif name == 'procd_close_instance':
                current = None
            elif name == 'procd_set_param':
                assert current is not None, 'procd_set_param outside an instance'
                current[args[0]] = list(args[1:])
            elif name == 'procd_append_param':
                assert current is not None, 'procd_append_param outside an instance'
                current.setdefault(args[0], []).extend(args[1:])
            elif name == 'procd_add_mdns':
                assert current is not None, 'procd_add_mdns outside an instance'
                current['mdns'] = list(args)
        return found


def run_init(tmp_path, uci, action='start', env=None):
    """Run the init script, installed as <tmp>/etc/init.d/atftpd, with
    `uci` as /etc/config/atftpd, as a router runs it: no IPKG_INSTROOT
    (that is image-build mode) except for enable/disable, which link below
    it. procd's state (<tmp>/procd) and the script's (<tmp>/run) last from
    one call to the next, as on a router between commands."""
    need_program('busybox', 'busybox')
    initd = tmp_path / 'etc' / 'init.d'
    initd.mkdir(parents=True, exist_ok=True)
    (tmp_path / 'etc' / 'rc.d').mkdir(exist_ok=True)
    (tmp_path / 'etc' / 'config').mkdir(exist_ok=True)
    script = initd / 'atftpd'
    with open(INIT) as f:
        script.write_text(f.read())
    (tmp_path / 'etc' / 'config' / 'atftpd').write_text(uci)
    log = tmp_path / 'procd.log'
    if log.exists():
        log.unlink()
    (tmp_path / 'procd').mkdir(exist_ok=True)
    environ = dict(os.environ, STUB_LOG=str(log), STUB_PYTHON=sys.executable,
                   UCI_CONFIG_DIR=str(tmp_path / 'etc' / 'config'),
                   STUB_PROCD=str(tmp_path / 'procd'), ATFTPD_STATE=str(tmp_path / 'run'),
                   ATFTPD_MD5FILE=str(tmp_path / 'config.md5'))
    environ.pop('IPKG_INSTROOT', None)
    if action in ('enable', 'disable'):
        environ['IPKG_INSTROOT'] = str(tmp_path)
    environ.update(env or {})
    result = run(['busybox', 'sh', STUB, str(script), action], env=environ)
    calls = []
    if log.exists():
        for line in log.read_text().splitlines():
            words = shlex.split(line)
            calls.append((words[0], words[1:]))
    return InitRun(result, calls)


def uci_section(options, name='service', kind='service'):
    head = "config %s '%s'\n" % (kind, name) if name else 'config %s\n' % kind
    lines = []
    for key, value in options:
        keyword = 'list' if key.startswith('list ') else 'option'
        key = key.split(' ', 1)[-1]
        lines.append("\t%s %s '%s'\n" % (keyword, key, value))
    return head + ''.join(lines) + '\n'


@pytest.fixture
def served(tmp_path):
    root = tmp_path / 'srv'
    root.mkdir()
    (root / 'hello.txt').write_bytes(b'hello from procd\n')
    return str(root)


@pytest.fixture
def generator(tmp_path):
    path = tmp_path / 'generator.sh'
    path.write_text('#!/bin/sh\nprintf "generated for %s\\n" "$TFTP_REQUEST" >&3\n')
    path.chmod(0o755)
    return str(path)


def shipped_config(root):
    with open(CONFIG) as f:
        text = f.read()
    assert "option path '/srv/tftp'" in text
    return text.replace("'/srv/tftp'", "'%s'" % root)


def test_shipped_config_gives_the_atftpd_package_command_line(tmp_path, served):
    run_ = run_init(tmp_path, shipped_config(served))
    assert run_.result.returncode == 0, run_.stderr
    assert run_.instances() == {'service': {
        'command': LAUNCH + ['--daemon', '--no-fork',
                             '--user', 'root.root', '--port', '69', served],
        'env': MODULE_ENV,
        'stdout': ['1'],
        'stderr': ['1'],
        'respawn': [],
        'mdns': ['tftp', 'udp', '69', 'daemon=atftpd'],
    }}
    assert run_.named('procd_open_service') == [['atftpd', str(tmp_path / 'etc/init.d/atftpd')]]
    assert 'validation failed' not in run_.stdout


def test_triggers_reload_on_config_change_and_declare_the_schema(tmp_path, served):
    run_ = run_init(tmp_path, shipped_config(served))
    assert run_.named('procd_add_reload_trigger') == [['atftpd']]
    assert run_.named('procd_add_validation') == [['validate_atftpd_section']]
    # procd_add_validation runs the validator without a section: the schema,
    # whose every type the stand-in validate_data knows (status 0).
    schema = [args for args in run_.named('uci_load_validate') if args[2] == '']
    assert len(schema) == 1
    package, kind, _, callback, status = schema[0][:5]
    assert (package, kind, callback, status) == ('atftpd', 'service', '', '0')
    types = dict(spec.split(':')[:2] for spec in schema[0][5:])
    assert types == {
        'enabled': 'bool', 'path': 'directory', 'port': 'port',
        'bind_address': 'list(ipaddr)', 'user': 'string', 'verbose': 'range(0,7)',
        'maxthread': 'min(1)', 'max_blksize': 'range(8,65464)',
        'allow_write': 'bool', 'allow_create': 'bool', 'generator': 'file',
        'generator_timeout': 'min(1)', 'generator_max_size': 'min(1)',
        'generator_max_running': 'min(1)', 'generator_cache': 'uinteger', 'mdns': 'bool',
        'env': 'list(string)', 'port_range': 'string', 'allow': 'list(string)',
        'deny': 'list(string)',
    }
    assert run_.calls[-1] == ('procd_close_service', ['set'])


def test_config_of_openwrts_atftpd_package_works_unchanged(tmp_path, served):
    """net/atftp's atftpd.conf: config service 'service', path and port only."""
    run_ = run_init(tmp_path, "\nconfig service 'service'\n\toption path '%s'\n"
                              "\toption port '6969'\n" % served)
    assert run_.instances()['service']['command'] == LAUNCH + [
        '--daemon', '--no-fork', '--user', 'root.root',
        '--port', '6969', served]


def test_every_option_maps_to_its_flag_in_order(tmp_path, served, generator):
    run_ = run_init(tmp_path, uci_section([
        ('enabled', '1'), ('path', served), ('port', '1069'),
        ('list bind_address', '192.168.1.1'), ('list bind_address', 'fd00::1'),
        ('user', 'nobody'), ('verbose', '7'), ('maxthread', '20'), ('max_blksize', '1428'),
        ('allow_write', 'yes'), ('allow_create', 'on'), ('generator', generator),
        ('generator_timeout', '5'), ('generator_max_size', '65536'),
        ('generator_max_running', '2'), ('generator_cache', '0'), ('mdns', '0'),
        ('port_range', '40000:40999'), ('list allow', '192.168.1.0/24'),
        ('list allow', 'fd00::/8'), ('list allow', '10.0.0.1'), ('list deny', '192.168.1.13'),
    ]))
    assert run_.result.returncode == 0, run_.stderr
    assert run_.instances() == {'service': {
        'command': LAUNCH + ['--daemon', '--no-fork',
                             '--user', 'nobody', '--port', '1069',
                             '--bind-address', '192.168.1.1', '--bind-address', 'fd00::1',
                             '--verbose=7', '--maxthread', '20', '--max-blksize', '1428',
                             '--allow-write', '--allow-create',
                             '--content-generator', generator, '--generator-timeout', '5',
                             '--generator-max-size', '65536', '--generator-max-running', '2',
                             '--generator-cache', '0', '--port-range', '40000:40999',
                             '--allow', '192.168.1.0/24', '--allow', 'fd00::/8',
                             '--allow', '10.0.0.1', '--deny', '192.168.1.13', served],
        'env': MODULE_ENV,
        'stdout': ['1'],
        'stderr': ['1'],
        'respawn': [],
    }}


def test_generator_limits_without_a_generator_are_not_passed(tmp_path, served):
    run_ = run_init(tmp_path, uci_section([('path', served), ('generator_timeout', '5'),
                                           ('allow_write', '0')]))
    command = run_.instances()['service']['command']
    assert not [arg for arg in command if arg.startswith('--generator')]
    assert '--allow-write' not in command


def test_user_by_number_and_group(tmp_path, served):
    run_ = run_init(tmp_path, uci_section([('path', served), ('user', '0.0')]))
    assert failing_lines(run_) == [] and '0.0' in run_.instances()['service']['command']
    run_ = run_init(tmp_path, uci_section([('path', served), ('user', 'root.root')]))
    assert failing_lines(run_) == []


def test_bind_address_as_an_option_with_two_words(tmp_path, served):
    run_ = run_init(tmp_path, uci_section([('path', served),
                                           ('bind_address', '10.0.0.1 ::1')]))
    command = run_.instances()['service']['command']
    assert command[-5:] == ['--bind-address', '10.0.0.1', '--bind-address', '::1', served]


@pytest.mark.parametrize('value', ['0', 'no', 'off', 'false', 'disabled'])
def test_enabled_off_starts_no_instance(tmp_path, served, value):
    run_ = run_init(tmp_path, uci_section([('enabled', value), ('path', served)]))
    assert run_.result.returncode == 0, run_.stderr
    assert run_.instances() == {}
    assert 'validation failed' not in run_.stdout
    assert run_.named('procd_add_reload_trigger') == [['atftpd']]   # a later enable reloads


INVALID = [
    ('port', 'tftp'),
    ('port', '70000'),
    ('path', '/nonexistent/tftp'),
    ('enabled', 'maybe'),
    ('verbose', '8'),
    ('verbose', 'debug'),
    ('maxthread', '0'),
    ('max_blksize', '7'),
    ('max_blksize', '65465'),
    ('list bind_address', 'router.lan'),
    ('list bind_address', '192.168.1.300'),
    ('allow_create', '2'),
    ('generator', '/nonexistent/generator.sh'),
    ('generator_timeout', '0'),
    ('generator_max_size', '1M'),
    ('generator_max_running', '0'),
    ('generator_cache', '-5'),
    ('mdns', 'sometimes'),
    # Real validate_data passes these (C's strtoul/strtol, issue 15): the
    # init script must catch them, or the server exits and procd respawns it.
    ('port', '-1'),
    ('port', '4294967365'),
    ('verbose', '07'),
    ('maxthread', '0x10'),
    ('max_blksize', '010'),
    ('generator_cache', '0x0'),
    ('generator_timeout', ' 5'),
    ('user', 'nobdy'),
    ('list env', 'MACLIST'),
    ('list env', '1X=2'),
    ('list env', 'PYTHONPATH=/tmp'),
    ('list env', 'TFTP_ROOT=/'),
    ('env', 'MACLIST_SOURCE=/tmp/maclist'),
    ('user', 'root.nogrp'),
    ('port_range', '100'),
    ('port_range', '2000:1000'),
    ('port_range', '0:10'),
    ('port_range', '1:70000'),
    ('port_range', '0x10:0x20'),
    ('list allow', '10.0.0.0/33'),
    ('list allow', '::/129'),
    ('list allow', '10.0.0.0/'),
    ('list deny', 'lan'),
    ('list deny', '10.0.0.0/08'),
]


def failing_lines(run_):
    return [line for line in run_.stderr.splitlines() if line.strip()]


@pytest.mark.parametrize('option, value', INVALID)
def test_invalid_value_is_reported_in_one_line_and_nothing_started(tmp_path, served,
                                                                   option, value):
    run_ = run_init(tmp_path, uci_section([('path', served), (option, value)]))
    assert run_.instances() == {}
    assert "validation failed: atftpd section 'service' not started" in run_.stdout
    name = option.split(' ')[-1]
    # One line, naming the option and the value; real validate_data's
    # lines for the valid and unset options are not shown.
    lines = failing_lines(run_)
    assert len(lines) == 1, run_.stderr
    assert re.match(r'atftpd\.service\.%s(\[0\])?=%s (validates as .* with false|is not )'
                    % (name, re.escape(value)), lines[0]), lines[0]
    logged = run_.named('logger')
    assert [args[:4] for args in logged] == [['-t', 'atftpd', '-p', 'daemon.err']] * 2
    assert logged[0][4] == lines[0]
    assert logged[1][4] == "validation failed: atftpd section 'service' not started"
    status = run_init(tmp_path, uci_section([('path', served), (option, value)]), 'status')
    assert status.result.returncode == 1
    assert status.stdout.splitlines() == [
        'active with no instances', 'config error, /etc/config/atftpd not applied:', lines[0]]


def test_a_bad_list_item_before_a_good_one_is_caught(tmp_path, served):
    """Real validate_data judges a list by its last item: this passes it
    (status 0) and leaves router.lan out. The init script refuses it."""
    uci = uci_section([('path', served), ('list bind_address', 'router.lan'),
                       ('list bind_address', '127.0.0.1')])
    run_ = run_init(tmp_path, uci)
    assert run_.instances() == {}
    assert [args[4] for args in run_.named('uci_load_validate') if args[2]] == ['0']
    # validate_data said nothing (status 0: procd.sh shows its stderr only
    # on a failure); the line is the init script's.
    assert failing_lines(run_) == ['atftpd.service.bind_address[0]=router.lan is not an IP address']


def test_the_stand_in_validate_data_is_as_loose_as_the_real_one(tmp_path):
    """What issue 15 observed on OpenWrt's validate_data."""
    script = os.path.join(PROJECT, 'tests', 'uci_validate_data.py')
    for kind, value, valid in [
            ('port', '-1', True), ('port', '4294967365', True), ('port', '70000', False),
            ('port', '0x10', False), ('uinteger', '0x10', True), ('uinteger', '010', True),
            ('uinteger', '08', False), ('min(1)', '0x10', True), ('range(0,7)', '07', True),
            ('bool', 'No', True), ('bool', 'YES', True), ('bool', 'maybe', False),
            ('ipaddr', 'router.lan', False), ('ipaddr', 'fd00::1', True)]:
        result = run([sys.executable, script, 'check', kind, value])
        assert (result.returncode == 0) == valid, (kind, value)
        assert result.stdout == '%s - %s = %s\n' % (kind, value, str(valid).lower())
    (tmp_path / 'atftpd').write_text(uci_section([('enabled', 'No'), ('port', '70000')]))
    result = run([sys.executable, script, 'validate', 'atftpd', 'service', 'service',
                  'enabled:bool:1', 'port:port:69', 'verbose:range(0,7)'],
                 env=dict(os.environ, UCI_CONFIG_DIR=str(tmp_path)))
    assert result.returncode == 1
    assert result.stdout.startswith("enabled=''; ")      # No: valid, exported empty
    assert result.stderr.splitlines() == [
        'atftpd.service.enabled=No validates as bool with true',
        'atftpd.service.port=70000 validates as port with false',
        'atftpd.service.verbose is unset and defaults to range(0,7) ']


@pytest.mark.parametrize('value, started', [('No', False), ('OFF', False), ('Disabled', False),
                                            ('YES', True), ('True', True), ('On', True)])
def test_booleans_in_any_case_mean_what_they_say(tmp_path, served, value, started):
    run_ = run_init(tmp_path, uci_section([('enabled', value), ('path', served),
                                           ('allow_write', value), ('mdns', value)]))
    assert run_.result.returncode == 0, run_.stderr
    assert failing_lines(run_) == []
    if not started:
        assert run_.instances() == {}
        return
    instance = run_.instances()['service']
    assert '--allow-write' in instance['command']
    assert instance['mdns'] == ['tftp', 'udp', '69', 'daemon=atftpd']


def test_env_list_reaches_the_server_and_its_generator(tmp_path, served, generator):
    run_ = run_init(tmp_path, uci_section([
        ('path', served), ('generator', generator),
        ('list env', 'MACLIST_SOURCE=/tmp/dhcp.leases'),
        ('list env', 'MACLIST_FILTER=a  b '), ('list env', 'EMPTY=')]))
    assert failing_lines(run_) == [], run_.stderr
    assert run_.instances()['service']['env'] == MODULE_ENV + [
        'MACLIST_SOURCE=/tmp/dhcp.leases', 'MACLIST_FILTER=a  b ', 'EMPTY=']


# A typo must not take TFTP down (issue 15, point 4) #########################

def test_a_typo_keeps_the_running_server_with_its_last_good_settings(tmp_path, served):
    good = uci_section([('path', served), ('port', '1069'), ('list env', 'A=1')])
    first = run_init(tmp_path, good)
    declared = first.instances()
    assert declared and failing_lines(first) == []
    assert run_init(tmp_path, good, 'status').stdout == 'running\n'
    for action in ('reload', 'start', 'restart'):
        bad = run_init(tmp_path, uci_section([('path', served), ('port', '1o69')]), action)
        # procd is given the same instance again: it leaves it running.
        assert bad.instances() == declared, action
        assert failing_lines(bad) == ['atftpd.service.port=1o69 validates as port with false']
        line = ("validation failed: atftpd section 'service' keeps running with its "
                "last good settings")
        assert bad.stdout.strip() == line
        assert [args[4] for args in bad.named('logger')] == [failing_lines(bad)[0], line]
        status = run_init(tmp_path, good, 'status')
        assert status.result.returncode == 1
        assert status.stdout.splitlines() == [
            'running', 'config error, /etc/config/atftpd not applied:',
            'atftpd.service.port=1o69 validates as port with false']
    fixed = run_init(tmp_path, uci_section([('path', served), ('port', '2069')]), 'reload')
    assert fixed.instances()['service']['command'][-3:] == ['--port', '2069', served]
    status = run_init(tmp_path, good, 'status')
    assert (status.result.returncode, status.stdout) == (0, 'running\n')


def test_after_disable_in_uci_a_typo_does_not_bring_the_old_server_back(tmp_path, served):
    run_init(tmp_path, uci_section([('path', served)]))
    off = run_init(tmp_path, uci_section([('path', served), ('enabled', '0')]), 'reload')
    assert off.instances() == {}
    bad = run_init(tmp_path, uci_section([('path', served), ('port', 'x')]), 'reload')
    assert bad.instances() == {}
    assert "section 'service' not started" in bad.stdout


def test_disabled_with_a_typo_in_the_same_change_is_off(tmp_path, served):
    run_init(tmp_path, uci_section([('path', served)]))
    bad = run_init(tmp_path, uci_section([('path', served), ('enabled', 'No'),
                                          ('port', 'x')]), 'reload')
    assert bad.instances() == {}
    assert failing_lines(bad) == ['atftpd.service.port=x validates as port with false']
    assert "section 'service' not started" in bad.stdout


def test_stop_then_status_is_inactive(tmp_path, served):
    uci = uci_section([('path', served)])
    run_init(tmp_path, uci)
    assert run_init(tmp_path, uci, 'stop').named('procd_kill') == [['atftpd', '']]
    status = run_init(tmp_path, uci, 'status')
    assert (status.result.returncode, status.stdout) == (3, 'inactive\n')


def test_image_build_mode_declares_nothing(tmp_path, served):
    """With IPKG_INSTROOT set, real config_load returns at once: start
    declares no instance and the script writes no state."""
    run_ = run_init(tmp_path, uci_section([('path', served)]),
                    env={'IPKG_INSTROOT': str(tmp_path)})
    assert run_.result.returncode == 0
    assert run_.instances() == {}
    assert not (tmp_path / 'run').exists()


def test_one_instance_per_service_section(tmp_path, served):
    uci = uci_section([('path', served)]) + uci_section(
        [('path', served), ('port', '1069'), ('list bind_address', '127.0.0.1')], name=None)
    uci += uci_section([('path', '/nonexistent')], name='broken')
    run_ = run_init(tmp_path, uci)
    instances = run_.instances()
    assert len(instances) == 2 and 'service' in instances, instances
    anonymous = [name for name in instances if name != 'service'][0]
    assert anonymous.startswith('cfg')          # uci's name for an unnamed section
    assert instances['service']['command'][7:] == ['--port', '69', served]
    assert instances[anonymous]['command'][7:] == [
        '--port', '1069', '--bind-address', '127.0.0.1', served]
    assert "section 'broken' not started" in run_.stdout


def test_enable_links_the_start_script(tmp_path, served):
    run_ = run_init(tmp_path, shipped_config(served), action='enable')
    assert run_.result.returncode == 0, run_.stderr
    start = re.search(r'^START=(\d+)$', open(INIT).read(), re.M).group(1)
    link = tmp_path / 'etc' / 'rc.d' / ('S%satftpd' % start)
    assert os.readlink(str(link)) == '../init.d/atftpd'


def test_procd_command_line_is_accepted_by_the_real_server(tmp_path, served, generator):
    """The command procd would run, with port 0 and our interpreter, serves
    a file and a generated one."""
    user = pwd.getpwuid(os.getuid()).pw_name
    run_ = run_init(tmp_path, uci_section([
        ('path', served), ('port', '0'), ('list bind_address', '127.0.0.1'), ('user', user),
        ('verbose', '6'), ('maxthread', '4'), ('max_blksize', '1428'), ('allow_create', '1'),
        ('generator', generator), ('generator_timeout', '5'), ('generator_cache', '0'),
        ('list allow', '127.0.0.0/8'), ('list deny', '192.0.2.0/24'),
        ('port_range', '40000:40999'),
    ]))
    instance = run_.instances()['service']
    command = instance['command']
    assert command[:3] == LAUNCH and instance['env'] == MODULE_ENV
    # The same launch, with this interpreter and the module from the project,
    # and the log on stdout for the test to read (procd's has syslog: logd).
    assert '--logfile' not in command
    env = dict(os.environ, PYTHONPATH=PROJECT)
    server = ForegroundServer([sys.executable, '-m', 'atftpd'] + command[3:-1]
                              + ['--logfile', '-', command[-1]], env=env)
    try:
        with RawClient('127.0.0.1', server.port) as client:
            assert client.download('hello.txt')[0] == b'hello from procd\n'
            data, oack = client.download('pxelinux.cfg/x', options=[('blksize', '9000')])
            assert data == b'generated for pxelinux.cfg/x\n'
            assert oack == {'blksize': '1428'}
    finally:
        status = server.stop()
    assert status == 0, server.log()


def test_readme_shows_what_a_typo_prints(tmp_path, served):
    """openwrt/README.md's example of a bad value: the reload's output and
    status, line for line."""
    with open(os.path.join(OPENWRT, 'README.md')) as f:
        text = f.read()
    def block(command):
        match = re.search(r'^    # %s.*\n((?:    \S.*\n)+)' % re.escape(command), text, re.M)
        assert match, command
        return [line[4:] for line in match.group(1).splitlines()]
    run_init(tmp_path, uci_section([('path', served)]))
    bad = run_init(tmp_path, uci_section([('path', served), ('port', '6x9')]), 'reload')
    assert block('/etc/init.d/atftpd reload') == failing_lines(bad) + bad.stdout.splitlines()
    status = run_init(tmp_path, uci_section([('path', served), ('port', '6x9')]), 'status')
    assert block('/etc/init.d/atftpd status') == status.stdout.splitlines()


def test_shipped_config_mentions_every_option_and_the_readme(tmp_path):
    with open(CONFIG) as f:
        text = f.read()
    assert 'openwrt/README.md' in text
    with open(INIT) as f:
        options = re.findall(r"^\t\t'(\w+):", f.read(), re.M)
    with open(os.path.join(OPENWRT, 'README.md')) as f:
        readme = f.read()
    for option in options:
        assert re.search(r"^\s*#?(option|list) %s '" % option, text, re.M), option
        assert re.search(r'^\| `%s`' % option, readme, re.M) or '`, `%s`' % option in readme, option


def uci_show(tmp_path):
    result = run([sys.executable, os.path.join(PROJECT, 'tests', 'uci_validate_data.py'),
                  'show', 'atftpd'], env=dict(os.environ,
                                              UCI_CONFIG_DIR=str(tmp_path / 'etc' / 'config')))
    assert result.returncode == 0, result.stderr
    return result.stdout


def reload_config(tmp_path, md5file):
    """What /sbin/reload_config does: signal the packages whose `uci show`
    differs from the checksum file (only those listed there), then rewrite
    the file. Here the only config is atftpd; other lines are kept."""
    path = '/var/run/config.check/atftpd'
    digest = hashlib.md5(uci_show(tmp_path).encode()).hexdigest()
    lines = md5file.read_text().splitlines()
    changed = ['atftpd' for line in lines if line.endswith('  ' + path)
               and line.split()[0] != digest]
    lines = [line for line in lines if not line.endswith('  ' + path)] + [
        '%s  %s' % (digest, path)]
    md5file.write_text('\n'.join(lines) + '\n')
    return changed


def test_the_first_change_after_install_reaches_reload_config(tmp_path, served):
    """reload_config wrote its checksums at boot, before /etc/config/atftpd
    existed: start (opkg's postinst runs it, so does the owner after a
    copy) lists it, so the first `uci commit; reload_config` reloads."""
    md5file = tmp_path / 'config.md5'
    boot = '0123456789abcdef0123456789abcdef  /var/run/config.check/dhcp\n'
    md5file.write_text(boot)
    first = run_init(tmp_path, uci_section([('path', served)]))
    assert first.instances()
    digest = hashlib.md5(uci_show(tmp_path).encode()).hexdigest()
    assert md5file.read_text() == boot + '%s  /var/run/config.check/atftpd\n' % digest
    run_init(tmp_path, uci_section([('path', served)]), 'reload')
    assert md5file.read_text().count('atftpd') == 1            # listed once
    (tmp_path / 'etc' / 'config' / 'atftpd').write_text(
        uci_section([('path', served), ('port', '1069')]))    # uci commit
    assert reload_config(tmp_path, md5file) == ['atftpd']
    assert reload_config(tmp_path, md5file) == []


def test_no_checksum_file_is_left_alone(tmp_path, served):
    run_init(tmp_path, uci_section([('path', served)]))
    assert not (tmp_path / 'config.md5').exists()


def test_the_server_logs_to_syslog_as_atftpd_at_each_lines_priority(monkeypatch):
    """Without --logfile (as procd starts it) the server speaks syslog with
    ident atftpd, facility daemon, and the line's own priority: logread
    shows atftpd[pid] and daemon.warn, not python3[pid] at daemon.info."""
    calls = []
    monkeypatch.setattr(atftpd.syslog, 'openlog', lambda *args: calls.append(('open',) + args))
    monkeypatch.setattr(atftpd.syslog, 'syslog', lambda *args: calls.append(('log',) + args))
    log = atftpd.Log(atftpd.LOG_INFO)
    log.warning('disk %s', 'full')
    log.info('hello')
    assert calls == [('open', 'atftpd', syslog.LOG_PID, syslog.LOG_DAEMON),
                     ('log', syslog.LOG_WARNING, 'disk full'), ('log', syslog.LOG_INFO, 'hello')]


# The feed Makefile ###########################################################

def makefile_text():
    with open(MAKEFILE) as f:
        return f.read()


def test_makefile_is_a_script_only_python_package():
    text = makefile_text()
    values = dict(re.findall(r'^\s*([A-Z_]+):=(.*)$', text, re.M))
    assert values['PKG_VERSION'] == atftpd.__version__
    assert values['PKG_RELEASE'].isdigit()
    assert values['PKGARCH'] == 'all'
    assert values['DEPENDS'] == '+python3-light'
    assert values['PKG_MAINTAINER']
    assert re.search(r'^define Package/atftpd-py/conffiles\n/etc/config/atftpd\nendef$',
                     text, re.M)
    assert re.search(r'^define Build/Compile\nendef$', text, re.M)
    assert '$(INSTALL_BIN) $(PKG_BUILD_DIR)/atftpd.py $(1)%s' % PROG in text
    assert '$(INSTALL_BIN) ./files/atftpd.init $(1)/etc/init.d/atftpd' in text
    assert '$(INSTALL_CONF) ./files/atftpd.config $(1)/etc/config/atftpd' in text
    assert "sed '1s|^#!.*|#!/usr/bin/python3|'" in text
    assert text.rstrip().endswith('$(eval $(call BuildPackage,atftpd-py))')


def test_makefile_recipes_are_indented_with_tabs():
    """Build/* and */install are make recipes: every line starts with a tab."""
    blocks = re.findall(r'^define (\S+)\n(.*?)^endef$', makefile_text(), re.M | re.S)
    recipes = [(name, body) for name, body in blocks
               if name.startswith('Build/') or name.endswith('/install')]
    assert [name for name, _ in recipes] == ['Build/Prepare', 'Build/Compile',
                                             'Package/atftpd-py/install']
    for name, body in recipes:
        for line in body.splitlines():
            assert line.startswith('\t') and not line.startswith('\t '), (name, line)


# The .ipk ####################################################################

@pytest.fixture(scope='module')
def ipk(tmp_path_factory):
    """build-ipk.sh run under busybox sh (as on a router's shell), unpacked
    with tar: {'path', 'outer', 'control', 'data', 'dir'}."""
    need_program('busybox', 'busybox')
    out = tmp_path_factory.mktemp('ipk')
    result = run(['busybox', 'sh', BUILD_IPK, str(out)])
    assert result.returncode == 0, result.stderr
    path = result.stdout.strip()
    assert os.path.dirname(path) == str(out)
    unpacked = out / 'unpacked'
    for part in ('outer', 'control', 'data'):
        (unpacked / part).mkdir(parents=True)
    assert run(['tar', '-xzf', path, '-C', str(unpacked / 'outer')]).returncode == 0
    for part in ('control', 'data'):
        archive = str(unpacked / 'outer' / ('%s.tar.gz' % part))
        assert run(['tar', '-xzf', archive, '-C', str(unpacked / part)]).returncode == 0
    return {'path': path, 'dir': unpacked}


def members(archive):
    with tarfile.open(archive, 'r:gz') as tar:
        return {info.name: info for info in tar.getmembers()}


def release():
    return re.search(r'^PKG_RELEASE:=(\d+)$', makefile_text(), re.M).group(1)


def test_ipk_is_a_gzipped_tar_of_the_three_members(ipk):
    version = '%s-%s' % (atftpd.__version__, release())
    assert os.path.basename(ipk['path']) == 'atftpd-py_%s_all.ipk' % version
    with open(ipk['path'], 'rb') as f:
        assert f.read(2) == b'\x1f\x8b'
    with tarfile.open(ipk['path'], 'r:gz') as tar:
        assert tar.getnames() == ['./debian-binary', './control.tar.gz', './data.tar.gz']
    assert (ipk['dir'] / 'outer' / 'debian-binary').read_text() == '2.0\n'


def test_ipk_control_fields_and_conffiles(ipk):
    text = (ipk['dir'] / 'control' / 'control').read_text()
    fields = dict(re.findall(r'^([A-Za-z-]+): (.*)$', text, re.M))
    assert fields['Package'] == 'atftpd-py'
    assert fields['Version'] == '%s-%s' % (atftpd.__version__, release())
    assert fields['Depends'] == 'python3-light'
    assert fields['Architecture'] == 'all'
    assert fields['Conflicts'] == 'atftpd'
    assert fields['Description'] and re.search(r'^Description: .*\n( \S.*\n)+', text, re.M)
    assert fields['Maintainer']
    assert fields['License'] == 'GPL-2.0-or-later'
    assert (ipk['dir'] / 'control' / 'conffiles').read_text() == '/etc/config/atftpd\n'
    names = set(members(str(ipk['dir'] / 'outer' / 'control.tar.gz')))
    assert names == {'./control', './conffiles', './postinst', './prerm'}


def test_ipk_maintainer_scripts_are_openwrts_defaults(ipk):
    for name, call in (('postinst', 'default_postinst'), ('prerm', 'default_prerm')):
        path = str(ipk['dir'] / 'control' / name)
        result = shellcheck(path)
        assert result.returncode == 0, result.stdout
        with open(path) as f:
            text = f.read()
        assert text.startswith('#!/bin/sh\n') and '%s "$0" "$@"' % call in text


def test_ipk_data_files_modes_and_owner(ipk):
    info = members(str(ipk['dir'] / 'outer' / 'data.tar.gz'))
    files = {name: stat.S_IMODE(i.mode) for name, i in info.items() if i.isfile()}
    assert files == {'.%s' % PROG: 0o755, './etc/init.d/atftpd': 0o755,
                     './etc/config/atftpd': 0o644}
    for name, i in info.items():
        assert (i.uid, i.gid) == (0, 0), name
        if i.isdir():
            assert stat.S_IMODE(i.mode) == 0o755, name
    assert not [name for name, i in info.items() if not (i.isfile() or i.isdir())]


def test_ipk_files_are_the_shipped_ones(ipk):
    data = ipk['dir'] / 'data'
    assert (data / 'etc/init.d/atftpd').read_bytes() == open(INIT, 'rb').read()
    assert (data / 'etc/config/atftpd').read_bytes() == open(CONFIG, 'rb').read()
    server = (data / PROG.lstrip('/')).read_bytes().split(b'\n', 1)
    original = open(os.path.join(PROJECT, 'atftpd.py'), 'rb').read().split(b'\n', 1)
    assert server[0] == b'#!/usr/bin/python3'
    assert server[1] == original[1]


def test_ipk_server_runs_and_serves(ipk, tmp_path):
    root = tmp_path / 'root'
    root.mkdir()
    payload = os.urandom(5000)
    (root / 'file.bin').write_bytes(payload)
    program = str(ipk['dir'] / 'data' / PROG.lstrip('/'))
    argv = [sys.executable, program, '--daemon', '--no-fork', '--port', '0',
            '--bind-address', '127.0.0.1', '--logfile', '-']
    argv += ['--user', 'root.root'] if IS_ROOT else []
    server = ForegroundServer(argv + [str(root)])
    try:
        with RawClient('127.0.0.1', server.port) as client:
            assert client.download('file.bin')[0] == payload
    finally:
        status = server.stop()
    assert status == 0, server.log()
    version = run([sys.executable, program, '--version'])
    assert version.stdout.strip() == 'atftpd.py %s' % atftpd.__version__


def test_build_ipk_runs_under_dash_too(tmp_path):
    """POSIX sh: Debian's dash builds the same archive members."""
    dash = need_program('dash', 'dash')
    result = run([dash, BUILD_IPK, str(tmp_path)])
    assert result.returncode == 0, result.stderr
    with tarfile.open(result.stdout.strip(), 'r:gz') as tar:
        assert tar.getnames() == ['./debian-binary', './control.tar.gz', './data.tar.gz']



def test_readme_states_the_flash_footprint(ipk):
    """openwrt/README.md's figures, within 10% of this build's."""
    with open(os.path.join(os.path.dirname(BUILD_IPK), 'README.md')) as f:
        text = f.read()
    stated = [int(kib) * 1024 for kib in re.findall(r'^\| [^|]+ \| (\d+) KiB \|$', text, re.M)]
    assert len(stated) == 3, 'the footprint table has three rows'
    data = ipk['dir'] / 'data'
    installed = sum(path.stat().st_size for path in data.rglob('*') if path.is_file())
    measured = [os.path.getsize(ipk['path']), installed]
    if sys.version_info[:2] == (3, 11):     # the table's bytecode is 3.11's
        cache = py_compile.compile(str(data / 'usr' / 'sbin' / 'atftpd.py'),
                                   cfile=str(ipk['dir'] / 'atftpd.pyc'), doraise=True)
        measured.append(os.path.getsize(cache))
    for want, got in zip(stated, measured):
        assert abs(got - want) <= want // 10, 'README says %d KiB, the build has %d KiB' % (
            want // 1024, got // 1024)
