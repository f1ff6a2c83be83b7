"""Truncate and RandomTruncate against explicit references."""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_equal, rel_err, tree_rel_err

import bpttjax as bj

D, H = 3, 4
REMATS = {"StoreAll": bj.StoreAll(), "EveryStep": bj.EveryStep()}


def make_params(seed=0, radius=0.95):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    q, _ = jnp.linalg.qr(jax.random.normal(k2, (H, H), jnp.float64))
    return {
        "W_xh": jax.random.normal(k1, (D, H), jnp.float64) / np.sqrt(D),
        "W_hh": radius * q,
        "W_q": jax.random.normal(k3, (H, 2), jnp.float64),
    }


def step(p, h, x):
    h = jnp.tanh(x @ p["W_xh"] + h @ p["W_hh"])
    return h, h @ p["W_q"]


def loss(scan_fn, p, h0, xs):
    h_T, os = scan_fn(functools.partial(step, p), h0, xs)
    return jnp.mean(jnp.sum(jnp.sin(os) ** 2, axis=-1)) + jnp.sum(h_T)


def chunked_scan(f, init, xs, every):
    """Training on consecutive windows of `every` steps with the state detached between them."""
    T = xs.shape[0]
    carry, ys = init, []
    for start in range(0, T, every):
        if start > 0:
            carry = jax.lax.stop_gradient(carry)
        carry, y = jax.lax.scan(f, carry, xs[start : start + every])
        ys.append(y)
    return carry, jnp.concatenate(ys)


def inputs(T, seed=1):
    xs = jax.random.normal(jax.random.key(seed), (T, D), jnp.float64)
    h0 = 0.1 * jnp.ones(H)
    return h0, xs


@pytest.mark.parametrize("remat", REMATS)
@pytest.mark.parametrize(("T", "every"), [(1, 1), (7, 1), (10, 5), (23, 5), (23, 7), (12, 30)])
def test_truncate_equals_detached_windows(remat, T, every):
    p = make_params()
    h0, xs = inputs(T)
    ours = functools.partial(bj.scan, remat=REMATS[remat], truncation=bj.Truncate(every))
    ref = functools.partial(chunked_scan, every=every)
    fwd = ours(functools.partial(step, p), h0, xs)
    jax.tree.map(
        np.testing.assert_array_equal, fwd, jax.lax.scan(functools.partial(step, p), h0, xs)
    )
    got = jax.jit(jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2)))(p, h0, xs)
    want = jax.grad(functools.partial(loss, ref), argnums=(0, 1, 2))(p, h0, xs)
    assert tree_rel_err(got, want) < 1e-12


def test_truncate_actually_cuts_and_full_length_is_bptt():
    p = make_params()
    h0, xs = inputs(20)
    g = lambda tr: jax.grad(functools.partial(loss, functools.partial(bj.scan, truncation=tr)))(
        p, h0, xs
    )
    full = g(None)
    assert tree_rel_err(g(bj.Truncate(20)), full) == 0.0
    assert tree_rel_err(g(bj.Truncate(1000)), full) == 0.0
    assert tree_rel_err(g(bj.Truncate(4)), full) > 1e-3  # a real cut changes the gradient


def test_truncate_reverse_windows_start_at_the_end():
    p = make_params()
    h0, xs = inputs(11)

    def rev_loss(scan_fn, p, xs):
        h_T, os = scan_fn(functools.partial(step, p), h0, xs)
        return jnp.sum(os**2) + jnp.sum(h_T)

    ours = functools.partial(bj.scan, reverse=True, truncation=bj.Truncate(4))
    got = jax.grad(functools.partial(rev_loss, ours), argnums=(0, 1))(p, xs)
    flipped = lambda f, init, xs: chunked_scan(f, init, xs[::-1], 4)
    want = jax.grad(functools.partial(rev_loss, flipped), argnums=(0, 1))(p, xs)
    assert tree_rel_err(got, want) < 1e-12


def test_truncate_with_pytree_carry_and_integer_leaf():
    p = make_params()
    h0, xs = inputs(9)

    def f(carry, x):
        h, n = carry
        h, o = step(p, h, x)
        return (h, n + 1), o

    def total(scan_fn, xs):
        (h, n), os = scan_fn(f, (h0, jnp.zeros((), jnp.int32)), xs)
        return jnp.sum(os**2) + jnp.sum(h)

    ours = functools.partial(bj.scan, truncation=bj.Truncate(3), remat=bj.EveryStep())
    ref = lambda f, init, xs: chunked_scan(f, init, xs, 3)
    assert (
        rel_err(
            jax.grad(functools.partial(total, ours))(xs),
            jax.grad(functools.partial(total, ref))(xs),
        )
        < 1e-12
    )
    assert bj.scan(f, (h0, jnp.zeros((), jnp.int32)), xs, truncation=bj.Truncate(3))[0][1] == 9


# --- randomized truncation ---------------------------------------------------------------


def xi_probe(keys, T, keep_prob):
    """Read the ξ_t that RandomTruncate drew: for h_t = h_{t-1} + x_t and L = h_T,
    ∂L/∂x_t is the product of the ξ_s for s > t."""
    f = lambda h, x: (h + x, None)

    def one(key):
        tr = bj.RandomTruncate(key, keep_prob=keep_prob)
        return jax.grad(lambda xs: bj.scan(f, jnp.float64(0.0), xs, truncation=tr)[0])(jnp.zeros(T))

    return jax.vmap(one)(keys)


def test_random_truncate_draws_bernoulli_scaled_by_inverse_prob():
    keys = jax.random.split(jax.random.key(7), 20000)
    g = np.asarray(xi_probe(keys, 3, 0.6))
    xi2, xi1xi2 = g[:, 1], g[:, 0]
    np.testing.assert_array_equal(g[:, 2], 1.0)  # the last input reaches L directly
    assert set(np.unique(xi2).tolist()) == {0.0, 1 / 0.6}
    kept = xi2 > 0
    assert abs(kept.mean() - 0.6) < 4 * np.sqrt(0.6 * 0.4 / len(keys))
    # independence across steps: P(both kept) = π²
    both = xi1xi2 > 0
    assert abs(both.mean() - 0.36) < 4 * np.sqrt(0.36 * 0.64 / len(keys))
    assert abs(xi2.mean() - 1.0) < 4 * xi2.std() / np.sqrt(len(keys))


def test_random_truncate_per_step_probabilities():
    keep = jnp.array([0.5, 1.0, 0.25, 1.0])
    g = np.asarray(xi_probe(jax.random.split(jax.random.key(3), 4000), 4, keep))
    # ∂L/∂x_2 = ξ_3 with π_3 = 1: always kept, never rescaled
    np.testing.assert_array_equal(g[:, 2], 1.0)
    # ∂L/∂x_1 = ξ_2 ξ_3 = ξ_2 with π_2 = 0.25
    assert set(np.unique(g[:, 1]).tolist()) == {0.0, 4.0}
    assert abs((g[:, 1] > 0).mean() - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 4000)


def sampled_grads(keys, p, h0, xs, keep_prob, remat=REMATS["StoreAll"]):
    def one(key):
        tr = bj.RandomTruncate(key, keep_prob=keep_prob)
        scan_fn = functools.partial(bj.scan, truncation=tr, remat=remat)
        g = jax.grad(functools.partial(loss, scan_fn), argnums=(0, 1))(p, h0, xs)
        return jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)])

    return jax.jit(jax.vmap(one))(keys)


def test_random_truncate_is_unbiased():
    p = make_params(radius=1.0)
    h0, xs = inputs(16)
    full = jax.grad(functools.partial(loss, bj.scan), argnums=(0, 1))(p, h0, xs)
    full = np.concatenate([x.ravel() for x in jax.tree.leaves(full)])
    samples = np.asarray(sampled_grads(jax.random.split(jax.random.key(0), 16384), p, h0, xs, 0.7))
    errors = {}
    for n in (256, 4096, 16384):
        mean = samples[:n].mean(axis=0)
        stderr = samples[:n].std(axis=0, ddof=1) / np.sqrt(n)
        errors[n] = np.linalg.norm(mean - full) / np.linalg.norm(full)
        # components no cut can reach (e.g. those of the last step) have zero variance
        noisy = stderr > 1e-9 * np.abs(full).max()
        z = (mean - full)[noisy] / stderr[noisy]
        assert np.max(np.abs(z)) < 5.0, (n, np.max(np.abs(z)))
        np.testing.assert_allclose(mean[~noisy], full[~noisy], rtol=1e-10, atol=1e-12)
    assert errors[16384] < errors[4096] < errors[256]
    assert errors[16384] < 0.02
    # ... while a single sample is a genuinely noisy, different estimate
    assert np.linalg.norm(samples[0] - full) / np.linalg.norm(full) > 1e-3


def test_random_truncate_reproducible_and_independent_of_remat():
    p = make_params()
    h0, xs = inputs(15)
    keys = jax.random.split(jax.random.key(5), 8)
    a = sampled_grads(keys, p, h0, xs, 0.5)
    b = sampled_grads(keys, p, h0, xs, 0.5)
    c = sampled_grads(keys, p, h0, xs, 0.5, remat=bj.EveryStep())
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(c, a, rtol=1e-12, atol=1e-14)
    assert not np.allclose(a[0], a[1])  # different keys, different truncations


def test_random_truncate_keep_one_is_full_bptt_and_forward_unchanged():
    p = make_params()
    h0, xs = inputs(12)
    tr = bj.RandomTruncate(jax.random.key(0), keep_prob=1.0)
    ours = functools.partial(bj.scan, truncation=tr)
    full = jax.grad(functools.partial(loss, bj.scan))(p, h0, xs)
    assert tree_rel_err(jax.grad(functools.partial(loss, ours))(p, h0, xs), full) == 0.0
    tr = bj.RandomTruncate(jax.random.key(0), keep_prob=0.3)
    got = bj.scan(functools.partial(step, p), h0, xs, truncation=tr)
    jax.tree.map(
        np.testing.assert_array_equal, got, jax.lax.scan(functools.partial(step, p), h0, xs)
    )


def test_random_truncate_accepts_raw_uint32_key_and_traced_key():
    p = make_params()
    h0, xs = inputs(6)

    @jax.jit
    def g(key):
        scan_fn = functools.partial(bj.scan, truncation=bj.RandomTruncate(key, 0.5))
        return jax.grad(functools.partial(loss, scan_fn))(p, h0, xs)

    raw = g(jax.random.PRNGKey(1))
    typed = g(jax.random.key(1))
    jax.tree.map(np.testing.assert_array_equal, raw, typed)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("every", [0, -3])
def test_truncate_rejects_non_positive(every):
    with pytest.raises(ValueError, match=f"every >= 1, got every={every}"):
        bj.Truncate(every)


@pytest.mark.parametrize("every", [2.5, "3", True, None])
def test_truncate_rejects_non_int(every):
    with pytest.raises(TypeError, match="Truncate\\(every=...\\) expects a positive int"):
        bj.Truncate(every)


@pytest.mark.parametrize("p", [0.0, -0.1, 1.5, float("nan")])
def test_random_truncate_rejects_bad_probability(p):
    with pytest.raises(ValueError, match=r"probabilities in \(0, 1\]"):
        bj.RandomTruncate(jax.random.key(0), keep_prob=p)


def test_random_truncate_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"probabilities in \(0, 1\]"):
        bj.RandomTruncate(jax.random.key(0), keep_prob=jnp.array([0.5, 0.0]))
    with pytest.raises(TypeError, match="keep_prob=.*float in \\(0, 1\\].*str"):
        bj.RandomTruncate(jax.random.key(0), keep_prob="high")
    with pytest.raises(TypeError, match="key=.*PRNG key.*int"):
        bj.RandomTruncate(0, keep_prob=0.5)
    with pytest.raises(TypeError, match="key=.*PRNG key.*float64"):
        bj.RandomTruncate(jnp.zeros(2), keep_prob=0.5)
    with pytest.raises(ValueError, match=r"shape \(5,\), got shape \(3,\)"):
        tr = bj.RandomTruncate(jax.random.key(0), keep_prob=jnp.full(3, 0.5))
        bj.scan(lambda h, x: (h + x, None), jnp.float64(0), jnp.zeros(5), truncation=tr)


# --- huge windows, abstract base, messages --------------------------------------------------


@pytest.mark.parametrize("every", [2**31 - 1, 2**31, 2**32, 2**32 + 3, sys.maxsize])
def test_truncate_longer_than_int32_is_full_bptt(every):
    """``every >= T`` is full BPTT for any Python int, although the step counter is int32."""
    p = make_params()
    h0, xs = inputs(7)
    g = lambda tr: jax.grad(functools.partial(loss, functools.partial(bj.scan, truncation=tr)))
    assert tree_rel_err(g(bj.Truncate(every))(p, h0, xs), g(None)(p, h0, xs)) == 0.0


@pytest.mark.parametrize("every", [2**31, 2**32, 2**32 + 3, sys.maxsize])
def test_truncate_longer_than_int32_is_full_bptt_in_float32_mode(every):
    f32 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float32), tree)
    p, (h0, xs) = f32(make_params()), f32(inputs(7))
    with jax.enable_x64(False):
        g = lambda tr: jax.grad(functools.partial(loss, functools.partial(bj.scan, truncation=tr)))
        got, want = g(bj.Truncate(every))(p, h0, xs), g(None)(p, h0, xs)
        assert jax.tree.leaves(got)[0].dtype == jnp.float32
        jax.tree.map(np.testing.assert_array_equal, got, want)


def test_truncation_rejects_more_steps_than_the_int32_counter_holds():
    with pytest.raises(ValueError, match=r"up to 2\*\*31 - 1 steps, got length 2147483648"):
        bj.scan(lambda c, _: (c, None), 0.0, None, length=2**31, truncation=bj.Truncate(3))


def test_truncation_strategy_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        bj.TruncationStrategy()

    class Incomplete(bj.TruncationStrategy):
        pass

    with pytest.raises(TypeError, match="_scale"):
        Incomplete()


@pytest.mark.parametrize("p", [1.5, float("nan"), float("inf"), -0.5])
def test_random_truncate_zero_hint_only_for_zero(p):
    with pytest.raises(ValueError, match=r"probabilities in \(0, 1\]") as err:
        bj.RandomTruncate(jax.random.key(0), keep_prob=p)
    assert "divide by zero" not in str(err.value)
    with pytest.raises(ValueError, match="probability 0 would divide by zero"):
        bj.RandomTruncate(jax.random.key(0), keep_prob=jnp.array([0.5, 0.0, 1.5]))


@pytest.mark.parametrize("reverse", [False, True])
def test_random_truncate_first_processed_entry_of_keep_prob_is_unused(reverse):
    """keep_prob[0] going forward, keep_prob[T - 1] with reverse=True, as documented."""
    p = make_params()
    h0, xs = inputs(6)
    first, other = (5, 0) if reverse else (0, 5)

    @jax.jit
    def grads_for(keep):
        tr = bj.RandomTruncate(jax.random.key(4), keep_prob=keep)
        scan_fn = functools.partial(bj.scan, reverse=reverse, truncation=tr)
        return jax.grad(functools.partial(loss, scan_fn))(p, h0, xs)

    grads = lambda entry, value: grads_for(jnp.full(6, 0.5).at[entry].set(value))

    base = grads(first, 0.5)
    assert tree_rel_err(grads(first, 1e-6), base) == 0.0
    assert tree_rel_err(grads(other, 1.0), base) > 1e-3  # kept where 0.5 cut, or unscaled


@pytest.mark.parametrize("reverse", [False, True])
def test_random_truncate_unused_keep_prob_entry_changes_no_gradient(reverse):
    """The docstring's claim, entry by entry: the first step processed (index 0, or
    T - 1 with reverse=True) has an unused entry, which changes no gradient (of the
    parameters, init or xs); every other entry changes one."""
    T = 6
    p = make_params()
    h0, xs = inputs(T)
    unused = T - 1 if reverse else 0

    @jax.jit
    def grads_for(keep):
        tr = bj.RandomTruncate(jax.random.key(4), keep_prob=keep)
        scan_fn = functools.partial(bj.scan, reverse=reverse, truncation=tr)
        return jax.grad(functools.partial(loss, scan_fn), argnums=(0, 1, 2))(p, h0, xs)

    base_keep = jnp.full(T, 0.5)
    base = grads_for(base_keep)
    for entry in range(T):
        moved = [grads_for(base_keep.at[entry].set(value)) for value in (1e-3, 0.99, 1.0)]
        if entry == unused:
            for grads in moved:
                assert_trees_equal(grads, base)
        else:
            assert max(tree_rel_err(grads, base) for grads in moved) > 1e-3, entry


# --- second derivatives -------------------------------------------------------------------

SECOND_ORDER_REMATS = [
    pytest.param(bj.StoreAll(), id="StoreAll"),
    pytest.param(bj.EveryStep(), id="EveryStep"),
    pytest.param(bj.Nested(levels=2), id="Nested2"),
    pytest.param(bj.Binomial(3), id="Binomial3"),
]
TRUNCATIONS = {
    "Truncate2": bj.Truncate(2),
    "RandomTruncate": bj.RandomTruncate(jax.random.key(1), keep_prob=0.5),
}


def echo_loss(scan_fn, w):
    """A tanh recurrence that emits its incoming carry: ys are h_0 … h_{T-1}."""
    xs = jnp.linspace(-1.0, 1.0, 7)
    step = lambda h, x: (jnp.tanh(w[0] * h + w[1] * x), h)
    _, ys = scan_fn(step, jnp.float64(0.5), xs)
    return jnp.sum(ys**2)


def fd_jacobian(g, w, eps=1e-6):
    """Central differences of ``g``, one column per coordinate of ``w``."""
    cols = [(g(w + eps * e) - g(w - eps * e)) / (2 * eps) for e in jnp.eye(w.shape[0])]
    return jnp.stack(cols, axis=1)


@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize("remat", SECOND_ORDER_REMATS)
def test_second_derivatives_differentiate_the_truncated_gradient(remat, truncation):
    """jax.hessian and jvp∘grad are the Jacobian of the truncated gradient map g̃."""
    scan_fn = functools.partial(bj.scan, remat=remat, truncation=TRUNCATIONS[truncation])
    L = functools.partial(echo_loss, scan_fn)
    w = jnp.array([0.8, 1.3])
    J = fd_jacobian(jax.jit(jax.grad(L)), w)
    np.testing.assert_allclose(jax.jit(jax.hessian(L))(w), J, rtol=1e-7, atol=1e-8)
    v = jnp.array([0.3, -1.1])
    hvp = jax.jit(lambda w, v: jax.jvp(jax.grad(L), (w,), (v,))[1])(w, v)
    np.testing.assert_allclose(hvp, J @ v, rtol=1e-7, atol=1e-8)


def test_second_derivatives_differ_from_the_stop_gradient_formulation():
    """Same first gradient as windows with stop_gradient, but only ours has J_g̃ as Hessian."""

    def windows(f, init, xs, every=2):
        carry, ys = init, []
        for start in range(0, xs.shape[0], every):
            carry = jax.lax.stop_gradient(carry) if start else carry
            carry, y = jax.lax.scan(f, carry, xs[start : start + every])
            ys.append(y)
        return carry, jnp.concatenate(ys)

    ours = functools.partial(echo_loss, functools.partial(bj.scan, truncation=bj.Truncate(2)))
    theirs = functools.partial(echo_loss, windows)
    w = jnp.array([0.8, 1.3])
    grad = jax.jit(jax.grad(ours))
    assert rel_err(grad(w), jax.jit(jax.grad(theirs))(w)) < 1e-13
    J = fd_jacobian(grad, w)
    np.testing.assert_allclose(jax.jit(jax.hessian(ours))(w), J, rtol=1e-7, atol=1e-8)
    # stop_gradient also cuts forward tangents
    assert rel_err(jax.jit(jax.hessian(theirs))(w), J) > 0.1
    assert rel_err(J, J.T) > 0.1  # g̃ is not a gradient: its Jacobian is not symmetric
    # reverse over reverse gives J_g̃ too (so grad of vdot(g̃, v) is Jᵀ·v)
    np.testing.assert_allclose(jax.jit(jax.jacrev(grad))(w), J, rtol=1e-7, atol=1e-8)
