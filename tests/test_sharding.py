"""Beyond one device: ``_sharded_checks.py`` on 8 simulated CPU devices, in two subprocesses.

JAX fixes the number of CPU devices when its backend starts, and the rest of
the suite runs on one, so the multi-device checks run in two child processes,
each taking every second check (compiling each case once, about 45 and 65 s
on 2 cores, so that two test workers share them); the output names each check
that failed.
"""

import os

import pytest
from helpers import run_on_cpu_devices

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
@pytest.mark.parametrize("part", ["1/2", "2/2"])
def test_sharded_checks_on_8_devices(part):
    out = run_on_cpu_devices(
        os.path.join(HERE, "_sharded_checks.py"), "--part", part, path=os.path.dirname(HERE)
    )
    assert "0 failed" in out and "FAIL " not in out
