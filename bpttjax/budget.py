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
:func:`bpttjax.memory.step_costs`), asks every registered strategy class for its candidates
(:meth:`bpttjax.RematStrategy.candidates`), predicts each with its own
:meth:`~bpttjax.RematStrategy.cost`, and takes the fastest whose prediction,
outputs included, fits. ``StoreAll`` and ``EveryStep`` with each of the
budget's ``policies`` are measured directly instead: their prediction is a
line through two compilations of their own gradient.

Then it compiles the chosen strategy's gradient at the full length and
reads XLA's figure. Where that and the outputs exceed the budget (the model
missed something on this backend), the excess is added to every prediction
and the choice is made again.

A scan with nothing to differentiate (integer-only carries and inputs), or
whose step reverse mode cannot differentiate, runs as ``StoreAll``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax

from . import _probe
from ._checks import check_length, checked_step, parse_bytes
from ._trace import linearized, when_linearized
from ._tree import is_diff, promote_weak_init
from .remat import (
    STRATEGIES,
    Binomial,
    Cost,
    EveryStep,
    Layer,
    Nested,
    RematStrategy,
    StepCosts,
    StoreAll,
    register,
)

__all__ = ["Budget", "BudgetTooSmallError", "Plan", "parse_bytes"]

_SAFETY = 0.95
"""Plan a model's prediction (``EveryStep()``, ``Binomial``) to this fraction of the
budget: such predictions are within a few percent of XLA's. A prediction that is a line
through two compilations of the strategy itself (``StoreAll``, a policy) may use it all."""
_FUSED_NESTED_OVER = 1.5  # forward passes; see Budget._layer_strategy
_CHECKS = 4  # choices compiled and measured before a budget the model keeps missing is refused


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
    def _predicted(self) -> int:  # predicted_bytes, which __post_init__ always sets
        assert self.predicted_bytes is not None
        return self.predicted_bytes

    @property
    def total_bytes(self) -> int:
        """What the budget holds: XLA's figure where compiled, else the prediction."""
        return self._predicted if self.measured_bytes is None else self.measured_bytes

    def __str__(self) -> str:
        passes = self.recomputed_steps / self.length if self.length else 0.0
        measured = "" if self.measured_bytes is None else f", measured {_mb(self.measured_bytes)}"
        return (
            f"{self.strategy} for T={self.length}: schedule {_mb(self.temp_bytes)} and "
            f"outputs with their cotangent {_mb(self.output_bytes)}, predicted "
            f"{_mb(self._predicted)}{measured}: {self.total_bytes / self.budget_bytes:.0%} "
            f"of a {_mb(self.budget_bytes)} budget; {self.recomputed_steps:,} recomputed steps "
            f"({passes:.2f} forward passes)"
        )


def _mb(n: float) -> str:
    return f"{n / 1e6:.3g} MB"


def _recomputation(steps: int, length: int) -> str:
    """``steps`` recomputed over ``length`` in words: a pass, or revolve's quadratic worst."""
    if steps == 0:
        return "no recomputation"
    if steps <= length:
        return "about one extra forward pass"
    if 2 * steps >= length * (length - 1):  # Binomial(1): every step from the start
        return "about T**2/2 recomputed steps"
    return f"about {steps / length:.2g} extra forward passes"


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


def _too_small(budget: int, plan: Plan, least: int, how: str) -> BudgetTooSmallError:
    """The error for a budget under ``least`` bytes, what ``plan``'s strategy takes in all."""
    outputs = plan.output_bytes
    alone = (
        f" The scan's outputs (the final carry and ys) and their cotangent alone take "
        f"{outputs:,} bytes, more than the budget: a loss over all outputs keeps them while "
        "the gradient runs. A loss computed inside the step (per-step scalar ys) needs "
        "little of that."
        if outputs >= budget
        else ""
    )
    recompute = _recomputation(plan.recomputed_steps, plan.length)
    return BudgetTooSmallError(
        f"Budget(bytes={budget}) is too small for this scan: the least any strategy "
        f"needs is {plan.strategy}, at a {how} {least:,} bytes with the scan's outputs and "
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

    Choice, when a gradient is taken (see :meth:`plan`): every registered
    strategy class offers its candidates
    (:meth:`~bpttjax.RematStrategy.candidates`: ``StoreAll()``,
    ``EveryStep()``, ``Binomial(s)`` for every ``s``, and whatever a
    registered user strategy offers), each predicted by its own ``cost``;
    ``StoreAll`` and ``EveryStep`` with each policy are predicted from their
    own measured gradients instead. Of those that fit, the fastest runs:
    time is counted in whole forward passes of recomputation
    (``recomputed_steps / T``, rounded up), and among equal counts the
    candidate offered first wins (the measured ones, the policy saving most
    first, then the registry's classes in registration order). A prediction
    from a cost model aims at 95% of what is left for the schedule. The
    choice is then compiled at the full length; where XLA's figure and the
    outputs exceed the budget (a cost model can miss a constant on another
    backend), the excess is added to every prediction and the choice made
    again. Under a mesh in context this check is skipped: the unsharded
    program it would compile overstates each device's share.

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

    @property
    def _cap(self) -> int:  # bytes as parsed: an int once __post_init__ has run
        return int(self.bytes)

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
        T = check_length(xs, length)
        step = checked_step(f)
        return self._plan(step, promote_weak_init(step, init, xs)[0], xs, T)

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
        """:meth:`choose` with the measured candidates' plans made (:func:`_lines`)."""
        offered = _offered(length, costs, lines)
        fits = lambda group, plan: group.need(plan, missed) <= self._cap
        picks = []
        for position, group in enumerate(offered):
            plan = group.first(lambda plan, group=group: fits(group, plan))
            if plan is not None:
                picks.append((_passes(plan), position, plan))
        if not picks:
            least = [(g.need(g[-1], missed), g[-1]) for g in offered if len(g)]
            need, plan = min(least, key=lambda np_: np_[0])
            raise _too_small(self._cap, plan, need, "predicted")
        plan = min(picks, key=lambda p: p[:2])[2]
        return dataclasses.replace(plan, budget_bytes=self._cap)

    def _plan(self, f: Callable, init: Any, xs: Any, length: int) -> Plan:
        """The plan for a gradient of ``bj.scan(f, ...)``, checked by compiling it."""
        outputs = _probe.output_bytes(f, init, xs, length)
        try:
            costs, lines = self._step_costs(f, init, xs)
        except _NotDifferentiable:
            return Plan(StoreAll(), 0, 0, self._cap, length, StepCosts(0, 0), output_bytes=outputs)
        plans = _lines(length, costs, lines, outputs, holds_outputs=True)

        def measure(strategy):
            if any(strategy == p.strategy for p in plans):
                return _probe.scan_temp(f, init, xs, length, strategy, all_outputs=True)
            return _probe.scan_temp(f, init, xs, length, strategy) + outputs

        return self._checked(length, costs, plans, measure)

    def _step_costs(self, f: Callable, init: Any, xs: Any) -> tuple[StepCosts, list]:
        """The step's measured costs under a per-step loss, and those of ``StoreAll``
        and ``EveryStep`` with each policy under a loss over all outputs.

        Raises ``_NotDifferentiable`` where plain BPTT of the step does not
        compile: nothing is differentiable, or reverse mode fails on the step.
        """
        _, consts_a, init_a, x_a = _probe.closed_step(f, init, xs)
        if not any(map(is_diff, jax.tree.leaves((consts_a, init_a, x_a)))):
            raise _NotDifferentiable
        try:
            costs = _probe.measured_costs(f, init, xs, None)
        except (TypeError, ValueError) as err:  # JAX's reverse-mode errors
            raise _NotDifferentiable from err
        lines = [StoreAll(), *(EveryStep(p) for p in self.policies)]
        return costs, [(s, _probe.measured_costs(f, init, xs, s, all_outputs=True)) for s in lines]

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
        if not _probe.checking():
            return self._choose(length, costs, lines, 0)
        missed = 0
        for _ in range(_CHECKS):
            try:
                plan = self._choose(length, costs, lines, missed)
            except BudgetTooSmallError:
                break
            total = measure(plan.strategy)
            if total <= self._cap:
                return dataclasses.replace(plan, measured_bytes=total)
            missed = max(missed + 1, total - plan._predicted)
        return self._smallest(length, costs, lines, measure)

    def _smallest(self, length: int, costs: StepCosts, lines: list, measure: Callable) -> Plan:
        """The fastest of the least-memory candidates that XLA says fits, or the error
        naming the least budget that works.

        The least-memory candidates: ``StoreAll``'s measured plan and the last
        candidate of each registered class (``EveryStep()``, ``Binomial(1)``).
        """
        offered = _offered(length, costs, lines)
        least = [(0, 0, lines[0])]
        least += [
            (_passes(g[-1]), i, g[-1]) for i, g in enumerate(offered) if g.registered and len(g)
        ]
        measured = [
            (plan, measure(plan.strategy)) for *_, plan in sorted(least, key=lambda p: p[:2])
        ]
        for plan, total in measured:  # fastest first
            if total <= self._cap:
                return dataclasses.replace(plan, budget_bytes=self._cap, measured_bytes=total)
        plan, total = min(measured, key=lambda pt: pt[1])
        raise _too_small(self._cap, plan, total, "measured")

    def cost(self, length, costs):
        plan = self.choose(length, costs)
        own = plan.strategy.cost(length, costs)  # its host events and wasted pullbacks
        return Cost(plan.temp_bytes, plan.recomputed_steps, own.host_events, own.wasted_pullbacks)

    def scan(self, f, init, xs, length, reverse, unroll):
        x0 = None if xs is None else jax.tree.map(lambda a: a[0], xs)
        closed, consts = jax.closure_convert(f, init, x0)

        def run(strategy, consts, init, xs):
            step = lambda c, x: closed(c, x, *consts)
            return strategy.scan(step, init, xs, length, reverse, unroll)

        # jax.linearize (not a VJP) evaluates the linear map forward, which
        # Binomial, a custom_vjp, cannot; say so where it is chosen.
        forward = any(linearized(x) for x in jax.tree.leaves((consts, init, xs)))

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

        return when_linearized(run, StoreAll(), choose, (list(consts), init, xs))

    def scan_layer(self, layer: Layer, init):
        def rebuild(arrays):
            params, xs, truncation = arrays
            return layer.replace(params=params, xs=xs, truncation=truncation)

        run = lambda strategy, arrays, init: strategy.scan_layer(rebuild(arrays), init)
        choose = lambda arrays, init: self._layer_strategy(rebuild(arrays), init)
        return when_linearized(
            run, StoreAll(), choose, ((layer.params, layer.xs, layer.truncation), init)
        )

    def _layer_strategy(self, layer: Layer, init: Any) -> RematStrategy:
        """What runs a :func:`bpttjax.cells.run` layer under this budget.

        Planned as ``bj.scan`` of the step, with ``StoreAll`` as the layer
        runs it, one fused block, predicted from that block's measured
        costs; and, where the plan recomputes more than
        ``_FUSED_NESTED_OVER`` forward passes (a ``Binomial``), ``Nested(2)`` with fused
        blocks if its memory, measured by compiling it, fits. The choice is
        checked against the layer as it runs (a loss over all its outputs),
        and the chosen strategy runs the layer its own way.
        """
        outputs = _probe.output_bytes(layer.step, init, layer.xs, layer.length)
        try:
            costs, lines = self._step_costs(layer.step, init, layer.xs)
        except _NotDifferentiable:
            return StoreAll()
        lines = [(StoreAll(), _probe.layer_costs(layer, init)), *lines[1:]]
        plans = _lines(layer.length, costs, lines, outputs, holds_outputs=True)
        measure = lambda strategy: _probe.layer_temp(layer, init, strategy)
        try:
            model = self._choose(layer.length, costs, plans, 0)
        except BudgetTooSmallError:
            model = None
        if model is None or model.recomputed_steps > _FUSED_NESTED_OVER * layer.length:
            nested = _fused_nested(layer, init)
            if measure(nested) <= self._cap:
                return nested
        return self._checked(layer.length, costs, plans, measure).strategy


class _Group(Sequence):
    """One source's candidates as plans, from the most memory to the least.

    ``plans[i]`` is made only when indexed, so a class may offer a long lazy
    sequence (``Binomial``'s one per snapshot count) that :meth:`first`
    bisects. ``measured`` plans are lines through two compilations of the
    strategy itself, whose prediction may use the whole budget; the others
    come from a cost model and aim at ``_SAFETY`` of what the outputs leave.
    """

    def __init__(self, items: Sequence, make: Callable[[Any], Plan], measured: bool, registered):
        self._items, self._make = items, make
        self.measured, self.registered = measured, registered

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):  # type: ignore[override]
        return self._make(self._items[i])

    def need(self, plan: Plan, missed: int) -> int:
        """The least budget ``plan`` fits, with ``missed`` bytes added to its prediction."""
        if self.measured:
            return plan._predicted + missed
        return math.ceil((plan.temp_bytes + missed) / _SAFETY) + plan.output_bytes

    def first(self, fits: Callable[[Plan], bool]) -> Plan | None:
        """The first plan that ``fits``: the one with the most memory, so the fastest."""
        lo, hi = 0, len(self)
        while lo < hi:  # the plans' needs do not increase along the group
            mid = (lo + hi) // 2
            if fits(self[mid]):
                hi = mid
            else:
                lo = mid + 1
        return self[lo] if lo < len(self) else None


def _offered(length: int, costs: StepCosts, lines: list[Plan]) -> list[_Group]:
    """Every candidate, grouped by where it comes from, in the order offered: the
    measured ``lines`` (:func:`_lines`), then each registered class's
    :meth:`~bpttjax.RematStrategy.candidates` (without those measured)."""
    groups = [_Group((p,), lambda p: p, measured=True, registered=None) for p in lines]
    measured = [p.strategy for p in lines]
    outputs = lines[0].output_bytes

    def model(strategy: RematStrategy) -> Plan:
        cost = strategy.cost(length, costs)
        return Plan(
            strategy, cost.temp_bytes, cost.recomputed_steps, 0, length, costs, output_bytes=outputs
        )

    for cls in STRATEGIES.values():
        offered = cls.candidates(length, costs)
        if not isinstance(offered, Sequence):
            offered = tuple(offered)
        if isinstance(offered, tuple | list):
            offered = [s for s in offered if s not in measured]
        groups.append(_Group(offered, model, measured=False, registered=cls))
    return groups


def _passes(plan: Plan) -> int:
    """The plan's recomputation in whole forward passes, rounded up: Budget's time."""
    return -(-plan.recomputed_steps // max(plan.length, 1))


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


def _fused_nested(layer: Layer, init: Any) -> Nested:
    """``Nested(2)`` with the level lengths it picks for this layer, made explicit."""
    return Nested(lengths=Nested(2).layer_lengths(layer, init))
