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


def load_run_py():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        'bench_run', os.path.join(PROJECT, 'benchmarks', 'run.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_ratio_pairs_samples_of_the_same_repetition():
    """A failed sample leaves a repetition out on one side only: the pairs
    must still be taken by repetition, not by position."""
    run = load_run_py()
    # Repetition 1 failed for the server; the reference has all three.
    assert run.paired_ratio([2.0, 8.0], [0, 2], [1.0, 100.0, 4.0], [0, 1, 2]) == 2.0
    # Results from before repetitions were recorded: samples in order.
    assert run.paired_ratio([3.0, 6.0, 9.0], None, [1.0, 2.0, 3.0], None) == 3.0
    # The machine's speed in a repetition cancels out of its pair. Pairing by
    # position after the failed repetition would give 1.1 and 110 here.
    rates, ref = [110.0, 220.0], [100.0, 2.0, 200.0]
    assert run.paired_ratio(rates, [0, 2], ref, [0, 1, 2]) == pytest.approx(1.1)
