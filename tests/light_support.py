"""OpenWrt's python3-light, imitated: the modules it lacks made unimportable.

The list is tests/python3-light-excluded.txt (OpenWrt's python3 package:
python3-light is python3-base minus the listed modules). BLOCKER is Python
source that installs a finder refusing those modules; it is the body of a
sitecustomize.py (put on PYTHONPATH, so generators started by the server get
it too) or the head of a launcher script (for `python3 -I`, which ignores
PYTHONPATH)."""

import os

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXCLUDED_LIST = os.path.join(PROJECT, 'tests', 'python3-light-excluded.txt')

BLOCKER = '''\
"""python3-light: the modules OpenWrt's python3-light lacks are unimportable."""
import sys

BLOCKED = frozenset(%(blocked)r)


class Python3Light:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ModuleNotFoundError('No module named %%r (python3-light)' %% name, name=name)
        return None

    @staticmethod
    def invalidate_caches():
        pass


sys.meta_path.insert(0, Python3Light)
for loaded in list(sys.modules):
    if loaded.split('.')[0] in BLOCKED:
        del sys.modules[loaded]
'''

# `python3 -I LAUNCHER SCRIPT ARGS...` runs SCRIPT ARGS... behind the blocker.
LAUNCHER_TAIL = '''\
import runpy
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''


def excluded_modules():
    """The module names of the list; AssertionError when it is missing or empty."""
    if not os.path.isfile(EXCLUDED_LIST):
        raise AssertionError('the list of modules missing from python3-light is not at %s'
                             % EXCLUDED_LIST)
    names = []
    with open(EXCLUDED_LIST) as f:
        for line in f:
            name = line.split('#', 1)[0].strip()
            if name:
                names.append(name)
    if not names:
        raise AssertionError('%s lists no module' % EXCLUDED_LIST)
    return names


def blocker_source():
    return BLOCKER % {'blocked': sorted(excluded_modules())}


def write_launcher(path):
    """Write the launcher script to `path` (a str or Path); returns str(path)."""
    with open(str(path), 'w') as f:
        f.write(blocker_source() + LAUNCHER_TAIL)
    return str(path)


def write_sitecustomize(directory):
    with open(os.path.join(str(directory), 'sitecustomize.py'), 'w') as f:
        f.write(blocker_source())
