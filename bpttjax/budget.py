"""``bj.Budget``: say how much memory the gradient may use, get the fastest fit.

A :class:`Budget` promises that the whole gradient's working memory fits its
``bytes`` (per device), for every loss: the schedule's memory, plus the
scan's outputs (``carry`` and ``ys``) and their cotangent, which a loss over
the outputs keeps while the gradient runs (``jnp.mean(hs**2)`` keeps both).

It plans only when a gradient is taken. Its scan is a ``jax.custom_jvp``
whose primal is ``lax.scan``: a scan that is only run forward (or under
``jax.jvp`` alone) is exactly ``StoreAll`` and nothing is compiled. When
the scan is linearized (``jax.grad``, ``jax.vjp``, ``jax.linearize``),
:class:`Budget` measures what one step costs to keep (by compiling plain
BPTT of the step at two short lengths, see
:func:`bpttjax.memory.step_costs`), asks each candidate strategy for its
predicted cost (:meth:`bpttjax.RematStrategy.cost`), and takes the fastest
whose prediction, outputs included, fits:

1. :class:`~bpttjax.StoreAll`, no recomputation;
2. :class:`~bpttjax.EveryStep` with a saving policy (``policies``; what a
   policy saves is measured the same way), the policy that saves most first;
3. :class:`~bpttjax.EveryStep` without a policy;
4. :class:`~bpttjax.Binomial` with the most snapshots that fit.

Then it compiles the chosen strategy's gradient at the full length and
reads XLA's figure. Where that and the outputs exceed the budget (the model
missed something on this backend), the excess is added to every prediction
and the choice is made again.

A scan with nothing to differentiate (integer-only carries and inputs), or
whose step reverse mode cannot differentiate, runs as ``StoreAll``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.extend import core as jex_core

from . import memory
from ._engine import _BATCH_TRACER, _is_diff, _linearized, _split_diff
from ._scan import _check_length, _checked_step, _one_step, _promote_weak_init

try:  # the tracers a custom_jvp rule sees (private; without them every JVP plans)
    from jax._src.interpreters.ad import JVPTracer as _JVP_TRACER
    from jax._src.interpreters.partial_eval import DynamicJaxprTracer as _JIT_TRACER
    from jax._src.interpreters.partial_eval import JaxprTracer as _JAXPR_TRACER

    _PURE_TRACERS: tuple = (_JIT_TRACER, _JVP_TRACER)
except ImportError:  # pragma: no cover
    _JAXPR_TRACER = None
    _PURE_TRACERS = ()
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

__all__ = ["Budget", "BudgetTooSmallError", "Plan", "parse_bytes"]

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
"""Plan a model's prediction (``EveryStep()``, ``Binomial``) to this fraction of the
budget: such predictions are within a few percent of XLA's. A prediction that is a line
through two compilations of the strategy itself (``StoreAll``, a policy) may use it all."""
_SLACK = 256
"""Bytes added to every measured figure for the loss's own small buffers (its
scalars and reductions), which XLA places in 64-byte aligned slots that the
probe's loss may not have; only programs of a few kilobytes feel them (see
docs/strategies.md for what was measured)."""
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
        number = float(match.group(1)) * _UNITS[unit]
        if not math.isfinite(number):
            raise ValueError(
                f"Budget(bytes={value!r}) is not a finite size: write e.g. 64MB or 1.5GiB"
            )
        value = int(number)
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
      measured_bytes: XLA's figure for what the budget holds, the chosen
        strategy's gradient compiled at ``length`` (None: not compiled, as
        from :meth:`Budget.choose` or under a mesh). For ``StoreAll`` and a
        policy, the gradient of a loss over all outputs (``mean(ys**2)``,
        which keeps them and their cotangent); for the others, the gradient
        of a per-step loss plus ``output_bytes``.
      output_bytes: the scan's outputs (``carry`` and ``ys``) and their
        cotangent, which a loss over the outputs may keep on top of the
        schedule: ``2·(C + T·|y|)`` for float outputs.
      predicted_bytes: the predicted whole: for ``StoreAll`` and a policy a
        line through two compilations of the gradient of a loss over all
        outputs (XLA may share the outputs with the residuals, so it can be
        less than ``temp_bytes + output_bytes``); for the others
        ``temp_bytes + output_bytes``.
    """

    strategy: RematStrategy
    temp_bytes: int
    recomputed_steps: int
    budget_bytes: int
    length: int
    costs: StepCosts
    measured_bytes: int | None = None
    output_bytes: int = 0
    predicted_bytes: int | None = None

    def __post_init__(self):
        if self.predicted_bytes is None:
            object.__setattr__(self, "predicted_bytes", self.temp_bytes + self.output_bytes)

    @property
    def snapshots(self) -> int | None:
        """Stored carries when the strategy is :class:`~bpttjax.Binomial`, else None."""
        return getattr(self.strategy, "snapshots", None)

    @property
    def total_bytes(self) -> int:
        """What the budget holds: XLA's figure where compiled, else the prediction."""
        return self.predicted_bytes if self.measured_bytes is None else self.measured_bytes

    def __str__(self) -> str:
        passes = self.recomputed_steps / self.length if self.length else 0.0
        measured = "" if self.measured_bytes is None else f", measured {_mb(self.measured_bytes)}"
        return (
            f"{self.strategy} for T={self.length}: schedule {_mb(self.temp_bytes)} and "
            f"outputs with their cotangent {_mb(self.output_bytes)}, predicted "
            f"{_mb(self.predicted_bytes)}{measured}: {self.total_bytes / self.budget_bytes:.0%} "
            f"of a {_mb(self.budget_bytes)} budget; {self.recomputed_steps:,} recomputed steps "
            f"({passes:.2f} forward passes)"
        )


def _mb(n: float) -> str:
    return f"{n / 1e6:.3g} MB"


class BudgetTooSmallError(ValueError):
    """No strategy fits the budget; ``least_bytes`` is the least budget that works.

    Attributes:
      budget_bytes: the budget asked for.
      least_bytes: the least budget that works for this scan.
    """

    def __init__(self, message: str, budget_bytes: int, least_bytes: int):
        super().__init__(message)
        self.budget_bytes = budget_bytes
        self.least_bytes = least_bytes


def _too_small(budget: int, strategy: RematStrategy, least: int, how: str, outputs: int):
    """The error for a budget under ``least`` bytes, what ``strategy`` takes in all."""
    alone = (
        f" The scan's outputs (the final carry and ys) and their cotangent alone take "
        f"{outputs:,} bytes, more than the budget: a loss over all outputs keeps them while "
        "the gradient runs. A loss computed inside the step (per-step scalar ys) needs "
        "little of that."
        if outputs >= budget
        else ""
    )
    recompute = {
        StoreAll: "no recomputation",
        EveryStep: "about one extra forward pass",
        Binomial: "about T**2/2 recomputed steps",
    }.get(type(strategy), "")
    return BudgetTooSmallError(
        f"Budget(bytes={budget}) is too small for this scan: the least any strategy "
        f"needs is {strategy}, at a {how} {least:,} bytes with the scan's outputs and "
        f"their cotangent; Budget({least}) would work ({_mb(least)}; {recompute}).{alone}",
        budget,
        least,
    )


@register("budget")
@dataclasses.dataclass(frozen=True)
class Budget(RematStrategy):
    """The fastest strategy whose working memory, outputs included, fits ``bytes``.

    Args:
      bytes: the budget for the whole gradient's working memory, per device:
        an int or a string such as ``"64MB"`` or ``"1.5GiB"``.
      policies: ``jax.checkpoint_policies`` values tried with
        :class:`~bpttjax.EveryStep` before the policy-free version (default:
        ``dots_saveable``). What each saves per step is measured.

    What the budget holds: the schedule's memory (XLA's working memory for
    the gradient with a per-step loss, ``temp_size_in_bytes``) plus the
    scan's outputs (``carry`` and ``ys``) and their cotangent, ``2·(C +
    T·|y|)`` bytes, which a loss over all outputs such as
    ``jnp.mean(hs**2)`` keeps. For a loss computed inside the step (``ys``
    per-step scalars) that part is small; for a loss linear in ``ys``, whose
    cotangent is a constant, the plan is conservative by up to that amount.
    Inputs (parameters, ``xs``) are not part of it.

    Choice, when a gradient is taken (see :meth:`plan`): ``StoreAll`` if it
    fits, else ``EveryStep`` with the policy saving most that fits, else
    ``EveryStep()``, else ``Binomial`` with the most snapshots that fit. A
    prediction from the step's costs (``EveryStep()``, ``Binomial``) aims at
    95% of what is left for the schedule. The choice is then compiled at the
    full length; where XLA's figure and the outputs exceed the budget (a cost
    model can miss a constant on another backend), the excess is added to
    every prediction and the choice made again. Under a mesh in context
    this check is skipped: the unsharded program it would compile overstates
    each device's share.

    A scan that is only run forward, or under ``jax.jvp`` alone, runs as
    ``StoreAll`` and is never probed; so does one with nothing to
    differentiate (integer carries and inputs) or whose step reverse mode
    cannot differentiate (a ``fori_loop`` with traced bounds): its gradient
    then fails, if taken, exactly as ``lax.scan``'s does.

    Under :func:`bpttjax.cells.run`, ``StoreAll`` is tried as the layer runs
    it, one fused block with its own measured costs (about half of plain
    BPTT's memory for the library's cells); the rest is planned as for
    ``bj.scan`` of the step, except that a ``Binomial`` recomputing more than
    1.5 forward passes gives way to ``Nested(2)`` with fused blocks where that
    fits (measured by compiling it), as fused blocks recompute faster.

    Cost: that of the chosen strategy, plus two to four small compilations
    and one at the full length each time a gradient of the scan is traced
    (the step's measured costs and the checks are cached per step program
    and shapes).

    Raises:
      BudgetTooSmallError: a ``ValueError``, when no strategy fits; the
        message and its ``least_bytes`` name the least budget that works.
      ValueError: when XLA's figure keeps exceeding the budget after four
        choices.

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
        return (cls(30_000),)

    def plan(self, f: Callable, init: Any, xs: Any = None, length: int | None = None) -> Plan:
        """The strategy this budget runs for a gradient of ``bj.scan(f, init, xs, length)``.

        Compiles plain BPTT of ``f`` (and ``EveryStep`` with each policy) at
        two short lengths to measure its :class:`~bpttjax.remat.StepCosts`,
        then the chosen strategy at ``length`` to check it. For a scan with
        nothing to differentiate, or a step reverse mode cannot
        differentiate, the plan is ``StoreAll`` with no measured costs.
        """
        T = _check_length(xs, length)
        step = _checked_step(f)
        return self._plan(step, _promote_weak_init(step, init, xs)[0], xs, T)

    def choose(
        self,
        length: int,
        costs: StepCosts,
        policy_costs: Sequence[tuple[RematStrategy, StepCosts]] = (),
        missed: int = 0,
        output_bytes: int = 0,
    ) -> Plan:
        """The plan for ``length`` steps with the step's measured costs (no compiling).

        ``policy_costs`` pairs each ``EveryStep(policy)`` with its measured
        per-step costs (its ``residual_bytes`` is what it keeps per step).
        ``missed`` bytes are added to every prediction: what XLA measured
        beyond the model's figure for an earlier choice. ``output_bytes``
        are the scan's outputs and their cotangent, held on top of the
        schedule.

        Raises:
          BudgetTooSmallError: nothing fits; it names the least budget the
            model says would.
        """
        lines = _lines(length, costs, [(StoreAll(), costs), *policy_costs], output_bytes)
        return self._choose(length, costs, lines, missed)

    def _choose(self, length: int, costs: StepCosts, lines: list, missed: int) -> Plan:
        """:meth:`choose` with the line candidates' plans made (:func:`_lines`)."""
        outputs = lines[0].output_bytes
        for plan in lines:
            if plan.predicted_bytes + missed <= self.bytes:
                return dataclasses.replace(plan, budget_bytes=self.bytes)
        usable = _SAFETY * (self.bytes - outputs) - missed
        every = EveryStep().cost(length, costs)
        if every.temp_bytes <= usable:
            return self._made(EveryStep(), every, length, costs, outputs)
        least = Binomial(1).cost(length, costs).temp_bytes
        per_snapshot = max(Binomial(2).cost(length, costs).temp_bytes - least, 1)
        s = 1 + int((usable - least) // per_snapshot) if usable >= least else 0
        s = min(s, max(length - 1, 1))
        if s < 1 or usable < 0:
            needs = [(p.predicted_bytes + missed, p.strategy) for p in lines]
            for strategy, temp in ((EveryStep(), every.temp_bytes), (Binomial(1), least)):
                needs.append((math.ceil((temp + missed) / _SAFETY) + outputs, strategy))
            need, strategy = min(needs, key=lambda ns: ns[0])
            raise _too_small(self.bytes, strategy, need, "predicted", outputs)
        strategy = Binomial(s)
        return self._made(strategy, strategy.cost(length, costs), length, costs, outputs)

    def _made(
        self, strategy: RematStrategy, cost: Cost, length: int, costs: StepCosts, outputs: int
    ) -> Plan:
        return Plan(
            strategy,
            cost.temp_bytes,
            cost.recomputed_steps,
            self.bytes,
            length,
            costs,
            output_bytes=outputs,
        )

    def _plan(self, f: Callable, init: Any, xs: Any, length: int) -> Plan:
        """The plan for a gradient of ``bj.scan(f, ...)``, checked by compiling it."""
        outputs = _output_bytes(f, init, xs, length)
        try:
            costs, lines = self._step_costs(f, init, xs)
        except _NotDifferentiable:
            return self._made(StoreAll(), Cost(0, 0), length, StepCosts(0, 0), outputs)
        plans = _lines(length, costs, lines, outputs, holds_outputs=True)

        def measure(strategy):
            if any(strategy == p.strategy for p in plans):
                return _scan_temp(f, init, xs, length, strategy, all_outputs=True)
            return _scan_temp(f, init, xs, length, strategy) + outputs

        return self._checked(length, costs, plans, measure)

    def _step_costs(self, f: Callable, init: Any, xs: Any) -> tuple[StepCosts, list]:
        """The step's measured costs under a per-step loss, and those of ``StoreAll``
        and ``EveryStep`` with each policy under a loss over all outputs.

        Raises ``_NotDifferentiable`` where plain BPTT of the step does not
        compile: nothing is differentiable, or reverse mode fails on the step.
        """
        _, consts_a, init_a, x_a = _closed_step(f, init, xs)
        if not any(map(_is_diff, jax.tree.leaves((consts_a, init_a, x_a)))):
            raise _NotDifferentiable
        try:
            costs = _measured_costs(f, init, xs, None)
        except (TypeError, ValueError) as err:  # JAX's reverse-mode errors
            raise _NotDifferentiable from err
        lines = [StoreAll(), *(EveryStep(p) for p in self.policies)]
        return costs, [(s, _measured_costs(f, init, xs, s, all_outputs=True)) for s in lines]

    def _checked(
        self,
        length: int,
        costs: StepCosts,
        lines: list,
        measure: Callable[[RematStrategy], int],
    ) -> Plan:
        """:meth:`_choose`, then XLA's figure for the whole (``measure(strategy)``).

        Where it exceeds the budget, the excess over the prediction is added
        to every prediction and the choice made again. Where the model says
        nothing fits, or after four misses, the least-memory candidates are
        compiled and the fastest that fits is taken; otherwise the error names
        the least budget XLA measured. Under a mesh, the model's choice.
        """
        if not _checking():
            return self._choose(length, costs, lines, 0)
        missed = 0
        for _ in range(_CHECKS):
            try:
                plan = self._choose(length, costs, lines, missed)
            except BudgetTooSmallError:
                break
            total = measure(plan.strategy)
            if total <= self.bytes:
                return dataclasses.replace(plan, measured_bytes=total)
            missed = max(missed + 1, total - plan.predicted_bytes)
        return self._smallest(length, costs, lines, measure)

    def _smallest(self, length: int, costs: StepCosts, lines: list, measure: Callable) -> Plan:
        """The fastest of the least-memory strategies that XLA says fits, or the error
        naming the least budget that works."""
        outputs = lines[0].output_bytes
        measured = [(s, measure(s)) for s in (StoreAll(), EveryStep(), Binomial(1))]
        for strategy, total in measured:  # fastest first
            if total <= self.bytes:
                plan = self._made(strategy, strategy.cost(length, costs), length, costs, outputs)
                for line in lines:
                    if line.strategy == strategy:
                        plan = dataclasses.replace(line, budget_bytes=self.bytes)
                return dataclasses.replace(plan, measured_bytes=total)
        strategy, total = min(measured, key=lambda st: st[1])
        raise _too_small(self.bytes, strategy, total, "measured", outputs)

    def cost(self, length, costs):
        plan = self.choose(length, costs)
        return Cost(plan.temp_bytes, plan.recomputed_steps)

    def scan(self, f, init, xs, length, reverse, unroll):
        x0 = None if xs is None else jax.tree.map(lambda a: a[0], xs)
        closed, consts = jax.closure_convert(f, init, x0)

        def run(strategy, consts, init, xs):
            step = lambda c, x: closed(c, x, *consts)
            return strategy.scan(step, init, xs, length, reverse, unroll)

        # jax.linearize (not a VJP) evaluates the linear map forward, which
        # Binomial, a custom_vjp, cannot; say so where it is chosen.
        forward = any(_linearized(x) for x in jax.tree.leaves((consts, init, xs)))

        def choose(consts, init, xs):
            plan = self._plan(lambda c, x: closed(c, x, *consts), init, xs, length)
            if forward and isinstance(plan.strategy, Binomial):
                raise TypeError(
                    f"{self} chose {plan.strategy} for this scan, which does not support "
                    "forward-mode jax.linearize (a jax.custom_vjp has no forward-mode rule). "
                    "Give the budget room for EveryStep, use remat=bj.Nested(levels), "
                    "or linearize the gradient instead (jax.linearize of jax.grad works)."
                )
            return plan.strategy

        return _when_linearized(run, choose, (list(consts), init, xs))

    def scan_layer(self, layer, init):
        def rebuild(arrays):
            params, xs, truncation = arrays
            return dataclasses.replace(layer, params=params, xs=xs, truncation=truncation)

        run = lambda strategy, arrays, init: strategy.scan_layer(rebuild(arrays), init)
        choose = lambda arrays, init: self._layer_strategy(rebuild(arrays), init)
        return _when_linearized(run, choose, ((layer.params, layer.xs, layer.truncation), init))

    def _layer_strategy(self, layer, init) -> RematStrategy:
        """What runs a :func:`bpttjax.cells.run` layer under this budget.

        Planned as ``bj.scan`` of the step, with ``StoreAll`` as the layer
        runs it, one fused block, predicted from that block's measured
        costs; and, where the plan is a ``Binomial`` that recomputes more
        than ``_FUSED_NESTED_OVER`` forward passes, ``Nested(2)`` with fused
        blocks if its memory, measured by compiling it, fits. The choice is
        checked against the layer as it runs (a loss over all its outputs),
        and the chosen strategy runs the layer its own way.
        """
        outputs = _output_bytes(layer.step, init, layer.xs, layer.length)
        try:
            costs, lines = self._step_costs(layer.step, init, layer.xs)
        except _NotDifferentiable:
            return StoreAll()
        lines = [(StoreAll(), _layer_costs(layer, init)), *lines[1:]]
        plans = _lines(layer.length, costs, lines, outputs, holds_outputs=True)
        measure = lambda strategy: _layer_temp(layer, init, strategy)
        try:
            model = self._choose(layer.length, costs, plans, 0)
        except BudgetTooSmallError:
            model = None
        if model is None or (
            isinstance(model.strategy, Binomial)
            and model.recomputed_steps > _FUSED_NESTED_OVER * layer.length
        ):
            nested = _fused_nested(layer, init)
            if measure(nested) <= self.bytes:
                return nested
        return self._checked(layer.length, costs, plans, measure).strategy


class _NotDifferentiable(Exception):
    """Plain BPTT of the step does not compile: nothing to plan for."""


def _lines(
    length: int, costs: StepCosts, pairs: Sequence, outputs: int, holds_outputs: bool = False
) -> list[Plan]:
    """Plans for the candidates predicted by a line through two compilations of
    themselves: ``StoreAll`` and ``EveryStep`` with a policy, fastest first.

    ``pairs`` are ``(strategy, StepCosts)``; where ``holds_outputs``, their
    costs were measured with a loss over all outputs, so the line is the
    whole prediction, else ``outputs`` are added to it.
    """
    store_all, *policies = pairs
    policies = sorted(policies, key=lambda sc: -sc[1].residual_bytes)  # saves most first
    plans = []
    for strategy, pc in (store_all, *policies):
        # a policy is measured like plain BPTT (what it keeps per step is its
        # slope); it still re-evaluates each step in the backward pass
        line = StoreAll().cost(length, pc).temp_bytes
        predicted = line if holds_outputs else line + outputs
        recomputed = 0 if strategy == StoreAll() else length
        plans.append(
            Plan(
                strategy,
                max(predicted - outputs, 0),
                recomputed,
                0,
                length,
                costs,
                output_bytes=outputs,
                predicted_bytes=predicted,
            )
        )
    return plans


def _output_bytes(f: Callable, init: Any, xs: Any, length: int) -> int:
    """The scan's outputs (final carry, ``ys``) and the cotangent of their inexact
    leaves: what a loss over the outputs holds on top of the schedule."""
    carry, y = jax.eval_shape(f, init, _one_step(xs))
    diff = lambda tree: [a for a in jax.tree.leaves(tree) if _is_diff(a)]
    outputs = memory.tree_bytes(carry) + length * memory.tree_bytes(y)
    cotangents = memory.tree_bytes(diff(carry)) + length * memory.tree_bytes(diff(y))
    return outputs + cotangents


def _when_linearized(run: Callable, choose: Callable, args: tuple) -> Any:
    """``run(StoreAll(), *args)``, or ``run(choose(*args), *args)`` where it is linearized.

    A ``jax.custom_jvp`` whose primal is ``StoreAll``'s. JAX calls its rule
    only when a tangent flows in; the rule then runs the JVP of the chosen
    strategy, which ``jax.grad`` partially evaluates and transposes exactly
    as if the strategy had been called directly, so the residuals are the
    strategy's. Under ``jax.jvp`` alone nothing is stored for a backward
    pass, so the rule keeps ``StoreAll`` and never plans.
    """
    if not any(map(_is_diff, jax.tree.leaves(args))):
        return run(StoreAll(), *args)

    @jax.custom_jvp
    def call(*args):
        return run(StoreAll(), *args)

    @functools.partial(call.defjvp, symbolic_zeros=True)
    def call_jvp(primals, tangents):
        flat, tree = jax.tree.flatten(primals)
        flat_t = jax.tree.leaves(tangents, is_leaf=lambda t: isinstance(t, SymbolicZero))
        live = [not isinstance(t, SymbolicZero) for t in flat_t]
        tangent_in = [t for t, keep in zip(flat_t, live, strict=True) if keep]
        strategy = choose(*primals) if _linearizing(tangent_in) else StoreAll()

        def on_live(*values):
            values = iter(values)
            full = [next(values) if keep else x for x, keep in zip(flat, live, strict=True)]
            return run(strategy, *tree.unflatten(full))

        primal_in = [x for x, keep in zip(flat, live, strict=True) if keep]
        return jax.jvp(on_live, primal_in, tangent_in)

    return call(*args)


def _linearizing(tangents: list) -> bool:
    """Whether the tangents come from a linearization (``jax.grad``, ``jax.vjp``,
    ``jax.linearize``), whose backward pass needs residuals, rather than from
    forward-mode ``jax.jvp``, which needs none.

    JAX hands a ``custom_jvp`` rule partial-evaluation tracers under a
    linearization, possibly inside ``vmap``'s tracers; under ``jax.jvp`` the
    tangents are values or ``jit``'s tracers. Anything else is taken as a
    linearization, so that the budget is never skipped where it may matter.
    """
    if _JAXPR_TRACER is None:
        return True
    for t in tangents:
        while isinstance(t, _BATCH_TRACER):
            t = t.val
        if not isinstance(t, jax.core.Tracer) or isinstance(t, _PURE_TRACERS):
            continue
        return True
    return False


# --- measuring a step -------------------------------------------------------------------

_COSTS_CACHE: dict[tuple, StepCosts] = {}
_TEMP_CACHE: dict[tuple, int] = {}


def _aval(a: Any) -> jax.ShapeDtypeStruct:
    """``a``'s shape, dtype and weak type, abstractly."""
    t = jax.typeof(a)
    return jax.ShapeDtypeStruct(t.shape, t.dtype, weak_type=t.weak_type)


def _abstract(tree: Any) -> Any:
    return jax.tree.map(_aval, tree)


def _per_step_loss(closed: Callable) -> Callable:
    """``closed`` with its ``y`` replaced by the sum of its inexact leaves (a float32 scalar).

    The probes differentiate this per-step loss, so that what they measure is
    the schedule, the step's residuals for ``y`` included, and not a ``T``-long
    ``ys`` buffer, which :func:`_output_bytes` counts (with its cotangent)
    for every strategy alike.
    """

    def step(c, x, *consts):
        c, y = closed(c, x, *consts)
        terms = [jnp.sum(jnp.real(v)).astype(jnp.float32) for v in _split_diff(y)[0]]
        return c, sum(terms, jnp.zeros((), jnp.float32))

    return step


def _measured_costs(
    f: Callable, init: Any, xs: Any, remat: RematStrategy | None, all_outputs: bool = False
) -> StepCosts:
    """:class:`StepCosts` of ``f`` under ``remat`` (plain BPTT when None), by compiling.

    The gradient compiled is that of a per-step loss (:func:`_per_step_loss`)
    and the final carry's sum, or with ``all_outputs`` of a loss over all
    outputs (:func:`_probe_grad`), with respect to the step's float
    parameters and ``init``; the result is cached by the step's program, the
    shapes, ``remat`` and the loss.
    """
    closed, consts_a, init_a, x_a = _closed_step(f, init, xs)
    key = (str(closed.jaxpr), repr((init_a, x_a, consts_a)), remat, all_outputs)
    remat = remat or StoreAll()
    step = closed if all_outputs else _per_step_loss(closed)

    def build(T):
        xs_a = jax.tree.map(lambda a: jax.ShapeDtypeStruct((T, *a.shape), a.dtype), x_a)
        run = lambda consts, init, xs: remat.scan(
            lambda c, x: step(c, x, *consts), init, xs, T, False, 1
        )
        return _probe_grad(run, all_outputs), (consts_a, init_a, xs_a)

    return _probe_costs(key, build, init_a)


def _probe_grad(run: Callable, all_outputs: bool = False) -> Callable:
    """``grad(a, init, xs)``: the gradient, for the float leaves of ``a`` and
    ``init``, of a loss over the float outputs of ``run(a, init, xs)``.

    The loss sums them, or with ``all_outputs`` takes the mean of their
    squares (as ``jnp.mean(hs**2)``), whose gradient keeps the outputs and
    makes their cotangent: what a loss over all outputs holds.
    """

    def term(o):
        o = jnp.real(o)
        return (jnp.mean(o * o) if all_outputs else jnp.sum(o)).astype(jnp.float32)

    def loss(diff, a, init, xs):
        _, other, merge = _split_diff((a, init))
        a, init = merge(diff, other)
        outs = _split_diff(run(a, init, xs))[0]
        return sum((term(o) for o in outs), jnp.zeros((), jnp.float32))

    return lambda a, init, xs: jax.grad(loss)(_split_diff((a, init))[0], a, init, xs)


def _probe_costs(key: tuple, build: Callable, init_a: Any) -> StepCosts:
    """:func:`bpttjax.memory.step_costs` of ``build`` at the probe lengths, cached by ``key``."""

    def measure():
        C = memory.tree_bytes(init_a)
        costs = memory.step_costs(build, C, _PROBE_LENGTHS)
        # The probe takes init as an argument; a loss usually creates it (as a
        # zero state), which holds one more carry in working memory.
        return dataclasses.replace(costs, overhead_bytes=costs.overhead_bytes + C + _SLACK)

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
        return _probe_grad(run, all_outputs=True), (params_a, init_a, xs_a)

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
    return _full_temp(key, run, params_a, init_a, xs_a, all_outputs=True)


def _scan_temp(
    f: Callable,
    init: Any,
    xs: Any,
    length: int,
    strategy: RematStrategy,
    all_outputs: bool = False,
) -> int:
    """XLA's temp bytes for the gradient of ``bj.scan(f, init, xs, length)`` under ``strategy``.

    Measured like :func:`_measured_costs`'s probes (the same loss, the same
    carry added for a loss that creates it) at the full length; cached.
    """
    closed, consts_a, init_a, _ = _closed_step(f, init, xs)
    xs_a = None if xs is None else _abstract(xs)
    step = closed if all_outputs else _per_step_loss(closed)
    run = lambda consts, init, xs: strategy.scan(
        lambda c, x: step(c, x, *consts), init, xs, length, False, 1
    )
    shapes = repr((init_a, xs_a, consts_a, length, all_outputs))
    key = ("scan temp", str(closed.jaxpr), shapes, strategy)
    return _full_temp(key, run, consts_a, init_a, xs_a, all_outputs)


def _full_temp(
    key: tuple, run: Callable, a: Any, init_a: Any, xs_a: Any, all_outputs: bool = False
) -> int:
    """XLA's temp bytes for :func:`_probe_grad` of ``run(a, init, xs)``, compiled as one
    unsharded program, plus the carry a loss usually creates; cached by ``key``."""

    def measure():
        with _outside_any_mesh():
            grad = _probe_grad(run, all_outputs)
            temp = memory.measure(grad, a, init_a, xs_a).temp_bytes
        return temp + memory.tree_bytes(init_a) + _SLACK

    return _cached(_TEMP_CACHE, key, measure)


def _closed_step(f: Callable, init: Any, xs: Any) -> tuple[Callable, Any, Any, Any]:
    """``f`` with its constants hoisted (:func:`_hoist_constants`), and the abstract
    constants, ``init`` and one step's ``x``."""
    init_a = _abstract(init)
    x_a = _one_step(xs)
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
