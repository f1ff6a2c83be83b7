"""What :class:`~bpttjax.Budget` chooses from and how: its ``Plan``, the candidates, the pick.

A :class:`Plan` is one candidate strategy with its predicted memory and time.
Candidates come in groups (:class:`Group`): each measured ``StoreAll`` or
policy on its own, and every family a registered strategy class offers
(:meth:`bpttjax.RematStrategy.candidates`), ordered from the most memory to
the least, so that the first plan of a group that fits is its fastest and can
be found by bisection. :func:`pick` takes the fastest family by the time
model (:class:`~bpttjax.budget.Timing`), the one offered first where several
are within :data:`TIE`, then, within that family, the plan with the least
memory whose predicted time is within :data:`CLOSE` of the family's fastest.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from ._timing import Timing
from .remat import STRATEGIES, Cost, RematStrategy, StepCosts, StoreAll

__all__ = ["CLOSE", "SAFETY", "TIE", "Group", "Plan", "mb", "measured_lines", "offered", "pick"]

SAFETY = 0.95
"""Plan a model's prediction (``EveryStep()``, ``Binomial``) to this fraction of the
budget: such predictions are within a few percent of XLA's. A prediction that is a line
through two compilations of the strategy itself (``StoreAll``, a policy) may use it all."""

CLOSE = 0.005
"""Within a family, a plan whose predicted time is within this fraction of the family's
fastest fit counts as fast as it, and the one of those with the least memory runs:
revolve's last few snapshots buy almost no time."""

TIE = 0.03
"""Families whose fastest fits are within this fraction of each other count as equally
fast, and the one offered first runs: each schedule's loops cost a few percent that the
time model does not see (an engine's bookkeeping per step, a level's slicing)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What :class:`~bpttjax.Budget` chose for one scan, and why.

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
      host_events: the times its gradient waits for the host
        (:attr:`bpttjax.remat.Cost.host_events`).
      wasted_pullbacks: step pullbacks it runs and throws away
        (:attr:`bpttjax.remat.Cost.wasted_pullbacks`).
      seconds: its predicted time for one gradient by ``timing`` (None: not
        predicted).
      timing: the :class:`~bpttjax.budget.Timing` constants ``seconds`` was
        predicted with.
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
    host_events: int = 0
    wasted_pullbacks: int = 0
    seconds: float | None = None
    timing: Timing | None = None

    def __post_init__(self):
        if self.predicted_bytes is None:
            object.__setattr__(self, "predicted_bytes", self.temp_bytes + self.output_bytes)

    @property
    def snapshots(self) -> int | None:
        """Stored carries when the strategy is :class:`~bpttjax.Binomial`, else None."""
        return getattr(self.strategy, "snapshots", None)

    @property
    def predicted(self) -> int:
        """``predicted_bytes``, which construction always sets."""
        assert self.predicted_bytes is not None
        return self.predicted_bytes

    @property
    def total_bytes(self) -> int:
        """What the budget holds: XLA's figure where compiled, else the prediction."""
        return self.predicted if self.measured_bytes is None else self.measured_bytes

    def timed(self, timing: Timing) -> Plan:
        """This plan with its time predicted by ``timing``."""
        cost = Cost(self.temp_bytes, self.recomputed_steps, self.host_events, self.wasted_pullbacks)
        return dataclasses.replace(self, seconds=timing.seconds(self.length, cost), timing=timing)

    def __str__(self) -> str:
        passes = self.recomputed_steps / self.length if self.length else 0.0
        measured = "" if self.measured_bytes is None else f", measured {mb(self.measured_bytes)}"
        text = (
            f"{self.strategy} for T={self.length}: schedule {mb(self.temp_bytes)} and "
            f"outputs with their cotangent {mb(self.output_bytes)}, predicted "
            f"{mb(self.predicted)}{measured}: {self.total_bytes / self.budget_bytes:.0%} "
            f"of a {mb(self.budget_bytes)} budget; {self.recomputed_steps:,} recomputed steps "
            f"({passes:.2f} forward passes)"
        )
        if self.host_events:
            text += f", {self.host_events:,} host events"
        if self.seconds is not None:
            took = f"{self.seconds:.3g} s" if self.seconds >= 1 else f"{self.seconds * 1e3:.3g} ms"
            text += f"; predicted {took} at {self.timing}"
        return text


def mb(n: float) -> str:
    """``n`` bytes in megabytes, three significant digits."""
    return f"{n / 1e6:.3g} MB"


class Group(Sequence):
    """One family of candidates as plans, from the most memory to the least.

    ``plans[i]`` is made only when indexed, so a class may offer a long lazy
    sequence (``Binomial``'s one per snapshot count) that :meth:`first`
    bisects. ``measured`` plans are lines through two compilations of the
    strategy itself, whose prediction may use the whole budget; the others
    come from a cost model and aim at :data:`SAFETY` of what the outputs leave.
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
            return plan.predicted + missed
        return math.ceil((plan.temp_bytes + missed) / SAFETY) + plan.output_bytes

    def first(self, fits: Callable[[Plan], bool]) -> int | None:
        """The index of the first plan that ``fits``: the one with the most memory, so the
        fastest. Bisects: the plans' needs do not increase along the group."""
        return _bisect(len(self), lambda i: fits(self[i]))

    def least_close(self, start: int, seconds: float) -> Plan:
        """The plan with the least memory from ``start`` on whose predicted time is at
        most ``seconds``, or ``self[start]``. Bisects: time does not fall along the group."""
        slower = lambda i: (self[start + i].seconds or 0.0) > seconds
        after = _bisect(len(self) - start, slower)
        last = self[start + (len(self) - start if after is None else after) - 1]
        assert last.seconds is not None
        return last if last.seconds <= seconds else self[start]


def _bisect(n: int, true: Callable[[int], bool]) -> int | None:
    """The least ``i < n`` where ``true(i)`` for a predicate false then true, or None."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if true(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo if lo < n else None


def offered(length: int, costs: StepCosts, lines: list[Plan], timing: Timing) -> list[Group]:
    """Every candidate, grouped by family, in the order offered: the measured ``lines``
    (:func:`measured_lines`), then each registered class's
    :meth:`~bpttjax.RematStrategy.candidates` (without those measured), each plan's time
    predicted by ``timing``."""
    groups = [Group((p.timed(timing),), lambda p: p, measured=True, registered=None) for p in lines]
    measured = [p.strategy for p in lines]
    outputs = lines[0].output_bytes

    def model(strategy: RematStrategy) -> Plan:
        cost = strategy.cost(length, costs)
        plan = Plan(
            strategy,
            cost.temp_bytes,
            cost.recomputed_steps,
            0,
            length,
            costs,
            output_bytes=outputs,
            host_events=cost.host_events,
            wasted_pullbacks=cost.wasted_pullbacks,
        )
        return plan.timed(timing)

    for cls in STRATEGIES.values():
        for family in _families(cls.candidates(length, costs)):
            if isinstance(family, tuple | list):
                family = [s for s in family if s not in measured]
            groups.append(Group(family, model, measured=False, registered=cls))
    return groups


def _families(offered: Any) -> list[Sequence]:
    """What a class's ``candidates`` returned, as families: one sequence of strategies,
    or a tuple of such sequences."""
    if isinstance(offered, tuple) and offered and not isinstance(offered[0], RematStrategy):
        return [f if isinstance(f, Sequence) else tuple(f) for f in offered]
    return [offered if isinstance(offered, Sequence) else tuple(offered)]


def pick(groups: list[Group], fits: Callable[[int, Plan], bool]) -> tuple[int, Plan] | None:
    """The plan to run among those that ``fits``.

    Each group's first fit is its fastest. Of the groups whose fastest is
    within :data:`TIE` of the fastest of all, the one offered first runs:
    the order of offering puts the measured plans first, then the registry's
    classes in registration order. Within that group, the plan with the least
    memory whose predicted time is within :data:`CLOSE` of the group's fastest.
    Returns that group's position and the plan.
    """
    firsts = []
    for position, group in enumerate(groups):
        i = group.first(lambda plan, position=position: fits(position, plan))
        if i is not None:
            firsts.append((group[i].seconds, position, i))
    if not firsts:
        return None
    limit = min(firsts)[0] * (1 + TIE)
    seconds, position, i = min(((s, p, i) for s, p, i in firsts if s <= limit), key=lambda f: f[1])
    return position, groups[position].least_close(i, seconds * (1 + CLOSE))


def measured_lines(
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
