"""bj.scan is a drop-in for lax.scan, and every remat strategy gives plain BPTT's gradient.

Each strategy runs through the same suite: forward values equal to
``jax.lax.scan``, gradients (w.r.t. closed-over parameters, ``init`` and
``xs``) equal to plain ``lax.scan`` + ``jax.grad`` in float64, under ``jit``,
``vmap∘grad`` and ``grad∘vmap``, for lengths 1, prime and large.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import STRATEGIES, assert_trees_equal, rel_err, tree_rel_err

import bpttjax as bj

# Values are compared bit for bit here: XLA's default code generation (conftest.py).
pytestmark = pytest.mark.usefixtures("llvm_optimized")

LENGTHS = [1, 13, 257]  # one step, a prime, longer than every inner block
D, H = 3, 4


def make_params(seed=0, scale=0.9):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    q, _ = jnp.linalg.qr(jax.random.normal(k2, (H, H), jnp.float64))
    return {
        "W_xh": jax.random.normal(k1, (D, H), jnp.float64) / np.sqrt(D),
        "W_hh": scale * q,
        "b": 0.1 * jax.random.normal(k3, (H,), jnp.float64),
    }


def make_xs(T, seed=1):
    return jax.random.normal(jax.random.key(seed), (T, D), jnp.float64)


def pytree_step(params, carry, x):
    """A step with a dict carry holding a tuple, and a pytree output."""
    h, (c, n) = carry["h"], carry["rest"]
    h_new = jnp.tanh(x["a"] @ params["W_xh"] + h @ params["W_hh"] + params["b"])
    c_new = 0.5 * c + jnp.sin(h_new) * x["b"]
    return {"h": h_new, "rest": (c_new, n + 1)}, {"h": h_new, "sq": jnp.sum(c_new**2)}


def pytree_inputs(T):
    xs = {"a": make_xs(T), "b": make_xs(T, 2)[:, 0]}
    init = {"h": jnp.zeros(H), "rest": (jnp.ones(H), jnp.zeros((), jnp.int32))}
    return init, xs


def pytree_loss(scan_fn, params, init, xs):
    carry, ys = scan_fn(functools.partial(pytree_step, params), init, xs)
    return jnp.sum(ys["h"] ** 2) + jnp.sum(ys["sq"]) + jnp.sum(carry["rest"][0])


def plain(f, init, xs, **kw):
    return jax.lax.scan(f, init, xs, **kw)


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("T", LENGTHS)
def test_forward_and_grad_match_lax_scan(name, T):
    """Both directions, forward values bit for bit and gradients, in one program per
    strategy and length (one compilation instead of eight)."""
    remat = STRATEGIES[name]
    params = make_params()
    init, xs = pytree_inputs(T)
    grad = lambda scan_fn: jax.grad(
        functools.partial(pytree_loss, scan_fn), argnums=(0, 1, 2), allow_int=True
    )

    @jax.jit
    def both(params, init, xs):
        f = functools.partial(pytree_step, params)
        out = {}
        for reverse in (False, True):
            ours = functools.partial(bj.scan, reverse=reverse, remat=remat)
            ref = functools.partial(plain, reverse=reverse)
            out[reverse] = (
                (ours(f, init, xs), ref(f, init, xs)),
                (grad(ours)(params, init, xs), grad(ref)(params, init, xs)),
            )
        return out

    float_leaves = lambda t: [x for x in jax.tree.leaves(t) if x.dtype == jnp.float64]
    for reverse, ((value, value_ref), (got, want)) in both(params, init, xs).items():
        assert_trees_equal(value, value_ref)
        for a, b in zip(float_leaves(got), float_leaves(want), strict=True):
            assert rel_err(a, b) < 1e-12, reverse


@pytest.mark.parametrize("name", STRATEGIES)
def test_value_and_grad_and_unroll(name):
    remat = STRATEGIES[name]
    params, xs = make_params(), make_xs(31)

    def loss(scan_fn, p, unroll):
        step = lambda h, x: (jnp.tanh(x @ p["W_xh"] + h @ p["W_hh"]), jnp.sum(h))
        _, ys = scan_fn(step, jnp.zeros(H), xs, unroll=unroll)
        return jnp.sum(ys**2)

    want_v, want_g = jax.value_and_grad(functools.partial(loss, jax.lax.scan))(params, 1)
    for unroll in (1, 4, True):
        ours = functools.partial(bj.scan, remat=remat)
        v, g = jax.jit(jax.value_and_grad(functools.partial(loss, ours)), static_argnums=1)(
            params, unroll
        )
        assert rel_err(v, want_v) < 1e-13
        assert tree_rel_err(g, want_g) < 1e-12


@pytest.mark.parametrize("name", STRATEGIES)
def test_xs_none_with_length(name):
    params = make_params()

    def loss(scan_fn, p):
        step = lambda h, _: (jnp.tanh(h @ p["W_hh"] + p["b"]), h[0])
        carry, ys = scan_fn(step, jnp.ones(H), None, length=23)
        return jnp.sum(carry) + jnp.sum(ys)

    ours = functools.partial(bj.scan, remat=STRATEGIES[name])
    assert rel_err(loss(ours, params), loss(jax.lax.scan, params)) == 0.0
    got = jax.grad(functools.partial(loss, ours))(params)
    want = jax.grad(functools.partial(loss, jax.lax.scan))(params)
    assert tree_rel_err(got, want) < 1e-12


def batched_loss(scan_fn, p, xs):
    step = lambda h, x: (jnp.tanh(x @ p["W_xh"] + h @ p["W_hh"] + p["b"]), h)
    _, hs = scan_fn(step, jnp.zeros(H), xs)
    return jnp.sum(jnp.cos(hs))


@pytest.mark.parametrize("name", STRATEGIES)
def test_vmap_of_grad_and_grad_of_vmap(name):
    params = make_params()
    xs = jax.random.normal(jax.random.key(3), (5, 19, D), jnp.float64)  # batch of sequences
    ours = functools.partial(batched_loss, functools.partial(bj.scan, remat=STRATEGIES[name]))
    ref = functools.partial(batched_loss, jax.lax.scan)

    # vmap∘grad: one gradient per sequence
    got = jax.jit(jax.vmap(jax.grad(ours), in_axes=(None, 0)))(params, xs)
    want = jax.vmap(jax.grad(ref), in_axes=(None, 0))(params, xs)
    assert tree_rel_err(got, want) < 1e-12

    # grad∘vmap: gradient of the batch's summed loss
    total = lambda fn: lambda p, xs: jnp.sum(jax.vmap(fn, in_axes=(None, 0))(p, xs))
    got = jax.jit(jax.grad(total(ours)))(params, xs)
    want = jax.grad(total(ref))(params, xs)
    assert tree_rel_err(got, want) < 1e-12


@pytest.mark.parametrize("name", STRATEGIES)
def test_forward_mode_and_hessian_vector(name):
    """jvp and grad-of-grad also pass through (strategies only change the backward pass)."""
    params = make_params()
    xs = make_xs(11)
    ours = functools.partial(batched_loss, functools.partial(bj.scan, remat=STRATEGIES[name]))
    ref = functools.partial(batched_loss, jax.lax.scan)
    tangent = jax.tree.map(jnp.ones_like, params)
    got = jax.jvp(lambda p: jax.grad(ours)(p, xs), (params,), (tangent,))[1]
    want = jax.jvp(lambda p: jax.grad(ref)(p, xs), (params,), (tangent,))[1]
    assert tree_rel_err(got, want) < 1e-11


def test_default_is_store_all_and_strategies_are_values():
    assert bj.StoreAll() == bj.StoreAll()
    assert bj.EveryStep() == bj.EveryStep(policy=None)
    assert hash(bj.EveryStep()) == hash(bj.EveryStep())
    with pytest.raises(dataclasses.FrozenInstanceError):
        bj.EveryStep().policy = jax.checkpoint_policies.dots_saveable


def test_store_all_lowers_to_the_same_program_as_lax_scan():
    params, xs = make_params(), make_xs(9)
    ours = jax.jit(jax.grad(functools.partial(batched_loss, bj.scan)))
    ref = jax.jit(jax.grad(functools.partial(batched_loss, jax.lax.scan)))
    strip = lambda s: "\n".join(
        line for line in s.splitlines() if "loc(" not in line and "module @" not in line
    )
    assert strip(ours.lower(params, xs).as_text(debug_info=False)) == strip(
        ref.lower(params, xs).as_text(debug_info=False)
    )


def test_every_step_stores_less_than_store_all():
    """The remat path is real: EveryStep saves fewer residuals than StoreAll."""
    params, xs = make_params(), make_xs(500)
    temp = {}
    for name in ("StoreAll", "EveryStep"):
        fn = functools.partial(batched_loss, functools.partial(bj.scan, remat=STRATEGIES[name]))
        compiled = jax.jit(jax.grad(fn)).lower(params, xs).compile()
        temp[name] = compiled.memory_analysis().temp_size_in_bytes
    assert temp["EveryStep"] < 0.75 * temp["StoreAll"]


# --- bad input --------------------------------------------------------------------------


def good_step(h, x):
    return h + x, h


def test_error_mismatched_leading_axes():
    xs = {"a": jnp.zeros((5, 2)), "b": jnp.zeros((6, 2))}
    with pytest.raises(ValueError, match=r"leading \(time\) axis.*\['a'\]: 5.*\['b'\]: 6"):
        bj.scan(lambda h, x: (h, None), jnp.zeros(2), xs)


def test_error_length_disagrees():
    with pytest.raises(ValueError, match=r"length=4.*disagrees.*xs, which is 5"):
        bj.scan(good_step, jnp.zeros(2), jnp.zeros((5, 2)), length=4)


def test_error_no_length():
    with pytest.raises(ValueError, match="number of steps"):
        bj.scan(good_step, jnp.zeros(2), None)


def test_error_bad_length_type_and_value():
    with pytest.raises(TypeError, match=r"length=.*non-negative int.*float"):
        bj.scan(good_step, jnp.zeros(2), None, length=3.0)
    with pytest.raises(ValueError, match="non-negative int, got -1"):
        bj.scan(good_step, jnp.zeros(2), None, length=-1)


def test_error_scalar_xs_leaf():
    with pytest.raises(ValueError, match=r"xs\['b'\] is a scalar"):
        bj.scan(good_step, jnp.zeros(2), {"a": jnp.zeros((3, 2)), "b": jnp.float64(1.0)})


def test_error_step_changes_carry_structure():
    step = lambda h, x: ((h, h), None)
    with pytest.raises(TypeError, match="same pytree structure as init"):
        bj.scan(step, jnp.zeros(2), jnp.zeros((3, 2)))


@pytest.mark.parametrize("name", STRATEGIES)
def test_error_step_changes_carry_shape(name):
    step = lambda h, x: (jnp.concatenate([h, x]), None)
    with pytest.raises(TypeError, match=r"init has float64\[2\], f returned float64\[4\]"):
        bj.scan(step, jnp.zeros(2), jnp.zeros((3, 2)), remat=STRATEGIES[name])


def test_error_step_changes_carry_dtype():
    step = lambda c, x: ({"h": c["h"].astype(jnp.float32)}, None)
    with pytest.raises(TypeError, match=r"carry\['h'\].*init has float64\[2\].*float32\[2\]"):
        bj.scan(step, {"h": jnp.zeros(2)}, jnp.zeros((3, 2)))


@pytest.mark.parametrize("name", STRATEGIES)
def test_error_shape_error_in_the_step_notes_the_time_major_layout(name):
    """A shape error inside the step keeps JAX's message, chained, and says what bj.scan fed it."""
    W_x, W_h = jnp.ones((D, H)), jnp.eye(H)
    step = lambda h, x: (jnp.tanh(x @ W_x + h @ W_h),) * 2
    h0, xs = jnp.zeros((4, H)), jnp.ones((20, 4, D))
    batch_major = jnp.swapaxes(xs, 0, 1)  # (B, T, D)
    with pytest.raises(TypeError) as err:
        bj.scan(step, h0, batch_major, remat=STRATEGIES[name])
    message = str(err.value)
    assert message.startswith(str(err.value.__cause__)), message  # JAX's message, first
    assert "incompatible shapes" in message
    assert "scans over the leading axis of xs (time-major, xs: (T, ...))" in message
    assert "x of shape (20, 3), and carry of shape (4, 4)" in message
    assert "batch-major" in message and "jnp.swapaxes(xs, 0, 1)" in message
    assert message.count("bj.scan scans") == 1
    # the fix works
    want = jax.lax.scan(step, h0, xs)
    assert_trees_equal(bj.scan(step, h0, jnp.swapaxes(batch_major, 0, 1)), want)


def test_error_shape_note_only_for_shape_errors_and_hint_only_where_it_fits():
    # the batch axes agree: a shape error, but not the layout's
    step = lambda h, x: (h + x[:, :2], None)
    with pytest.raises(TypeError, match=r"x of shape \(4, 3\), and carry of shape") as err:
        bj.scan(step, jnp.zeros((4, 4)), jnp.ones((5, 4, 3)))
    assert "batch-major" not in str(err.value)
    # pytree x and carry: every leaf by its path
    step = lambda c, x: ({"h": c["h"] + x["a"]}, None)
    with pytest.raises(TypeError, match=r"x\['a'\] of shape \(2, 3\), and carry\['h'\] of shape"):
        bj.scan(step, {"h": jnp.zeros((4, 3))}, {"a": jnp.ones((4, 2, 3))})
    # other errors pass through untouched
    boom = TypeError("not about the layout")

    def raises(h, x):
        raise boom

    with pytest.raises(TypeError) as err:
        bj.scan(raises, jnp.zeros(2), jnp.zeros((3, 2)))
    assert err.value is boom
    # a nested bj.scan's note is not repeated, nor added to its own errors
    inner = lambda h, x: (h + x, None)
    outer = lambda h, xs: (bj.scan(inner, h, xs)[0], None)
    with pytest.raises(TypeError) as err:
        bj.scan(outer, jnp.zeros((4, 3)), jnp.ones((2, 5, 2, 3)))
    assert str(err.value).count("bj.scan scans") == 1
    grow = lambda h, x: (jnp.concatenate([h, x]), None)
    with pytest.raises(TypeError) as err:
        bj.scan(lambda h, xs: (bj.scan(grow, h, xs)[0], None), jnp.zeros(2), jnp.zeros((2, 3, 2)))
    assert "bj.scan scans" not in str(err.value)


def test_error_step_does_not_return_pair():
    with pytest.raises(TypeError, match=r"must return a pair \(carry, y\)"):
        bj.scan(lambda h, x: h, jnp.zeros(2), jnp.zeros((3, 2)))


def test_error_remat_wrong_type():
    with pytest.raises(TypeError, match="remat=.*strategy.*got str"):
        bj.scan(good_step, jnp.zeros(2), jnp.zeros((3, 2)), remat="every_step")
    with pytest.raises(TypeError, match=r"got the class EveryStep; write remat=EveryStep\(\)"):
        bj.scan(good_step, jnp.zeros(2), jnp.zeros((3, 2)), remat=bj.EveryStep)
    with pytest.raises(TypeError, match="policy=.*callable.*str"):
        bj.EveryStep(policy="dots")


def test_error_truncation_wrong_type():
    with pytest.raises(TypeError, match="truncation=.*got int"):
        bj.scan(good_step, jnp.zeros(2), jnp.zeros((3, 2)), truncation=5)
    with pytest.raises(TypeError, match="got the class Truncate"):
        bj.scan(good_step, jnp.zeros(2), jnp.zeros((3, 2)), truncation=bj.Truncate)


def test_error_f_not_callable_and_bad_flags():
    with pytest.raises(TypeError, match="callable step"):
        bj.scan(None, jnp.zeros(2), jnp.zeros((3, 2)))
    with pytest.raises(TypeError, match="reverse=.*bool"):
        bj.scan(good_step, jnp.zeros(2), jnp.zeros((3, 2)), reverse="yes")
    with pytest.raises(TypeError, match="unroll=.*int or bool"):
        bj.scan(good_step, jnp.zeros(2), jnp.zeros((3, 2)), unroll=2.5)


def test_weak_typed_init_is_accepted_like_lax_scan():
    xs = jnp.ones((4,), jnp.float32)
    got = bj.scan(lambda c, x: (c + x, c), 0.0, xs)
    want = jax.lax.scan(lambda c, x: (c + x, c), 0.0, xs)
    jax.tree.map(np.testing.assert_array_equal, got, want)


# --- inputs as users and JAX's own tests give them (issue 25) ---------------------------

WEAK_INITS = {
    "int": 7,
    "float": 0.5,
    "complex": 1 + 2j,
    "weak-array": jnp.asarray(0.25),
}
XS_DTYPES = [jnp.int8, jnp.int16, jnp.int32, jnp.float32, jnp.float64]


def _divide_step(c, x):
    """``lax.scan`` promotes a weakly typed int carry to the float this step returns."""
    return (c + x) / 3, c


def _same_types(got, want):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert (a.dtype, a.shape, a.weak_type) == (b.dtype, b.shape, b.weak_type)


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("dtype", XS_DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_weak_int_init_is_promoted_like_lax_scan(name, dtype):
    """JAX's test_scan_init_weak_type: a Python int init that the step turns into
    a float. Binomial traced the step with the int carry and truncated it."""
    xs = jnp.arange(5, dtype=dtype)
    remat = STRATEGIES[name]
    with jax.numpy_dtype_promotion("standard"):  # as JAX's own test runs
        for step in (_divide_step, lambda c, x: (c // 2 + x, c)):
            got = jax.jit(lambda xs, f=step: bj.scan(f, 7, xs, remat=remat))(xs)
            want = jax.jit(lambda xs, f=step: jax.lax.scan(f, 7, xs))(xs)
            _same_types(got, want)
            assert_trees_equal(got, want)


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("kind", WEAK_INITS)
def test_weak_inits_of_every_kind_values_and_gradients(name, kind):
    """Values, types and gradients as ``lax.scan`` for every weakly typed init,
    against float32 and float64 inputs and a closed-over parameter."""
    init = WEAK_INITS[kind]
    remat = STRATEGIES[name]
    for dtype in (jnp.float32, jnp.float64):
        with jax.numpy_dtype_promotion("standard"):  # a complex init with float inputs
            grads = dtype == jnp.float64 and not kind.startswith("weak-")  # as the scalars'
            _check_weak_init(init, remat, dtype, kind == "complex", grads)


def _check_weak_init(init, remat, dtype, complex_xs, grads):
    xs = jnp.linspace(0.1, 1.0, 13, dtype=dtype)
    if complex_xs:
        xs = xs.astype(jnp.complex64 if dtype == jnp.float32 else jnp.complex128)
    w = jnp.asarray(0.9, dtype)

    def run(scan_fn, w, xs):
        return scan_fn(lambda c, x: (c * w + jnp.sin(x), c), init, xs)

    def loss(scan_fn, w, xs):
        carry, ys = run(scan_fn, w, xs)
        return jnp.real(jnp.sum(ys * ys) + carry)

    ours = functools.partial(bj.scan, remat=remat)
    got, want = run(ours, w, xs), run(jax.lax.scan, w, xs)
    _same_types(got, want)
    assert_trees_equal(got, want)
    if not grads:
        return
    g = jax.jit(jax.grad(functools.partial(loss, ours), argnums=(0, 1)))(w, xs)
    g_ref = jax.grad(functools.partial(loss, jax.lax.scan), argnums=(0, 1))(w, xs)
    assert tree_rel_err(g, g_ref) < 1e-12


@pytest.mark.parametrize("name", STRATEGIES)
def test_integer_only_scan(name):
    """Nothing to differentiate: every strategy runs it as lax.scan does (Budget
    compiled a reverse-mode probe and raised "grad requires real-valued outputs")."""
    remat = STRATEGIES[name]
    step = lambda c, _: (c + 1, c)
    got = bj.scan(step, 0, None, length=10, remat=remat)
    want = jax.lax.scan(step, 0, None, length=10)
    _same_types(got, want)
    assert_trees_equal(got, want)
    xs = jnp.arange(6, dtype=jnp.int32)
    got = jax.jit(lambda xs: bj.scan(lambda c, x: (c * 2 + x, c % 3), 1, xs, remat=remat))(xs)
    want = jax.lax.scan(lambda c, x: (c * 2 + x, c % 3), 1, xs)
    assert_trees_equal(got, want)


def _loop_step(c, x):
    """A step with a ``fori_loop`` whose bounds are traced: forward and JVP work,
    reverse mode does not (for ``lax.scan`` either)."""
    n = 1 + (x[0] > 0).astype(jnp.int32)
    return jax.lax.fori_loop(0, n, lambda i, c: jnp.sin(c) + x, c), jnp.sum(c)


@pytest.mark.parametrize("name", STRATEGIES)
def test_step_reverse_mode_cannot_differentiate_runs_forward(name):
    """A strategy changes how the gradient is computed, never whether the forward
    runs: Budget planned by compiling reverse-mode probes and raised here."""
    remat = STRATEGIES[name]
    xs = jax.random.normal(jax.random.key(2), (9, 3), jnp.float64)
    c0 = jnp.full(3, 0.2)
    assert_trees_equal(
        jax.jit(lambda c: bj.scan(_loop_step, c, xs, remat=remat))(c0),
        jax.jit(lambda c: jax.lax.scan(_loop_step, c, xs))(c0),
    )
    if isinstance(remat, bj.Binomial):
        return  # forward mode is refused with the library's error (test_binomial.py)
    ours = lambda c: jnp.sum(bj.scan(_loop_step, c, xs, remat=remat)[1])
    ref = lambda c: jnp.sum(jax.lax.scan(_loop_step, c, xs)[1])
    tangent = jnp.ones(3)
    assert rel_err(jax.jvp(ours, (c0,), (tangent,))[1], jax.jvp(ref, (c0,), (tangent,))[1]) < 1e-12
    (_, f_lin), (_, f_ref) = jax.linearize(ours, c0), jax.linearize(ref, c0)
    assert rel_err(f_lin(tangent), f_ref(tangent)) < 1e-12
