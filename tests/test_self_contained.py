"""A clone stands on its own: no file in the repository may read or point at
a directory beside the checkout (the team's reference notes live in a
sibling `shared/` folder that a user's clone does not have)."""

import os
import subprocess

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Spelled in pieces so this file does not match itself.
SIBLING = '..' + '/' + 'shared'
JOINED = "'" + 'shared' + "', 'python3-light"


def tracked_files():
    out = subprocess.run(['git', 'ls-files', '-z'], cwd=PROJECT, stdout=subprocess.PIPE,
                         check=True).stdout
    return [name for name in out.decode().split('\0') if name]


def test_no_file_refers_to_the_sibling_shared_folder():
    offenders = []
    for name in tracked_files():
        path = os.path.join(PROJECT, name)
        if not os.path.isfile(path):
            continue
        with open(path, 'rb') as f:
            text = f.read().decode('utf-8', 'replace')
        for number, line in enumerate(text.splitlines(), 1):
            if SIBLING in line or JOINED in line:
                offenders.append('%s:%d: %s' % (name, number, line.strip()))
    assert not offenders, 'files refer to a folder outside the repository:\n' + '\n'.join(offenders)


def test_the_python3_light_list_is_in_the_repository():
    from light_support import EXCLUDED_LIST, excluded_modules
    assert os.path.commonpath([EXCLUDED_LIST, PROJECT]) == PROJECT
    assert 'asyncio' in excluded_modules() and 'logging' in excluded_modules()
