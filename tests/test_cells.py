"""bpttjax.cells: shapes, Flax equivalence, adapters, checkpoint names, errors."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

import bpttjax as bj
from bpttjax import cells

F64 = jnp.float64
D, H, B, T = 5, 4, 3, 6
RTOL, ATOL = 1e-12, 1e-12
STEPS = {"rnn": cells.rnn, "gru": cells.gru, "lstm": cells.lstm}
INITS = {"rnn": cells.init_rnn, "gru": cells.init_gru, "lstm": cells.init_lstm}
GATES = {"rnn": 1, "gru": 3, "lstm": 4}


def close(a, b):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=RTOL, atol=ATOL), a, b)


def normal(rng, shape, dtype=F64):
    # NumPy draws: eager jax.random compiles one program per shape, too slow here.
    return jnp.asarray(rng.standard_normal(shape), dtype)


def random_params(kind, seed=0, dtype=F64):
    """Our params with every array random (biases included), so misplaced biases show."""
    init = functools.partial(INITS[kind], input_size=D, hidden_size=H, dtype=dtype)
    shapes = jax.eval_shape(init, jax.random.key(0))
    rng = np.random.default_rng(seed)
    return {name: normal(rng, v.shape, dtype) for name, v in shapes.items()}


def xs_and_carry(kind, seed=1, batch_shape=(B,), dtype=F64):
    rng = np.random.default_rng(seed)
    xs = normal(rng, (T, *batch_shape, D), dtype)
    h = normal(rng, (*batch_shape, H), dtype)
    carry = (h, normal(rng, h.shape, dtype)) if kind == "lstm" else h
    return xs, carry


# Flax layouts -> ours. Flax's LSTM carry is (c, h); ours is (h, c).
def _a(v):
    return jnp.asarray(v[...])


def nnx_to_ours(kind, state):
    """Map an nnx cell's parameter State (or its gradient) to our dict."""
    if kind == "rnn":  # nnx.SimpleCell
        return {
            "W_xh": _a(state["dense_i"]["kernel"]),
            "W_hh": _a(state["dense_h"]["kernel"]),
            "b_h": _a(state["dense_i"]["bias"]),
        }
    if kind == "gru":
        W_h = _a(state["dense_h"]["kernel"])
        return {
            "W_x": _a(state["dense_i"]["kernel"]),
            "W_h": W_h,
            "b_x": _a(state["dense_i"]["bias"]),
            "b_hn": jnp.zeros((W_h.shape[0],), W_h.dtype),  # nnx.GRUCell has no b_hn
        }
    inputs, hiddens = ("ii", "if_", "ig", "io"), ("hi", "hf", "hg", "ho")
    return {
        "W_x": jnp.concatenate([_a(state[k]["kernel"]) for k in inputs], 1),
        "W_h": jnp.concatenate([_a(state[k]["kernel"]) for k in hiddens], 1),
        "b": jnp.concatenate([_a(state[k]["bias"]) for k in hiddens], 0),
    }


def linen_to_ours(kind, variables):
    p = variables["params"]
    if kind == "gru":
        return {
            "W_x": jnp.concatenate([p["i" + g]["kernel"] for g in "rzn"], 1),
            "W_h": jnp.concatenate([p["h" + g]["kernel"] for g in "rzn"], 1),
            "b_x": jnp.concatenate([p["i" + g]["bias"] for g in "rzn"], 0),
            "b_hn": p["hn"]["bias"],
        }
    return {
        "W_x": jnp.concatenate([p["i" + g]["kernel"] for g in "ifgo"], 1),
        "W_h": jnp.concatenate([p["h" + g]["kernel"] for g in "ifgo"], 1),
        "b": jnp.concatenate([p["h" + g]["bias"] for g in "ifgo"], 0),
    }


def flax_carry(kind, carry):
    return carry[::-1] if kind == "lstm" else carry


def nnx_cell(kind, seed=0):
    cls = {"rnn": nnx.SimpleCell, "gru": nnx.GRUCell, "lstm": nnx.LSTMCell}[kind]
    return cls(
        D,
        H,
        param_dtype=F64,
        dtype=F64,
        bias_init=nnx.initializers.normal(1.0),
        rngs=nnx.Rngs(seed),
    )


@functools.cache
def init_params(kind, dtype=F64):
    """Our default init, computed once per kind and dtype (compiling it is the slow part)."""
    return INITS[kind](jax.random.key(0), D, H, dtype)


@functools.cache
def nnx_reference(kind):
    """An nnx cell, inputs in Flax's carry convention, and the cell run in a Python loop."""
    cell = nnx_cell(kind)
    xs, carry = xs_and_carry(kind)
    carry = flax_carry(kind, carry)
    c, ys = carry, []
    for x in xs:
        c, y = cell(c, x)
        ys.append(y)
    return cell, xs, carry, c, jnp.stack(ys)


def linen_cell(kind):
    cls = {"gru": nn.GRUCell, "lstm": nn.LSTMCell}[kind]
    return cls(features=H, param_dtype=F64, dtype=F64, bias_init=nn.initializers.normal(1.0))


@pytest.mark.parametrize(
    ("batch_shape", "dtype"), [((), jnp.float32), ((3,), F64), ((2, 3), jnp.float32)]
)
@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_shapes_and_dtypes(kind, batch_shape, dtype):
    params = init_params(kind, dtype)
    k = GATES[kind]
    assert all(v.dtype == dtype for v in params.values())
    assert params["W_x" if kind != "rnn" else "W_xh"].shape == (D, k * H)
    assert params["W_h" if kind != "rnn" else "W_hh"].shape == (H, k * H)
    carry = cells.initial_carry(kind, H, batch_shape, dtype)
    x = jnp.ones((*batch_shape, D), dtype)
    new_carry, y = jax.jit(STEPS[kind])(params, carry, x)
    assert jax.tree.structure(new_carry) == jax.tree.structure(carry)
    for leaf in [*jax.tree.leaves(new_carry), y]:
        assert leaf.shape == (*batch_shape, H)
        assert leaf.dtype == dtype
    _, ys = bj.scan(functools.partial(STEPS[kind], params), carry, jnp.stack([x, x]))
    assert ys.shape == (2, *batch_shape, H) and ys.dtype == dtype


def test_initial_carry_and_init_structure():
    h, c = cells.initial_carry("lstm", H, (2,), F64)
    assert h.shape == c.shape == (2, H) and not h.any() and not c.any()
    assert cells.initial_carry("gru", H).shape == (H,)
    # Each gate's recurrent block is orthogonal, as in Flax's per-gate kernels.
    for kind in ("rnn", "gru", "lstm"):
        params = init_params(kind)
        W_h = params["W_hh" if kind == "rnn" else "W_h"]
        for block in jnp.split(W_h, GATES[kind], axis=1):
            close(block.T @ block, jnp.eye(H, dtype=F64))
    assert not init_params("gru")["b_hn"].any()
    assert not init_params("lstm")["b"].any()


def test_rnn_matches_formula():
    p = random_params("rnn")
    xs, h = xs_and_carry("rnn")
    hs = []
    W_xh, W_hh, b_h = (np.asarray(p[k]) for k in ("W_xh", "W_hh", "b_h"))
    h_np = np.asarray(h)
    for x in np.asarray(xs):
        h_np = np.tanh(x @ W_xh + h_np @ W_hh + b_h)
        hs.append(h_np)
    h_T, ys = jax.lax.scan(functools.partial(cells.rnn, p), h, xs)
    close(ys, np.stack(hs))
    close(h_T, h_np)


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_matches_nnx_cell(kind):
    cell, xs, flax_c0, flax_T, flax_ys = nnx_reference(kind)
    params = nnx_to_ours(kind, nnx.state(cell, nnx.Param))
    assert params[{"rnn": "b_h", "gru": "b_x", "lstm": "b"}[kind]].any()  # random biases
    ours_T, ours_ys = jax.lax.scan(
        functools.partial(STEPS[kind], params), flax_carry(kind, flax_c0), xs
    )
    close(ours_ys, flax_ys)
    close(ours_T, flax_carry(kind, flax_T))


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_matches_linen_cell(kind):
    module = linen_cell(kind)
    xs, carry = xs_and_carry(kind)
    variables = module.init(jax.random.key(1), flax_carry(kind, carry), xs[0])
    params = linen_to_ours(kind, variables)
    assert params.get("b_hn", params.get("b")).any()  # biases really are random
    ours_T, ours_ys = jax.lax.scan(functools.partial(STEPS[kind], params), carry, xs)
    step = cells.from_linen(module)
    flax_T, flax_ys = bj.scan(functools.partial(step, variables), flax_carry(kind, carry), xs)
    close(ours_ys, flax_ys)
    close(ours_T, flax_carry(kind, flax_T))


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_from_nnx_scan_loop_and_grad(kind):
    cell, xs, carry, c_loop, ys_loop = nnx_reference(kind)
    step, params = cells.from_nnx(cell)
    c_T, ys = bj.scan(functools.partial(step, params), carry, xs)
    close(ys, ys_loop)
    close(c_T, c_loop)

    def loss(p, scan):
        c_T, ys = scan(functools.partial(step, p), carry, xs)
        return jnp.sum(ys**2) + jnp.sum(jax.tree.leaves(c_T)[0])

    # jit: one compilation per gradient instead of one per eager operation.
    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_bj, g_lax = grad(params, bj.scan), grad(params, jax.lax.scan)
    assert jax.tree.structure(g_bj) == jax.tree.structure(params)
    close(g_bj, g_lax)

    # Independent check: the same gradient through our own step, mapped back.
    def our_loss(p):
        c_T, ys = jax.lax.scan(functools.partial(STEPS[kind], p), flax_carry(kind, carry), xs)
        return jnp.sum(ys**2) + jnp.sum(jax.tree.leaves(flax_carry(kind, c_T))[0])

    g_ours = jax.jit(jax.grad(our_loss))(nnx_to_ours(kind, params))
    g_mapped = nnx_to_ours(kind, g_bj)
    if kind == "gru":
        del g_ours["b_hn"], g_mapped["b_hn"]  # not a parameter of nnx.GRUCell
    close(g_ours, g_mapped)


def _checkpointed(kind, *names):
    """A one-step loss under jax.checkpoint saving only ``names``, and its arguments."""
    p = random_params(kind)
    xs, carry = xs_and_carry(kind, batch_shape=(2,))

    def loss(p, carry, x):
        new_carry, y = STEPS[kind](p, carry, x)
        return jnp.sum(jnp.sin(y)) + jnp.sum(jax.tree.leaves(new_carry)[-1] ** 2)

    policy = jax.checkpoint_policies.save_only_these_names(*names)
    return jax.checkpoint(loss, policy=policy), (p, carry, xs[0])


def _saved(capsys, kind, *names):
    f, args = _checkpointed(kind, *names)
    capsys.readouterr()
    print_saved_residuals(f, *args)
    return capsys.readouterr().out


def _projections(kind, p, carry, x):
    h = jax.tree.leaves(carry)[0]
    if kind == "rnn":
        W_x, W_h, b = p["W_xh"], p["W_hh"], p["b_h"]
    else:
        W_x, W_h, b = p["W_x"], p["W_h"], p["b" if kind == "lstm" else "b_x"]
    return {"input_projection": x @ W_x + b[None], "hidden_projection": h @ W_h}


def _holds(residuals, v):
    return any(r.shape == v.shape and np.allclose(r, v, rtol=1e-12) for r in residuals)


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_checkpoint_names(kind, capsys):
    shape = f"f64[2,{GATES[kind] * H}]"
    for name, other in [
        ("input_projection", "hidden_projection"),
        ("hidden_projection", "input_projection"),
    ]:
        out = _saved(capsys, kind, name)
        named = [line for line in out.splitlines() if "named" in line]
        assert len(named) == 1, out
        assert re.match(rf"{re.escape(shape)} named '{name}'", named[0]), out
        assert other not in out
        # The saved value is the right one: the residuals of the VJP (the leaves of
        # the returned Partial) hold this projection's value and not the other's.
        f, args = _checkpointed(kind, name)
        residuals = jax.tree.leaves(jax.vjp(f, *args)[1])
        expected = _projections(kind, *args)
        assert _holds(residuals, expected[name]), residuals
        assert not _holds(residuals, expected[other]), residuals
    # A policy naming nothing of ours saves only the arguments: the test can fail.
    out = _saved(capsys, kind, "nothing")
    assert "named" not in out and "projection" not in out, out
    out = _saved(capsys, kind, "input_projection", "hidden_projection")
    assert out.count(f"{shape} named") == 2, out


@pytest.mark.parametrize("init", [cells.init_rnn, cells.init_gru, cells.init_lstm])
def test_init_rejects_bad_arguments(init):
    key = jax.random.key(0)
    name = init.__name__
    with pytest.raises(
        ValueError, match=rf"{name}\(hidden_size=\.\.\.\) expects a positive int, got 0"
    ):
        init(key, D, 0)
    with pytest.raises(
        TypeError, match=r"hidden_size=\.\.\.\) expects a positive int, got float: 2\.5"
    ):
        init(key, D, 2.5)
    with pytest.raises(ValueError, match=r"input_size=\.\.\.\) expects a positive int, got -1"):
        init(key, -1, H)
    with pytest.raises(TypeError, match=r"input_size.*got bool"):
        init(key, True, H)
    with pytest.raises(TypeError, match=r"dtype=\.\.\.\) expects a floating dtype.*int32"):
        init(key, D, H, jnp.int32)
    with pytest.raises(TypeError, match=r"floating dtype"):
        init(key, D, H, jnp.complex64)


@pytest.mark.parametrize("init", [cells.init_rnn, cells.init_gru, cells.init_lstm])
def test_init_asks_for_a_key_not_a_seed(init):
    name = init.__name__
    with pytest.raises(TypeError, match=rf"{name}\(key=\.\.\.\) .*jax\.random\.key\(0\).*int 0"):
        init(0, D, H)
    with pytest.raises(TypeError, match=rf"{name}\(key=\.\.\.\) .*jax\.random\.key\(seed\)"):
        init(0.5, D, H)
    with pytest.raises(TypeError, match=r"expects a PRNG key.*float32"):
        init(jnp.zeros(2, jnp.float32), D, H)
    with pytest.raises(ValueError, match=r"a single PRNG key, got a key array of shape \(2,\)"):
        init(jax.random.split(jax.random.key(0)), D, H)
    # a legacy raw key still works, and draws what the typed key of its seed draws
    legacy = init(jax.random.PRNGKey(3), D, H)
    typed = init(jax.random.key(3), D, H)
    jax.tree.map(np.testing.assert_array_equal, legacy, typed)
    jax.tree.map(
        np.testing.assert_array_equal, init(np.asarray(jax.random.PRNGKey(3)), D, H), typed
    )
    # under jit, keys are traced
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.jit(init, static_argnums=(1, 2))(jax.random.key(3), D, H),
        typed,
    )


def test_initial_carry_rejects_bad_arguments():
    with pytest.raises(
        ValueError,
        match=r"kind=\.\.\.\) expects one of \['gru', 'lstm', 'rnn'\], got 'transformer'",
    ):
        cells.initial_carry("transformer", H)
    with pytest.raises(ValueError, match=r"hidden_size.*got 0"):
        cells.initial_carry("rnn", 0)
    with pytest.raises(TypeError, match=r"batch_shape.*non-negative ints"):
        cells.initial_carry("rnn", H, (2, -1))
    with pytest.raises(TypeError, match=r"floating dtype"):
        cells.initial_carry("lstm", H, dtype=jnp.int32)


def test_adapters_reject_non_modules():
    with pytest.raises(
        TypeError, match=r"from_nnx expects a flax\.nnx\.Module instance, got object"
    ):
        cells.from_nnx(object())
    with pytest.raises(TypeError, match=r"got the class GRUCell; construct the cell first"):
        cells.from_nnx(nnx.GRUCell)
    with pytest.raises(TypeError, match=r"from_nnx expects a flax\.nnx\.Module.*got GRUCell"):
        cells.from_nnx(nn.GRUCell(features=H))
    with pytest.raises(TypeError, match=r"from_linen expects a flax\.linen\.Module.*got GRUCell"):
        cells.from_linen(nnx_cell("gru"))
    with pytest.raises(TypeError, match=r"from_linen expects a flax\.linen\.Module.*got function"):
        cells.from_linen(cells.gru)


def test_steps_reject_mismatched_shapes():
    p = init_params("gru")
    with pytest.raises(
        ValueError, match=rf"gru: x must have shape \(\.\.\., {D}\).*got \(3, {D + 1}\)"
    ):
        cells.gru(p, jnp.zeros((3, H), F64), jnp.zeros((3, D + 1), F64))
    with pytest.raises(ValueError, match=rf"hidden state must have shape \(\.\.\., {H}\)"):
        cells.gru(p, jnp.zeros((3, H + 1), F64), jnp.zeros((3, D), F64))
    with pytest.raises(ValueError, match=r"same batch dimensions"):
        cells.gru(p, jnp.zeros((H,), F64), jnp.zeros((3, D), F64))
    with pytest.raises(TypeError, match=r"lstm: carry must be a pair \(h, c\)"):
        cells.lstm(init_params("lstm"), jnp.zeros((H,), F64), jnp.zeros((D,), F64))
