"""The registries (strategies, cells), and strategies as jit arguments.

``bj.remat.STRATEGIES`` and ``bj.cells.CELLS`` are the one list each that
tests, scripts and ``--remat``/``--cell`` options read. Strategies are
pytrees: they cross ``jax.jit`` as ordinary arguments (arrays traced, the
rest static) and, being hashable, as static arguments, without retracing on
new values.
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import pytest
from absl.testing import parameterized
from helpers import CELLS, STRATEGIES, assert_trees_close, assert_trees_equal

import bpttjax as bj
from bpttjax.cells import _registry as _cells_registry
from bpttjax.remat import _base as _remat_base

# Values are compared bit for bit here: XLA's default code generation (conftest.py).
pytestmark = pytest.mark.usefixtures("llvm_optimized")

D, H = 3, 4


def make_params(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "W_xh": jax.random.normal(k1, (D, H), jnp.float64) / 2,
        "W_hh": 0.9 * jnp.linalg.qr(jax.random.normal(k2, (H, H), jnp.float64))[0],
    }


def make_xs(T, seed=1):
    return jax.random.normal(jax.random.key(seed), (T, D), jnp.float64)


def loss(params, xs, remat=None, truncation=None, scan=None):
    step = lambda h, x: (jnp.tanh(x @ params["W_xh"] + h @ params["W_hh"]), jnp.sum(jnp.sin(h)))
    if scan is None:
        scan = functools.partial(bj.scan, remat=remat or bj.StoreAll(), truncation=truncation)
    carry, ys = scan(step, jnp.zeros(H), xs)
    return jnp.sum(ys) + jnp.sum(carry**2)


def grad_loss(params, xs, remat=None, truncation=None):
    return jax.grad(loss)(params, xs, remat, truncation)


# --- the strategy registry ------------------------------------------------------------


def test_registry_names_the_built_in_strategies_in_order():
    assert list(bj.remat.STRATEGIES) == ["store_all", "every_step", "binomial", "nested", "budget"]
    assert bj.remat.STRATEGIES["binomial"] is bj.Binomial
    assert bj.remat.STRATEGIES["budget"] is bj.Budget
    with pytest.raises(TypeError):
        bj.remat.STRATEGIES["mine"] = bj.StoreAll  # read-only


@pytest.mark.parametrize(
    "spec, want",
    [
        ("store_all", bj.StoreAll()),
        ("every_step", bj.EveryStep()),
        ("every_step:dots_saveable", bj.EveryStep(jax.checkpoint_policies.dots_saveable)),
        ("nested:3", bj.Nested(3)),
        ("nested:10x10", bj.Nested(lengths=(10, 10))),
        ("binomial:14", bj.Binomial(14)),
        (" Binomial : 1_000 ", bj.Binomial(1000)),
        ("budget:64MB", bj.Budget(64_000_000)),
        ("budget:1.5GiB", bj.Budget("1.5GiB")),
    ],
)
def test_from_string(spec, want):
    assert bj.remat.from_string(spec) == want


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ("revolve:3", ValueError, r"unknown remat strategy 'revolve'.*store_all, every_step"),
        ("binomial:three", ValueError, r"Binomial expects an int argument.*'three'"),
        ("binomial:0", ValueError, r"snapshots >= 1"),
        ("nested:3xa", ValueError, r"level lengths separated by 'x'"),
        ("every_step:dots", ValueError, r"jax.checkpoint_policies value such as 'dots_saveable'"),
        ("budget", ValueError, r"budget expects a size"),
        ("budget:lots", ValueError, r"Budget"),
    ],
)
def test_from_string_errors(spec, error, match):
    with pytest.raises(error, match=match):
        bj.remat.from_string(spec)
    with pytest.raises(TypeError, match="expects a str"):
        bj.remat.from_string(3)


POLICY_FACTORIES = [
    "save_only_these_names",
    "save_any_names_but_these",
    "save_anything_except_these_names",
    "save_from_both_policies",
    "offload_dot_with_no_batch_dims",
    "save_and_offload_only_these_names",
]


MALFORMED_SPECS = [
    ("", r"unknown remat strategy ''.*'name' or 'name:argument'"),
    (":", r"unknown remat strategy ''"),
    (" : ", r"unknown remat strategy ''"),
    ("unknown", r"unknown remat strategy 'unknown'.*store_all, every_step"),
    ("nested:", r"Nested expects an int argument \(levels\), e.g. 'nested:4', got ''"),
    ("nested:0", r"levels >= 1"),
    ("nested:2x", r"level lengths separated by 'x' \('nested:10x10'\), got '2x'"),
    ("nested:axb", r"level lengths separated by 'x'.*got 'axb'"),
    ("nested:2x0", r"lengths\[1\] is 0"),
    ("binomial", r"Binomial expects an int argument \(snapshots\), e.g. 'binomial:4'"),
    ("binomial:", r"Binomial expects an int argument.*got ''"),
    ("binomial:x", r"Binomial expects an int argument.*got 'x'"),
    ("binomial:-1", r"snapshots >= 1.*got -1"),
    ("binomial:1.5", r"Binomial expects an int argument.*got '1.5'"),
    ("store_all:3", r"StoreAll takes no argument, got '3': write 'store_all'"),
    ("store_all:", r"StoreAll takes no argument"),
    ("every_step:nope", r"checkpoint_policies value such as 'dots_saveable'.*'nope'"),
    ("every_step:_private", r"checkpoint_policies value.*'_private'"),
    *(
        (f"every_step:{name}", rf"{name}\(.*is not one itself.*bj\.EveryStep\(jax")
        for name in POLICY_FACTORIES
    ),
    ("budget", r"budget expects a size, e.g. 'budget:64MB'"),
    ("budget:", r"is not a size"),
    ("budget:-5MB", r"is not a size"),
    ("budget:1e400", r"remat spec 'budget:1e400'"),
    ("budget:nan", r"remat spec 'budget:nan'"),
]


@pytest.mark.parametrize("spec, match", MALFORMED_SPECS, ids=[repr(s) for s, _ in MALFORMED_SPECS])
def test_from_string_malformed_specs_name_the_spec(spec, match):
    """Every malformed spec is a ValueError that quotes the spec and what is accepted."""
    with pytest.raises(ValueError, match=match) as err:
        bj.remat.from_string(spec)
    assert type(err.value) is ValueError, repr(err.value)
    assert repr(spec) in str(err.value)


def test_from_string_factories_say_how_to_pass_names():
    with pytest.raises(ValueError) as err:
        bj.remat.from_string("every_step:save_only_these_names")
    message = str(err.value)
    assert "bj.EveryStep(jax.checkpoint_policies.save_only_these_names('hidden_projection'))" in (
        message
    )
    assert "nothing_saveable" in message and "dots_saveable" in message
    # the policies that a spec names still work, and run
    for name in ("dots_saveable", "nothing_saveable", "everything_saveable", "checkpoint_dots"):
        got = bj.remat.from_string(f"every_step:{name}")
        assert got == bj.EveryStep(getattr(jax.checkpoint_policies, name))
    got = grad_loss(make_params(), make_xs(5), bj.remat.from_string("every_step:dots_saveable"))
    assert_trees_close(got, grad_loss(make_params(), make_xs(5)))


@pytest.mark.parametrize("spec", [3, None, b"binomial:3", ("binomial", 3)])
def test_from_string_rejects_a_spec_that_is_not_a_str(spec):
    with pytest.raises(TypeError, match=r"from_string\(spec=...\) expects a str") as err:
        bj.remat.from_string(spec)
    assert repr(spec) in str(err.value)


def test_examples_cover_every_registered_strategy():
    kinds = {type(s) for s in bj.remat.examples()}
    assert kinds == set(bj.remat.STRATEGIES.values())
    assert set(STRATEGIES.values()) == set(bj.remat.examples())
    assert len(STRATEGIES) == len(bj.remat.examples())  # the test ids are distinct


@dataclasses.dataclass(frozen=True)
class EveryOther(bj.RematStrategy):
    """A user's strategy: checkpoint pairs of steps (for the registry test)."""

    def scan(self, f, init, xs, length, reverse, unroll):
        return bj.Nested(lengths=(-(-length // 2), 2)).scan(f, init, xs, length, reverse, unroll)

    def cost(self, length, costs):
        return bj.Nested(lengths=(-(-length // 2), 2)).cost(length, costs)


def test_register_a_user_strategy():
    try:
        assert bj.remat.register("every_other")(EveryOther) is EveryOther
        assert bj.remat.from_string("every_other") == EveryOther()
        assert EveryOther() in bj.remat.examples()
        params, xs = make_params(), make_xs(7)
        got = jax.grad(loss)(params, xs, remat=bj.remat.from_string("every_other"))
        assert_trees_close(got, jax.grad(loss)(params, xs, scan=jax.lax.scan))
        with pytest.raises(ValueError, match="taken by Binomial"):
            bj.remat.register("binomial")(EveryOther)
    finally:
        _remat_base._REGISTRY.pop("every_other", None)
    with pytest.raises(ValueError, match="lower-case identifier"):
        bj.remat.register("Every Other")
    with pytest.raises(TypeError, match="RematStrategy subclass"):
        bj.remat.register("other")(int)


# --- the cell registry ----------------------------------------------------------------


def test_cell_registry():
    assert CELLS == ("rnn", "gru", "lstm")
    lstm = bj.cells.get("lstm")
    assert (lstm.step, lstm.init, lstm.carry_arrays, lstm.gates) == (
        bj.cells.lstm,
        bj.cells.init_lstm,
        2,
        4,
    )
    assert bj.cells.get(lstm) is lstm
    with pytest.raises(ValueError, match="unknown cell 'elman'; registered cells: rnn, gru, lstm"):
        bj.cells.get("elman")
    with pytest.raises(TypeError):
        bj.cells.CELLS["mine"] = lstm  # read-only


@pytest.mark.parametrize("name", CELLS)
def test_every_cell_runs_from_the_registry(name):
    cell = bj.cells.CELLS[name]
    params = cell.init(jax.random.key(0), D, H, dtype=jnp.float64)
    carry = cell.initial_carry(H, (2,), dtype=jnp.float64)
    assert len(jax.tree.leaves(carry)) == cell.carry_arrays
    assert params["W_x" if name != "rnn" else "W_xh"].shape == (D, cell.gates * H)
    new_carry, h = cell.step(params, carry, jnp.ones((2, D)))
    chex.assert_trees_all_equal_shapes_and_dtypes(new_carry, carry)
    chex.assert_shape(h, (2, H))


def test_register_a_user_cell():
    def init_linear(key, input_size, hidden_size, dtype=jnp.float32):
        return {"W_x": jax.random.normal(key, (input_size, hidden_size), dtype)}

    def linear(params, carry, x):
        h, n = carry
        h = 0.5 * h + x @ params["W_x"]
        return (h, n + 1), h

    cell = bj.cells.Cell("linear2", linear, init_linear, carry_arrays=2)
    try:
        assert bj.cells.register(cell) is cell
        assert "linear2" in bj.cells.CELLS
        carry = bj.cells.initial_carry("linear2", 5, (3,))
        assert len(carry) == 2 and carry[0].shape == (3, 5)
        with pytest.raises(ValueError, match="already named 'linear2'"):
            bj.cells.register(bj.cells.Cell("linear2", linear, init_linear))
    finally:
        _cells_registry._REGISTRY.pop("linear2", None)
    with pytest.raises(ValueError, match="lower-case identifier"):
        bj.cells.Cell("Linear", linear, init_linear)
    with pytest.raises(TypeError, match=r"Cell\(step=...\) expects a callable"):
        bj.cells.Cell("linear", None, init_linear)
    with pytest.raises(ValueError, match=r"Cell\(carry_arrays=...\) expects a positive int"):
        bj.cells.Cell("linear", linear, init_linear, carry_arrays=0)


# --- strategies cross jit -------------------------------------------------------------


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_as_jit_argument_does_not_retrace(name):
    strategy = STRATEGIES[name]
    chex.clear_trace_counter()
    g = jax.jit(chex.assert_max_traces(grad_loss, n=1))
    want = jax.grad(loss)(make_params(), make_xs(13), scan=jax.lax.scan)
    assert_trees_close(g(make_params(), make_xs(13), strategy), want)
    # new values, and an equal strategy rebuilt from its fields: no second trace
    rebuilt = dataclasses.replace(strategy)
    want = jax.grad(loss)(make_params(5), make_xs(13, 6), scan=jax.lax.scan)
    assert_trees_close(g(make_params(5), make_xs(13, 6), rebuilt), want)


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_as_static_argument(name):
    strategy = STRATEGIES[name]
    chex.clear_trace_counter()
    g = jax.jit(chex.assert_max_traces(grad_loss, n=1), static_argnums=2)
    want = jax.grad(loss)(make_params(), make_xs(13), scan=jax.lax.scan)
    assert_trees_close(g(make_params(), make_xs(13), strategy), want)
    assert_trees_close(g(make_params(), make_xs(13), dataclasses.replace(strategy)), want)


def test_random_truncate_crosses_jit_with_a_traced_key():
    params, xs = make_params(), make_xs(40)
    chex.clear_trace_counter()
    g = jax.jit(chex.assert_max_traces(grad_loss, n=1))
    for seed in range(3):
        tr = bj.RandomTruncate(jax.random.key(seed), keep_prob=0.7)
        want = jax.grad(loss)(params, xs, truncation=tr)  # the key closed over, eagerly
        assert_trees_close(g(params, xs, None, tr), want)
    # the draws differ between keys, so the key really was traced, not baked in
    a = g(params, xs, None, bj.RandomTruncate(jax.random.key(0), keep_prob=0.7))
    b = g(params, xs, None, bj.RandomTruncate(jax.random.key(1), keep_prob=0.7))
    assert not all(jax.tree.leaves(jax.tree.map(jnp.array_equal, a, b)))
    leaves = jax.tree.leaves(bj.RandomTruncate(jax.random.key(0)))
    assert len(leaves) == 1 and jnp.issubdtype(leaves[0].dtype, jax.dtypes.prng_key)


def test_random_truncate_as_static_argument_compares_by_value():
    a = bj.RandomTruncate(jax.random.key(3), keep_prob=0.5)
    b = bj.RandomTruncate(jax.random.key(3), keep_prob=0.5)
    assert a == b and hash(a) == hash(b)
    assert a != bj.RandomTruncate(jax.random.key(4), keep_prob=0.5)
    assert a != bj.RandomTruncate(jax.random.key(3), keep_prob=0.6)
    assert bj.RandomTruncate(jax.random.PRNGKey(3)) == bj.RandomTruncate(jax.random.PRNGKey(3))
    params, xs = make_params(), make_xs(30)
    chex.clear_trace_counter()
    g = jax.jit(chex.assert_max_traces(grad_loss, n=1), static_argnums=(2, 3))
    assert_trees_close(g(params, xs, None, a), jax.grad(loss)(params, xs, truncation=a))
    assert_trees_close(g(params, xs, None, b), jax.grad(loss)(params, xs, truncation=a))


def test_truncate_is_a_pytree_without_leaves():
    assert jax.tree.leaves(bj.Truncate(5)) == []
    assert jax.tree.unflatten(*reversed(jax.tree.flatten(bj.Truncate(5)))) == bj.Truncate(5)


# --- the shared check under chex's variants (with and without jit) ---------------------


class VariantsTest(chex.TestCase):
    """Forward values and gradients against lax.scan, each strategy with and without jit."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*((name, name) for name in STRATEGIES))
    def test_matches_lax_scan(self, name):
        strategy = STRATEGIES[name]
        params, xs = make_params(), make_xs(13)
        step = lambda h, x: (jnp.tanh(x @ params["W_xh"] + h @ params["W_hh"]), h)
        for reverse in (False, True):
            ours = self.variant(
                lambda init, xs, r=reverse: bj.scan(step, init, xs, reverse=r, remat=strategy)
            )
            want = jax.lax.scan(step, jnp.ones(H), xs, reverse=reverse)
            assert_trees_equal(ours(jnp.ones(H), xs), want)
        grad = self.variant(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
        got = grad(params, xs, strategy)
        assert_trees_close(got, jax.grad(loss, argnums=(0, 1))(params, xs, scan=jax.lax.scan))
