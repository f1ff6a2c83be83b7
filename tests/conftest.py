"""Strict numerics for the whole suite: float64, no silent promotion.

The suite compiles a few thousand small programs, and most of its time is
XLA's LLVM back end optimizing them. ``jax_disable_most_optimizations``
(LLVM at ``-O0``, set here and, through the environment, for the scripts the
tests start) leaves XLA's HLO passes, and so every memory plan and value,
as they are; ``tests/test_run.py`` took 89 s instead of 145 s on two cores.
It does change the rounding of some programs in the last bit, so the tests
that compare values bit for bit (``tests/test_scan.py``,
``tests/test_registry.py``) compile with XLA's defaults
(:func:`llvm_optimized`). The benchmarks run with XLA's defaults.
"""

import os

import jax
import pytest

import bpttjax
import bpttjax as bj
import bpttjax._timing

os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # for the scripts the tests start
jax.config.update("jax_disable_most_optimizations", True)
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture(scope="module")
def llvm_optimized():
    """XLA's default code generation for a module's tests, with no program compiled
    otherwise reused (the flag is read at compile time and is not in JAX's cache keys)."""
    jax.config.update("jax_disable_most_optimizations", False)
    jax.clear_caches()
    yield
    jax.config.update("jax_disable_most_optimizations", True)
    jax.clear_caches()


@pytest.fixture
def key():
    return jax.random.key(0)


def pytest_collection_modifyitems(config, items):
    """Run the tests marked ``slow`` first (a stable sort, so each file keeps its order).

    ``pytest -n auto --dist worksteal`` hands each worker a share of the list and
    lets an idle worker take tests from the others' queues; a minute-long test
    that starts last keeps one worker busy while the others have nothing left.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


CPU_TIMING = bj.budget.Timing(forward_s=40e-6, vjp_s=80e-6, host_event_s=0.05e-6)
"""The time constants ``Budget`` predicts with in the suite, of the order the 2-core CPU
measures: a choice must not depend on how busy the machine is while the suite runs.
Tests marked ``measured_timing`` use the device's own measurement."""


@pytest.fixture(autouse=True)
def fixed_timing(request, monkeypatch):
    """:data:`CPU_TIMING` for every ``Budget`` without ``timing=``, unless the test is
    marked ``measured_timing``."""
    if request.node.get_closest_marker("measured_timing") is None:
        monkeypatch.setattr(bpttjax._timing, "_measured", lambda device: CPU_TIMING)
