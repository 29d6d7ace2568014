"""The project ships under one licence, stated where packagers look for it:
LICENSE holds the full GPL version 2 text, every program (anything that
starts with #!) and the OpenWrt Makefile carry the SPDX line, and the
OpenWrt package names the licence and its file."""

import os
import re

from test_self_contained import PROJECT, tracked_files

SPDX = 'SPDX-License-Identifier: GPL-2.0-or-later'


def read(name):
    with open(os.path.join(PROJECT, name), 'rb') as f:
        return f.read().decode('utf-8', 'replace')


def programs():
    return [name for name in tracked_files()
            if os.path.isfile(os.path.join(PROJECT, name)) and read(name).startswith('#!')]


def test_license_is_the_whole_gpl_2_text():
    text = read('LICENSE')
    assert 'GNU GENERAL PUBLIC LICENSE' in text and 'Version 2, June 1991' in text
    # The whole text, not a summary: the terms run to section 12 and end there.
    assert '12. IN NO EVENT UNLESS REQUIRED BY APPLICABLE LAW' in text
    assert 'END OF TERMS AND CONDITIONS' in text


def test_every_program_and_the_openwrt_makefile_have_the_spdx_line():
    names = programs()
    assert 'atftpd.py' in names and 'generators/pxelinux' in names
    missing = [name for name in names + ['openwrt/Makefile']
               if SPDX not in read(name).splitlines()[:3][-2:] and SPDX not in read(name)[:200]]
    assert not missing, 'no "%s" near the top of: %s' % (SPDX, ', '.join(missing))


def test_openwrt_package_names_the_licence_and_its_file():
    makefile = read('openwrt/Makefile')
    fields = dict(re.findall(r'^(PKG_\w+):=(.*)$', makefile, re.M))
    assert fields['PKG_LICENSE'] == 'GPL-2.0-or-later'
    # The package is built from the repository root: its files are ../ of openwrt/.
    for name in fields['PKG_LICENSE_FILES'].split():
        assert os.path.isfile(os.path.join(PROJECT, name)), name
        assert '$(CURDIR)/../%s' % name in makefile, 'Build/Prepare does not copy %s' % name
    assert re.match(r'^\S.* <[^@\s]+@[^@\s]+>$', fields['PKG_MAINTAINER'])
