"""Measure the memory of a compiled function, and predict a strategy's memory.

Measuring reads what XLA plans for a compiled program
(``jax.jit(fn).lower(*args).compile().memory_analysis()``): deterministic, no
need to run it, and the same on CPU, GPU and TPU. ``temp_bytes`` is the
working memory (for a gradient: the stored residuals and the backward pass's
buffers); ``argument_bytes`` are the inputs, a floor no strategy can go under.
On backends whose devices report ``memory_stats()`` (GPU, TPU),
:func:`measure` can also run the function once and read the device's peak.

For a program that runs on several devices (``jax.jit`` of sharded inputs,
``jax.shard_map``), every figure is per device: XLA partitions the program
first (SPMD), and ``memory_analysis()`` describes the program each device
runs. :attr:`MemoryReport.devices` says how many devices that is.

Predicting asks the strategy's own cost model (:meth:`bpttjax.RematStrategy.cost`),
in units a user can reason about (:class:`StepCosts`):

* ``carry_bytes``: the size of one carry (e.g. ``B·H·4`` for a float32 RNN);
* ``residual_bytes``: what plain BPTT stores per step (several carries);
* ``overhead_bytes``: what one level of scan needs regardless of ``T`` (chiefly
  the gradient accumulators of the parameters).

:func:`step_costs` finds ``residual_bytes`` and ``overhead_bytes`` by compiling
the plain-scan gradient at two short lengths and taking the slope and the
intercept, so the prediction speaks XLA's language rather than a guess.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding

from .remat import RematStrategy, StepCosts

__all__ = [
    "ControlFlow",
    "MemoryReport",
    "StepCosts",
    "control_flow",
    "measure",
    "predict",
    "step_costs",
    "tree_bytes",
]


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Memory of one compiled program, in bytes, per device.

    A program partitioned over several devices is described by the program
    one device runs: with the batch sharded over ``N`` devices,
    ``argument_bytes`` are the parameters plus ``1/N`` of the inputs, and
    ``temp_bytes`` about those of one device's share of the batch, plus a
    buffer the size of the parameters' gradients for their all-reduce
    (checked on 8 simulated CPU devices, ``tests/_sharded_checks.py``).

    Attributes:
      temp_bytes: working memory XLA plans (``temp_size_in_bytes``).
      argument_bytes: the inputs (the floor under every strategy).
      output_bytes: the outputs.
      alias_bytes: outputs that reuse an input's buffer.
      peak_bytes: XLA's planned peak where the backend reports it, else None.
        On CPU (jax 0.10) it was observed to count arguments and outputs but
        not ``temp_bytes``, so it understates the real peak there.
      device_peak_bytes: ``memory_stats()["peak_bytes_in_use"]`` of the device
        after one run, where the backend has memory stats and ``run=True``;
        else None. It is the process-wide peak, so earlier work can raise it,
        of the first of the program's devices in this process.
      devices: the number of devices the program runs on (1 unless its
        inputs or outputs are sharded over several); the other figures are
        for each of them, not their sum.
    """

    temp_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    peak_bytes: int | None
    device_peak_bytes: int | None
    devices: int = 1


def measure(fn: Callable, *args: Any, run: bool = False, **kwargs: Any) -> MemoryReport:
    """Compile ``fn(*args, **kwargs)`` with ``jax.jit`` and report its memory.

    Args:
      fn: any jittable function, typically ``jax.grad(loss)``.
      *args, **kwargs: example inputs (arrays or ``jax.ShapeDtypeStruct``).
        Sharded arrays, or ``jax.ShapeDtypeStruct(..., sharding=...)``,
        compile the partitioned program, whose memory is then per device.
      run: also execute once (only when every input is concrete) to read the
        device's peak memory where the backend reports ``memory_stats``.

    Returns:
      A :class:`MemoryReport`: bytes per device, and the number of devices.

    Example:
      >>> rep = bj.memory.measure(jax.grad(loss), params, xs)
      >>> rep.temp_bytes / 2**20
      >>> batch = NamedSharding(mesh, P(None, "data"))  # xs: (T, B, D)
      >>> xs_8 = jax.ShapeDtypeStruct(xs.shape, xs.dtype, sharding=batch)
      >>> bj.memory.measure(jax.grad(loss), params, xs_8).temp_bytes  # per device
    """
    if not callable(fn):
        raise TypeError(f"measure(fn=...) expects a callable, got {type(fn).__name__}")
    compiled = jax.jit(fn).lower(*args, **kwargs).compile()
    stats = compiled.memory_analysis()
    if stats is None:  # some backends do not implement the analysis
        raise RuntimeError(
            f"the {jax.default_backend()} backend reports no memory analysis for compiled programs"
        )
    peak = getattr(stats, "peak_memory_in_bytes", None)
    devices = _devices(compiled)
    device_peak = None
    if run:
        jax.block_until_ready(compiled(*args, **kwargs))
        local = [d for d in devices if d.process_index == jax.process_index()]
        device_peak = device_peak_bytes(min(local, key=lambda d: d.id) if local else None)
    return MemoryReport(
        temp_bytes=int(stats.temp_size_in_bytes),
        argument_bytes=int(stats.argument_size_in_bytes),
        output_bytes=int(stats.output_size_in_bytes),
        alias_bytes=int(stats.alias_size_in_bytes),
        peak_bytes=int(peak) if peak else None,
        device_peak_bytes=device_peak,
        devices=max(len(devices), 1),
    )


@dataclasses.dataclass(frozen=True)
class ControlFlow:
    """The loops and conditionals of one compiled program, as XLA optimized it.

    On XLA:GPU a ``while`` loop whose trip count XLA cannot prove copies its
    predicate to the host and waits for the device before every iteration,
    and a ``conditional`` copies its branch index to the host and waits
    before it runs. A loop with a known trip count (``lax.scan``,
    ``fori_loop`` with Python-int bounds: XLA annotates it with
    ``known_trip_count``) is queued without waiting. So a program with
    ``unknown_trip_loops == conditionals == 0`` keeps its control flow on the
    device. On a CPU both kinds run on the host anyway; on TPU, loops run on
    the device either way.

    Attributes:
      while_loops: ``while`` instructions in the optimized program.
      unknown_trip_loops: those without a ``known_trip_count``.
      conditionals: ``conditional`` instructions (``lax.cond``, ``lax.switch``
        that XLA did not fold away).

    These count instructions, not executions: a conditional inside a loop of
    ``T`` iterations runs ``T`` times. How many times one gradient waits for
    the host, each strategy states in its cost
    (:attr:`bpttjax.remat.Cost.host_events`).
    """

    while_loops: int
    unknown_trip_loops: int
    conditionals: int

    @property
    def on_device(self) -> bool:
        """No unknown-trip loop and no conditional: nothing waits for the host."""
        return self.unknown_trip_loops == 0 and self.conditionals == 0


_WHILE = re.compile(r"=\s.*?\bwhile\(")
_CONDITIONAL = re.compile(r"=\s.*?\bconditional\(")
_KNOWN_TRIP = re.compile(r'"known_trip_count":\{"n":"\d+"')


def control_flow(fn: Callable, *args: Any, **kwargs: Any) -> ControlFlow:
    """Compile ``fn(*args, **kwargs)`` with ``jax.jit`` and count its host-decided control flow.

    Args:
      fn: any jittable function, typically ``jax.grad(loss)``.
      *args, **kwargs: example inputs (arrays or ``jax.ShapeDtypeStruct``), as
        for :func:`measure`.

    Returns:
      A :class:`ControlFlow` read from the optimized HLO (``compiled.as_text()``)
      for the default backend, or the one the inputs live on.

    Example:
      >>> cf = bj.memory.control_flow(jax.grad(loss), params, xs)
      >>> cf.unknown_trip_loops, cf.conditionals  # (0, 0) for StoreAll, EveryStep, Nested
    """
    if not callable(fn):
        raise TypeError(f"control_flow(fn=...) expects a callable, got {type(fn).__name__}")
    text = jax.jit(fn).lower(*args, **kwargs).compile().as_text() or ""
    loops = [line for line in text.splitlines() if _WHILE.search(line)]
    return ControlFlow(
        while_loops=len(loops),
        unknown_trip_loops=sum(not _KNOWN_TRIP.search(line) for line in loops),
        conditionals=sum(bool(_CONDITIONAL.search(line)) for line in text.splitlines()),
    )


def _devices(compiled: Any) -> set:
    """The devices a compiled program runs on, read from its argument and output shardings."""
    devices: set = set()
    shardings = (compiled.input_shardings, compiled.output_shardings)
    for sharding in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, Sharding)):
        if isinstance(sharding, Sharding):
            devices |= sharding.device_set
    return devices


def device_peak_bytes(
    # jax binds Device by assignment (Device = _xc.Device), which pyright reads as a variable
    device: jax.Device | None = None,  # pyright: ignore[reportInvalidTypeForm]
) -> int | None:
    """The device's ``peak_bytes_in_use``, or None where the backend has no stats (CPU)."""
    dev = device or jax.devices()[0]
    try:
        stats = dev.memory_stats()
    except (NotImplementedError, RuntimeError):
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


def tree_bytes(tree: Any) -> int:
    """Total bytes of the array leaves of ``tree`` (arrays or ShapeDtypeStructs)."""
    return sum(
        math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
        if hasattr(x, "dtype")
    )


def step_costs(
    build: Callable[[int], tuple[Callable, tuple]],
    carry_bytes: int,
    lengths: tuple[int, int] = (64, 128),
) -> StepCosts:
    """Find what plain BPTT stores per step by compiling it at two short lengths.

    Args:
      build: ``build(T) -> (fn, args)``, the gradient computation with
        ``remat=bj.StoreAll()`` for a sequence of ``T`` steps (``args`` may be
        ``jax.ShapeDtypeStruct``; nothing is run).
      carry_bytes: bytes of one carry (see :func:`tree_bytes`).
      lengths: the two lengths compiled; the slope between them is
        ``residual_bytes`` and the intercept ``overhead_bytes``.

    Returns:
      :class:`StepCosts` to pass to :func:`predict`.
    """
    t1, t2 = lengths
    if not (0 < t1 < t2):
        raise ValueError(f"step_costs(lengths=...) expects 0 < T1 < T2, got {lengths}")
    temps = []
    for T in (t1, t2):
        fn, args = build(T)
        temps.append(measure(fn, *args).temp_bytes)
    slope = (temps[1] - temps[0]) / (t2 - t1)
    return StepCosts(
        carry_bytes=int(carry_bytes),
        residual_bytes=int(round(slope)),
        overhead_bytes=max(0, int(round(temps[0] - slope * t1))),
    )


def predict(
    remat: RematStrategy,
    length: int,
    carry_bytes: int,
    residual_bytes: int,
    overhead_bytes: int = 0,
    output_bytes: int = 0,
) -> int:
    """Predict the temporary bytes of a gradient through ``bj.scan(..., remat=remat)``.

    Delegates to the strategy's own cost model,
    :meth:`bpttjax.RematStrategy.cost`, which counts what it keeps alive at
    the peak of the backward pass: ``StoreAll`` all ``T`` steps of residuals;
    ``EveryStep`` ``T`` carries plus one step's residuals; ``Nested`` the
    carries stored by each level (including the remainder blocks the schedule
    really runs) plus one innermost block of residuals, and ``overhead_bytes``
    per live scan loop; ``Binomial`` its snapshots plus one ``overhead_bytes``;
    ``Budget`` that of the strategy it would choose.

    That is the schedule's memory, measured with a loss computed inside the
    step (``ys`` per-step scalars), as the experiments' tables are. A loss
    over all outputs, such as ``jnp.mean(hs**2)``, also keeps the outputs
    and makes their cotangent, about ``2·T·|y|`` bytes (``2·T·B·H`` floats
    for an RNN returning its hidden states): pass them as ``output_bytes``.
    For a schedule that keeps little (``Binomial``, ``Nested``) they can be
    most of the memory, so without them the figure can be many times under
    XLA's for such a loss.

    Args:
      remat: the strategy.
      length: ``T``.
      carry_bytes: bytes of one carry.
      residual_bytes: bytes plain BPTT stores per step (see :func:`step_costs`).
      overhead_bytes: per-level constant (see :func:`step_costs`).
      output_bytes: the scan's outputs and their cotangent that the loss
        keeps (0 for a per-step loss inside the step); a ``Budget`` leaves
        them room when it chooses.

    Returns:
      Predicted ``temp_bytes`` (an int): the schedule plus ``output_bytes``.
    """
    if not isinstance(remat, RematStrategy):
        raise TypeError(
            f"predict(remat=...) expects a bpttjax strategy, got {type(remat).__name__}"
        )
    for name, value in (
        ("length", length),
        ("carry_bytes", carry_bytes),
        ("residual_bytes", residual_bytes),
        ("overhead_bytes", overhead_bytes),
        ("output_bytes", output_bytes),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"predict({name}=...) expects a non-negative int, got {value!r}")
    costs = StepCosts(carry_bytes, residual_bytes, overhead_bytes)
    choose = getattr(remat, "choose", None)  # a Budget leaves the outputs room
    if output_bytes and callable(choose):
        plan: Any = choose(length, costs, output_bytes=output_bytes)  # a budget.Plan
        return plan.predicted_bytes
    return remat.cost(length, costs).temp_bytes + output_bytes
