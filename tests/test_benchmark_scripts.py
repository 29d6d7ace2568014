"""The benchmark scripts are not run by the suite (timing belongs in
benchmarks/), but they must keep importing and parsing their options: they
share helpers with the tests, and a rename there must not break them."""

import os
import subprocess
import sys

import pytest

from conftest import PROJECT


@pytest.mark.parametrize('script', ['run.py', 'emulation.py'])
def test_benchmark_script_starts(script):
    result = subprocess.run([sys.executable, os.path.join(PROJECT, 'benchmarks', script), '--help'],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=60)
    assert result.returncode == 0, result.stdout
    assert 'usage:' in result.stdout
