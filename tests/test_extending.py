"""A new strategy is one class: Budget, bj.scan, predict and --remat pick it up.

``Budget`` asks every registered class for its candidates
(``RematStrategy.candidates``), predicts each with the class's own ``cost``,
and runs the fastest that fits. These tests register user strategies whose
cost models make them the best fit, or no fit at all, and check what Budget
does with them; and that a long lazy list of candidates is bisected.
"""

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CPU_TIMING
from helpers import assert_trees_close

import bpttjax as bj
from bpttjax.remat import _base as _remat_base

T, B, D, H = 300, 4, 8, 32


def problem():
    params = bj.cells.init_rnn(jax.random.key(0), D, H, jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (T, B, D), jnp.float64)
    h0 = bj.cells.initial_carry("rnn", H, (B,), dtype=jnp.float64)

    def step(h, x):  # a per-step loss: the outputs are T scalars
        h, y = bj.cells.rnn(params, h, x)
        return h, jnp.mean(y**2)

    return params, xs, h0, step


@pytest.fixture
def registered():
    """Register classes under test names for one test, and remove them after."""
    names = []

    def register(name, cls):
        names.append(name)
        return bj.remat.register(name)(cls)

    yield register
    for name in names:
        _remat_base._REGISTRY.pop(name, None)


def plain_bytes(step, h0, xs):
    fn = jax.grad(lambda h0, xs: jnp.sum(bj.scan(step, h0, xs)[1]), argnums=(0, 1))
    return bj.memory.measure(fn, h0, xs).temp_bytes


@dataclasses.dataclass(frozen=True)
class Thrifty(bj.RematStrategy):
    """A user's strategy whose cost model claims ``Binomial(4)``'s memory and no
    recomputation at all: the best fit wherever ``StoreAll`` does not fit."""

    def scan(self, f, init, xs, length, reverse, unroll):
        return bj.Binomial(4).scan(f, init, xs, length, reverse, unroll)

    def cost(self, length, costs):
        return bj.remat.Cost(bj.Binomial(4).cost(length, costs).temp_bytes, 0)

    @classmethod
    def candidates(cls, length, costs):
        Thrifty.asked.append((length, costs))
        return (cls(),)


Thrifty.asked = []


@dataclasses.dataclass(frozen=True)
class Lavish(bj.RematStrategy):
    """A user's strategy that recomputes nothing and whose cost model says it needs far
    more than any budget here: never a fit."""

    def scan(self, f, init, xs, length, reverse, unroll):
        return jax.lax.scan(f, init, xs, length=length, reverse=reverse, unroll=unroll)

    def cost(self, length, costs):
        return bj.remat.Cost(10**15, 0)

    @classmethod
    def candidates(cls, length, costs):
        return (cls(),)


@pytest.mark.slow
def test_budget_picks_a_registered_strategy_that_fits_best(registered):
    params, xs, h0, step = problem()
    budget = bj.Budget(int(0.2 * plain_bytes(step, h0, xs)))  # under EveryStep's floor
    without = budget.plan(step, h0, xs)
    assert without.recomputed_steps > 0, without
    Thrifty.asked.clear()
    registered("thrifty", Thrifty)
    plan = budget.plan(step, h0, xs)
    assert plan.strategy == Thrifty(), plan
    assert plan.recomputed_steps == 0 and plan.measured_bytes <= budget.bytes
    assert [length for length, _ in Thrifty.asked] and all(n == T for n, _ in Thrifty.asked)
    assert all(isinstance(c, bj.remat.StepCosts) for _, c in Thrifty.asked)

    def loss(params, h0, xs, remat):
        def f(h, x):
            h, y = bj.cells.rnn(params, h, x)
            return h, jnp.mean(y**2)

        return jnp.sum(bj.scan(f, h0, xs, remat=remat)[1])

    got = jax.grad(loss, argnums=(0, 1, 2))(params, h0, xs, budget)
    want = jax.grad(loss, argnums=(0, 1, 2))(params, h0, xs, bj.StoreAll())
    assert_trees_close(got, want)
    # StoreAll still wins where it fits: it recomputes nothing and is offered first
    roomy = bj.Budget(10 * plain_bytes(step, h0, xs)).plan(step, h0, xs)
    assert roomy.strategy == bj.StoreAll()


def test_budget_skips_a_registered_strategy_that_does_not_fit(registered):
    params, xs, h0, step = problem()
    budget = bj.Budget(int(0.2 * plain_bytes(step, h0, xs)))
    want = budget.plan(step, h0, xs)
    registered("lavish", Lavish)
    got = budget.plan(step, h0, xs)
    assert got.strategy == want.strategy and want.recomputed_steps > 0


def reference_choice(budget, n, costs, timing):
    """Budget's rule by brute force over every candidate: the family offered first
    whose fastest fit is within 3% of the fastest of all, and in it the least memory
    within 0.5% of the family's fastest. ``StoreAll`` is measured (its prediction needs
    no margin), the rest are cost models planned at 95%."""
    store_all = bj.StoreAll().cost(n, costs)
    families = [[(bj.StoreAll(), store_all.temp_bytes, store_all)]]
    for cls in bj.remat.STRATEGIES.values():
        offered = cls.candidates(n, costs)
        if isinstance(offered, tuple) and offered and isinstance(offered[0], Sequence):
            groups = offered
        else:
            groups = [offered]
        for group in groups:
            members = [s for s in list(group) if s != bj.StoreAll()]
            families.append(
                [
                    (s, math.ceil(s.cost(n, costs).temp_bytes / 0.95), s.cost(n, costs))
                    for s in members
                ]
            )
    timed = [
        [(s, need, timing.seconds(n, cost)) for s, need, cost in family if need <= budget]
        for family in families
    ]
    fastest = [min(t for *_, t in family) if family else math.inf for family in timed]
    tie = min(fastest) * 1.03
    family, best = next((f, b) for f, b in zip(timed, fastest, strict=True) if b <= tie)
    close = [(need, -i, s) for i, (s, need, t) in enumerate(family) if t <= best * 1.005]
    return min(close)[2]


GPU_LIKE = bj.budget.Timing(forward_s=10e-6, vjp_s=17e-6, host_event_s=20e-6)


@pytest.mark.parametrize("timing", [CPU_TIMING, GPU_LIKE], ids=["cpu", "gpu"])
def test_the_choice_by_the_cost_model_alone(timing):
    """``Budget.choose`` (no compiling) bisects each family; it takes what the
    brute-force reference takes, at budgets from the least to more than
    ``StoreAll``'s, and ``StoreAll`` wherever it fits."""
    costs = bj.remat.StepCosts(carry_bytes=1_000, residual_bytes=3_000, overhead_bytes=10_000)
    n = 1_000
    store_all = bj.StoreAll().cost(n, costs).temp_bytes
    least = math.ceil(bj.Binomial(1).cost(n, costs).temp_bytes / 0.95)
    assert bj.Budget(store_all, timing=timing).choose(n, costs).strategy == bj.StoreAll()
    budgets = np.unique(np.geomspace(least, store_all - 1, 40).astype(int))
    kinds = set()
    for budget in budgets:
        plan = bj.Budget(int(budget), timing=timing).choose(n, costs)
        assert plan.strategy == reference_choice(budget, n, costs, timing), budget
        assert plan.seconds == timing.seconds(n, plan.strategy.cost(n, costs))
        kinds.add((type(plan.strategy), getattr(plan.strategy, "static", None)))
        if timing is GPU_LIKE and budget >= 0.03 * store_all:
            # host decisions cost more than the static engine's waste, or Nested's passes
            assert plan.host_events == 0, plan
    assert len(kinds) >= 3, kinds  # the sweep crosses families
    with pytest.raises(bj.budget.BudgetTooSmallError) as err:
        bj.Budget(least - 1, timing=timing).choose(n, costs)
    assert err.value.least_bytes == least and "Binomial(snapshots=1" in str(err.value)


class _Ladder(Sequence):
    """``Rungs(n - 1), ..., Rungs(0)``, made when indexed; counts how many were made."""

    def __init__(self, n):
        self.n, self.made = n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.made += 1
        return Rungs(self.n - 1 - i)


@dataclasses.dataclass(frozen=True)
class Rungs(bj.RematStrategy):
    """``Rungs(k)`` keeps ``k`` bytes and recomputes nothing from ``k = 50,000`` on, a
    million steps below; a million are offered."""

    k: int = 0
    ladder = None

    def scan(self, f, init, xs, length, reverse, unroll):
        return jax.lax.scan(f, init, xs, length=length, reverse=reverse, unroll=unroll)

    def cost(self, length, costs):
        return bj.remat.Cost(self.k, 0 if self.k >= 50_000 else 10**6)

    @classmethod
    def candidates(cls, length, costs):
        return Rungs.ladder


def test_a_long_lazy_list_of_candidates_is_bisected(registered):
    """Budget bisects a class's candidates (most memory first) on the prediction and
    on the time: of a million, it makes about 4·log2 of them and takes the least
    memory that is as fast as the first that fits."""
    registered("rungs", Rungs)
    costs = bj.remat.StepCosts(carry_bytes=10**6, residual_bytes=10**7, overhead_bytes=0)
    for budget, want in ((100_000, Rungs(50_000)), (40_000, Rungs(0))):
        Rungs.ladder = _Ladder(10**6)
        plan = bj.Budget(budget).choose(10, costs)
        assert plan.strategy == want, plan
        assert Rungs.ladder.made <= 100


def test_one_class_is_enough_for_scan_predict_and_specs(registered):
    registered("thrifty", Thrifty)
    params, xs, h0, step = problem()
    assert bj.remat.from_string("thrifty") == Thrifty()
    assert Thrifty() in bj.remat.examples()
    want = bj.scan(step, h0, xs)
    assert_trees_close(bj.scan(step, h0, xs, remat=Thrifty()), want)
    predicted = bj.memory.predict(Thrifty(), T, 1_000, 3_000, 10_000)
    costs = bj.remat.StepCosts(1_000, 3_000, 10_000)
    assert predicted == bj.Binomial(4).cost(T, costs).temp_bytes
    loss = lambda h0, remat: jnp.sum(bj.scan(step, h0, xs, remat=remat)[1])
    assert_trees_close(jax.grad(loss)(h0, Thrifty()), jax.grad(loss)(h0, bj.StoreAll()))
