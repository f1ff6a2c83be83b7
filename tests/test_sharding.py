"""Beyond one device: ``_sharded_checks.py`` on 8 simulated CPU devices, in two subprocesses.

JAX fixes the number of CPU devices when its backend starts, and the rest of
the suite runs on one, so the multi-device checks run in two child processes,
each taking every second check (compiling each case once, about 45 and 65 s
on 2 cores, so that two test workers share them); the output names each check
that failed.
"""

import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
@pytest.mark.parametrize("part", ["1/2", "2/2"])
def test_sharded_checks_on_8_devices(part):
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
    env["JAX_PLATFORMS"] = "cpu"  # simulated devices, also where a GPU is present
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (os.path.dirname(HERE), env.get("PYTHONPATH")) if p
    )
    done = subprocess.run(
        [sys.executable, os.path.join(HERE, "_sharded_checks.py"), "--part", part],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, "sharded checks failed:\n" + out
    assert "0 failed" in out and "FAIL " not in out
