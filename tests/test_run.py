"""``bj.cells.run``: the whole-sequence path equals ``bj.scan`` of the step, in float64.

The references are ``bj.scan`` of the cell's own step with the same
strategy and truncation (itself checked against ``lax.scan`` in the shared
suite) and, for full BPTT, a hand-written ``jax.lax.scan``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest
from helpers import CELLS, STRATEGIES, assert_trees_close, strategy_id

import bpttjax as bj
from bpttjax import _probe
from bpttjax.cells import _registry

D, H, B = 3, 4, 2

# The strategies whose blocks run fused (StoreAll: one block; Nested: innermost blocks).
FUSED = (bj.StoreAll(), bj.Nested(2), bj.Nested(lengths=(3, 2, 3)))
CUTS = {
    "full": (None, False),
    "truncate-reverse": (bj.Truncate(every=4), True),
    "random": (bj.RandomTruncate(jax.random.key(7), keep_prob=0.6), False),
}


def problem(cell: str, T: int, key: int = 0, width: int = D, batch: tuple = (B,)):
    c = bj.cells.get(cell)
    k = jax.random.split(jax.random.key(key), 4)
    params = c.init(k[0], width, H, jnp.float64)
    # nonzero biases, so that every parameter's gradient is exercised
    params = jax.tree.map(
        lambda a, kk: a + 0.2 * jax.random.normal(kk, a.shape, a.dtype),
        params,
        dict(zip(params, jax.random.split(k[1], len(params)), strict=True)),
    )
    carry = jax.tree.map(
        lambda a: a + 0.3 * jax.random.normal(k[2], a.shape, a.dtype),
        c.initial_carry(H, batch, jnp.float64),
    )
    xs = jax.random.normal(k[3], (T, *batch, width), jnp.float64)
    return c, params, carry, xs


def loss_of(run):
    """A loss using every output and the final carry, nonlinearly."""

    def loss(params, carry, xs):
        carry_T, ys = run(params, carry, xs)
        return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(a**2) for a in jax.tree.leaves(carry_T))

    return loss


def check(cell, T, remat, truncation, reverse, hoist=False, width=D, batch=(B,), chunks=1):
    c, params, carry, xs = problem(cell, T, width=width, batch=batch)
    kw = dict(reverse=reverse, truncation=truncation)

    def ref(p, c0, x):
        return bj.scan(functools.partial(c.step, p), c0, x, remat=bj.StoreAll(), **kw)

    def got(p, c0, x):
        return bj.cells.run(cell, p, c0, x, remat=remat, hoist=hoist, batch_chunks=chunks, **kw)

    assert_trees_close(jax.jit(got)(params, carry, xs), ref(params, carry, xs))
    want = jax.grad(loss_of(ref), argnums=(0, 1, 2))(params, carry, xs)
    grads = jax.jit(jax.grad(loss_of(got), argnums=(0, 1, 2)))(params, carry, xs)
    assert_trees_close(grads, want)


# A Latin square: each cut meets each cell and each fused strategy once.
SQUARE = [
    (cell, remat, list(CUTS)[(i + j) % len(CUTS)])
    for i, cell in enumerate(CELLS)
    for j, remat in enumerate(FUSED)
]


@pytest.mark.parametrize(
    "cell, remat, cut", SQUARE, ids=[f"{c}-{strategy_id(r)}-{k}" for c, r, k in SQUARE]
)
def test_fused_matches_scan(cell, remat, cut):
    truncation, reverse = CUTS[cut]
    check(cell, 13, remat, truncation, reverse)


@pytest.mark.parametrize("cell", CELLS)
def test_hoisted_projection_matches_scan(cell):
    check(cell, 11, bj.Nested(lengths=(3, 4)), bj.Truncate(every=3), True, hoist=True)
    check(cell, 5, bj.StoreAll(), None, False, hoist=True)


@pytest.mark.parametrize("cell", CELLS)
def test_inputs_wider_than_the_carry(cell):
    """Inputs wider than the hidden state: the residuals keep the carries, not the outputs."""
    check(cell, 9, bj.StoreAll(), bj.Truncate(every=4), True, width=H + 2)
    check(cell, 10, bj.Nested(2), None, False, width=H + 2)


# (chunks, strategy, cut, width): uneven groups, more groups than rows, the
# outputs standing in for the carry (narrow inputs) or not (wide).
CHUNKED = [
    (2, bj.StoreAll(), "full", D),
    (3, bj.Nested(2), "truncate-reverse", D),
    (7, bj.StoreAll(), "random", H + 2),
]


@pytest.mark.parametrize("chunks, remat, cut, width", CHUNKED, ids=lambda v: str(v))
@pytest.mark.parametrize("cell", CELLS)
def test_batch_chunks_match_scan(cell, chunks, remat, cut, width):
    """The batch run as independent row groups: the same values and gradients."""
    truncation, reverse = CUTS[cut]
    check(cell, 9, remat, truncation, reverse, width=width, batch=(5,), chunks=chunks)


@pytest.mark.parametrize("cell", CELLS)
def test_batch_chunks_other_batch_shapes(cell):
    """Several batch axes are grouped along the first; unbatched inputs run whole."""
    check(cell, 6, bj.StoreAll(), None, True, batch=(3, 2), chunks=2, hoist=True)
    check(cell, 5, bj.Nested(2), bj.Truncate(every=2), False, batch=(), chunks=2)


def test_batch_chunks_run_as_separate_chains():
    """Each row group has its own products in the loops (forward and backward)."""
    _, params, carry, xs = problem("rnn", 6, batch=(5,))

    def products(chunks, batch_axis=True):
        x, c = (xs, carry) if batch_axis else (xs[:, 0], carry[0])
        run = lambda p: bj.cells.run("rnn", p, c, x, batch_chunks=chunks)
        text = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(run(p)[1])))(params))
        return text.count("dot_general")

    one = products(1)
    assert products(2) > one and products(3) > products(2)
    assert products(3, batch_axis=False) == products(1, batch_axis=False)


def _traced(cell, params, carry, xs, chunks):
    run = lambda p: bj.cells.run(cell, p, carry, xs, batch_chunks=chunks)
    return str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(run(p)[1])))(params))


@pytest.fixture
def fake_timer(monkeypatch):
    """``batch_chunks="auto"`` on a 2-core CPU with a fresh cache, its timings set by the
    test (``timings[n]``); ``calls`` counts the timings taken."""
    from bpttjax.cells import _autotune

    timings, calls = {1: 1.0, 2: 1.0}, []
    monkeypatch.setattr(_autotune, "_CACHE", {})
    monkeypatch.setattr(_autotune, "cores", lambda: 2)
    monkeypatch.setattr(_autotune, "times", lambda *a: calls.append(a) or dict(timings))
    return timings, calls


@pytest.mark.parametrize("cell", CELLS)
def test_auto_batch_chunks_runs_the_faster_by_its_timing(cell, fake_timer):
    """``"auto"`` (the default) runs what the timing found faster, by at least 3%,
    and times a layer shape once."""
    timings, calls = fake_timer
    _, params, carry, xs = problem(cell, 5, batch=(16,))
    one, two = _traced(cell, params, carry, xs, 1), _traced(cell, params, carry, xs, 2)
    assert one != two
    timings[2] = 0.5
    assert _traced(cell, params, carry, xs, "auto") == two
    assert bj.cells.choose_batch_chunks(cell, params, carry, xs) == 2
    assert len(calls) == 1  # cached: timed once for both
    bj.cells.run(cell, params, carry, xs[:4])  # another length: timed again
    assert len(calls) == 2

    timings[2] = 0.98  # within the 3% margin: the simpler program
    _, params, carry, xs = problem(cell, 5, batch=(17,))
    assert _traced(cell, params, carry, xs, "auto") == _traced(cell, params, carry, xs, 1)
    assert bj.cells.choose_batch_chunks(cell, params, carry, xs) == 1
    assert len(calls) == 3


def test_auto_batch_chunks_is_1_untimed_where_chains_cannot_help(fake_timer, monkeypatch):
    """Small batches, no batch axis, one core and other platforms: 1, nothing timed."""
    from bpttjax.cells import _autotune

    timings, calls = fake_timer
    timings[2] = 0.1
    _, params, carry, xs = problem("gru", 4, batch=(15,))  # under 2 x 8 rows
    assert bj.cells.choose_batch_chunks("gru", params, carry, xs) == 1
    _, params, carry, xs = problem("gru", 4, batch=())
    assert bj.cells.choose_batch_chunks("gru", params, carry, xs) == 1
    _, params, carry, xs = problem("gru", 4, batch=(16,))
    unbatched = jax.tree.map(lambda a: a[0], carry)  # a carry with no batch axis (a custom cell's)
    assert _autotune.untimed(_layer_of("gru", params, xs), unbatched).startswith("no batch axis")
    assert _autotune.choose(_layer_of("gru", params, xs), unbatched) == 1
    with monkeypatch.context() as m:
        m.setattr(_autotune, "cores", lambda: 1)
        assert bj.cells.choose_batch_chunks("gru", params, carry, xs) == 1
    with monkeypatch.context() as m:
        m.setattr(_autotune, "platform", lambda xs: "gpu")
        assert _autotune.untimed(_layer_of("gru", params, xs), carry).startswith("not a CPU")
        assert bj.cells.choose_batch_chunks("gru", params, carry, xs) == 1
    assert calls == []
    assert bj.cells.choose_batch_chunks("gru", params, carry, xs) == 2
    assert len(calls) == 1


def _layer_of(cell, params, xs):
    from bpttjax.cells import _fused

    c = bj.cells.get(cell)
    return _fused.FusedLayer(split=c.split, step_fn=c.step, params=params, xs=xs, length=len(xs))


def test_auto_batch_chunks_times_under_jit_and_grad(monkeypatch):
    """The real timing runs while ``jit`` and ``grad`` trace, once per shape; the
    gradients equal one chain's."""
    from bpttjax.cells import _autotune

    monkeypatch.setattr(_autotune, "_CACHE", {})
    monkeypatch.setattr(_autotune, "cores", lambda: 2)
    timed = []
    real = _autotune.times
    monkeypatch.setattr(_autotune, "times", lambda *a: timed.append(real(*a)) or timed[-1])
    _, params, carry, xs = problem("lstm", 40, batch=(16,))
    loss = lambda chunks: loss_of(
        lambda p, c, x: bj.cells.run("lstm", p, c, x, batch_chunks=chunks)
    )
    grads = jax.jit(jax.grad(loss("auto"), argnums=(0, 1, 2)))(params, carry, xs)
    assert len(timed) == 1 and set(timed[0]) == {1, 2}
    assert all(0 < t < 10 for t in timed[0].values())
    assert_trees_close(grads, jax.grad(loss(1), argnums=(0, 1, 2))(params, carry, xs))
    assert bj.cells.choose_batch_chunks("lstm", params, carry, xs) in (1, 2)
    assert len(timed) == 1  # the same layer: cached


def _cell_state_first_lstm(output_leaf):
    """An LSTM whose carry is ``(c, h)`` (Flax's order): its output is carry leaf 1."""

    def elem(pe, carry, z):  # the library's LSTM, its carry reordered
        c, h = carry
        (h_new, c_new), y = _registry._lstm_elem(pe, (h, c), z)
        return (c_new, h_new), y

    split = bj.cells.Split(
        project=lambda p, x: x @ p["W_x"] + p["b"][None, :],
        hidden=lambda p, carry: carry[1] @ p["W_h"],
        mix=lambda xw, hw: xw + hw,
        elem=elem,
        output_leaf=output_leaf,
    )

    def step(p, carry, x):
        return elem(p, carry, split.mix(split.project(p, x), split.hidden(p, carry)))

    lstm = bj.cells.get("lstm")
    return bj.cells.Cell("lstm_ch", step, lstm.init, carry_arrays=2, gates=4, split=split)


@pytest.mark.parametrize("width", [D, H + 2], ids=["narrow-inputs", "wide-inputs"])
def test_a_cell_whose_output_is_its_second_carry_leaf(width):
    """A user's Split with output_leaf=1; a wrong output_leaf is refused, not silently wrong."""
    cell = _cell_state_first_lstm(output_leaf=1)
    _, params, (h0, c0), xs = problem("lstm", 8, width=width)
    carry = (c0, h0)
    kw = dict(truncation=bj.Truncate(every=3), reverse=True)

    def ref(p, c, x):
        return bj.scan(functools.partial(cell.step, p), c, x, **kw)

    def got(p, c, x):
        return bj.cells.run(cell, p, c, x, **kw)

    want = jax.grad(loss_of(ref), argnums=(0, 1, 2))(params, carry, xs)
    assert_trees_close(jax.grad(loss_of(got), argnums=(0, 1, 2))(params, carry, xs), want)
    if width <= H:
        wrong = _cell_state_first_lstm(output_leaf=0)
        with pytest.raises(ValueError, match=r"Split\(output_leaf=0\) says that elem returns"):
            jax.grad(loss_of(lambda p, c, x: bj.cells.run(wrong, p, c, x)))(params, carry, xs)


def test_split_rejects_bad_fields():
    ok = bj.cells.get("lstm").split
    with pytest.raises(TypeError, match=r"Split\(output_leaf=...\) expects None or the index"):
        bj.cells.Split(ok.project, ok.hidden, ok.mix, ok.elem, output_leaf=-1)
    with pytest.raises(TypeError, match=r"Split\(bulk_vjp=...\) expects None or a callable"):
        bj.cells.Split(ok.project, ok.hidden, ok.mix, ok.elem, bulk_vjp=3)
    with pytest.raises(TypeError, match=r"Split\(elem=...\) expects a callable"):
        bj.cells.Split(ok.project, ok.hidden, ok.mix, None)
    with pytest.raises(TypeError, match=r"Split\(output_vjp=...\) expects None or a callable"):
        bj.cells.Split(ok.project, ok.hidden, ok.mix, ok.elem, output_vjp="tanh")
    _, params, (h0, c0), xs = problem("lstm", 4)
    three = _cell_state_first_lstm(output_leaf=2)
    with pytest.raises(ValueError, match=r"Split\(output_leaf=2\) names a carry leaf"):
        jax.grad(loss_of(lambda p, c, x: bj.cells.run(three, p, c, x)))(params, (c0, h0), xs)


@pytest.mark.parametrize("width", [D, H + 2], ids=["narrow-inputs", "wide-inputs"])
def test_output_vjp_replaces_elems_vjp(width):
    """The rnn's ``Split.output_vjp`` is what the backward loop uses, and it is exact.

    The same cell with it dropped, and with it scaled, against ``bj.scan``:
    the first agrees, the second must not.
    """
    rnn = bj.cells.get("rnn")
    _, params, carry, xs = problem("rnn", 7, width=width)
    ref = jax.grad(loss_of(lambda p, c, x: bj.scan(functools.partial(rnn.step, p), c, x)))

    def grads(output_vjp):
        split = dataclasses.replace(rnn.split, output_vjp=output_vjp)
        cell = dataclasses.replace(rnn, name="rnn_variant", split=split)
        return jax.grad(loss_of(lambda p, c, x: bj.cells.run(cell, p, c, x)))(params, carry, xs)

    def doubled(pe, h, y, cotangents):
        d_pe, d_h, dz = rnn.split.output_vjp(pe, h, y, cotangents)
        return d_pe, d_h, 2 * dz

    want = ref(params, carry, xs)
    assert rnn.split.output_vjp is not None
    assert_trees_close(grads(rnn.split.output_vjp), want)
    assert_trees_close(grads(None), want)
    wrong = grads(doubled)
    assert not jnp.allclose(wrong["W_hh"], want["W_hh"])


def test_short_sequences():
    for T in (0, 1, 2):
        check("lstm", T, bj.Nested(2), None, False)


@pytest.mark.parametrize(
    "remat",
    [s for s in STRATEGIES.values() if type(s) not in (bj.StoreAll, bj.Nested)]
    + [bj.Budget("1MB")],
    ids=strategy_id,
)
def test_other_strategies_step_by_step(remat):
    check("gru", 9, remat, bj.Truncate(every=4), False)


def test_matches_hand_written_lax_scan():
    c, params, carry, xs = problem("lstm", 17)

    def ref(p, c0, x):
        return jax.lax.scan(functools.partial(c.step, p), c0, x)

    def got(p, c0, x):
        return bj.cells.run("lstm", p, c0, x)

    want = jax.grad(loss_of(ref), argnums=(0, 1, 2))(params, carry, xs)
    assert_trees_close(jax.grad(loss_of(got), argnums=(0, 1, 2))(params, carry, xs), want)


def test_transformations():
    """vmap of grad and jvp of grad (Hessian-vector products) match bj.scan's."""
    c, params, carry, xs = problem("gru", 7)
    ref_loss = loss_of(lambda p, c0, x: bj.scan(functools.partial(c.step, p), c0, x))
    got_loss = loss_of(lambda p, c0, x: bj.cells.run("gru", p, c0, x, remat=bj.Nested(2)))

    carry_b = jax.tree.map(lambda a: a[:, None, :], carry)
    assert_trees_close(
        jax.vmap(jax.grad(got_loss), in_axes=(None, 0, 1))(params, carry_b, xs[:, :, None, :]),
        jax.vmap(jax.grad(ref_loss), in_axes=(None, 0, 1))(params, carry_b, xs[:, :, None, :]),
    )
    tangent = jax.tree.map(jnp.ones_like, params)

    def hvp(loss):
        return jax.jvp(lambda p: jax.grad(loss)(p, carry, xs), (params,), (tangent,))[1]

    assert_trees_close(hvp(got_loss), hvp(ref_loss), rtol=1e-11)


@pytest.mark.parametrize("width", [8, 48], ids=["narrow-inputs", "wide-inputs"])
@pytest.mark.parametrize("cell", CELLS)
def test_memory_less_than_the_step_by_step_scan(cell, width):
    """Measured temp: the fused path keeps less than bj.scan of the step.

    Under StoreAll its backward loop writes each step's ``dz`` over that
    step's ``z``, so it holds one stack of that size where a scan holds two.
    With inputs no wider than the hidden state (8 < 32), the outputs also
    stand in for the stack of entering hidden states. Under Nested it keeps
    about as much: within 3% at the benchmark size (T = 1,000, H = 256), up to
    8.5% more at this size, where a block's own small buffers weigh more.
    """
    c = bj.cells.get(cell)
    T, batch, hidden = 120, 4, 32
    params = c.init(jax.random.key(0), width, hidden)
    carry = c.initial_carry(hidden, (batch,))
    xs = jnp.ones((T, batch, width), jnp.float32)
    z_stack = T * batch * c.gates * hidden * 4
    h_stack = T * batch * hidden * 4
    for remat in (bj.StoreAll(), bj.Nested(2)):

        def scan_loss(p, x, remat=remat):
            return jnp.sum(bj.scan(functools.partial(c.step, p), carry, x, remat=remat)[1] ** 2)

        def run_loss(p, x, remat=remat):
            return jnp.sum(bj.cells.run(cell, p, carry, x, remat=remat)[1] ** 2)

        ref = bj.memory.measure(jax.grad(scan_loss), params, xs).temp_bytes
        got = bj.memory.measure(jax.grad(run_loss), params, xs).temp_bytes
        if not isinstance(remat, bj.StoreAll):
            saved = -0.1 * ref
        elif width <= hidden:
            saved = 0.8 * (z_stack + h_stack)
        else:
            saved = 0.9 * z_stack
        assert got <= ref - saved, (cell, remat, got, ref, z_stack, h_stack)


def summed_temp(cell, params, carry, xs, remat, layer=True):
    """Temp bytes of the gradient of a loss over every output (the mean of their
    squares, as Budget's probes measure a layer), through ``run`` or, with
    ``layer=False``, ``bj.scan``."""
    c = bj.cells.get(cell)

    def loss(p, x):
        if layer:
            out = bj.cells.run(cell, p, carry, x, remat=remat)
        else:
            out = bj.scan(functools.partial(c.step, p), carry, x, remat=remat)
        return sum(jnp.mean(a * a) for a in jax.tree.leaves(out))

    return bj.memory.measure(jax.grad(loss), params, xs).temp_bytes


@pytest.mark.parametrize("cell", CELLS)
def test_budget_plans_the_fused_layer(cell):
    """Budget under run: the fused StoreAll wherever its measured memory fits.

    Between the fused block's memory and bj.scan's StoreAll it runs that
    block; below, what it plans for bj.scan of the step; the measured temp
    stays within the budget either way.
    """
    c = bj.cells.get(cell)
    params = c.init(jax.random.key(0), 8, 32)
    carry = c.initial_carry(32, (4,))
    xs = jnp.ones((120, 4, 8), jnp.float32)
    temp = functools.partial(summed_temp, cell, params, carry, xs)

    fused, plain = temp(bj.StoreAll()), temp(bj.StoreAll(), layer=False)
    assert fused < 0.9 * plain
    between = bj.Budget(int(0.5 * (fused + plain)))
    step = functools.partial(c.step, params)
    assert between.plan(step, carry, xs).strategy != bj.StoreAll()  # as bj.scan plans it
    assert temp(between) == fused <= between.bytes
    tight = bj.Budget(int(0.75 * fused))  # above the outputs and their cotangent
    assert temp(tight) <= tight.bytes


@pytest.mark.parametrize("cell", CELLS)
def test_budget_runs_the_fused_nested_instead_of_a_long_binomial(cell):
    """Budget under run: where bj.scan's plan would be a Binomial recomputing
    more than 1.5 forward passes, the fused Nested(2) runs if its measured
    memory fits; below that memory, the Binomial runs. Both stay within the
    budget.
    """
    c = bj.cells.get(cell)
    T = 1000
    params = c.init(jax.random.key(0), 8, 32)
    carry = c.initial_carry(32, (4,))
    xs = jnp.ones((T, 4, 8), jnp.float32)
    step = functools.partial(c.step, params)
    C = bj.memory.tree_bytes(carry)
    temp = functools.partial(summed_temp, cell, params, carry, xs)

    nested = temp(bj.Nested(2))
    # Budget adds the carry a loss creates and room for the loss's own scalars
    fits = bj.Budget(nested + C + _probe.SLACK)
    plan = fits.plan(step, carry, xs)
    assert isinstance(plan.strategy, bj.Binomial), plan
    assert plan.recomputed_steps > 1.5 * T, plan
    assert temp(fits) == nested <= fits.bytes
    below = bj.Budget(int(0.97 * nested))
    assert isinstance(below.plan(step, carry, xs).strategy, bj.Binomial)
    got = temp(below)
    assert got != nested and got <= below.bytes


def test_rejects_bad_arguments():
    c, params, carry, xs = problem("rnn", 3)
    with pytest.raises(ValueError, match="unknown cell 'tanh'"):
        bj.cells.run("tanh", params, carry, xs)
    with pytest.raises(ValueError, match=r"run\(xs=...\) expects an array of shape \(T"):
        bj.cells.run("rnn", params, carry, xs[0, 0])
    with pytest.raises(TypeError, match=r"run\(hoist=...\) expects True or False"):
        bj.cells.run("rnn", params, carry, xs, hoist="yes")
    with pytest.raises(TypeError, match="got the class Nested"):
        bj.cells.run("rnn", params, carry, xs, remat=bj.Nested)
    for bad in (2.0, True, "2", "Auto"):
        with pytest.raises(TypeError, match=r"run\(batch_chunks=...\) expects a positive int or"):
            bj.cells.run("rnn", params, carry, xs, batch_chunks=bad)
    with pytest.raises(ValueError, match=r"choose_batch_chunks\(xs=...\) expects an array"):
        bj.cells.choose_batch_chunks("rnn", params, carry, xs[0, 0])
    with pytest.raises(TypeError, match=r"choose_batch_chunks\(hoist=...\) expects True"):
        bj.cells.choose_batch_chunks("rnn", params, carry, xs, hoist=1)
    with pytest.raises(ValueError, match=r"the hidden state must have shape \(\.\.\., 4\)"):
        bj.cells.choose_batch_chunks("rnn", params, carry[:, :2], xs)
    with pytest.raises(ValueError, match=r"run\(batch_chunks=...\) must be at least 1, got 0"):
        bj.cells.run("rnn", params, carry, xs, batch_chunks=0)
    with pytest.raises(TypeError, match="truncation"):
        bj.cells.run("rnn", params, carry, xs, truncation=3)
    with pytest.raises(ValueError, match="hidden state must have shape"):
        bj.cells.run("rnn", params, jnp.zeros((B, H + 1)), xs)


@pytest.mark.parametrize("cell", CELLS)
def test_batch_major_xs_is_refused_with_the_fix(cell):
    c, params, carry, xs = problem(cell, 5, batch=(3,))
    batch_major = jnp.swapaxes(xs, 0, 1)  # (B, T, D), as batch_first layers take
    with pytest.raises(
        ValueError,
        match=r"run\(xs=...\): time is the leading axis of xs.*\(T, 3, input_size\); got xs of "
        r"shape \(3, 5, 3\) for a carry of shape \(3, 4\); xs looks batch-major.*"
        r"jnp\.swapaxes\(xs, 0, 1\)",
    ):
        bj.cells.run(cell, params, carry, batch_major)
    with pytest.raises(ValueError, match=r"choose_batch_chunks\(xs=...\): time is the leading"):
        bj.cells.choose_batch_chunks(cell, params, carry, batch_major)
    # a batch that swapping does not fix: no hint
    with pytest.raises(ValueError, match=r"carry's batch shape \(3,\)") as err:
        bj.cells.run(cell, params, carry, jnp.ones((5, 2, D)))
    assert "swapaxes" not in str(err.value)
    # the fix works
    assert_trees_close(
        bj.cells.run(cell, params, carry, jnp.swapaxes(batch_major, 0, 1)),
        bj.scan(functools.partial(c.step, params), carry, xs),
    )


def test_another_cells_parameters_are_named():
    _, rnn_params, carry, xs = problem("rnn", 3)
    with pytest.raises(
        ValueError,
        match=r"run\(params=...\): the 'gru' cell expects parameters with keys \['W_h', 'W_x', "
        r"'b_hn', 'b_x'\], got keys \['W_hh', 'W_xh', 'b_h'\] \(the parameters of the 'rnn' "
        r"cell\)",
    ) as err:
        bj.cells.run("gru", rnn_params, carry, xs)
    assert isinstance(err.value.__cause__, KeyError)
    _, lstm_params, _, _ = problem("lstm", 3)
    with pytest.raises(ValueError, match=r"'gru' cell expects.*\(the parameters of the 'lstm'"):
        bj.cells.run("gru", lstm_params, carry, xs, remat=bj.EveryStep())
    with pytest.raises(ValueError, match=r"'rnn' cell expects parameters with keys"):
        bj.cells.choose_batch_chunks("rnn", lstm_params, carry, xs)
    # a cell without a Split runs bj.scan of its step: the same error
    plain = bj.cells.Cell("plain_gru", bj.cells.gru, bj.cells.init_gru)
    with pytest.raises(ValueError, match=r"the 'plain_gru' cell expects parameters with keys"):
        bj.cells.run(plain, rnn_params, carry, xs)


def test_nested_lengths_are_checked_before_the_step_is_traced():
    calls = []

    def counted(params, h, x):
        calls.append(1)
        return bj.cells.rnn(params, h, x)

    cell = bj.cells.Cell("counted", counted, bj.cells.init_rnn, split=bj.cells.RNN_SPLIT)
    _, params, carry, xs = problem("rnn", 10)
    with pytest.raises(ValueError, match=r"covers only 4 steps.*length 10"):
        bj.cells.run(cell, params, carry, xs, remat=bj.Nested(lengths=(2, 2)))
    assert calls == []
    bj.cells.run(cell, params, carry, xs, remat=bj.Nested(lengths=(2, 5)))
    assert calls
