"""bj.nnx.RNN and bj.linen.RNN against Flax's own nnx.RNN and nn.RNN.

Same outputs, final carries, gradients (with respect to the parameters and
the inputs) and variables, for Flax's four cells (which run the library's
fast path) and a cell of the user's own (which runs as Flax calls it), under
StoreAll and a rematerializing strategy.

Compiling is what costs here (the sizes are tiny), so each test compiles one
program holding Flax's module and ours, with XLA's optimizations off: they
do not change what is compared.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import assert_trees_close

import bpttjax as bj
from bpttjax import _flax

D, H, B, T = 3, 4, 2, 9
F64 = jnp.float64
STRATEGIES = (bj.StoreAll(), bj.Nested(2))
NNX_FAST = {"SimpleCell": "rnn", "GRUCell": "gru", "LSTMCell": "lstm", "OptimizedLSTMCell": "lstm"}
LINEN_CELLS = ("SimpleCell", "GRUCell", "LSTMCell", "OptimizedLSTMCell", "LinenUserCell")


@pytest.fixture(autouse=True)
def fast_compile():
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture
def fast_calls(monkeypatch):
    """The names of the cells the fast path runs, as it runs them."""
    calls = []
    fast_scan = _flax.fast_scan

    def spy(name, *args, **kw):
        calls.append(name)
        return fast_scan(name, *args, **kw)

    monkeypatch.setattr(_flax, "fast_scan", spy)
    return calls


class CountingCell(nnx.Module):
    """A user's cell: not a Flax class, and it updates a non-parameter variable every step."""

    num_feature_axes = 1

    def __init__(self, rngs):
        self.lin = nnx.Linear(D + H, H, param_dtype=F64, rngs=rngs)
        self.steps = nnx.Variable(jnp.zeros((), F64))

    def __call__(self, h, x):
        self.steps[...] = self.steps[...] + 1.0
        h = jnp.tanh(self.lin(jnp.concatenate([x, h], axis=-1))) * (1.0 + 0.1 * self.steps[...])
        return h, h

    def initialize_carry(self, input_shape, rngs=None):
        return jnp.zeros((*input_shape[:-1], H), F64)


def nnx_cell(kind, seed=0):
    if kind == "CountingCell":
        return CountingCell(nnx.Rngs(seed))
    kw = dict(param_dtype=F64, rngs=nnx.Rngs(seed), bias_init=nnx.initializers.normal(1.0))
    if kind == "SimpleCell":
        kw["dtype"] = F64  # nnx.SimpleCell computes in float32 unless told
    return getattr(nnx, kind)(D, H, **kw)


class LinenUserCell(nn.Module):
    """A user's Linen cell (a minimal gated unit)."""

    @nn.compact
    def __call__(self, h, x):
        z = nn.sigmoid(nn.Dense(H, param_dtype=F64, name="z")(jnp.concatenate([x, h], -1)))
        n = jnp.tanh(nn.Dense(H, param_dtype=F64, name="n")(jnp.concatenate([x, z * h], -1)))
        h = (1.0 - z) * h + z * n
        return h, h

    @nn.nowrap
    def initialize_carry(self, rng, input_shape):
        return jnp.zeros((*input_shape[:-1], H), F64)

    @property
    def num_feature_axes(self):
        return 1


def linen_cell(kind):
    if kind == "LinenUserCell":
        return LinenUserCell()
    return getattr(nn, kind)(H, param_dtype=F64, bias_init=nn.initializers.normal(1.0))


def inputs(time_major=False):
    x = jax.random.normal(jax.random.key(1), (B, T, D), F64)
    return jnp.swapaxes(x, 0, 1) if time_major else x


def loss(out):
    """A scalar that weighs every output and carry entry differently."""
    return sum(jnp.sum(jnp.sin(leaf + 0.1 * i)) for i, leaf in enumerate(jax.tree.leaves(out)))


def nnx_results(cases):
    """For each ``(model, x, call_kwargs)``: the outputs, the gradients w.r.t. the
    parameters and ``x``, and the model's variables after the call; one program."""
    models, xs, calls = zip(*cases, strict=True)

    @nnx.jit
    def run(models, xs):
        results = []
        for model, x, call in zip(models, xs, calls, strict=True):
            f = lambda m, x, call=call: (loss(out := m(x, **call)), out)
            (_, out), grads = nnx.value_and_grad(f, argnums=(0, 1), has_aux=True)(model, x)
            results.append((out, grads))
        return results

    results = run(models, xs)
    state = lambda m: nnx.to_pure_dict(nnx.state(m, nnx.Not(nnx.RngState)))
    return [(*r, state(m)) for r, m in zip(results, models, strict=True)]


@pytest.mark.parametrize("kind", [*NNX_FAST, "CountingCell"])
def test_nnx_matches_flax(kind, fast_calls):
    """StoreAll and a rematerializing strategy against nnx.RNN, the fast path where it applies."""
    x = inputs()
    models = [nnx.RNN(nnx_cell(kind), return_carry=True)] + [
        bj.nnx.RNN(nnx_cell(kind), remat=remat, return_carry=True) for remat in STRATEGIES
    ]
    want, *got = nnx_results([(model, x, {}) for model in models])
    for result in got:
        assert_trees_close(result, want)
    assert fast_calls == ([NNX_FAST[kind]] * len(STRATEGIES) if kind in NNX_FAST else [])
    # the same state tree as nnx.RNN's: one loads into the other
    assert jax.tree.structure(nnx.state(models[1])) == jax.tree.structure(nnx.state(models[0]))
    nnx.update(models[1], nnx.state(nnx.RNN(nnx_cell(kind, seed=5))))
    assert_trees_close(nnx.state(models[1].cell), nnx.state(nnx_cell(kind, seed=5)))


SEQ = jnp.array([5, T])
OPTIONS = {
    "time_major-reverse": ({"time_major": True, "reverse": True}, {}),
    "reverse-keep_order": ({}, {"reverse": True, "keep_order": True}),
    "seq_lengths": ({"return_carry": True}, {"seq_lengths": SEQ}),
    "seq_lengths-reverse": (
        {"reverse": True},
        {"seq_lengths": SEQ, "return_carry": True, "keep_order": True},
    ),
}
"""Flax's layout options: (constructor arguments, call arguments)."""


@pytest.mark.parametrize("option", OPTIONS)
def test_nnx_options(option, fast_calls):
    """Each option on the fast path (LSTM, whose carry is reordered) and the generic one."""
    ctor, call = OPTIONS[option]
    x = inputs(ctor.get("time_major"))
    cases = [
        (rnn(nnx_cell(kind), **ctor), x, call)
        for kind in ("LSTMCell", "CountingCell")
        for rnn in (nnx.RNN, functools.partial(bj.nnx.RNN, remat=bj.Nested(2)))
    ]
    want_lstm, got_lstm, want_user, got_user = nnx_results(cases)
    assert_trees_close(got_lstm, want_lstm)
    assert_trees_close(got_user, want_user)
    assert fast_calls == ["lstm"]
    assert float(cases[3][0].cell.steps[...]) == T  # the counter, carried and written back


def test_nnx_fast_path_only_for_known_math(fast_calls):
    """Other activations, a residual connection or a cast to float32 run the cell as Flax does."""
    cells = [
        lambda: nnx.GRUCell(D, H, activation_fn=jax.nn.relu, param_dtype=F64, rngs=nnx.Rngs(0)),
        lambda: nnx.SimpleCell(D, H, residual=True, dtype=F64, param_dtype=F64, rngs=nnx.Rngs(0)),
        lambda: nnx.SimpleCell(D, H, rngs=nnx.Rngs(0)),  # computes in float32
    ]
    x, x32 = inputs(), inputs().astype(jnp.float32)
    cases = [(rnn(cell()), x, {}) for cell in cells for rnn in (nnx.RNN, bj.nnx.RNN)]
    # float32 everywhere: the fast path again
    cases += [(rnn(cells[2]()), x32, {}) for rnn in (nnx.RNN, bj.nnx.RNN)]
    results = nnx_results(cases)
    as64 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)
    for want, got in zip(results[::2], results[1::2], strict=True):
        assert_trees_close(as64(got), as64(want), rtol=1e-6)
    assert fast_calls == ["rnn"]


def test_nnx_remat_rematerializes():
    """EveryStep's jax.checkpoint reaches the gradient's program; StoreAll has none."""
    x = inputs()

    def jaxpr(remat):
        model = bj.nnx.RNN(nnx_cell("GRUCell"), remat=remat, rngs=False)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        f = lambda p: loss(nnx.merge(graphdef, p, rest)(x, initial_carry=jnp.zeros((B, H), F64)))
        return str(jax.make_jaxpr(jax.grad(f))(params))

    remat = {"remat2", "checkpoint"}  # jax.checkpoint's primitive, by its old and new names
    assert remat & set(re.findall(r"(\w+)\[", jaxpr(bj.EveryStep())))
    assert not remat & set(re.findall(r"(\w+)\[", jaxpr(bj.StoreAll())))


def test_nnx_truncation():
    """The module's Truncate and a per-call RandomTruncate cut as bj.scan does."""
    cell = nnx_cell("GRUCell")
    step, params = bj.cells.from_nnx(cell)
    random = bj.RandomTruncate(jax.random.key(3), keep_prob=0.5)
    truncations = (bj.Truncate(every=3), random, None)

    @nnx.jit
    def run(truncated, randomized, params, x):
        grad = lambda m, **kw: nnx.grad(lambda m, x: loss(m(x, **kw)), argnums=(0, 1))(m, x)
        got = [grad(truncated), grad(randomized, truncation=random)]
        h0, xs = jnp.zeros((B, H), F64), jnp.swapaxes(x, 0, 1)
        f = lambda p, xs, tr: loss(bj.scan(functools.partial(step, p), h0, xs, truncation=tr)[1])
        return got, [jax.grad(f, argnums=(0, 1))(params, xs, tr) for tr in truncations]

    models = bj.nnx.RNN(cell, truncation=truncations[0]), bj.nnx.RNN(cell, remat=bj.Binomial(2))
    got, (*want, full) = run(*models, params, inputs())
    for (g_model, g_x), (g_params, g_xs) in zip(got, want, strict=True):
        assert_trees_close(nnx.to_pure_dict(g_model["cell"]), nnx.to_pure_dict(g_params))
        assert_trees_close(g_x, jnp.swapaxes(g_xs, 0, 1))
        assert not np.allclose(g_xs, full[1])


def test_nnx_optimizer_step():
    """Two optax steps through nnx.Optimizer give nnx.RNN's new parameters."""
    x = inputs()
    target = jnp.cos(jnp.arange(B * T * H, dtype=F64)).reshape(B, T, H)

    @nnx.jit
    def train_steps(models, optimizers):
        for model, optimizer in zip(models, optimizers, strict=True):
            for _ in range(2):
                grads = nnx.grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
                optimizer.update(model, grads)

    models = (
        nnx.RNN(nnx_cell("OptimizedLSTMCell")),
        bj.nnx.RNN(nnx_cell("OptimizedLSTMCell"), remat=bj.EveryStep()),
    )
    optimizers = [nnx.Optimizer(m, optax.sgd(0.5, momentum=0.9), wrt=nnx.Param) for m in models]
    train_steps(models, optimizers)
    want, got = (nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in models)
    assert_trees_close(got, want)
    before = nnx.to_pure_dict(nnx.state(nnx_cell("OptimizedLSTMCell"), nnx.Param))
    assert not np.allclose(got["cell"]["dense_h"]["kernel"], before["dense_h"]["kernel"])


def linen_results(modules, x, inits=2, **call):
    """The first ``inits`` modules' ``init`` variables; then, with the first module's
    variables, each one's outputs and gradients w.r.t. the variables and the inputs; one
    program."""

    @jax.jit
    def run(key, x):
        variables = [module.init(key, x) for module in modules[:inits]]
        results = []
        for module in modules:
            f = lambda v, x, module=module: (loss(out := module.apply(v, x, **call)), out)
            (_, out), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(variables[0], x)
            results.append((out, grads))
        return variables, results

    return run(jax.random.key(2), x)


@pytest.mark.parametrize("kind", LINEN_CELLS)
def test_linen_matches_flax(kind, fast_calls):
    """StoreAll and a rematerializing strategy against nn.RNN, and the same ``init``."""
    modules = [nn.RNN(linen_cell(kind), return_carry=True)] + [
        bj.linen.RNN(linen_cell(kind), return_carry=True, remat=remat) for remat in STRATEGIES
    ]
    (want_vars, got_vars), (want, *got) = linen_results(modules, inputs())
    # the same variables, even their initial values: Flax's parameters load as they are
    assert_trees_close(got_vars, want_vars)
    for result in got:
        assert_trees_close(result, want)
    assert bool(fast_calls) == (kind != "LinenUserCell")


@pytest.mark.parametrize(
    ("kind", "option"),
    [("LSTMCell", "seq_lengths-reverse"), ("LinenUserCell", "time_major-reverse")],
)
def test_linen_options(kind, option):
    ctor, call = OPTIONS[option]
    modules = [
        nn.RNN(linen_cell(kind), **ctor),
        bj.linen.RNN(linen_cell(kind), remat=bj.Nested(2), **ctor),
    ]
    _, (want, got) = linen_results(modules, inputs(ctor.get("time_major")), **call)
    assert_trees_close(got, want)


def test_batch_chunks(monkeypatch):
    """``batch_chunks`` reaches ``bj.cells.run`` on the fast path, with Flax's results."""
    chunks = []
    run = _flax.run_cell
    assert run is bj.cells.run

    def spy(*args, batch_chunks=1, **kw):
        chunks.append(batch_chunks)
        return run(*args, batch_chunks=batch_chunks, **kw)

    monkeypatch.setattr(_flax, "run_cell", spy)
    x = jnp.concatenate([inputs()] * 2)  # 4 rows: two groups of 2
    models = [
        nnx.RNN(nnx_cell("LSTMCell"), return_carry=True),
        bj.nnx.RNN(nnx_cell("LSTMCell"), return_carry=True, batch_chunks=2),
    ]
    want, got = nnx_results([(model, x, {}) for model in models])
    assert_trees_close(got, want)
    modules = [
        nn.RNN(linen_cell("GRUCell"), reverse=True),
        bj.linen.RNN(linen_cell("GRUCell"), reverse=True, batch_chunks=3),
    ]
    _, (want, got) = linen_results(modules, x)
    assert_trees_close(got, want)
    assert sorted(set(chunks)) == [2, 3]


def test_errors():
    gru = nnx_cell("GRUCell")
    with pytest.raises(ValueError, match=r"RNN\(batch_chunks=\.\.\.\) must be at least 1"):
        bj.nnx.RNN(gru, batch_chunks=0)
    with pytest.raises(TypeError, match=r"RNN\(batch_chunks=\.\.\.\) expects a positive int"):
        bj.linen.RNN(nn.GRUCell(H), batch_chunks=1.5)
    with pytest.raises(TypeError, match=r"RNN\(remat=\.\.\.\) expects a bpttjax remat strategy"):
        bj.nnx.RNN(gru, remat="binomial")
    with pytest.raises(TypeError, match=r"got the class Binomial; write remat=Binomial\("):
        bj.nnx.RNN(gru, remat=bj.Binomial)
    with pytest.raises(TypeError, match=r"RNN\(truncation=\.\.\.\) expects .* got int"):
        bj.nnx.RNN(gru, truncation=5)
    with pytest.raises(TypeError, match=r"cannot hold arrays.*rnn\(x, truncation=\.\.\.\)"):
        bj.nnx.RNN(gru, truncation=bj.RandomTruncate(jax.random.key(0)))
    with pytest.raises(TypeError, match=r"RNN\.__call__\(remat=\.\.\.\).*class Nested"):
        bj.nnx.RNN(gru)(inputs(), remat=bj.Nested)
    with pytest.raises(NotImplementedError, match=r"state_axes"):
        bj.nnx.RNN(gru, state_axes={})
    with pytest.raises(TypeError, match=r"got the class GRUCell"):
        bj.nnx.RNN(nnx.GRUCell)
    with pytest.raises(TypeError, match=r"use bj\.linen\.RNN"):
        bj.nnx.RNN(nn.GRUCell(H))
    with pytest.raises(TypeError, match=r"RNN\(remat=\.\.\.\) expects a bpttjax remat strategy"):
        bj.linen.RNN(nn.GRUCell(H), remat="binomial")
    with pytest.raises(TypeError, match=r"RNN\(truncation=\.\.\.\) expects .* got Binomial"):
        bj.linen.RNN(nn.GRUCell(H), truncation=bj.Binomial(2))
    with pytest.raises(NotImplementedError, match=r"variable_carry"):
        bj.linen.RNN(nn.GRUCell(H), variable_carry="batch_stats")
    with pytest.raises(TypeError, match=r"use bj\.nnx\.RNN"):
        bj.linen.RNN(gru)
