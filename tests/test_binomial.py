"""Binomial checkpointing: the schedule's optimality, the engine's counts and order, memory.

Gradients of ``bj.Binomial`` against plain BPTT run in the shared suites
(``test_scan.py``, ``test_remat.py``); this file checks the schedule itself.
"""

import functools
import math
import random

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CELLS, assert_trees_close

import bpttjax as bj
from bpttjax.remat import _binomial
from bpttjax.remat import _revolve as _engine

# --- the schedule: an independent dynamic program -------------------------------------------


def optimal_advances(N, S):
    """``p[n][s]``: fewest forward advances reversing ``n`` steps with ``s`` snapshots.

    Brute force over every first split: advance ``m`` steps, store a snapshot
    there, reverse the last ``n − m`` steps with the ``s − 1`` snapshots left,
    then the first ``m`` with all ``s``. A range of one step is reversed from
    the current state; one snapshot means replaying from the start every time.
    """
    p = [[0] * (S + 1) for _ in range(N + 1)]
    for n in range(2, N + 1):
        p[n][1] = n * (n - 1) // 2
        for s in range(2, S + 1):
            p[n][s] = min(m + p[n - m][s - 1] + p[m][s] for m in range(1, n))
    return p


def test_advances_formula_and_split_are_the_optimum():
    N, S = 160, 8
    p = optimal_advances(N, S)
    for n in range(1, N + 1):
        for s in range(1, S + 1):
            assert _engine.binomial_advances(n, s) == p[n][s], (n, s)
            if n >= 2 and s >= 2:
                m = _engine.split(n, s)
                assert 1 <= m < n
                assert m + p[n - m][s - 1] + p[m][s] == p[n][s], (n, s, m)


def test_advances_closed_form_by_hand():
    # beta(2, r) = (r+1)(r+2)/2: T=10 needs r=3; 3*10 - beta(3, 2) = 30 - 10
    assert _engine.binomial_advances(10, 2) == 20
    assert _engine.binomial_advances(10, 1) == 45  # 9 + 8 + ... + 1
    assert _engine.binomial_advances(10, 9) == 9  # enough snapshots: the first sweep only
    assert _engine.binomial_advances(1, 3) == 0
    # T = 10^4 with 14 snapshots: r = 5, 5*10^4 - C(19, 4) = 46124 (DESIGN.md's 5.6 per step)
    assert _engine.binomial_advances(10_000, 14) == 46_124
    assert _engine.binomial_steps(10_000, 14) == 56_124


def test_traced_split_matches_python():
    n, k = np.meshgrid(np.arange(2, 400, dtype=np.int32), np.arange(1, 13, dtype=np.int32))
    got = jax.jit(jax.vmap(_engine._split_traced))(n.ravel(), k.ravel())
    want = [_engine.split(int(a), int(b)) for a, b in zip(n.ravel(), k.ravel(), strict=True)]
    np.testing.assert_array_equal(np.asarray(got), want)
    rng = random.Random(0)
    big_n = [2**30, 10**8, 999_999_937] + [rng.randint(2, 2**30) for _ in range(200)]
    big_k = [2, 3, 40] + [rng.choice([2, 3, 5, 14, 64, 10**5]) for _ in range(200)]
    got = jax.jit(jax.vmap(_engine._split_traced))(
        np.asarray(big_n, np.int32), np.asarray(big_k, np.int32)
    )
    want = [_engine.split(a, b) for a, b in zip(big_n, big_k, strict=True)]
    np.testing.assert_array_equal(np.asarray(got), want)


# --- the engine: every evaluation of the step, counted ----------------------------------------


class Counter:
    """Counts evaluations of a scalar step with ``jax.debug.callback``.

    With ``log=True`` the log holds each evaluation's step index. Passing the
    index to the host costs about 60 µs per call on CPU, against 11 µs for an
    argument-free callback, so the count tests log ``None`` instead.
    """

    def __init__(self, ordered=False, log=False):
        self.ordered, self.logging, self.log = ordered, log, []

    def step(self, h, t):
        if self.logging:
            jax.debug.callback(lambda t: self.log.append(int(t)), t, ordered=self.ordered)
        else:
            jax.debug.callback(lambda: self.log.append(None), ordered=self.ordered)
        return jnp.sin(h) * 0.9 + 0.01 * t, h

    def run(self, fn, *args):
        self.log.clear()
        jax.block_until_ready(fn(*args))
        jax.effects_barrier()
        return len(self.log)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("s", "lengths"),
    # s = 1 replays from init for every step (T(T+1)/2 evaluations): up to T = 120
    # here, and T = 300 through bj.scan below
    [(1, range(1, 121))] + [(s, range(1, 301)) for s in range(2, 9)],
    ids=lambda v: f"T{v.start}-{v.stop - 1}" if isinstance(v, range) else f"s{v}",
)
def test_counts_equal_the_optimum_for_every_length_up_to_300(s, lengths):
    """Exhaustive: one compiled program per ``s``, run for every ``T <= 300``.

    The engine's ``steps`` argument (private, for this test) gives the number
    of steps as a traced value; everything else is the code ``bj.scan`` runs.
    With one snapshot the schedule has no split point to find (it advances
    from ``init`` to each step in turn), so its lengths stop at 120, where
    they already cost ``T(T+1)/2`` host callbacks each; ``T = 300`` is checked
    through ``bj.scan`` in :func:`test_counts_through_bj_scan`. All together
    make 2.2 million host callbacks.
    """
    L, counter = 300, Counter()
    xs = jnp.arange(L, dtype=jnp.float64)

    @jax.jit
    def grad(h, n):
        loss = lambda h: jnp.sum(_engine.binomial_scan(counter.step, h, xs, L, s, steps=n)[1])
        return jax.grad(loss)(h)

    for T in lengths:
        assert counter.run(grad, 1.0, jnp.int32(T)) == _engine.binomial_steps(T, s), (T, s)


@pytest.mark.parametrize(
    ("T", "s"),
    [(1, 1), (1, 4), (2, 1), (2, 2), (7, 3), (97, 4), (300, 1), (300, 8), (1000, 14)],
)
def test_counts_through_bj_scan(T, s):
    counter = Counter()
    xs = jnp.arange(T, dtype=jnp.float64)
    grad = jax.jit(jax.grad(lambda h: bj.scan(counter.step, h, xs, remat=bj.Binomial(s))[0]))
    assert counter.run(grad, 1.0) == _engine.binomial_steps(T, s)
    # the plain forward pass costs exactly T evaluations
    fwd = jax.jit(lambda h: bj.scan(counter.step, h, xs, remat=bj.Binomial(s))[0])
    assert counter.run(fwd, 1.0) == T


@pytest.mark.slow
@pytest.mark.parametrize(("T", "s"), [(30_000, 12)])  # 212,868 evaluations in seven sweeps
def test_counts_at_long_lengths(T, s):
    counter = Counter()
    xs = jnp.arange(T, dtype=jnp.float64)
    grad = jax.jit(jax.grad(lambda h: bj.scan(counter.step, h, xs, remat=bj.Binomial(s))[0]))
    assert counter.run(grad, 1.0) == _engine.binomial_steps(T, s)


def reference_order(T, s):
    """The binomial schedule's evaluation order, written recursively.

    The forward pass runs every step once (the last inside its VJP). Then
    ``[a, b)`` with the state at ``a`` restored and ``k`` snapshots: advance
    to the split ``m``, reverse ``[a + m, b)`` with ``k − 1`` snapshots, then
    ``[a, a + m)`` with ``k``. A range the forward pass already advanced
    through is not advanced again; each step's VJP evaluates it once.
    """
    order = list(range(T))

    def reverse(a, b, k, swept):
        if b - a == 1:
            if not swept:
                order.append(a)  # the VJP of step a
            return
        m = _engine.split(b - a, k)
        if not swept:
            order.extend(range(a, a + m))
        reverse(a + m, b, k - 1, swept)
        reverse(a, a + m, k, False)

    if T:
        reverse(0, T, s, True)
    return order


@pytest.mark.parametrize("T", [1, 2, 10, 64])
@pytest.mark.parametrize("s", [1, 3, 5, 70])
@pytest.mark.parametrize("reverse", [False, True])
def test_evaluation_order_is_the_recursive_schedule(T, s, reverse):
    counter = Counter(ordered=True, log=True)  # unordered callbacks may run out of order
    xs = jnp.arange(T, dtype=jnp.float64)
    scan = functools.partial(bj.scan, remat=bj.Binomial(s), reverse=reverse)
    counter.run(jax.jit(jax.grad(lambda h: scan(counter.step, h, xs)[0])), 1.0)
    want = reference_order(T, s)
    if reverse:  # the same schedule over the steps in processing order
        want = [T - 1 - t for t in want]
    assert counter.log == want
    assert len(want) == _engine.binomial_steps(T, s)


# --- memory and program size ------------------------------------------------------------------


def rnn_grad(remat, T, B=4, D=3, H=8):
    params, xs = helpers.abstract_inputs("rnn", T, B, D, H, jnp.float32)
    return jax.grad(functools.partial(helpers.model_loss, cell="rnn", remat=remat)), (params, xs)


def test_memory_is_snapshots_times_carry_and_independent_of_length():
    C = helpers.carry_bytes("rnn", 16, 32, jnp.float32)
    temp = {}
    for T in (100, 10_000):
        for s in (2, 10, 40):
            fn, args = rnn_grad(bj.Binomial(s), T, B=16, D=8, H=32)
            temp[T, s] = bj.memory.measure(fn, *args).temp_bytes
    for T in (100, 10_000):
        # a carry and an int32 position per snapshot (XLA aligns buffers to 64 bytes)
        assert 8 * C <= temp[T, 10] - temp[T, 2] <= 8 * (C + 4) + 64
        assert 30 * C <= temp[T, 40] - temp[T, 10] <= 30 * (C + 4) + 64
    for s in (2, 10, 40):
        assert temp[100, s] == temp[10_000, s]


def hlo_lines(remat, T):
    fn, args = rnn_grad(remat, T)
    text = jax.jit(fn).lower(*args).compile().as_text()
    return sum(1 for line in text.splitlines() if " = " in line)


@pytest.mark.slow
def test_program_does_not_grow_with_length():
    sizes = [hlo_lines(bj.Binomial(6), T) for T in (100, 10_000, 1_000_000)]
    assert sizes[0] == sizes[1] == sizes[2], sizes


@pytest.mark.slow
@pytest.mark.parametrize("cell", CELLS)
def test_predictions_within_10_percent(cell):
    B, D, H = 32, 64, 256

    def build(T, remat=None):
        params, xs = helpers.abstract_inputs(cell, T, B, D, H, jnp.float32)
        return jax.grad(functools.partial(helpers.model_loss, cell=cell, remat=remat)), (params, xs)

    costs = bj.memory.step_costs(build, helpers.carry_bytes(cell, B, H, jnp.float32))
    for T in (1_000, 10_000):
        for s in (2, 14, 40):
            fn, args = build(T, bj.Binomial(s))
            measured = bj.memory.measure(fn, *args).temp_bytes
            predicted = bj.memory.predict(
                bj.Binomial(s), T, costs.carry_bytes, costs.residual_bytes, costs.overhead_bytes
            )
            assert abs(predicted - measured) <= 0.10 * measured, (T, s, predicted, measured)


def test_cost_by_hand():
    costs = bj.remat.StepCosts(carry_bytes=10, residual_bytes=30, overhead_bytes=5)
    cost = bj.Binomial(3).cost(100, costs)
    # snapshots and their int32 positions, the state being advanced, the state
    # being pulled back, the overhead, the engine's bookkeeping
    assert cost.temp_bytes == 3 * (10 + 4) + 10 + 10 + 5 + _binomial._ENGINE_BYTES
    assert cost.recomputed_steps == _engine.binomial_advances(100, 3)
    assert bj.Binomial(4).recomputed_steps(1000) == _engine.binomial_advances(1000, 4)


@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3), (2, 0, 4)])
def test_live_until_changes_no_value(shape):
    out = jnp.arange(math.prod(shape), dtype=jnp.float32).reshape(shape) - 1.5
    kept = jnp.full(shape, jnp.nan, jnp.float32)
    got = jax.jit(_engine._live_until)([out], [kept], jnp.asarray(False))
    np.testing.assert_array_equal(got[0], out)
    sized = [axis for axis, n in enumerate(shape) if n > 0]
    want = (sized[0] if jax.device_count() == 1 else sized[-1]) if sized else None
    assert _engine._unsharded_axis(out) == want


def test_the_pulled_back_state_stays_live():
    """Without ``_live_until``, XLA gives the GRU's state buffer to its cotangent
    (the backward loop then runs the two products in turn); with it, the state
    is live until the cotangent exists: one carry more working memory."""
    params, xs = helpers.abstract_inputs("gru", 50, 32, 64, 256, jnp.float32)
    carry = helpers.carry_bytes("gru", 32, 256, "float32")

    def temp():  # a new function each time, so that nothing traced is reused
        loss = functools.partial(helpers.model_loss, cell="gru", remat=bj.Binomial(5))
        return bj.memory.measure(jax.grad(loss), params, xs).temp_bytes

    kept = temp()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_engine, "_live_until", lambda outs, keep, never: outs)
        shared = temp()
    assert carry <= kept - shared <= carry + 1024, (kept, shared, carry)


# --- edge cases, transformations that cannot work, bad input -------------------------------


@pytest.mark.parametrize("T", [0, 1, 2])
@pytest.mark.parametrize("s", [1, 3])
def test_short_sequences(T, s):
    w = jnp.asarray([[0.5, -0.3], [0.2, 0.8]])
    xs = jnp.linspace(-1.0, 1.0, 2 * T).reshape(T, 2)

    def loss(scan, w, h):
        c, ys = scan(lambda h, x: (jnp.tanh(h @ w + x), jnp.sum(h**2)), h, xs)
        return jnp.sum(ys) + jnp.sum(c**3)

    ours = functools.partial(bj.scan, remat=bj.Binomial(s))
    got = jax.grad(functools.partial(loss, ours), (0, 1))(w, jnp.ones(2))
    want = jax.grad(functools.partial(loss, jax.lax.scan), (0, 1))(w, jnp.ones(2))
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-13, atol=1e-15), got, want)


def test_eager_and_jit_agree_with_integer_and_float_carries():
    xs = {"x": jnp.linspace(0.0, 1.0, 30), "i": jnp.arange(30)}

    def loss(w, h, remat):
        def step(c, x):
            h, n = c
            h = jnp.sin(w * h) + x["x"] * (x["i"] % 3).astype(h.dtype)
            return (h, n + x["i"]), h * n.astype(h.dtype)

        (h, n), ys = bj.scan(step, (h, jnp.zeros((), jnp.int64)), xs, remat=remat)
        assert n.dtype == jnp.int64
        return jnp.sum(ys) + h

    want = jax.grad(loss, (0, 1))(0.7, 0.3, bj.StoreAll())
    eager = jax.grad(loss, (0, 1))(0.7, 0.3, bj.Binomial(4))
    jitted = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)(0.7, 0.3, bj.Binomial(4))
    for got in (eager, jitted):
        np.testing.assert_allclose(got, want, rtol=1e-13)


@jax.custom_vjp
def clip_cotangent(x):
    return x


clip_cotangent.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -0.05, 0.05),))


@pytest.mark.parametrize(
    "remat",
    [bj.Binomial(1), bj.Binomial(3), bj.Binomial(13), bj.Nested(2), bj.EveryStep()],
    ids=str,
)
def test_a_step_calling_a_custom_vjp_function(remat):
    # The engine's recomputation runs the step as the primal of a JVP, which a
    # custom_vjp function (here: clipping the cotangent) does not have.
    w = jnp.array([[0.9, -0.4], [0.3, 1.1]])
    xs = jnp.linspace(-1.0, 1.0, 26).reshape(13, 2)

    def loss(scan, w, h, clip=clip_cotangent):
        step = lambda h, x: (jnp.tanh(clip(h) @ w + x),) * 2
        h, ys = scan(step, h, xs)
        return jnp.sum(ys**2) + jnp.sum(h)

    got = jax.jit(
        jax.grad(functools.partial(loss, functools.partial(bj.scan, remat=remat)), (0, 1))
    )
    want = jax.grad(functools.partial(loss, jax.lax.scan), (0, 1))(w, jnp.ones(2))
    assert_trees_close(got(w, jnp.ones(2)), want, rtol=1e-13)
    # the clipping acted: without it the gradient is another one
    unclipped = jax.grad(functools.partial(loss, jax.lax.scan, clip=lambda h: h))(w, jnp.ones(2))
    assert not np.allclose(unclipped, want[0], rtol=1e-3)


def simple_loss(w, remat, T=9):
    xs = jnp.linspace(0.0, 1.0, T)
    c, ys = bj.scan(lambda h, x: (jnp.sin(w * h) + x, h), 0.5, xs, remat=remat)
    return jnp.sum(ys) + c


def test_forward_mode_jvp_is_refused_with_a_pointer_to_nested():
    with pytest.raises(TypeError, match=r"does not support forward-mode jax.jvp.*bj\.Nested"):
        jax.jvp(lambda w: simple_loss(w, bj.Binomial(2)), (0.3,), (1.0,))
    # Nested does it
    got = jax.jvp(lambda w: simple_loss(w, bj.Nested(2)), (0.3,), (1.0,))
    want = jax.jvp(lambda w: simple_loss(w, bj.StoreAll()), (0.3,), (1.0,))
    np.testing.assert_allclose(got, want, rtol=1e-13)


def test_linearize_is_refused_with_a_pointer_to_nested():
    """jax.linearize raises the library's TypeError, not JAX's custom_vjp error.

    The error comes at linearization, so the linear function that JAX would
    refuse to evaluate is never returned; under jit, at tracing.
    """
    message = r"does not support forward-mode jax.linearize of the scan.*bj\.Nested"
    loss = lambda w: simple_loss(w, bj.Binomial(2))
    with pytest.raises(TypeError, match=message):
        jax.linearize(loss, 0.3)
    with pytest.raises(TypeError, match=message):  # evaluating the linear function, traced
        jax.jit(lambda w, t: jax.linearize(loss, w)[1](t))(0.3, 1.0)
    with pytest.raises(TypeError, match=message):  # a vmap inside passes the call on
        jax.linearize(lambda w: jnp.sum(jax.vmap(loss)(w)), jnp.array([0.3, 0.4]))
    # Nested linearizes, as jvp
    y, f_jvp = jax.linearize(lambda w: simple_loss(w, bj.Nested(2)), 0.3)
    want = jax.jvp(lambda w: simple_loss(w, bj.StoreAll()), (0.3,), (1.0,))
    np.testing.assert_allclose((y, f_jvp(1.0)), want, rtol=1e-13)


def test_linearize_of_the_gradient_works():
    """linearize∘grad evaluates the backward pass's linearization, never transposes it."""
    g = jax.grad(simple_loss)
    _, hvp = jax.linearize(lambda w: g(w, bj.Binomial(2)), 0.3)
    want = jax.jvp(lambda w: g(w, bj.StoreAll()), (0.3,), (1.0,))[1]
    np.testing.assert_allclose(hvp(1.0), want, rtol=1e-12)
    np.testing.assert_allclose(jax.jit(hvp)(2.0), 2.0 * want, rtol=1e-12)


def test_grad_of_grad_is_refused_but_hessian_vector_products_work():
    g = jax.grad(simple_loss)
    with pytest.raises(TypeError, match=r"reverse-mode differentiation of its gradient.*Nested"):
        jax.grad(lambda w: g(w, bj.Binomial(2)))(0.3)
    hvp = jax.jvp(lambda w: g(w, bj.Binomial(2)), (0.3,), (1.0,))
    want = jax.jvp(lambda w: g(w, bj.StoreAll()), (0.3,), (1.0,))
    np.testing.assert_allclose(hvp, want, rtol=1e-12)
    np.testing.assert_allclose(
        jax.hessian(simple_loss)(0.3, bj.Binomial(3)), jax.hessian(simple_loss)(0.3, bj.StoreAll())
    )


def test_rejects_bad_snapshots_and_too_long_sequences():
    with pytest.raises(ValueError, match=r"snapshots >= 1.*got 0"):
        bj.Binomial(0)
    with pytest.raises(TypeError, match=r"snapshots=.*positive int.*float"):
        bj.Binomial(2.0)
    with pytest.raises(TypeError, match=r"snapshots=.*positive int.*bool"):
        bj.Binomial(True)
    assert bj.Binomial(np.int64(3)) == bj.Binomial(3)
    with pytest.raises(ValueError, match=r"up to 2\*\*30 steps, got length 1073741825"):
        bj.scan(lambda h, _: (h, None), 0.0, None, length=2**30 + 1, remat=bj.Binomial(4))


def test_strategy_is_a_static_value():
    assert bj.Binomial(3) == bj.Binomial(3) and hash(bj.Binomial(3)) == hash(bj.Binomial(3))
    f = jax.jit(simple_loss, static_argnums=1)
    np.testing.assert_allclose(f(0.3, bj.Binomial(3)), simple_loss(0.3, bj.StoreAll()))
    assert math.isfinite(float(f(0.3, bj.Binomial(5))))


def test_overlap_changes_neither_values_nor_counts(cell="lstm"):
    """``overlap`` only orders the backward pass's work; gradients and counts are equal."""
    assert repr(bj.Binomial(4, overlap=False)) == "Binomial(snapshots=4, overlap=False)"
    assert repr(bj.Binomial(4)) == "Binomial(snapshots=4)"
    params = helpers.init_model(jax.random.key(0), cell, 3, 5, jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (41, 2, 3), jnp.float64)
    grads = {
        overlap: jax.grad(
            functools.partial(helpers.model_loss, cell=cell, remat=bj.Binomial(4, overlap))
        )(params, xs)
        for overlap in (True, False)
    }
    want = jax.grad(functools.partial(helpers.model_loss, cell=cell))(params, xs)
    for got in grads.values():
        assert_trees_close(got, want)
    counter, t = Counter(), jnp.arange(41, dtype=jnp.float64)
    for overlap in (True, False):
        remat = bj.Binomial(4, overlap=overlap)
        grad = jax.jit(jax.grad(lambda h, r=remat: bj.scan(counter.step, h, t, remat=r)[0]))
        assert counter.run(grad, 1.0) == _engine.binomial_steps(41, 4)
    with pytest.raises(TypeError, match=r"overlap=.*True or False.*int"):
        bj.Binomial(4, overlap=1)
