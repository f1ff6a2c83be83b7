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

Of those that fit, it runs the fastest by a time model: seconds per step,
per pullback and per host decision (:class:`Timing`), measured once per
process on the device (:func:`device_timing`) or given as ``timing=``.

Then it compiles the chosen strategy's gradient at the full length and
reads XLA's figure. Where that and the outputs exceed the budget (the model
missed something on this backend), the excess is added to the predictions
of the chosen family and the choice is made again.

A scan with nothing to differentiate (integer-only carries and inputs), or
whose step reverse mode cannot differentiate, runs as ``StoreAll``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax

from . import _probe
from ._checks import check_length, checked_step, parse_bytes
from ._plan import Plan, mb, measured_lines, offered, pick
from ._timing import Timing, device_timing
from ._trace import linearized, when_linearized
from ._tree import is_diff, promote_weak_init
from .remat import (
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

__all__ = ["Budget", "BudgetTooSmallError", "Plan", "Timing", "device_timing", "parse_bytes"]

_FUSED_NESTED_OVER = 1.5  # forward passes; see Budget._layer_strategy
_CHECKS = 4  # choices compiled and measured before a budget the model keeps missing is refused


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
        f"their cotangent; Budget({least}) would work ({mb(least)}; {recompute}).{alone}",
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
      timing: the :class:`Timing` constants to predict time with (default:
        :func:`device_timing`, measured on JAX's default device once per
        process). Give them to make the choice independent of the machine's
        load, or to plan for another device.

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
    ``EveryStep()``, ``Binomial(s)`` and ``Binomial(s, static=True)`` for
    every ``s``, ``Nested`` with each number of levels, and whatever a
    registered user strategy offers), each predicted by its own ``cost``;
    ``StoreAll`` and ``EveryStep`` with each policy are predicted from their
    own measured gradients instead. Of those that fit, the fastest runs, by
    the time model of :class:`Timing`: each forward step, each pullback (those
    a schedule throws away included) and each host-decided event
    (:attr:`~bpttjax.remat.Cost.host_events`), timed per device. Families
    (a class's candidates, such as ``Binomial`` with each snapshot count)
    whose fastest fits are within 3% count as equally fast, and the one
    offered first runs (the measured ones, the policy saving most first, then
    the registry's classes in registration order): each schedule's loops cost
    a few percent the model does not see. Within it, the plan with the least
    memory whose time is within 0.5% of the family's fastest.
    A prediction from a cost model aims at 95% of what is left for the
    schedule. The choice is then compiled at the full length; where XLA's
    figure and the outputs exceed the budget (a cost model can miss a
    constant on another backend), the excess is added to that family's
    predictions and the choice made again. Under a mesh in context this
    check is skipped: the unsharded program it would compile overstates each
    device's share.

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
    timing: Timing | None = None

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
        if self.timing is not None and not isinstance(self.timing, Timing):
            raise TypeError(
                "Budget(timing=...) expects a bj.budget.Timing or None, got "
                f"{type(self.timing).__name__}: {self.timing!r}"
            )

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
        lines = measured_lines(length, costs, [(StoreAll(), costs), *policy_costs], output_bytes)
        return self._choose(length, costs, lines, missed)

    def _choose(self, length: int, costs: StepCosts, lines: list, missed: int) -> Plan:
        """:meth:`choose` with the measured candidates' plans made (``measured_lines``)."""
        return self._choose_family(length, costs, lines, {}, missed)[1]

    def _choose_family(
        self, length: int, costs: StepCosts, lines: list, missed: dict[int, int], everywhere: int
    ) -> tuple[int, Plan]:
        """The chosen plan and its family's position among the groups offered, with
        ``missed[position]`` bytes added to that family's predictions and
        ``everywhere`` to all."""
        groups = offered(length, costs, lines, self._timing())
        need = lambda i, plan: groups[i].need(plan, everywhere + missed.get(i, 0))
        chosen = pick(groups, lambda i, plan: need(i, plan) <= self._cap)
        if chosen is None:
            least = [(need(i, g[-1]), g[-1]) for i, g in enumerate(groups) if len(g)]
            least_need, plan = min(least, key=lambda np_: np_[0])
            raise _too_small(self._cap, plan, least_need, "predicted")
        position, plan = chosen
        return position, dataclasses.replace(plan, budget_bytes=self._cap)

    def _timing(self) -> Timing:
        """The constants this budget predicts time with: ``timing``, or those measured on
        JAX's default device (:func:`bpttjax.budget.device_timing`, once per process)."""
        return self.timing if self.timing is not None else device_timing()

    def _plan(self, f: Callable, init: Any, xs: Any, length: int) -> Plan:
        """The plan for a gradient of ``bj.scan(f, ...)``, checked by compiling it."""
        outputs = _probe.output_bytes(f, init, xs, length)
        try:
            costs, lines = self._step_costs(f, init, xs)
        except _NotDifferentiable:
            return Plan(StoreAll(), 0, 0, self._cap, length, StepCosts(0, 0), output_bytes=outputs)
        plans = measured_lines(length, costs, lines, outputs, holds_outputs=True)

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
        to the predictions of the chosen plan's family (each cost model misses
        by its own amount) and the choice made again. Where the model says
        nothing fits, or after four misses, the least-memory candidates are
        compiled and the fastest that fits is taken; otherwise the error names
        the least budget XLA measured. Under a mesh, the model's choice.
        """
        if not _probe.checking():
            return self._choose(length, costs, lines, 0)
        missed: dict[int, int] = {}  # by family: cost models miss by their own amounts
        for _ in range(_CHECKS):
            try:
                position, plan = self._choose_family(length, costs, lines, missed, 0)
            except BudgetTooSmallError:
                break
            total = measure(plan.strategy)
            if total <= self._cap:
                return dataclasses.replace(plan, measured_bytes=total)
            missed[position] = max(missed.get(position, 0) + 1, total - plan.predicted)
        return self._smallest(length, costs, lines, measure)

    def _smallest(self, length: int, costs: StepCosts, lines: list, measure: Callable) -> Plan:
        """The fastest of the least-memory candidates that XLA says fits, or the error
        naming the least budget that works.

        The least-memory candidates: ``StoreAll``'s measured plan and the last
        candidate of each registered class (``EveryStep()``, ``Binomial(1)``).
        """
        groups = offered(length, costs, lines, self._timing())
        least = [(groups[0][0].seconds, 0, groups[0][0])]
        least += [
            (g[-1].seconds, i, g[-1]) for i, g in enumerate(groups) if g.registered and len(g)
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
        plans = measured_lines(layer.length, costs, lines, outputs, holds_outputs=True)
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


class _NotDifferentiable(Exception):
    """Plain BPTT of the step does not compile: nothing to plan for."""


def _fused_nested(layer: Layer, init: Any) -> Nested:
    """``Nested(2)`` with the level lengths it picks for this layer, made explicit."""
    return Nested(lengths=Nested(2).layer_lengths(layer, init))
