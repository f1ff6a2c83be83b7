"""bpttjax.reference: d2l's BPTT formulas against jax.grad through bj.scan."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpttjax as bj
from bpttjax import reference as ref

D, H, Q = 3, 5, 2
RTOL = 1e-10
FD_STEP = 1e-6
FD_RTOL = 1e-7
WEIGHTS = ("W_hx", "W_hh", "W_qh", "h0")
STORE_ALL = bj.StoreAll()
REMATS = [pytest.param(bj.StoreAll(), id="StoreAll"), pytest.param(bj.EveryStep(), id="EveryStep")]


def _problem(T, d=D, h=H, q=Q, radius=0.9, seed=0):
    """Random linear RNN whose W_hh has spectral radius ``radius``."""
    rng = np.random.default_rng([seed, T, d, h, q])
    W_hh = rng.standard_normal((h, h))
    W_hh *= radius / np.max(np.abs(np.linalg.eigvals(W_hh)))
    return {
        "W_hx": rng.standard_normal((h, d)) / np.sqrt(d),
        "W_hh": W_hh,
        "W_qh": rng.standard_normal((q, h)) / np.sqrt(h),
        "h0": rng.standard_normal(h),
        "xs": rng.standard_normal((T, d)),
        "ys": rng.standard_normal((T, q)),
    }


def _reference(p):
    return ref.linear_rnn_squared_loss(p["W_hx"], p["W_hh"], p["W_qh"], p["xs"], p["ys"], p["h0"])


def _jax_loss(weights, deltas, xs, ys, remat):
    """The same loss as a bj.scan step; ``deltas[t]`` is added to h_t so that
    the gradient with respect to it is ∂L/∂h_t."""
    W_hx, W_hh, W_qh, h0 = weights

    def step(h, inp):
        x, y, delta = inp
        h = W_hx @ x + W_hh @ h + delta
        err = W_qh @ h - y
        return h, 0.5 * jnp.sum(err * err)

    _, losses = bj.scan(step, h0, (xs, ys, deltas), remat=remat)
    return jnp.mean(losses)


@functools.partial(jax.jit, static_argnames="remat")
def _jax_value_and_grads(weights, xs, ys, remat):
    deltas = jnp.zeros((xs.shape[0], weights[1].shape[0]), xs.dtype)
    grad_fn = jax.value_and_grad(_jax_loss, argnums=(0, 1))
    return grad_fn(weights, deltas, xs, ys, remat)


def _jax(p, remat=STORE_ALL):
    """JAX loss and gradients as NumPy: (loss, {name: grad}, dL_dh)."""
    weights = tuple(jnp.asarray(p[k]) for k in WEIGHTS)
    loss, (g_weights, dL_dh) = _jax_value_and_grads(
        weights, jnp.asarray(p["xs"]), jnp.asarray(p["ys"]), remat
    )
    grads = {k: np.asarray(g) for k, g in zip(WEIGHTS, g_weights, strict=True)}
    return float(loss), grads, np.asarray(dL_dh)


def _ref_dict(g):
    return {"W_hx": g.dL_dW_hx, "W_hh": g.dL_dW_hh, "W_qh": g.dL_dW_qh, "h0": g.dL_dh0}


def _rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def _rel_errs(got, want):
    return {k: _rel_err(got[k], want[k]) for k in want}


def _assert_small(errs, rtol):
    bad = {k: e for k, e in errs.items() if not e < rtol}
    assert not bad, f"relative errors above {rtol:g}: {bad}"


@pytest.mark.parametrize("remat", REMATS)
@pytest.mark.parametrize("T", [1, 2, 17, 100, 1000])
def test_jax_grad_through_scan_matches_reference(T, remat):
    p = _problem(T)
    loss, grads = _reference(p)
    jax_loss, jax_grads, jax_dL_dh = _jax(p, remat)

    assert jax_loss == pytest.approx(loss, rel=RTOL)
    _assert_small(_rel_errs(jax_grads, _ref_dict(grads)), RTOL)
    assert grads.dL_dh.shape == jax_dL_dh.shape == (T, H)
    _assert_small({"dL_dh": _rel_err(jax_dL_dh, grads.dL_dh)}, RTOL)
    # Every step's ∂L/∂h_t, not only the whole array, within tolerance.
    per_step = np.linalg.norm(jax_dL_dh - grads.dL_dh, axis=1)
    assert np.all(per_step <= RTOL * np.linalg.norm(grads.dL_dh, axis=1))


def test_forward_matches_jax_scan():
    p = _problem(17)
    hs, os = ref.linear_rnn_forward(p["W_hx"], p["W_hh"], p["W_qh"], p["xs"], p["h0"])

    def step(h, x):
        h = jnp.asarray(p["W_hx"]) @ x + jnp.asarray(p["W_hh"]) @ h
        return h, (h, jnp.asarray(p["W_qh"]) @ h)

    _, (jhs, jos) = bj.scan(step, jnp.asarray(p["h0"]), jnp.asarray(p["xs"]))
    assert hs.shape == (17, H) and os.shape == (17, Q)
    np.testing.assert_allclose(hs, jhs, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(os, jos, rtol=1e-12, atol=1e-14)


def test_general_loss_gradient_via_dl_do():
    """linear_rnn_grads works for any l given ∂l/∂o_t; here l(o, y) = Σ sin(o)·y."""
    p = _problem(17)
    args = (p["W_hx"], p["W_hh"], p["W_qh"], p["xs"])
    _, os = ref.linear_rnn_forward(*args, p["h0"])
    grads = ref.linear_rnn_grads(*args, np.cos(os) * p["ys"], p["h0"])

    def loss(weights):
        W_hx, W_hh, W_qh, h0 = weights

        def step(h, inp):
            x, y = inp
            h = W_hx @ x + W_hh @ h
            return h, jnp.sum(jnp.sin(W_qh @ h) * y)

        _, ls = bj.scan(step, h0, (jnp.asarray(p["xs"]), jnp.asarray(p["ys"])))
        return jnp.mean(ls)

    jax_grads = jax.grad(loss)(tuple(jnp.asarray(p[k]) for k in WEIGHTS))
    got = dict(zip(WEIGHTS, jax_grads, strict=True))
    _assert_small(_rel_errs(got, _ref_dict(grads)), RTOL)


def test_expanded_sum_equals_recursion():
    T = 12
    p = _problem(T)
    _, grads = _reference(p)
    _, os = ref.linear_rnn_forward(p["W_hx"], p["W_hh"], p["W_qh"], p["xs"], p["h0"])
    expanded = ref.dL_dh_expanded(p["W_hh"], p["W_qh"], (os - p["ys"]) / T)
    assert expanded.shape == (T, H)
    assert _rel_err(expanded, grads.dL_dh) < RTOL
    np.testing.assert_allclose(expanded, grads.dL_dh, rtol=RTOL, atol=RTOL * 1e-3)


def test_expanded_sum_shows_geometric_vanishing():
    """With W_hh = ρ·(orthogonal), the last output's gradient reaches h_t scaled
    by exactly ρ^(T-t): the powers of W_hhᵀ in d2l eq. 9.7.15."""
    T, rho = 30, 0.5
    rng = np.random.default_rng(1)
    orth, _ = np.linalg.qr(rng.standard_normal((H, H)))
    W_qh = rng.standard_normal((Q, H))
    dL_do = np.zeros((T, Q))
    dL_do[-1] = rng.standard_normal(Q)
    norms = np.linalg.norm(ref.dL_dh_expanded(rho * orth, W_qh, dL_do), axis=1)
    want = rho ** np.arange(T - 1, -1, -1) * np.linalg.norm(W_qh.T @ dL_do[-1])
    np.testing.assert_allclose(norms, want, rtol=1e-12)


def test_finite_differences_match_reference_and_jax_grad():
    p = _problem(4, d=2, h=3, q=2)
    _, grads = _reference(p)
    _, jax_grads, _ = _jax(p)

    fd = {}
    for name in WEIGHTS:
        fd[name] = np.empty_like(p[name])
        for idx in np.ndindex(p[name].shape):
            plus, minus = dict(p), dict(p)
            plus[name], minus[name] = p[name].copy(), p[name].copy()
            plus[name][idx] += FD_STEP
            minus[name][idx] -= FD_STEP
            fd[name][idx] = (_reference(plus)[0] - _reference(minus)[0]) / (2 * FD_STEP)

    _assert_small(_rel_errs(fd, _ref_dict(grads)), FD_RTOL)
    _assert_small(_rel_errs(fd, jax_grads), FD_RTOL)


def test_default_h0_is_zeros_and_inputs_become_float64():
    p = _problem(5)
    args = (p["W_hx"], p["W_hh"], p["W_qh"], p["xs"], p["ys"])
    loss, grads = ref.linear_rnn_squared_loss(*args)
    loss0, grads0 = ref.linear_rnn_squared_loss(*args, np.zeros(H))
    assert loss == loss0
    for a, b in zip(grads, grads0, strict=True):
        np.testing.assert_array_equal(a, b)

    int_args = [np.round(3 * a).astype(np.int32) for a in args]
    _, g_int = ref.linear_rnn_squared_loss(*int_args[:3], jnp.asarray(int_args[3]), int_args[4])
    _, g_f64 = ref.linear_rnn_squared_loss(*[a.astype(np.float64) for a in int_args])
    for a, b in zip(g_int, g_f64, strict=True):
        assert a.dtype == np.float64
        np.testing.assert_array_equal(a, b)


def _bad_shape_cases():
    p = _problem(7)
    model = (p["W_hx"], p["W_hh"], p["W_qh"], p["xs"])
    sq, grads, fwd = ref.linear_rnn_squared_loss, ref.linear_rnn_grads, ref.linear_rnn_forward
    W_hx, W_hh, W_qh, xs = model
    cases = {
        "W_hx_1d": (fwd, (W_hx[0], W_hh, W_qh, xs), "W_hx=...) expects shape (h, d), got (3,)"),
        "W_hh": (fwd, (W_hx, W_hh[:4], W_qh, xs), "W_hh=...) expects shape (h, h) = (5, 5)"),
        "W_qh": (fwd, (W_hx, W_hh, W_qh[:, :4], xs), "W_qh=...) expects shape (q, h) = (q, 5)"),
        "xs": (fwd, (W_hx, W_hh, W_qh, xs[:, :2]), "xs=...) expects shape (T, d) = (T, 3)"),
        "xs_empty": (fwd, (W_hx, W_hh, W_qh, xs[:0]), "xs=...) needs at least one time step"),
        "h0": (fwd, (*model, np.zeros(4)), "h0=...) expects shape (h,) = (5,)"),
        "ys": (sq, (*model, p["ys"][:3]), "ys=...) expects shape (T, q) = (7, 2)"),
        "dl_do": (grads, (*model, np.zeros((7, 3))), "dl_do=...) expects shape (T, q) = (7, 2)"),
        "expanded": (
            ref.dL_dh_expanded,
            (W_hh, W_qh, np.zeros((7, 3))),
            "dL_do=...) expects shape (T, q) = (T, 2)",
        ),
        "expanded_square": (ref.dL_dh_expanded, (W_hh[:, :4], W_qh, np.zeros((7, 2))), "W_hh"),
    }
    return [pytest.param(*case, id=name) for name, case in cases.items()]


@pytest.mark.parametrize("fn, args, message", _bad_shape_cases())
def test_bad_shapes_raise_value_error_naming_the_argument(fn, args, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        fn(*args)
    assert str(info.value).startswith(fn.__name__ + "(")


def test_complex_input_is_a_type_error():
    p = _problem(3)
    with pytest.raises(TypeError, match=r"ys=\.\.\.\) expects a real numeric array"):
        ref.linear_rnn_squared_loss(p["W_hx"], p["W_hh"], p["W_qh"], p["xs"], p["ys"] + 0j)


def test_comparison_can_fail_when_W_hh_is_perturbed():
    """The tolerance is meaningful: a 1e-6 change of W_hh is caught."""
    p = _problem(100)
    _, jax_grads, _ = _jax(p)
    perturbed = dict(p, W_hh=p["W_hh"] + 1e-6 * np.random.default_rng(2).standard_normal((H, H)))
    errs = _rel_errs(jax_grads, _ref_dict(_reference(perturbed)[1]))
    assert errs["W_hh"] > 1e3 * RTOL
    with pytest.raises(AssertionError, match="relative errors above"):
        _assert_small(errs, RTOL)
