"""``bj.Binomial(s, static=True)``: revolve's schedule run as data, in known-trip loops.

The shared suite (``Binomial.examples()``) runs it through every test that
takes the registered strategies: truncation, ``reverse``, ``unroll``, pytree
and integer carries, ``xs=None``, closures, ``vmap``, meshes, and the
control-flow audit of its stated ``host_events``. Here: the same gradients as
plain BPTT at the edges of the schedule, the same evaluations in the same
order as the dynamic engine, the pullbacks its cost states, its memory, the
size of its table and of its program, and the transformations it supports.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CELLS, abstract_inputs, assert_trees_close, carry_bytes, model_loss
from test_binomial import Counter, hlo_lines, reference_order, simple_loss

import bpttjax as bj
from bpttjax.remat import _revolve, _revolve_table

COSTS = bj.remat.StepCosts(carry_bytes=64, residual_bytes=256, overhead_bytes=0)


@pytest.mark.parametrize("cell", ["lstm"])  # the other cells: the shared suite (examples())
def test_gradients_equal_plain_bptt(cell):
    """Float64, a loss nonlinear in ``ys`` and in the carry, both directions, at the
    schedule's edges: one and two steps, one snapshot, snapshots beyond ``T``."""
    B, D, H = 2, 3, 4
    params = getattr(bj.cells, f"init_{cell}")(jax.random.key(0), D, H, jnp.float64)
    h0 = jax.tree.map(lambda a: a + 0.1, bj.cells.initial_carry(cell, H, (B,), jnp.float64))

    def loss(params, h0, xs, remat, reverse):
        step = functools.partial(getattr(bj.cells, cell), params)
        c, hs = bj.scan(step, h0, xs, remat=remat, reverse=reverse)
        return jnp.sum(jnp.sin(hs) ** 2) + sum(jnp.sum(leaf**3) for leaf in jax.tree.leaves(c))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=(3, 4))
    for T in (1, 2, 37):
        xs = jax.random.normal(jax.random.key(T), (T, B, D), jnp.float64)
        for s in (1, 5, 40):
            for reverse in (False, True):
                want = grad(params, h0, xs, bj.StoreAll(), reverse)
                got = grad(params, h0, xs, bj.Binomial(s, static=True), reverse)
                assert_trees_close(got, want, rtol=1e-12)


@pytest.mark.parametrize("T", [1, 2, 10, 64])
@pytest.mark.parametrize("s", [1, 3, 5, 70])
@pytest.mark.parametrize("reverse", [False, True])
def test_evaluation_order_is_the_dynamic_engines(T, s, reverse):
    """Every evaluation of the step, in order: revolve's ``advances + T``, as the
    dynamic engine runs them (its order is checked against the recursion)."""
    counter = Counter(ordered=True, log=True)
    xs = jnp.arange(T, dtype=jnp.float64)
    scan = functools.partial(bj.scan, remat=bj.Binomial(s, static=True), reverse=reverse)
    counter.run(jax.jit(jax.grad(lambda h: scan(counter.step, h, xs)[0])), 1.0)
    want = reference_order(T, s)
    if reverse:
        want = [T - 1 - t for t in want]
    assert counter.log == want
    assert len(want) == _revolve.binomial_steps(T, s)


@pytest.mark.parametrize(("T", "s"), [(1, 1), (2, 1), (9, 1), (30, 3), (100, 6), (40, 39)])
def test_pullbacks_are_the_ones_its_cost_states(T, s):
    """Each action pulls back the step; an advance throws its pullback away. The
    count is ``T`` (the gradient's own) plus ``Cost.wasted_pullbacks``."""
    pulled = []

    @jax.custom_vjp
    def tap(h):
        return h

    def tap_bwd(_, g):
        jax.debug.callback(lambda: pulled.append(1), ordered=True)
        return (g,)

    tap.defvjp(lambda h: (h, None), tap_bwd)
    step = lambda h, x: (jnp.sin(tap(h)) + x, h)
    xs = jnp.linspace(0.0, 1.0, T)
    remat = bj.Binomial(s, static=True)
    grad = jax.jit(jax.grad(lambda h: jnp.sum(bj.scan(step, h, xs, remat=remat)[1] ** 2)))
    jax.block_until_ready(grad(0.3))
    jax.effects_barrier()
    cost = remat.cost(T, COSTS)
    assert len(pulled) == T + cost.wasted_pullbacks
    assert cost.wasted_pullbacks == cost.recomputed_steps - (T - 1)
    assert cost.host_events == 0 and bj.Binomial(s).cost(T, COSTS).wasted_pullbacks == 0


def test_no_host_decisions_and_the_same_recomputation():
    def grad(remat, T=1_000):
        params, xs = abstract_inputs("rnn", T, 4, 3, 8, jnp.float32)
        fn = jax.grad(functools.partial(model_loss, cell="rnn", remat=remat))
        return bj.memory.control_flow(fn, params, xs)

    assert grad(bj.Binomial(10, static=True)) == bj.memory.ControlFlow(2, 0, 0)
    assert not grad(bj.Binomial(10)).on_device
    static, dynamic = bj.Binomial(10, static=True), bj.Binomial(10)
    assert static.cost(1_000, COSTS).recomputed_steps == dynamic.cost(1_000, COSTS).recomputed_steps


@pytest.mark.slow
def test_program_does_not_grow_with_length_and_the_table_is_two_bits_an_action():
    remat = bj.Binomial(20, static=True)
    sizes = [hlo_lines(remat, T) for T in (100, 10_000, 1_000_000)]
    assert sizes[0] == sizes[1] == sizes[2], sizes
    for T, s in [(1, 1), (17, 1), (1_000, 10), (1_000_000, 20)]:
        plan = _revolve_table.schedule(T, s)
        actions = _revolve.binomial_advances(T, s)  # reversals and advances after the first sweep
        assert len(plan.actions) == actions
        assert plan.table_bytes == 4 * max(-(-actions // 16), 1)  # 16 actions per uint32
        assert _revolve_table.table_bytes(T, s) == plan.table_bytes  # the cost's, by count
        unpacked = (plan.words[:, None] >> (2 * np.arange(16, dtype=np.uint32))) & 3
        np.testing.assert_array_equal(unpacked.ravel()[:actions], plan.actions)


@pytest.mark.slow
@pytest.mark.parametrize("cell", CELLS)
def test_memory_within_10_percent_of_its_cost(cell):
    B, D, H = 32, 64, 256

    def build(T, remat=None):
        params, xs = abstract_inputs(cell, T, B, D, H, jnp.float32)
        return jax.grad(functools.partial(model_loss, cell=cell, remat=remat)), (params, xs)

    costs = bj.memory.step_costs(build, carry_bytes(cell, B, H, jnp.float32))
    for T in (1_000, 10_000):
        for s in (2, 14, 40):
            remat = bj.Binomial(s, static=True)
            fn, args = build(T, remat)
            # the table is a constant of the program, which XLA's figure leaves out
            table = _revolve_table.schedule(T, s).table_bytes
            measured = bj.memory.measure(fn, *args).temp_bytes + table
            predicted = remat.cost(T, costs).temp_bytes
            assert abs(predicted - measured) <= 0.10 * measured, (T, s, predicted, measured)


STATIC = bj.Binomial(3, static=True)


def test_transformations_as_the_dynamic_engine():
    g = jax.grad(simple_loss)
    with pytest.raises(TypeError, match=r"does not support forward-mode jax.jvp.*bj\.Nested"):
        jax.jvp(lambda w: simple_loss(w, STATIC), (0.3,), (1.0,))
    with pytest.raises(TypeError, match=r"forward-mode jax.linearize of the scan.*bj\.Nested"):
        jax.linearize(lambda w: simple_loss(w, STATIC), 0.3)
    with pytest.raises(TypeError, match=r"reverse-mode differentiation of its gradient.*Nested"):
        jax.grad(lambda w: g(w, STATIC))(0.3)
    hvp = jax.jvp(lambda w: g(w, STATIC), (0.3,), (1.0,))
    want = jax.jvp(lambda w: g(w, bj.StoreAll()), (0.3,), (1.0,))
    np.testing.assert_allclose(hvp, want, rtol=1e-12)
    _, lin = jax.linearize(lambda w: g(w, STATIC), 0.3)
    np.testing.assert_allclose(lin(1.0), want[1], rtol=1e-12)
    ws = jnp.array([0.1, 0.3, 0.7])
    np.testing.assert_allclose(
        jax.vmap(g, (0, None))(ws, STATIC), jax.vmap(g, (0, None))(ws, bj.StoreAll()), rtol=1e-12
    )


def test_named_checked_and_compared_by_value():
    assert bj.remat.from_string("binomial:10:static") == bj.Binomial(10, static=True)
    assert bj.remat.from_string(" Binomial : 1_000 : Static ") == bj.Binomial(1000, static=True)
    assert repr(bj.Binomial(4, static=True)) == "Binomial(snapshots=4, static=True)"
    assert bj.Binomial(4, static=True) != bj.Binomial(4)
    with pytest.raises(TypeError, match=r"Binomial\(static=\.\.\.\) expects True or False.*str"):
        bj.Binomial(4, static="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="snapshots >= 1"):
        bj.remat.from_string("binomial:0:static")
