"""``batch_chunks="auto"``: how many row chains a layer's loops run, chosen by timing them.

Splitting the batch into independent chains (``_fused._pieces``) lets XLA's
CPU runtime run one chain's operations beside another's. Whether that pays
depends on the cell, the sizes and the machine, in both directions
(``docs/layers.md`` has the measurements), so no fixed rule serves: like
cuDNN's and XLA's GPU autotuners, :func:`choose` compiles the layer's
gradient over its first steps for each candidate, times it, and keeps the
fastest, once per layer shape.

The timing is the fastest of several alternating calls. On a busy machine
it is noisy, so where the candidates are within a few percent the choice
can go either way; ``_MARGIN`` makes a tie keep one chain.

It times only where chains can run side by side: a CPU backend with one
device and at least two cores, and at least ``2 * _MIN_ROWS`` batch rows.
Elsewhere it answers 1 without timing: a GPU runs a step's operations one
after another, so chains only add work there.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.core
import numpy as np

from .._probe import cached, outside_any_mesh, probe_grad
from .._tree import abstract
from ._fused import FusedLayer

# The candidates timed, in order of preference: a later one must beat the best
# before it by _MARGIN, so that a tie keeps the simpler program.
_CANDIDATES = (1, 2)
_MARGIN = 0.97
# Below this many rows per chain, handing a chain to a second thread costs more
# than it saves; such batches are not timed.
_MIN_ROWS = 8
# The probe runs up to _PROBE_STEPS steps (fewer if the sequence is shorter, or
# if a step is large: about _PROBE_FLOPS in all, at least _MIN_STEPS). Per-step
# costs are what chains change, so the probe must be long enough that the
# products after the loop, which chains do not change, weigh little.
_PROBE_STEPS, _MIN_STEPS, _PROBE_FLOPS = 128, 16, 8e9
# Each candidate runs at least _MIN_ROUNDS timed calls, and more (up to
# _MAX_ROUNDS) while its calls total less than _ROUND_SECONDS.
_MIN_ROUNDS, _MAX_ROUNDS, _ROUND_SECONDS = 3, 15, 0.5

_CACHE: dict[tuple, int] = {}


def cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def platform(xs: Any) -> str:
    """The platform ``xs`` lives on, or the default device's where it is traced."""
    if isinstance(xs, jax.Array) and not isinstance(xs, jax.core.Tracer):
        return next(iter(xs.devices())).platform
    device = jax.default_device.value  # what jax.config.jax_default_device reads, typed
    if isinstance(device, jax.Device):
        return device.platform
    return device if isinstance(device, str) else jax.default_backend()


def untimed(layer: FusedLayer, carry: Any) -> str | None:
    """Why ``layer`` gets 1 chain without timing, or ``None`` if it is timed."""
    if platform(layer.xs) != "cpu":
        return "not a CPU (a GPU runs a step's operations one after another)"
    if jax.local_device_count("cpu") > 1 or jax.device_count() > 1:
        return "several devices"
    if cores() < 2:
        return "one core"
    rows = layer.xs.shape[1] if layer.xs.ndim >= 3 else 0
    if rows < 2 * _MIN_ROWS:
        return f"{rows} batch rows (under {2 * _MIN_ROWS})"
    if any(np.ndim(a) < 2 or np.shape(a)[0] != rows for a in jax.tree.leaves(carry)):
        return "no batch axis shared by the carry and the inputs"
    return None


def choose(layer: FusedLayer, carry: Any) -> int:
    """The number of chains ``layer``'s loops run fastest with (see the module's docstring)."""
    if untimed(layer, carry) is not None:
        return 1
    steps = min(layer.length, probe_steps(layer, carry))
    params_a, carry_a = abstract(layer.params), abstract(carry)
    xs_a = jax.ShapeDtypeStruct((steps, *layer.xs.shape[1:]), layer.xs.dtype)
    key = (layer.split, layer.step_fn, layer.hoist, repr((params_a, carry_a, xs_a)))
    return cached(_CACHE, key, lambda: _fastest(times(layer, params_a, carry_a, xs_a)))


def probe_steps(layer: FusedLayer, carry: Any) -> int:
    """The steps the probe runs: about ``_PROBE_FLOPS`` of fwd+bwd, within
    ``[_MIN_STEPS, _PROBE_STEPS]``, counting a step as at most a gated cell's
    ``3 x 2·B·(D + H)·4H`` (``H`` the carry's width, ``D`` the input's)."""
    rows = int(np.prod(layer.xs.shape[1:-1]))
    width = max(np.shape(a)[-1] for a in jax.tree.leaves(carry))
    flops = 6 * rows * (layer.xs.shape[-1] + width) * 4 * width
    return int(min(_PROBE_STEPS, max(_MIN_STEPS, _PROBE_FLOPS // max(flops, 1))))


def _fastest(times: dict[int, float]) -> int:
    """The first candidate, unless a later one is faster than the best before it by _MARGIN."""
    best = _CANDIDATES[0]
    for n in _CANDIDATES[1:]:
        if times[n] < _MARGIN * times[best]:
            best = n
    return best


def times(layer: FusedLayer, params_a: Any, carry_a: Any, xs_a: Any) -> dict[int, float]:
    """The fastest of several calls of the gradient of ``layer`` over ``xs_a``'s steps,
    compiled for each candidate number of chains, in seconds; calls alternate."""
    rng = np.random.default_rng(0)

    def value(a):
        if not np.issubdtype(a.dtype, np.inexact):
            return np.zeros(a.shape, a.dtype)
        return (0.1 * rng.standard_normal(a.shape)).astype(a.dtype)

    args = jax.tree.map(value, (params_a, carry_a, xs_a))
    calls = {}
    for n in _CANDIDATES:

        def run(params, carry, xs, n=n):
            probe = layer.replace(
                params=params, xs=xs, length=xs.shape[0], truncation=None, chunks=n
            )
            return probe.block(carry, 0, xs.shape[0])

        with outside_any_mesh():
            compiled = jax.jit(probe_grad(run)).lower(params_a, carry_a, xs_a).compile()
        jax.block_until_ready(compiled(*args))  # the first call allocates
        calls[n] = compiled
    best = {n: float("inf") for n in _CANDIDATES}
    total = 0.0
    for i in range(_MAX_ROUNDS):
        if i >= _MIN_ROUNDS and total >= _ROUND_SECONDS * len(_CANDIDATES):
            break
        for n in _CANDIDATES if i % 2 == 0 else reversed(_CANDIDATES):
            start = time.perf_counter()
            jax.block_until_ready(calls[n](*args))
            took = time.perf_counter() - start
            best[n] = min(best[n], took)
            total += took
    return best
