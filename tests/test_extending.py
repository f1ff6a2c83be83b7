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
import pytest
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
    assert isinstance(without.strategy, bj.Binomial), without
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
    assert got.strategy == want.strategy and isinstance(got.strategy, bj.Binomial)


def test_the_choice_by_the_cost_model_alone():
    """``Budget.choose`` (no compiling) takes the fastest fit: StoreAll, then the
    policies, then EveryStep, then the Binomial with the most snapshots that fit."""
    costs = bj.remat.StepCosts(carry_bytes=1_000, residual_bytes=3_000, overhead_bytes=10_000)
    n = 1_000
    store_all = bj.StoreAll().cost(n, costs).temp_bytes
    every = bj.EveryStep().cost(n, costs).temp_bytes
    assert bj.Budget(store_all).choose(n, costs).strategy == bj.StoreAll()
    assert bj.Budget(store_all - 1).choose(n, costs).strategy == bj.EveryStep()
    assert bj.Budget(math.ceil(every / 0.95)).choose(n, costs).strategy == bj.EveryStep()
    for s in (1, 2, 7, 100, 900):
        need = math.ceil(bj.Binomial(s).cost(n, costs).temp_bytes / 0.95)
        assert bj.Budget(need).choose(n, costs).strategy == bj.Binomial(s), s
        plan = bj.Budget(need - 1).choose(n, costs) if s > 1 else None
        assert plan is None or plan.strategy == bj.Binomial(s - 1), s
    with pytest.raises(bj.budget.BudgetTooSmallError) as err:
        bj.Budget(1_000).choose(n, costs)
    least = math.ceil(bj.Binomial(1).cost(n, costs).temp_bytes / 0.95)
    assert err.value.least_bytes == least and "Binomial(snapshots=1)" in str(err.value)


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
    """``Rungs(k)`` keeps ``k`` bytes and recomputes nothing; a million are offered."""

    k: int = 0
    ladder = None

    def scan(self, f, init, xs, length, reverse, unroll):
        return jax.lax.scan(f, init, xs, length=length, reverse=reverse, unroll=unroll)

    def cost(self, length, costs):
        return bj.remat.Cost(self.k, 0)

    @classmethod
    def candidates(cls, length, costs):
        return Rungs.ladder


def test_a_long_lazy_list_of_candidates_is_bisected(registered):
    """Budget bisects a class's candidates (most memory first) on the prediction:
    of a million, it makes about 2·log2 of them and takes the first that fits."""
    registered("rungs", Rungs)
    costs = bj.remat.StepCosts(carry_bytes=10**6, residual_bytes=10**7, overhead_bytes=0)
    Rungs.ladder = _Ladder(10**6)
    plan = bj.Budget(100_000).choose(10, costs)
    assert plan.strategy == Rungs(95_000), plan  # the most that fits at 95%
    assert Rungs.ladder.made <= 50


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
