"""``bj.Budget``: say how much working memory the gradient may use, get the fastest fit.

At trace time :class:`Budget` measures what one step costs to keep (by
compiling plain BPTT of the step at two short lengths, see
:func:`bpttjax.memory.step_costs`), asks each candidate strategy for its
predicted cost (:meth:`bpttjax.RematStrategy.cost`), and runs the fastest one
whose prediction fits:

1. :class:`~bpttjax.StoreAll`, no recomputation;
2. :class:`~bpttjax.EveryStep` with a saving policy (``policies``; what a
   policy saves is measured the same way), the policy that saves most first;
3. :class:`~bpttjax.EveryStep` without a policy;
4. :class:`~bpttjax.Binomial` with the most snapshots that fit.

Then, unless its prediction is a line through two compilations of that very
strategy (``StoreAll``; ``EveryStep`` with a policy), it compiles the chosen
strategy's gradient at the full length and reads XLA's figure. Where that
exceeds the budget (the model missed something on this backend), the excess
is added to every prediction and the choice is made again.

The budget is for XLA's working memory of the gradient (``temp_size_in_bytes``
as reported by :func:`bpttjax.memory.measure`), per device; inputs and
outputs are not part of it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from . import memory
from ._engine import _split_diff
from ._scan import _check_length, _checked_step
from .remat import (
    Binomial,
    Cost,
    EveryStep,
    Nested,
    RematStrategy,
    StepCosts,
    StoreAll,
    register,
)

__all__ = ["Budget", "Plan", "parse_bytes"]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
_SAFETY = 0.95
"""Plan to this fraction of the budget: predictions are within a few percent of XLA's."""
_PROBE_LENGTHS = (64, 128)
_FUSED_NESTED_OVER = 1.5  # forward passes; see Budget._layer_strategy
_CHECKS = 4
"""Choices compiled and measured before a budget the model keeps missing is refused."""


def parse_bytes(value: int | str) -> int:
    """Bytes from an int or a size such as ``"64MB"``, ``"1.5GiB"`` or ``"512 KiB"``.

    ``KB``/``MB``/``GB``/``TB`` are powers of 1000, ``KiB``/``MiB``/``GiB``/``TiB``
    powers of 1024 (case-insensitive).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral | str):
        raise TypeError(
            "Budget(bytes=...) expects an int or a size string such as '64MB' or '1.5GiB', "
            f"got {type(value).__name__}: {value!r}"
        )
    if isinstance(value, str):
        match = _SIZE.match(value)
        unit = match and match.group(2).lower()
        if not match or unit not in _UNITS:
            raise ValueError(
                f"Budget(bytes={value!r}) is not a size: write e.g. 64MB, 1.5GiB or 500000 "
                f"(units: {', '.join(u for u in _UNITS if u)})"
            )
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"Budget(bytes=...) expects a positive number of bytes, got {value}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What :class:`Budget` chose for one scan, and why.

    Attributes:
      strategy: the strategy that runs.
      temp_bytes: its predicted working memory.
      recomputed_steps: its step evaluations beyond plain BPTT's ``T``.
      budget_bytes: the budget.
      length: ``T``.
      costs: the measured :class:`~bpttjax.remat.StepCosts` of the step.
      measured_bytes: XLA's temp bytes for the strategy's gradient, compiled
        at ``length`` to check the prediction (None: not compiled, as from
        :meth:`Budget.choose`, under a mesh, or for ``StoreAll`` and
        ``EveryStep`` with a policy, whose predictions come from compiling
        them).
    """

    strategy: RematStrategy
    temp_bytes: int
    recomputed_steps: int
    budget_bytes: int
    length: int
    costs: StepCosts
    measured_bytes: int | None = None

    @property
    def snapshots(self) -> int | None:
        """Stored carries when the strategy is :class:`~bpttjax.Binomial`, else None."""
        return getattr(self.strategy, "snapshots", None)

    def __str__(self) -> str:
        passes = self.recomputed_steps / self.length if self.length else 0.0
        measured = (
            ""
            if self.measured_bytes is None
            else f", measured {_mb(self.measured_bytes)}"
            f" ({self.measured_bytes / self.budget_bytes:.0%})"
        )
        return (
            f"{self.strategy} for T={self.length}: predicted temp {_mb(self.temp_bytes)} "
            f"of a {_mb(self.budget_bytes)} budget "
            f"({self.temp_bytes / self.budget_bytes:.0%}){measured}; "
            f"{self.recomputed_steps:,} recomputed steps ({passes:.2f} forward passes)"
        )


def _mb(n: float) -> str:
    return f"{n / 1e6:.3g} MB"


class _TooSmall(ValueError):
    """A budget below what ``Binomial(1)`` needs; names the least budget that fits it."""

    def __init__(self, budget: int, need: int, how: str):
        least = math.ceil(need / _SAFETY)
        super().__init__(
            f"Budget(bytes={budget}) is too small for this scan: the least any strategy "
            f"needs is Binomial(1) at a {how} {need:,} bytes; Budget({least}) would work "
            f"({_mb(least)}, with a {1 - _SAFETY:.0%} margin; it recomputes about T**2/2 steps)"
        )


@register("budget")
@dataclasses.dataclass(frozen=True)
class Budget(RematStrategy):
    """The fastest strategy whose predicted working memory fits ``bytes``.

    Args:
      bytes: the budget for the gradient's working memory, per device: an int
        or a string such as ``"64MB"`` or ``"1.5GiB"``.
      policies: ``jax.checkpoint_policies`` values tried with
        :class:`~bpttjax.EveryStep` before the policy-free version (default:
        ``dots_saveable``). What each saves per step is measured.

    Choice, at trace time (see :meth:`plan`): ``StoreAll`` if it fits, else
    ``EveryStep`` with the policy saving most that fits, else ``EveryStep()``,
    else ``Binomial`` with the most snapshots that fit. The plan aims at 95%
    of the budget, as predictions are within a few percent of XLA's figure on
    a CPU. A chosen ``EveryStep()`` or ``Binomial``, whose predictions combine
    the step's costs, is then compiled at the full length;
    where XLA's temp exceeds the budget (on an H200 the GRU's model missed a
    constant ~0.4 MB), the excess is added to every prediction and the choice
    made again. Under a mesh in context this check is skipped: the unsharded
    program it would compile overstates each device's share.

    Under :func:`bpttjax.cells.run`, ``StoreAll`` is tried as the layer runs
    it, one fused block with its own measured costs (about half of plain
    BPTT's memory for the library's cells); the rest is planned as for
    ``bj.scan`` of the step, except that a ``Binomial`` recomputing more than
    1.5 forward passes gives way to ``Nested(2)`` with fused blocks where that
    fits (measured by compiling it): at T = 1,000 it took 1.3-1.36 times
    ``StoreAll``'s time against 1.4-1.9 for those ``Binomial`` schedules.

    Cost: that of the chosen strategy, plus two to four small compilations
    and, for ``EveryStep()`` or ``Binomial``, one at the full length each
    time the scan is traced (the step's
    measured costs and the check are cached per step program and shapes).

    Raises:
      ValueError: when even ``Binomial(1)`` does not fit; the message names
        the smallest budget that would. Also when XLA's figure keeps
        exceeding the budget after four choices.

    Example:
      >>> print(bj.Budget("8MB").plan(step, h0, xs))
      >>> carry, ys = bj.scan(step, h0, xs, remat=bj.Budget("8MB"))
    """

    bytes: int | str
    policies: tuple[Callable[..., Any], ...] = (jax.checkpoint_policies.dots_saveable,)

    def __post_init__(self):
        object.__setattr__(self, "bytes", parse_bytes(self.bytes))
        policies = self.policies
        if callable(policies) or not isinstance(policies, Sequence):
            raise TypeError(
                "Budget(policies=...) expects a tuple of jax.checkpoint_policies values, got "
                f"{type(policies).__name__}"
            )
        for p in policies:
            if not callable(p):
                raise TypeError(
                    "Budget(policies=...) expects jax.checkpoint_policies values (callables), "
                    f"got {type(p).__name__}: {p!r}"
                )
        object.__setattr__(self, "policies", tuple(policies))

    @classmethod
    def from_arg(cls, arg):
        if arg is None:
            raise ValueError("budget expects a size, e.g. 'budget:64MB'")
        return cls(arg)

    @classmethod
    def examples(cls):
        # small enough for Binomial at the suite's longer lengths, StoreAll at the shortest
        return (cls(6_000),)

    def plan(self, f: Callable, init: Any, xs: Any = None, length: int | None = None) -> Plan:
        """The strategy this budget runs for ``bj.scan(f, init, xs, length)``, and why.

        Compiles plain BPTT of ``f`` (and ``EveryStep`` with each policy) at
        two short lengths to measure its :class:`~bpttjax.remat.StepCosts`,
        then a chosen ``EveryStep()`` or ``Binomial`` at ``length`` to check it.
        """
        T = _check_length(xs, length)
        return self._plan(_checked_step(f), init, xs, T)

    def choose(
        self,
        length: int,
        costs: StepCosts,
        policy_costs: Sequence[tuple[RematStrategy, StepCosts]] = (),
        missed: int = 0,
    ) -> Plan:
        """The plan for ``length`` steps with the step's measured costs (no compiling).

        ``policy_costs`` pairs each ``EveryStep(policy)`` with its measured
        per-step costs (its ``residual_bytes`` is what it keeps per step).
        ``missed`` bytes are added to every prediction: what XLA measured
        beyond the model's figure for an earlier choice.
        """
        usable = _SAFETY * self.bytes - missed
        fits = lambda cost: cost.temp_bytes <= usable
        candidates = [(StoreAll(), StoreAll().cost(length, costs))]
        for strategy, pc in sorted(policy_costs, key=lambda sc: -sc[1].residual_bytes):
            # measured like plain BPTT (what it keeps per step is its slope);
            # it still re-evaluates each step in the backward pass
            candidates.append((strategy, Cost(StoreAll().cost(length, pc).temp_bytes, length)))
        candidates.append((EveryStep(), EveryStep().cost(length, costs)))
        for strategy, cost in candidates:
            if fits(cost):
                return self._made(strategy, cost, length, costs)
        least = Binomial(1).cost(length, costs).temp_bytes
        per_snapshot = max(Binomial(2).cost(length, costs).temp_bytes - least, 1)
        s = 1 + int((usable - least) // per_snapshot) if usable >= least else 0
        s = min(s, max(length - 1, 1))
        if s < 1:
            raise _TooSmall(self.bytes, least + missed, "predicted")
        strategy = Binomial(s)
        return self._made(strategy, strategy.cost(length, costs), length, costs)

    def _made(self, strategy: RematStrategy, cost: Cost, length: int, costs: StepCosts) -> Plan:
        return Plan(strategy, cost.temp_bytes, cost.recomputed_steps, self.bytes, length, costs)

    def _plan(self, f: Callable, init: Any, xs: Any, length: int) -> Plan:
        """:meth:`choose` for ``bj.scan`` of ``f``, checked by compiling the choice."""
        measure = lambda strategy: _scan_temp(f, init, xs, length, strategy)
        return self._checked(length, *self._step_costs(f, init, xs), measure)

    def _step_costs(self, f: Callable, init: Any, xs: Any) -> tuple[StepCosts, list]:
        """The step's measured costs, and ``EveryStep``'s with each policy."""
        costs = _measured_costs(f, init, xs, None)
        policy_costs = [
            (EveryStep(p), _measured_costs(f, init, xs, EveryStep(p))) for p in self.policies
        ]
        return costs, policy_costs

    def _checked(
        self,
        length: int,
        costs: StepCosts,
        policy_costs: list,
        measure: Callable[[RematStrategy], int],
    ) -> Plan:
        """:meth:`choose`, then XLA's figure for the choice (``measure(strategy)``).

        Where it exceeds the budget, the excess over the prediction is added to
        every prediction and the choice made again. Under a mesh, the model's
        choice.
        """
        if not _checking():
            return self.choose(length, costs, policy_costs)
        missed = 0
        for _ in range(_CHECKS):
            try:
                plan = self.choose(length, costs, policy_costs, missed)
            except _TooSmall:  # the model says even Binomial(1) does not fit: ask XLA
                one = Binomial(1)
                temp = measure(one)
                if temp > self.bytes:
                    raise _TooSmall(self.bytes, temp, "measured") from None
                plan = self._made(one, one.cost(length, costs), length, costs)
                return dataclasses.replace(plan, measured_bytes=temp)
            if _probed(plan.strategy, self.policies):
                return plan
            temp = measure(plan.strategy)
            if temp <= self.bytes:
                return dataclasses.replace(plan, measured_bytes=temp)
            missed = max(missed + 1, temp - plan.temp_bytes)
        raise ValueError(
            f"Budget(bytes={self.bytes}) cannot be met for this scan: XLA measured "
            f"{temp:,} bytes for {plan.strategy} after {_CHECKS} choices, each made with "
            "what the previous one missed"
        )

    def cost(self, length, costs):
        plan = self.choose(length, costs)
        return Cost(plan.temp_bytes, plan.recomputed_steps)

    def scan(self, f, init, xs, length, reverse, unroll):
        strategy = self._plan(f, init, xs, length).strategy
        return strategy.scan(f, init, xs, length, reverse, unroll)

    def scan_layer(self, layer, init):
        return self._layer_strategy(layer, init).scan_layer(layer, init)

    def _layer_strategy(self, layer, init) -> RematStrategy:
        """What runs a :func:`bpttjax.cells.run` layer under this budget.

        Planned as ``bj.scan`` of the step, with two fused candidates: first
        ``StoreAll`` as the layer runs it, one fused block (52-65% of plain
        BPTT's memory for the library's cells), predicted from that block's
        measured costs; and,
        where the plan for the step is a ``Binomial`` that recomputes more than
        ``_FUSED_NESTED_OVER`` forward passes, ``Nested(2)`` with fused blocks
        if its memory, measured by compiling it, fits. Otherwise the step's
        plan, checked against the layer as it runs. The chosen strategy runs
        the layer its own way.
        """
        usable = _SAFETY * self.bytes
        measure = lambda strategy: _layer_temp(layer, init, strategy)
        fused = StoreAll().cost(layer.length, _layer_costs(layer, init)).temp_bytes
        if fused <= usable:  # the block's own probes: a line through two measurements
            return StoreAll()
        costs, policy_costs = self._step_costs(layer.step, init, layer.xs)
        model = self.choose(layer.length, costs, policy_costs)
        if (
            isinstance(model.strategy, Binomial)
            and model.recomputed_steps > _FUSED_NESTED_OVER * layer.length
        ):
            nested = _fused_nested(layer, init)
            if measure(nested) <= usable:
                return nested
        return self._checked(layer.length, costs, policy_costs, measure).strategy


# --- measuring a step -------------------------------------------------------------------

_COSTS_CACHE: dict[tuple, StepCosts] = {}
_TEMP_CACHE: dict[tuple, int] = {}


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), tree)


def _measured_costs(f: Callable, init: Any, xs: Any, remat: RematStrategy | None) -> StepCosts:
    """:class:`StepCosts` of ``f`` under ``remat`` (plain BPTT when None), by compiling.

    The gradient compiled is that of the sum of every float output with
    respect to the step's float parameters and ``init``; the result is cached
    by the step's program, the shapes and ``remat``.
    """
    closed, consts_a, init_a, x_a = _closed_step(f, init, xs)
    key = (str(closed.jaxpr), repr((init_a, x_a, consts_a)), remat)
    remat = remat or StoreAll()

    def build(T):
        xs_a = jax.tree.map(lambda a: jax.ShapeDtypeStruct((T, *a.shape), a.dtype), x_a)
        run = lambda consts, init, xs: remat.scan(
            lambda c, x: closed(c, x, *consts), init, xs, T, False, 1
        )
        return _probe_grad(run), (consts_a, init_a, xs_a)

    return _probe_costs(key, build, init_a)


def _probe_grad(run: Callable) -> Callable:
    """``grad(a, init, xs)``: the gradient, for the float leaves of ``a`` and
    ``init``, of the sum of every float output of ``run(a, init, xs)``."""

    def loss(diff, a, init, xs):
        _, other, merge = _split_diff((a, init))
        a, init = merge(diff, other)
        return sum(jnp.sum(o).astype(jnp.float32) for o in _split_diff(run(a, init, xs))[0])

    return lambda a, init, xs: jax.grad(loss)(_split_diff((a, init))[0], a, init, xs)


def _probe_costs(key: tuple, build: Callable, init_a: Any) -> StepCosts:
    """:func:`bpttjax.memory.step_costs` of ``build`` at the probe lengths, cached by ``key``."""

    def measure():
        C = memory.tree_bytes(init_a)
        costs = memory.step_costs(build, C, _PROBE_LENGTHS)
        # The probe takes init as an argument; a loss usually creates it (as a
        # zero state), which holds one more carry in working memory.
        return dataclasses.replace(costs, overhead_bytes=costs.overhead_bytes + C)

    return _cached(_COSTS_CACHE, key, measure)


def _cached(cache: dict, key: tuple, compute: Callable[[], Any]) -> Any:
    """``cache[key]``, computed on a miss; the cache is emptied past 256 entries."""
    if key not in cache:
        if len(cache) > 256:
            cache.clear()
        cache[key] = compute()
    return cache[key]


def _layer_key(kind: str, layer: Any, *shapes: Any) -> tuple:
    """A cache key for a probe of ``layer``: its functions, ``shapes`` and options."""
    options = (layer.reverse, layer.unroll, layer.hoist, layer.chunks)
    return (kind, layer.split, layer.step_fn, repr((*shapes, options)))


def _probed(strategy: RematStrategy, policies: Sequence[Callable]) -> bool:
    """Whether ``strategy``'s prediction is a line through two compilations of the
    strategy itself (``StoreAll``, ``EveryStep`` with a measured policy), so that
    compiling it at the full length would tell nothing new."""
    return strategy == StoreAll() or (
        isinstance(strategy, EveryStep) and strategy.policy is not None
        and any(strategy == EveryStep(p) for p in policies)
    )  # fmt: skip


def _checking() -> bool:
    """Whether a choice is checked by compiling it: not under a mesh in context, where
    the unsharded program compiled overstates each device's share."""
    return jax.sharding.get_abstract_mesh().empty


def _outside_any_mesh():
    """A context compiling a probe as one unsharded program, whatever mesh is in context.

    Under ``jax.set_mesh`` with an explicit mesh, the unsharded probe of a
    fused ``Nested(2)`` measured 1.2 MB instead of 0.19 MB.
    """
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ()))


def _layer_costs(layer: Any, init: Any) -> StepCosts:
    """:class:`StepCosts` of a whole-sequence layer run as one fused block, by compiling.

    As :func:`_measured_costs` for plain BPTT, with the block that
    ``StoreAll`` runs for :func:`bpttjax.cells.run` in place of the scan.
    """
    params_a, init_a = _abstract(layer.params), _abstract(init)
    x_a = jax.ShapeDtypeStruct(layer.xs.shape[1:], layer.xs.dtype)
    key = _layer_key("layer", layer, params_a, init_a, x_a)

    def build(T):
        def run(params, init, xs):
            probe = dataclasses.replace(layer, params=params, xs=xs, length=T, truncation=None)
            return probe.block(init, 0, T)

        xs_a = jax.ShapeDtypeStruct((T, *x_a.shape), x_a.dtype)
        return _probe_grad(run), (params_a, init_a, xs_a)

    return _probe_costs(key, build, init_a)


def _fused_nested(layer: Any, init: Any) -> Nested:
    """``Nested(2)`` with the level lengths it picks for this layer, made explicit."""
    return Nested(lengths=Nested(2).layer_lengths(layer, init))


def _layer_temp(layer: Any, init: Any, strategy: RematStrategy) -> int:
    """XLA's temp bytes for the gradient of a layer run by ``strategy``, compiled at its length.

    Measured like :func:`_layer_costs`'s probes (unsharded, so on several
    devices it is more than each device's share; cached likewise), plus the
    carry a loss usually creates.
    """
    params_a, init_a, xs_a = _abstract(layer.params), _abstract(init), _abstract(layer.xs)

    def run(params, init, xs):
        probe = dataclasses.replace(layer, params=params, xs=xs, truncation=None)
        return strategy.scan_layer(probe, init)

    key = (*_layer_key("layer temp", layer, params_a, init_a, xs_a), strategy)
    return _full_temp(key, run, params_a, init_a, xs_a)


def _scan_temp(f: Callable, init: Any, xs: Any, length: int, strategy: RematStrategy) -> int:
    """XLA's temp bytes for the gradient of ``bj.scan(f, init, xs, length)`` under ``strategy``.

    Measured like :func:`_measured_costs`'s probes (the same gradient, the
    same carry added for a loss that creates it) at the full length; cached.
    """
    closed, consts_a, init_a, _ = _closed_step(f, init, xs)
    xs_a = None if xs is None else _abstract(xs)
    run = lambda consts, init, xs: strategy.scan(
        lambda c, x: closed(c, x, *consts), init, xs, length, False, 1
    )
    key = ("scan temp", str(closed.jaxpr), repr((init_a, xs_a, consts_a, length)), strategy)
    return _full_temp(key, run, consts_a, init_a, xs_a)


def _full_temp(key: tuple, run: Callable, a: Any, init_a: Any, xs_a: Any) -> int:
    """XLA's temp bytes for :func:`_probe_grad` of ``run(a, init, xs)``, compiled as one
    unsharded program, plus the carry a loss usually creates; cached by ``key``."""

    def measure():
        with _outside_any_mesh():
            temp = memory.measure(_probe_grad(run), a, init_a, xs_a).temp_bytes
        return temp + memory.tree_bytes(init_a)

    return _cached(_TEMP_CACHE, key, measure)


def _closed_step(f: Callable, init: Any, xs: Any) -> tuple[Callable, Any, Any, Any]:
    """``f`` with its constants hoisted (:func:`_hoist_constants`), and the abstract
    constants, ``init`` and one step's ``x``."""
    init_a = _abstract(init)
    x_a = (
        None
        if xs is None
        else jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), _abstract(xs))
    )
    closed, consts = _hoist_constants(f, init_a, x_a)
    return closed, _abstract(consts), init_a, x_a


def _hoist_constants(f: Callable, init: Any, x: Any) -> tuple[Callable, list]:
    """``f`` as a function of ``(carry, x, *consts)`` with *every* constant it closes over.

    Unlike ``jax.closure_convert``, which hoists only traced values, concrete
    parameters are hoisted too, so that a plan made outside ``jax.grad``
    counts their gradients, as the traced scan will.
    """
    closed_jaxpr, out_shape = jax.make_jaxpr(f, return_shape=True)(init, x)
    jaxpr, consts = closed_jaxpr.jaxpr, list(closed_jaxpr.consts)
    out_tree = jax.tree.structure(out_shape)

    def closed(c, x, *consts):
        out = jex_core.jaxpr_as_fun(jex_core.ClosedJaxpr(jaxpr, consts))(*jax.tree.leaves((c, x)))
        return jax.tree.unflatten(out_tree, out)

    closed.jaxpr = closed_jaxpr.jaxpr
    return closed, consts
