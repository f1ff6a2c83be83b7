"""``bj.Binomial(s, static=True)``: revolve's schedule run as data, in known-trip loops.

The shared suite (``Binomial.examples()``) runs it through every test that
takes the registered strategies: truncation, ``reverse``, ``unroll``, pytree
and integer carries, ``xs=None``, closures, ``vmap``, meshes, and the
control-flow audit of its stated ``host_events``. Here: the same gradients as
plain BPTT at the edges of the schedule, the same evaluations in the same
order as the dynamic engine, the pullbacks its cost states, its memory, the
size of its table and of its program, and the transformations it supports.
"""

import dataclasses
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


# --- bj.cells.run: the fused action body ---------------------------------------------------

# (T, s, reverse, truncation): the schedule's edges (one and two steps, one
# snapshot, snapshots beyond T), both directions, both kinds of cut
LAYER_CASES = [
    (1, 1, False, None),
    (2, 5, True, None),
    (37, 1, True, None),
    (37, 5, False, bj.Truncate(every=4)),
    (37, 40, True, bj.RandomTruncate(jax.random.key(3), keep_prob=0.7)),
]


def layer_problem(cell, T, B=2, D=3, H=4):
    c = bj.cells.get(cell)
    params = c.init(jax.random.key(0), D, H, jnp.float64)
    h0 = jax.tree.map(lambda a: a + 0.1, c.initial_carry(H, (B,), jnp.float64))
    return params, h0, jax.random.normal(jax.random.key(T), (T, B, D), jnp.float64)


def layer_loss(cell, remat, reverse=False, truncation=None):
    def loss(params, h0, xs):
        c, hs = bj.cells.run(
            cell,
            params,
            h0,
            xs,
            remat=remat,
            reverse=reverse,
            truncation=truncation,
            batch_chunks=1,
        )
        return jnp.sum(jnp.sin(hs) ** 2) + sum(jnp.sum(leaf**3) for leaf in jax.tree.leaves(c))

    return loss


@pytest.mark.parametrize("cell", CELLS)
def test_layer_gradients_equal_store_all(cell):
    """``run``'s gradient with the fused action body (each action: the step and the
    carry's cotangent; the weights' gradients per group of actions) is plain BPTT's."""
    for T, s, reverse, truncation in LAYER_CASES:
        args = layer_problem(cell, T)
        want = jax.grad(layer_loss(cell, bj.StoreAll(), reverse, truncation), (0, 1, 2))(*args)
        static = layer_loss(cell, bj.Binomial(s, static=True), reverse, truncation)
        got = jax.jit(jax.grad(static, (0, 1, 2)))(*args)
        assert_trees_close(got, want, rtol=1e-12)


def _logging_rnn(log):
    """The tanh RNN whose input projection logs the first input of each call: a step's
    (``batch`` rows, its position) or a group's products (more rows)."""
    split = bj.cells.RNN_SPLIT

    def project(params, x):
        jax.debug.callback(lambda n, t: log.append((int(n), int(t))), x.shape[0], x[0, 0],
                           ordered=True)  # fmt: skip
        return split.project(params, x)

    rnn = bj.cells.get("rnn")
    return dataclasses.replace(rnn, split=dataclasses.replace(split, project=project))


@pytest.mark.parametrize(("T", "s", "reverse"), [(10, 3, False), (37, 1, True)])
def test_layer_evaluations_and_groups(T, s, reverse):
    """The backward pass evaluates the step once per action (a padding action
    included); the actions other than padding run revolve's order after the forward
    pass, the last step's reversal first; and the weights' gradients are one set of
    products per group of actions. (The forward pass runs the cell's own step, which
    does not log.)"""
    log = []
    cell = _logging_rnn(log)
    B, H = 2, 4
    params = cell.init(jax.random.key(0), 1, H, jnp.float64)
    xs = jnp.broadcast_to(jnp.arange(T, dtype=jnp.float64)[:, None, None], (T, B, 1))
    remat = bj.Binomial(s, static=True)

    def loss(p):
        run = bj.cells.run(
            cell, p, jnp.zeros((B, H)), xs, remat=remat, reverse=reverse, batch_chunks=1
        )
        return jnp.sum(run[1] ** 2)

    jax.block_until_ready(jax.jit(jax.grad(loss))(params))
    jax.effects_barrier()
    words, groups = _revolve_table.grouped(T, _revolve_table.slots(T, s))
    actions = ((words[:, None] >> (2 * np.arange(16, dtype=np.uint32))) & 3).ravel()
    actions = actions[: groups * _revolve_table.GROUP_ACTIONS]
    steps = [t for n, t in log if n == B]
    assert len(steps) == len(actions)
    assert len(log) - len(steps) == groups  # one product per group
    kept = [t for t, a in zip(steps, actions, strict=True) if a != _revolve_table.PAD]
    want = [T - 1] + reference_order(T, _revolve_table.slots(T, s))[T:]
    if reverse:
        want = [T - 1 - t for t in want]
    assert kept == want
    assert np.sum(actions == _revolve_table.REVERSE) == T


def test_layer_no_host_decisions_and_transformations():
    """Known-trip loops only and no conditional; the same memory as the step-by-step
    path within a tenth of its schedule's share; ``jvp∘grad`` works, ``jvp``,
    ``linearize`` and ``grad∘grad`` are refused with the scan's message."""
    T, B, D, H = 300, 8, 16, 64
    params = jax.eval_shape(lambda: bj.cells.init_lstm(jax.random.key(0), D, H))
    h0 = bj.cells.initial_carry("lstm", H, (B,))
    xs = jax.ShapeDtypeStruct((T, B, D), jnp.float32)
    remat = bj.Binomial(6, static=True)
    # a loss over every output, as Budget measures a layer: with one linear in the
    # outputs, XLA keeps their constant cotangent whole for the two nested loops
    fused = lambda p, x: jnp.mean(
        bj.cells.run("lstm", p, h0, x, remat=remat, batch_chunks=1)[1] ** 2
    )
    steps = lambda p, x: jnp.mean(
        bj.scan(functools.partial(bj.cells.lstm, p), h0, x, remat=remat)[1] ** 2
    )
    flow = bj.memory.control_flow(jax.grad(fused), params, xs)
    assert flow.unknown_trip_loops == 0 and flow.conditionals == 0, flow
    got, want = (bj.memory.measure(jax.grad(f), params, xs).temp_bytes for f in (fused, steps))
    outputs = 2 * T * B * H * 4  # the outputs and their cotangent
    assert abs(got - want) <= 0.1 * (want - outputs), (got, want)

    args = layer_problem("gru", 7)
    g = lambda remat: jax.grad(layer_loss("gru", remat))
    ones = jax.tree.map(jnp.ones_like, args[0])
    hvp = lambda remat: jax.jvp(lambda p: g(remat)(p, *args[1:]), (args[0],), (ones,))
    assert_trees_close(hvp(STATIC), hvp(bj.StoreAll()), rtol=1e-11)
    loss = lambda p: layer_loss("gru", STATIC)(p, *args[1:])
    with pytest.raises(TypeError, match=r"does not support forward-mode jax.jvp.*bj\.Nested"):
        jax.jvp(loss, (args[0],), (ones,))
    with pytest.raises(TypeError, match=r"forward-mode jax.linearize of the scan.*bj\.Nested"):
        jax.linearize(loss, args[0])
    with pytest.raises(TypeError, match=r"reverse-mode differentiation of its gradient.*Nested"):
        jax.grad(lambda p: jnp.sum(g(STATIC)(p, *args[1:])[0]["W_h"]))(args[0])
