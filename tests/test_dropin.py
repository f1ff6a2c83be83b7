"""bj.scan as a drop-in for lax.scan at the edges: containers, traced arguments, bad input.

Every case runs under each kind of strategy (a plain scan, jax.checkpoint per
step, nested checkpoints, the custom_vjp engine): the checks in ``bj.scan``
sit in front of all of them.
"""

import collections
import functools

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpttjax as bj

# one example of each kind of implementation (the checks in bj.scan sit in front of all)
STRATEGIES = {
    name: strategy
    for name, strategy in helpers.STRATEGIES.items()
    if name in ("StoreAll", "EveryStep", "Nested-2", "Binomial-3")
}


def scan_with(name, **kw):
    return functools.partial(bj.scan, remat=STRATEGIES[name], **kw)


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


# --- what comes back ----------------------------------------------------------------------


Pair = collections.namedtuple("Pair", ["carry", "y"])


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("container", [list, Pair, tuple])
def test_returns_the_container_f_returns(name, container):
    xs = jnp.arange(5.0)
    make = getattr(container, "_make", container)
    step = lambda c, x: make([c + x, c * x])
    want = jax.lax.scan(step, jnp.float64(1.0), xs)
    got = scan_with(name)(step, jnp.float64(1.0), xs)
    assert type(got) is type(want) is container
    assert_same(got, want)
    got = scan_with(name, truncation=bj.Truncate(2))(step, jnp.float64(1.0), xs)
    assert type(got) is container


# --- traced length and unroll -------------------------------------------------------------


@pytest.mark.parametrize("name", STRATEGIES)
def test_traced_length_is_a_concretization_error(name):
    fn = jax.jit(lambda n: scan_with(name)(lambda c, _: (c + 1.0, c), 0.0, None, length=n))
    with pytest.raises(jax.errors.ConcretizationTypeError, match=r"length=.*while_loop"):
        fn(3)


@pytest.mark.parametrize("name", STRATEGIES)
def test_traced_unroll_is_a_concretization_error(name):
    xs = jnp.ones(3)
    fn = jax.jit(lambda u: scan_with(name)(lambda c, x: (c + x, c), 0.0, xs, unroll=u))
    with pytest.raises(jax.errors.ConcretizationTypeError, match=r"unroll=.*static"):
        fn(2)


def test_concrete_integer_array_length_is_accepted_like_lax_scan():
    step = lambda c, _: (c + 1.0, c)
    for n in (jnp.int32(4), np.int64(4)):
        assert_same(bj.scan(step, 0.0, None, length=n), jax.lax.scan(step, 0.0, None, length=n))


# --- carries the step passes through ------------------------------------------------------


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("T", [1, 5])
def test_passthrough_scan_in_vmapped_cond_stays_unbatched(name, T):
    """A carry-only scan inside a cond with a batched predicate, vmapped with out_axes=None."""

    def g(_, y):
        return scan_with(name)(lambda y, _: (y, None), y, None, length=T)[0]

    fn = jax.vmap(lambda x, y: jax.lax.cond(x < 0, g, g, x, y), (0, None), None)
    assert fn(jnp.arange(3.0), 3.0) == 3.0


@pytest.mark.parametrize("name", STRATEGIES)
def test_passthrough_carry_leaf_gradients_and_identity(name):
    """A read-only leaf in the carry (used by the step) gets the same gradients as lax.scan."""
    W = jax.random.normal(jax.random.key(0), (3, 3)) / 2
    xs = jax.random.normal(jax.random.key(1), (9, 3))

    def loss(scan_fn, W, h0, xs):
        step = lambda c, x: ((jnp.tanh(c[0] @ c[1] + x), c[1]), c[0])
        (h, W_out), hs = scan_fn(step, (h0, W), xs)
        return jnp.sum(hs**2) + jnp.sum(h) + jnp.sum(jnp.sin(W_out))

    h0 = jnp.ones(3)
    got = jax.grad(functools.partial(loss, scan_with(name)), argnums=(0, 1, 2))(W, h0, xs)
    want = jax.grad(functools.partial(loss, jax.lax.scan), argnums=(0, 1, 2))(W, h0, xs)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), got, want)
    (_, W_out), _ = scan_with(name)(lambda c, x: ((c[0] + x, c[1]), None), (h0, W), xs)
    assert W_out is W  # as lax.scan: the very value passed in


def test_passthrough_carry_leaf_is_not_stored_per_step():
    """EveryStep checkpoints carries; a read-only leaf must cost what a closed-over one does."""
    H, T = 64, 200
    W = jnp.eye(H) / 2
    xs = jnp.ones((T, H))

    def in_carry(W, xs):
        step = lambda c, x: ((jnp.tanh(c[0] @ c[1] + x), c[1]), None)
        (h, _), _ = bj.scan(step, (jnp.zeros(H), W), xs, remat=bj.EveryStep())
        return jnp.sum(h)

    def closed_over(W, xs):
        step = lambda h, x: (jnp.tanh(h @ W + x), None)
        return jnp.sum(bj.scan(step, jnp.zeros(H), xs, remat=bj.EveryStep())[0])

    temp = lambda fn: jax.jit(jax.grad(fn)).lower(W, xs).compile().memory_analysis()
    carried, closed = temp(in_carry).temp_size_in_bytes, temp(closed_over).temp_size_in_bytes
    assert carried < 1.2 * closed + 4 * W.nbytes, (carried, closed)


# --- strategies ---------------------------------------------------------------------------


def test_abstract_strategy_classes_are_rejected_with_concrete_examples():
    good_step = lambda h, x: (h + x, h)
    args = (good_step, jnp.zeros(2), jnp.zeros((3, 2)))
    with pytest.raises(TypeError, match=r"abstract base class RematStrategy.*bj\.EveryStep\(\)"):
        bj.scan(*args, remat=bj.RematStrategy)
    with pytest.raises(TypeError, match=r"abstract base class TruncationStrategy.*Truncate"):
        bj.scan(*args, truncation=bj.TruncationStrategy)
    with pytest.raises(TypeError, match=r"write remat=Binomial\(snapshots=\.\.\.\)"):
        bj.scan(*args, remat=bj.Binomial)
    with pytest.raises(TypeError, match=r"write truncation=Truncate\(every=\.\.\.\)"):
        bj.scan(*args, truncation=bj.Truncate)
    with pytest.raises(TypeError, match="abstract"):
        bj.TruncationStrategy()


# --- bad input, named by argument and path ------------------------------------------------


@pytest.mark.parametrize("name", STRATEGIES)
def test_non_array_init_leaf_is_named(name):
    with pytest.raises(TypeError, match=r"init=.*init\['a'\]\[1\] is a str 'abc'"):
        scan_with(name)(lambda c, x: (c, x), {"a": (1.0, "abc")}, jnp.ones(3))
    with pytest.raises(TypeError, match=r"xs=.*xs\['b'\] is a str"):
        scan_with(name)(lambda c, x: (c, x), 0.0, {"a": jnp.ones(3), "b": "abc"})


@pytest.mark.parametrize("name", STRATEGIES)
def test_negative_unroll_is_rejected_before_tracing(name):
    traced = []

    def step(c, x):
        traced.append(1)
        return c + x, c

    with pytest.raises(ValueError, match=r"unroll=.*non-negative int, got -1"):
        scan_with(name)(step, 0.0, jnp.ones(4), unroll=-1)
    assert not traced


@pytest.mark.parametrize("name", STRATEGIES)
def test_structure_mismatch_names_the_component_and_keys(name):
    init = {"layer1": jnp.zeros(2), "layer2": {"h": jnp.zeros(2)}, "n": (jnp.zeros(()),)}

    def step(c, x):
        h = c["layer2"]["h"] + x
        return {"layer1": c["layer1"], "layer2": {"h": h, "c": h}, "n": [c["n"][0]]}, None

    with pytest.raises(TypeError) as err:
        scan_with(name)(step, init, jnp.ones((3, 2)))
    msg = str(err.value)
    assert "carry['layer2'] is a dict with keys ['h'] in init" in msg
    assert "extra keys ['c']" in msg
    assert "carry['n'] is a tuple of length 1 in init, but f returned a list of length 1" in msg
    assert "PyTreeDef" not in msg


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_shape_and_dtype_mismatch_is_listed(name):
    init = {"a": jnp.zeros(2), "b": jnp.zeros(2), "c": jnp.zeros(2)}
    step = lambda c, x: (
        {"a": c["a"].astype(jnp.float32), "b": jnp.zeros(3), "c": c["c"] + x},
        None,
    )
    with pytest.raises(TypeError) as err:
        scan_with(name)(step, init, jnp.ones((3, 2)))
    msg = str(err.value)
    assert "carry['a']: init has float64[2], f returned float32[2] (dtype changed)" in msg
    assert "carry['b']: init has float64[2], f returned float64[3] (shape changed)" in msg
    assert "carry['c']" not in msg


@pytest.mark.parametrize("name", STRATEGIES)
def test_step_returning_one_array_is_described_as_an_array(name):
    with pytest.raises(TypeError, match=r"pair \(carry, y\).*got an array of shape \(2,\)"):
        scan_with(name)(lambda c, x: jnp.stack([c, x]), jnp.float64(0.0), jnp.ones(3))
    with pytest.raises(TypeError, match=r"pair \(carry, y\).*got a tuple of length 3"):
        scan_with(name)(lambda c, x: (c, x, x), jnp.float64(0.0), jnp.ones(3))
