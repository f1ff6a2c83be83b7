"""Rematerialization strategies: gradients, schedules, program size and memory."""

import dataclasses
import functools
import math

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CELLS, assert_trees_close
from hypothesis import given, settings
from hypothesis import strategies as st

import bpttjax as bj
from bpttjax.remat import _binomial

POLICIES = {
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "save_hidden_projection": jax.checkpoint_policies.save_only_these_names("hidden_projection"),
    "save_input_projection": jax.checkpoint_policies.save_only_these_names("input_projection"),
    "offload_hidden_projection": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=["hidden_projection"],
        offload_src="device",
        offload_dst="pinned_host",
    ),
}


def cell_problem(cell, T, batch, hidden, input_size=3, seed=0):
    params = helpers.init_model(jax.random.key(seed), cell, input_size, hidden, jnp.float64)
    rng = np.random.default_rng(seed)
    xs = jnp.asarray(rng.standard_normal((T, *batch, input_size)))
    return params, xs


def cell_loss(params, h0, xs, *, cell, remat, reverse=False, truncation=None):
    step = helpers.make_step(cell, params)
    carry, losses = bj.scan(step, h0, xs, reverse=reverse, remat=remat, truncation=truncation)
    return jnp.sum(losses * jnp.cos(jnp.arange(losses.shape[0]))) + sum(
        jnp.sum(jnp.sin(c)) for c in jax.tree.leaves(carry)
    )


def check_against_store_all(cell, T, batch, hidden, remat, reverse=False, truncation=None):
    params, xs = cell_problem(cell, T, batch, hidden)
    h0 = jax.tree.map(
        lambda a: a + 0.1, bj.cells.initial_carry(cell, hidden, batch, dtype=jnp.float64)
    )
    kw = dict(cell=cell, reverse=reverse, truncation=truncation)
    step = helpers.make_step(cell, params)
    fwd = bj.scan(step, h0, xs, reverse=reverse, remat=remat)
    # equal up to XLA compiling the loops differently (a last-bit difference)
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=1e-14, atol=1e-15),
        fwd,
        jax.lax.scan(step, h0, xs, reverse=reverse),
    )
    grad = lambda r: jax.jit(
        jax.grad(functools.partial(cell_loss, remat=r, **kw), argnums=(0, 1, 2))
    )(params, h0, xs)
    assert_trees_close(grad(remat), grad(bj.StoreAll()))


@pytest.mark.slow
@settings(max_examples=8, deadline=None)
@given(
    cell=st.sampled_from(CELLS),
    T=st.integers(1, 40),
    levels=st.integers(1, 4),
    batch=st.sampled_from([(), (1,), (3,)]),
    hidden=st.integers(1, 5),
    reverse=st.booleans(),
)
def test_nested_levels_matches_store_all(cell, T, levels, batch, hidden, reverse):
    check_against_store_all(cell, T, batch, hidden, bj.Nested(levels=levels), reverse=reverse)


@settings(max_examples=5, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    data=st.data(),
    cell=st.sampled_from(CELLS),
)
def test_nested_lengths_matches_store_all(lengths, data, cell):
    T = data.draw(st.integers(1, math.prod(lengths)), label="T")
    check_against_store_all(cell, T, (2,), 3, bj.Nested(lengths=tuple(lengths)))


PRIMES = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37]


@settings(max_examples=8, deadline=None)
@given(
    cell=st.sampled_from(CELLS),
    T=st.one_of(st.sampled_from([1, 2] + PRIMES), st.integers(1, 60)),
    snapshots=st.integers(1, 12),
    batch=st.sampled_from([(), (1,), (3,)]),
    hidden=st.integers(1, 5),
    reverse=st.booleans(),
)
def test_binomial_matches_store_all(cell, T, snapshots, batch, hidden, reverse):
    # T < snapshots, T = snapshots and T >> snapshots are all drawn
    check_against_store_all(cell, T, batch, hidden, bj.Binomial(snapshots), reverse=reverse)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("cell", CELLS)
def test_every_step_policies_match_store_all(policy, cell):
    check_against_store_all(cell, 11, (2,), 4, bj.EveryStep(policy=POLICIES[policy]))


@pytest.mark.parametrize(
    "remat",
    [bj.EveryStep(), bj.Nested(levels=2), bj.Nested(levels=3), bj.Binomial(1), bj.Binomial(3)],
    ids=str,
)
@pytest.mark.parametrize(
    "truncation",
    [bj.Truncate(every=4), bj.RandomTruncate(jax.random.key(3), keep_prob=0.6)],
    ids=["Truncate", "RandomTruncate"],
)
@pytest.mark.parametrize("reverse", [False, True])
def test_truncation_composes_with_remat(remat, truncation, reverse):
    check_against_store_all("gru", 23, (2,), 3, remat, reverse=reverse, truncation=truncation)


@pytest.mark.parametrize(
    "remat", [bj.Nested(levels=2), bj.Nested(levels=3), bj.Binomial(2), bj.Binomial(5)], ids=str
)
def test_pytree_carry_xs_none_and_closure(remat):
    w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3)))

    def loss(scan, w, init):
        def step(carry, _):
            a, (b, n) = carry["a"], carry["bn"]
            a = jnp.tanh(a @ w + b)
            b = 0.9 * b + jnp.sin(a)
            return {"a": a, "bn": (b, n + 1)}, {"a": a, "sum": jnp.sum(b)}

        carry, ys = scan(step, init, None, length=17)
        assert carry["bn"][1].dtype == jnp.int32
        return jnp.sum(ys["a"] ** 2) + jnp.sum(ys["sum"]) + jnp.sum(carry["bn"][0])

    init = {"a": jnp.ones(3), "bn": (jnp.zeros(3), jnp.zeros((), jnp.int32))}
    got = jax.grad(
        functools.partial(loss, functools.partial(bj.scan, remat=remat)), (0, 1), allow_int=True
    )(w, init)
    want = jax.grad(functools.partial(loss, jax.lax.scan), (0, 1), allow_int=True)(w, init)
    assert_trees_close(got[0], want[0])
    assert_trees_close(got[1]["a"], want[1]["a"])


# --- the schedule itself -----------------------------------------------------------------


def expected_schedule(T, lengths):
    """Step indices in evaluation order: the forward pass, then every recomputation.

    An independent model of nested checkpointing: a block that is checkpointed
    is run once forward and, when its backward pass comes, run again; the
    innermost level stores its residuals and is never rerun.
    """

    def forward(start, n, lengths):
        return list(range(start, start + n))

    def backward(start, n, lengths):
        # recomputations during the backward pass of steps [start, start+n)
        if len(lengths) == 1 or n <= 1:
            return []
        block = math.prod(lengths[1:])
        q, r = divmod(n, block)
        if q == 0:
            return backward(start, n, lengths[1:])
        out = []
        if r:
            out += backward(start + q * block, r, lengths[1:])
        for i in reversed(range(q)):
            s = start + i * block
            out += forward(s, block, lengths[1:]) + backward(s, block, lengths[1:])
        return out

    return forward(0, T, lengths) + backward(0, T, lengths)


@pytest.mark.parametrize(
    ("T", "lengths"), [(10, (4, 3)), (12, (4, 3)), (10, (2, 2, 3)), (7, (2, 2, 2)), (1, (3, 3))]
)
def test_nested_recompute_order(T, lengths):
    log = []

    def step(h, t):
        jax.debug.callback(lambda t: log.append(int(t)), t)
        return jnp.sin(h) + t, h

    xs = jnp.arange(T, dtype=jnp.float64)
    jax.grad(lambda h: bj.scan(step, h, xs, remat=bj.Nested(lengths=lengths))[0])(1.0)
    assert log == expected_schedule(T, lengths)
    assert sorted(log[:T]) == list(range(T))  # the forward pass runs each step once
    assert len(log) <= len(lengths) * T  # at most L-1 recomputations of each step
    costs = bj.remat.StepCosts(carry_bytes=1, residual_bytes=1)
    assert bj.Nested(lengths=lengths).cost(T, costs).recomputed_steps == len(log) - T


def test_every_step_recomputes_each_step_once_in_reverse():
    log = []

    def step(h, t):
        jax.debug.callback(lambda t: log.append(int(t)), t)
        return jnp.sin(h) + t, h

    jax.grad(lambda h: bj.scan(step, h, jnp.arange(6.0), remat=bj.EveryStep())[0])(1.0)
    assert log == list(range(6)) + list(reversed(range(6)))


def test_level_lengths_cover_the_sequence():
    for T in [1, 2, 3, 7, 97, 1000, 10007, 100_000]:
        for levels in (1, 2, 3, 4):
            for ratio in (1.0, 3.25, 10.0):
                lengths = bj.Nested(levels=levels).level_lengths(T, ratio)
                assert len(lengths) == levels
                assert math.prod(lengths) >= T
                # near the continuous optimum of the cost model (outer carries
                # + ratio x inner residuals), which is L·(ratio·T)^(1/L)
                cost = sum(lengths[:-1]) + ratio * lengths[-1]
                assert cost <= 1.5 * levels * (ratio * T) ** (1 / levels) + ratio + 2


# --- program size does not grow with T ------------------------------------------------------


def hlo_size(remat, T):
    params, xs = helpers.abstract_inputs("rnn", T, 2, 3, 4, jnp.float32)
    fn = jax.grad(functools.partial(helpers.model_loss, cell="rnn", remat=remat))
    text = jax.jit(fn).lower(params, xs).compile().as_text()
    return sum(1 for line in text.splitlines() if " = " in line)


@pytest.mark.slow
@pytest.mark.parametrize(
    "remat",
    [bj.StoreAll(), bj.EveryStep(), bj.Nested(levels=2), bj.Nested(levels=3), bj.Binomial(4)],
    ids=str,
)
def test_compiled_program_does_not_grow_with_length(remat):
    small, large = hlo_size(remat, 100), hlo_size(remat, 100_000)
    # The same loops at both lengths, except that a remainder block may add
    # one more small loop per level; an unrolled Python loop would grow 1000-fold.
    assert large <= 2 * small, (small, large)


# --- memory: measure and predict ------------------------------------------------------------


def test_measure_reports_bytes():
    params, xs = helpers.abstract_inputs("rnn", 50, 2, 3, 4, jnp.float32)
    rep = bj.memory.measure(jax.grad(functools.partial(helpers.model_loss, cell="rnn")), params, xs)
    assert rep.temp_bytes > 0
    assert rep.argument_bytes == bj.memory.tree_bytes((params, xs))
    assert bj.memory.tree_bytes(params) <= rep.output_bytes < 2 * bj.memory.tree_bytes(params)
    assert rep.device_peak_bytes is None  # not run


def test_measure_run_and_device_peak():
    params = helpers.init_model(jax.random.key(0), "rnn", 3, 4, jnp.float32)
    xs = jnp.ones((5, 2, 3), jnp.float32)
    rep = bj.memory.measure(
        jax.grad(functools.partial(helpers.model_loss, cell="rnn")), params, xs, run=True
    )
    if jax.default_backend() == "cpu":
        assert rep.device_peak_bytes is None
    else:
        assert rep.device_peak_bytes > 0


def test_nested_uses_much_less_memory_than_store_all():
    temps = {}
    for name, remat in [
        ("all", bj.StoreAll()),
        ("every", bj.EveryStep()),
        ("n2", bj.Nested(2)),
        ("n3", bj.Nested(3)),
    ]:
        params, xs = helpers.abstract_inputs("rnn", 2000, 8, 16, 64, jnp.float32)
        fn = jax.grad(functools.partial(helpers.model_loss, cell="rnn", remat=remat))
        temps[name] = bj.memory.measure(fn, params, xs).temp_bytes
    assert temps["n3"] < temps["n2"] < temps["every"] < temps["all"]
    assert temps["n2"] < 0.1 * temps["all"]
    fn = jax.grad(functools.partial(helpers.model_loss, cell="rnn", remat=bj.Binomial(8)))
    assert bj.memory.measure(fn, params, xs).temp_bytes < temps["n3"]


@pytest.mark.slow
@pytest.mark.parametrize("cell", CELLS)
def test_predictions_within_25_percent(cell):
    B, D, H = 32, 64, 256

    def build(T, remat=None):
        params, xs = helpers.abstract_inputs(cell, T, B, D, H, jnp.float32)
        fn = jax.grad(functools.partial(helpers.model_loss, cell=cell, remat=remat))
        return fn, (params, xs)

    C = helpers.carry_bytes(cell, B, H, jnp.float32)
    costs = bj.memory.step_costs(build, C)
    assert costs.residual_bytes > C  # plain BPTT keeps more than the carry per step
    for T in (1_000, 10_000):
        for remat in (bj.StoreAll(), bj.EveryStep(), bj.Nested(2), bj.Nested(3)):
            fn, args = build(T, remat)
            measured = bj.memory.measure(fn, *args).temp_bytes
            predicted = bj.memory.predict(remat, T, C, costs.residual_bytes, costs.overhead_bytes)
            assert abs(predicted - measured) <= 0.25 * measured, (T, remat, predicted, measured)


def test_predict_model_by_hand():
    C, R, over = 10, 30, 5
    assert bj.memory.predict(bj.StoreAll(), 100, C, R, over) == 100 * 30 + 5
    assert bj.memory.predict(bj.EveryStep(), 100, C, R, over) == 100 * 10 + 30 + 5
    # lengths (10, 10): 10 outer carries + 10 inner steps of residuals, two loops
    assert (
        bj.memory.predict(bj.Nested(lengths=(10, 10)), 100, C, R, over) == 10 * 10 + 10 * 30 + 2 * 5
    )
    # Binomial: the snapshots (a carry and an int32 position each), the states
    # advanced and pulled back, and the overhead
    assert bj.memory.predict(bj.Binomial(4), 100, C, R, over) == (
        4 * (10 + 4) + 2 * 10 + 5 + _binomial._ENGINE_BYTES
    )
    # T=95 with (10, 10): 9 full blocks and a remainder of 5 steps
    assert (
        bj.memory.predict(bj.Nested(lengths=(10, 10)), 95, C, R, over) == 9 * 10 + 10 * 30 + 2 * 5
    )


# --- the strategy protocol ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EveryOther(bj.RematStrategy):
    """The user-written strategy of docs/writing_a_strategy.md: the same scan and cost."""

    def scan(self, f, init, xs, length, reverse, unroll):
        return bj.Nested(lengths=(-(-length // 2), 2)).scan(f, init, xs, length, reverse, unroll)

    def cost(self, length, costs):
        temp = -(-length // 2) * costs.carry_bytes + 2 * costs.residual_bytes
        return bj.remat.Cost(temp + 2 * costs.overhead_bytes, length)


def test_a_user_written_strategy_runs_and_predicts():
    check_against_store_all("gru", 17, (2,), 3, EveryOther(), reverse=True)
    assert bj.memory.predict(EveryOther(), 10, 4, 12, 1) == 5 * 4 + 2 * 12 + 2
    params, xs = helpers.abstract_inputs("rnn", 400, 8, 16, 64, jnp.float32)
    fn = jax.grad(functools.partial(helpers.model_loss, cell="rnn", remat=EveryOther()))
    every = jax.grad(functools.partial(helpers.model_loss, cell="rnn", remat=bj.EveryStep()))
    assert (
        bj.memory.measure(fn, params, xs).temp_bytes
        < bj.memory.measure(every, params, xs).temp_bytes
    )


# --- bad input ------------------------------------------------------------------------------


def test_nested_rejects_bad_arguments():
    with pytest.raises(ValueError, match="levels >= 1, got levels=0"):
        bj.Nested(levels=0)
    with pytest.raises(TypeError, match="levels=.*positive int.*float"):
        bj.Nested(levels=2.0)
    with pytest.raises(ValueError, match=r"positive ints, but lengths\[1\] is 0"):
        bj.Nested(lengths=(3, 0))
    with pytest.raises(TypeError, match=r"lengths\[0\] is float: 2.5"):
        bj.Nested(lengths=(2.5, 4))
    with pytest.raises(TypeError, match=r"lengths\[1\] is bool"):
        bj.Nested(lengths=(2, True))
    with pytest.raises(ValueError, match="non-empty tuple of positive ints"):
        bj.Nested(lengths=())
    with pytest.raises(TypeError, match="lengths=.*tuple of positive ints.*int"):
        bj.Nested(lengths=5)
    with pytest.raises(ValueError, match=r"covers only 6 steps.*length 7"):
        bj.scan(lambda h, x: (h + x, None), 0.0, jnp.ones(7), remat=bj.Nested(lengths=(2, 3)))
    assert bj.Nested(lengths=[2, 3]) == bj.Nested(levels=2, lengths=(2, 3))


def counting_step(calls):
    def step(h, x):
        calls.append(1)
        return h + x, None

    return step


def test_nested_lengths_are_checked_with_the_length_alone():
    """``Nested.check(T)`` needs no step: the boundary calls it before any trace."""
    with pytest.raises(ValueError, match=r"Nested\(lengths=\(2, 2\)\) covers only 4 steps.*10"):
        bj.Nested(lengths=(2, 2)).check(10)
    bj.Nested(lengths=(2, 5)).check(10)
    bj.Nested(levels=3).check(10**9)  # levels= adapts to any length
    calls = []
    with pytest.raises(ValueError, match=r"covers only 4 steps"):
        bj.Nested(lengths=(2, 2)).scan(counting_step(calls), 0.0, jnp.ones(10), 10, False, 1)
    assert calls == []


def test_nested_lengths_are_checked_before_bj_scan_traces_the_step():
    calls = []
    with pytest.raises(ValueError, match=r"covers only 4 steps.*length 10"):
        bj.scan(counting_step(calls), 0.0, jnp.ones(10), remat=bj.Nested(lengths=(2, 2)))
    assert calls == []


def test_predict_and_measure_reject_bad_arguments():
    with pytest.raises(TypeError, match="predict\\(remat=...\\)"):
        bj.memory.predict("nested", 10, 1, 1)
    with pytest.raises(TypeError, match="abstract"):
        bj.RematStrategy()
    with pytest.raises(ValueError, match="predict\\(length=...\\).*non-negative int"):
        bj.memory.predict(bj.StoreAll(), -1, 1, 1)
    with pytest.raises(TypeError, match="measure\\(fn=...\\)"):
        bj.memory.measure(None)
    with pytest.raises(ValueError, match="0 < T1 < T2"):
        bj.memory.step_costs(lambda T: None, 1, lengths=(5, 5))


@pytest.mark.parametrize(
    "factory", ["save_only_these_names", "save_any_names_but_these", "save_from_both_policies"]
)
def test_every_step_refuses_a_policy_factory(factory):
    """A factory passed as the policy failed later, inside jax.checkpoint."""
    fn = getattr(jax.checkpoint_policies, factory)
    with pytest.raises(TypeError, match=rf"EveryStep\(policy=...\) got {factory}.*Call it"):
        bj.EveryStep(fn)
    bj.EveryStep(jax.checkpoint_policies.save_only_these_names("hidden_projection"))
    bj.EveryStep(lambda prim, *avals, **params: False)  # a policy of one's own
