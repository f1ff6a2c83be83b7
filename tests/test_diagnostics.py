"""bpttjax.diagnostics: per-step carry gradients, norms and Jacobian spectra."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpttjax as bj
from bpttjax import diagnostics as dg
from bpttjax import reference as ref

D, H, Q = 3, 5, 2
RTOL = 1e-10
REMATS = [
    pytest.param(bj.StoreAll(), id="StoreAll"),
    pytest.param(bj.EveryStep(), id="EveryStep"),
    pytest.param(bj.Nested(levels=2), id="Nested2"),
]


def _problem(T, h=H, radius=0.9, seed=0):
    rng = np.random.default_rng([seed, T, h])
    W_hh = rng.standard_normal((h, h))
    W_hh *= radius / np.max(np.abs(np.linalg.eigvals(W_hh)))
    return {
        "W_hx": rng.standard_normal((h, D)) / np.sqrt(D),
        "W_hh": W_hh,
        "W_qh": rng.standard_normal((Q, h)) / np.sqrt(h),
        "h0": rng.standard_normal(h),
        "xs": rng.standard_normal((T, D)),
        "ys": rng.standard_normal((T, Q)),
    }


def _linear_rnn(p):
    """d2l's linear RNN as (step, loss) for carry_grads.

    The step emits its *incoming* carry, so ys = (h_0 … h_{T-1}) and the loss
    rebuilds h_1 … h_T from ys[1:] and the final carry: then o_t = W_qh h_t
    sees the perturbation of h_t and carry_grads gives d2l's total ∂L/∂h_t.
    """
    W_hx, W_hh, W_qh = (jnp.asarray(p[k]) for k in ("W_hx", "W_hh", "W_qh"))
    targets = jnp.asarray(p["ys"])

    def step(h, x):
        return W_hx @ x + W_hh @ h, h

    def loss(h_T, hs_prev):
        hs = jnp.concatenate([hs_prev[1:], h_T[None]])
        err = hs @ W_qh.T - targets
        return jnp.mean(0.5 * jnp.sum(err * err, axis=1))

    return step, loss


def _rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def _orthogonal(n, seed=1):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q


@pytest.mark.parametrize("remat", REMATS)
@pytest.mark.parametrize("T", [1, 7, 200])
def test_carry_grads_match_d2l_reference(T, remat):
    p = _problem(T)
    want_loss, want = ref.linear_rnn_squared_loss(
        p["W_hx"], p["W_hh"], p["W_qh"], p["xs"], p["ys"], p["h0"]
    )
    step, loss = _linear_rnn(p)
    value, grads = dg.carry_grads(
        step, jnp.asarray(p["h0"]), jnp.asarray(p["xs"]), loss, remat=remat
    )
    assert grads.shape == want.dL_dh.shape == (T, H)
    assert float(value) == pytest.approx(want_loss, rel=RTOL)
    assert _rel_err(grads, want.dL_dh) < RTOL
    per_step = np.linalg.norm(np.asarray(grads) - want.dL_dh, axis=1)
    assert np.all(per_step <= RTOL * np.linalg.norm(want.dL_dh, axis=1))

    _, norms = dg.carry_grad_norms(
        step, jnp.asarray(p["h0"]), jnp.asarray(p["xs"]), loss, remat=remat
    )
    np.testing.assert_allclose(norms, np.linalg.norm(want.dL_dh, axis=1), rtol=RTOL)


def test_output_computed_inside_step_is_held_fixed():
    """With o_t computed inside f from the new carry, grads[t] is the recurrent
    cotangent only: d2l's ∂L/∂h_t minus the direct term W_qhᵀ ∂L/∂o_t."""
    T = 7
    p = _problem(T)
    _, want = ref.linear_rnn_squared_loss(
        p["W_hx"], p["W_hh"], p["W_qh"], p["xs"], p["ys"], p["h0"]
    )
    W_hx, W_hh, W_qh = (jnp.asarray(p[k]) for k in ("W_hx", "W_hh", "W_qh"))

    def step(h, x):
        h = W_hx @ x + W_hh @ h
        return h, W_qh @ h

    def loss(_, os):
        err = os - jnp.asarray(p["ys"])
        return jnp.mean(0.5 * jnp.sum(err * err, axis=1))

    _, grads = dg.carry_grads(step, jnp.asarray(p["h0"]), jnp.asarray(p["xs"]), loss)
    hs, os = ref.linear_rnn_forward(p["W_hx"], p["W_hh"], p["W_qh"], p["xs"], p["h0"])
    direct = (os - p["ys"]) @ p["W_qh"] / T
    np.testing.assert_allclose(grads, want.dL_dh - direct, rtol=1e-10, atol=1e-14)


def _last_carry_problem(rho, T, h=8, seed=2):
    rng = np.random.default_rng(seed)
    W_hh = jnp.asarray(rho * _orthogonal(h, seed))
    W_hx = jnp.asarray(rng.standard_normal((h, D)))
    c = jnp.asarray(rng.standard_normal(h))

    def step(carry, x):
        return W_hx @ x + W_hh @ carry, None

    def loss(h_T, _):
        return jnp.dot(c, h_T)

    return step, loss, jnp.asarray(rng.standard_normal(h)), jnp.asarray(rng.standard_normal((T, D)))


@pytest.mark.parametrize("rho", [0.5, 0.9, 1.1])
def test_norms_decay_as_powers_of_rho(rho):
    T = 40
    step, loss, h0, xs = _last_carry_problem(rho, T)
    _, norms = dg.carry_grad_norms(step, h0, xs, loss)
    _, grads = dg.carry_grads(step, h0, xs, loss)
    # grads[t] = ∂L/∂h_{t+1} = (W_hhᵀ)^(T-1-t) c, so its norm is ρ^(T-1-t)·‖c‖.
    want = rho ** np.arange(T - 1, -1, -1) * np.linalg.norm(np.asarray(grads[-1]))
    assert norms.shape == (T,)
    np.testing.assert_allclose(norms, want, rtol=1e-10)


@pytest.mark.parametrize("remat", REMATS)
def test_truncation_zeroes_carries_before_last_window(remat):
    T, k = 20, 6
    step, loss, h0, xs = _last_carry_problem(0.9, T)
    _, full = dg.carry_grads(step, h0, xs, loss, remat=remat)
    _, cut = dg.carry_grads(step, h0, xs, loss, remat=remat, truncation=bj.Truncate(every=k))
    _, cut_norms = dg.carry_grad_norms(step, h0, xs, loss, truncation=bj.Truncate(every=k))
    # Windows of steps [0,6), [6,12), [12,18), [18,20): the carry entering step 18
    # (output by step 17) is cut, so every carry output by steps 0..17 gets zero.
    boundary = (T - 1) // k * k
    assert boundary == 18
    assert np.all(np.asarray(cut[:boundary]) == 0.0)
    np.testing.assert_array_equal(cut_norms[:boundary], 0.0)
    np.testing.assert_allclose(cut[boundary:], full[boundary:], rtol=1e-12)
    assert np.all(np.linalg.norm(np.asarray(full), axis=1) > 0)
    assert np.all(np.asarray(cut_norms[boundary:]) > 0)


def test_pytree_carry_and_no_xs():
    T = 6
    A = jnp.asarray(0.5 * _orthogonal(3))

    def step(carry, x):
        assert x is None
        a, b = carry["a"], carry["b"]
        return {"a": A @ a + 0.1 * b[:3], "b": jnp.tanh(b), "n": carry["n"] + 1}, None

    def loss(carry, _):
        return jnp.sum(carry["a"] ** 2) + jnp.sum(carry["b"])

    init = {"a": jnp.ones(3), "b": jnp.linspace(-1.0, 1.0, 4), "n": jnp.zeros((), jnp.int32)}
    value, grads = dg.carry_grads(step, init, None, loss, length=T)
    assert jax.tree.structure(grads) == jax.tree.structure(init)
    assert grads["a"].shape == (T, 3) and grads["b"].shape == (T, 4)
    assert grads["n"].shape == (T,) and grads["n"].dtype == jax.dtypes.float0

    # Check against differentiating the hand-unrolled loop at each carry.
    def rollout(carry, start):
        for _ in range(start, T):
            carry, _ = step(carry, None)
        return loss(carry, None)

    carry = init
    for t in range(T):
        carry, _ = step(carry, None)
        g = jax.grad(lambda ab, c=carry, t=t: rollout({**ab, "n": c["n"]}, t + 1))(
            {"a": carry["a"], "b": carry["b"]}
        )
        np.testing.assert_allclose(grads["a"][t], g["a"], rtol=1e-12)
        np.testing.assert_allclose(grads["b"][t], g["b"], rtol=1e-12)
    assert float(value) == pytest.approx(float(rollout(init, 0)), rel=1e-12)

    _, norms = dg.carry_grad_norms(step, init, None, loss, length=T)
    want = np.sqrt(np.sum(grads["a"] ** 2, axis=1) + np.sum(grads["b"] ** 2, axis=1))
    np.testing.assert_allclose(norms, want, rtol=1e-12)


def test_reverse_indexes_by_xs_and_jit_works():
    T = 9
    p = _problem(T)
    step, loss = _linear_rnn(p)
    h0, xs = jnp.asarray(p["h0"]), jnp.asarray(p["xs"])
    _, g_rev = dg.carry_grads(step, h0, xs, lambda c, ys: jnp.sum(c**2), reverse=True)
    _, g_flip = dg.carry_grads(step, h0, xs[::-1], lambda c, ys: jnp.sum(c**2))
    np.testing.assert_allclose(g_rev, g_flip[::-1], rtol=1e-12)

    jitted = jax.jit(lambda h, x: dg.carry_grads(step, h, x, loss, remat=bj.EveryStep()))
    np.testing.assert_allclose(jitted(h0, xs)[1], dg.carry_grads(step, h0, xs, loss)[1], rtol=1e-12)


def test_batched_carry_norm_covers_whole_step():
    T, B = 5, 3
    W = jnp.asarray(0.7 * _orthogonal(4))

    def step(h, x):
        return h @ W.T + x, None

    xs = jnp.asarray(np.random.default_rng(3).standard_normal((T, B, 4)))
    loss = lambda h, _: jnp.sum(h)  # noqa: E731
    _, grads = dg.carry_grads(step, jnp.zeros((B, 4)), xs, loss)
    _, norms = dg.carry_grad_norms(step, jnp.zeros((B, 4)), xs, loss)
    assert grads.shape == (T, B, 4)
    np.testing.assert_allclose(norms, np.linalg.norm(np.asarray(grads).reshape(T, -1), axis=1))


def test_step_jacobian_tanh_rnn():
    rng = np.random.default_rng(4)
    W_hh, W_hx = jnp.asarray(rng.standard_normal((H, H))), jnp.asarray(rng.standard_normal((H, D)))

    def step(h, x):
        h = jnp.tanh(W_hh @ h + W_hx @ x)
        return h, h

    h, x = jnp.asarray(rng.standard_normal(H)), jnp.asarray(rng.standard_normal(D))
    J = dg.step_jacobian(step, h, x)
    h_new = np.tanh(np.asarray(W_hh) @ np.asarray(h) + np.asarray(W_hx) @ np.asarray(x))
    # J[i, j] = ∂h_new[i]/∂h[j] = (1 - h_new[i]²) W_hh[i, j]
    np.testing.assert_allclose(J, np.diag(1 - h_new**2) @ np.asarray(W_hh), rtol=1e-12)


def test_jacobian_product_linear_rnn_is_matrix_power():
    T = 12
    p = _problem(T, radius=1.05)
    step, _ = _linear_rnn(p)
    h0, xs = jnp.asarray(p["h0"]), jnp.asarray(p["xs"])
    P = dg.jacobian_product(step, h0, xs, 0, T)
    np.testing.assert_allclose(P, np.linalg.matrix_power(p["W_hh"], T), rtol=1e-10, atol=1e-13)
    P_mid = dg.jacobian_product(step, h0, xs, 3, 8)
    np.testing.assert_allclose(P_mid, np.linalg.matrix_power(p["W_hh"], 5), rtol=1e-10, atol=1e-13)
    np.testing.assert_array_equal(dg.jacobian_product(step, h0, xs, 4, 4), np.eye(H))


def test_jacobian_product_tanh_follows_trajectory_and_spectrum():
    T = 8
    rng = np.random.default_rng(5)
    W_hh, W_hx = jnp.asarray(rng.standard_normal((H, H))), jnp.asarray(rng.standard_normal((H, D)))

    def step(h, x):
        h = jnp.tanh(W_hh @ h + W_hx @ x)
        return h, h

    h0, xs = jnp.asarray(rng.standard_normal(H)), jnp.asarray(rng.standard_normal((T, D)))
    start, stop = 2, 7
    P = dg.jacobian_product(step, h0, xs, start, stop)
    # Autodiff of the unrolled map h_start -> h_stop.
    h = h0
    for t in range(start):
        h, _ = step(h, xs[t])

    def span(h):
        for t in range(start, stop):
            h, _ = step(h, xs[t])
        return h

    np.testing.assert_allclose(P, jax.jacfwd(span)(h), rtol=1e-10, atol=1e-14)

    s = dg.jacobian_product_spectrum(step, h0, xs, start, stop, k=3)
    svals = np.linalg.svd(np.asarray(P), compute_uv=False)
    assert isinstance(s, dg.Spectrum) and s.singular_values.shape == (3,)
    np.testing.assert_allclose(s.singular_values, svals[:3], rtol=1e-10)
    assert float(s.norm) == pytest.approx(svals[0], rel=1e-10)
    assert dg.jacobian_product_spectrum(step, h0, xs, start, stop).singular_values.shape == (H,)


@pytest.mark.parametrize("rho", [0.5, 0.9, 1.1])
def test_spectral_radius_of_scaled_orthogonal(rho):
    assert dg.spectral_radius(rho * _orthogonal(8)) == pytest.approx(rho, rel=1e-12)
    assert dg.spectral_radius(jnp.asarray(rho * _orthogonal(8))) == pytest.approx(rho, rel=1e-12)


def test_bad_inputs_raise():
    step, loss, h0, xs = _last_carry_problem(0.9, 5, h=4)
    with pytest.raises(TypeError, match=r"carry_grads\(loss=\.\.\.\) expects a callable"):
        dg.carry_grads(step, h0, xs, 3.0)
    with pytest.raises(TypeError, match=r"carry_grads\(f=\.\.\.\) expects a callable"):
        dg.carry_grad_norms(None, h0, xs, loss)
    with pytest.raises(TypeError, match="must return a real floating-point scalar"):
        dg.carry_grads(step, h0, xs, lambda c, ys: c)
    with pytest.raises(ValueError, match=r"use a single unbatched carry of shape \(H,\)"):
        dg.step_jacobian(step, jnp.zeros((2, 4)), xs[0])
    with pytest.raises(ValueError, match=r"use a single unbatched carry of shape \(H,\)"):
        dg.jacobian_product(step, {"h": h0}, xs, 0, 1)
    with pytest.raises(ValueError, match=r"0 <= start <= stop <= T, got start=3, stop=2, T=5"):
        dg.jacobian_product(step, h0, xs, 3, 2)
    with pytest.raises(ValueError, match=r"stop=6, T=5"):
        dg.jacobian_product(step, h0, xs, 0, 6)
    with pytest.raises(TypeError, match=r"start=\.\.\.\) expects an int"):
        dg.jacobian_product(step, h0, xs, 0.5, 2)
    with pytest.raises(ValueError, match=r"1 <= k <= H=4, got k=5"):
        dg.jacobian_product_spectrum(step, h0, xs, 0, 2, k=5)
    with pytest.raises(ValueError, match=r"square matrix of shape \(n, n\), got shape \(3, 4\)"):
        dg.spectral_radius(np.zeros((3, 4)))


def test_public_namespace():
    assert bj.diagnostics is dg
    assert set(dg.__all__) <= set(dir(dg))
