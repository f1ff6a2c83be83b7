"""Checks on 8 simulated CPU devices, run in one subprocess by ``test_sharding.py``.

The rest of the suite runs on one device, and JAX fixes the number of CPU
devices when its backend starts, so these checks run in their own process:

    python tests/_sharded_checks.py            # every check
    python tests/_sharded_checks.py binomial   # those whose name contains it
    python tests/_sharded_checks.py --part 1/2 # every second check, from the first

Each check prints ``ok``, ``FAIL`` (with the reason), ``known failure`` or
``XPASS`` (a known failure that now passes: remove its mark); the exit status
is 1 if any check failed or passed unexpectedly.

What is checked, in float64 at tiny sizes (``T <= 9``, ``B = 8``, ``H = 4``),
every program compiled once:

* ``bj.scan`` under every registered strategy (``helpers.STRATEGIES``,
  ``Binomial`` and ``Budget`` included) on a batch-sharded input, in three
  settings: ``jax.jit`` over a 1-D explicit mesh (``jax.make_mesh``'s
  default), ``jax.shard_map`` with a ``pmean`` of the gradients, and
  ``jax.jit`` over a 2-D mesh with the batch on one axis and the hidden units
  (the parameters' last axis) on the other. Each strategy meets each
  truncation (none, ``Truncate``, ``RandomTruncate``) once over the three
  settings (a Latin square rather than the full product), and the cells
  rotate likewise (the 2-D mesh alternates the tanh RNN and the LSTM).
  Outputs and gradients must equal the unsharded ``StoreAll`` run's (1e-12)
  and keep the input's sharding.
* ``bj.cells.run`` under ``StoreAll`` and ``Nested``: the same comparisons.
* ``bj.memory.measure`` reports per-device bytes and the number of devices;
  ``Budget(bytes)`` holds per device; under ``bj.cells.run`` on a mesh it runs
  the fused ``Nested(2)`` where a long ``Binomial`` would otherwise run.

The scripts' ``--devices`` are checked by ``tests/experiments/_sharded_script_checks.py``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # helpers


DEVICES = 8
DEVICE_FLAG = "--xla_force_host_platform_device_count"
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # simulated devices, even beside a GPU
if DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):  # before JAX starts
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {DEVICE_FLAG}={DEVICES}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from helpers import (  # noqa: E402
    STRATEGIES,
    abstract_inputs,
    assert_trees_close,
    init_model,
    make_step,
    model_loss,
)
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import bpttjax as bj  # noqa: E402
from bpttjax import _probe  # noqa: E402

# as tests/conftest.py
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

T, B, D, H = 7, 8, 3, 4
F64 = jnp.float64
TRUNCATIONS = {
    "full": None,
    "truncate": bj.Truncate(every=3),
    "random": bj.RandomTruncate(jax.random.key(3), keep_prob=0.7),
}
CELLS = ("rnn", "gru", "lstm")

CHECKS: list[tuple[str, object, str | None]] = []


def check(name: str, known_failure: str | None = None):
    """Register a check; ``known_failure`` states why it is expected to fail."""

    def add(fn):
        CHECKS.append((name, fn, known_failure))
        return fn

    return add


# --- the problem --------------------------------------------------------------------------


def problem(cell: str, seed: int = 0):
    """``(params, h0, xs)`` for ``cell``, float64, unsharded; ``h0`` is not zero."""
    c = bj.cells.get(cell)
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params = c.init(k1, D, H, F64)
    h0 = jax.tree.map(
        lambda a: 0.5 * jax.random.normal(k2, a.shape, F64), c.initial_carry(H, (B,), F64)
    )
    xs = jax.random.normal(k3, (T, B, D), F64)
    return params, h0, xs


def loss_fn(cell: str, remat, truncation, *, layer: bool = False, batch: int = B, chunks: int = 1):
    """``loss(params, h0, xs) -> (loss, (carry, ys))``: the batch mean of a per-step loss."""
    step = bj.cells.get(cell).step

    def loss(params, h0, xs):
        if layer:
            carry, ys = bj.cells.run(
                cell, params, h0, xs, remat=remat, truncation=truncation, batch_chunks=chunks
            )
        else:
            f = functools.partial(step, params)
            carry, ys = bj.scan(f, h0, xs, remat=remat, truncation=truncation)
        return jnp.sum(jnp.sin(ys)) / batch, (carry, ys)

    return loss


def value_and_grads(loss):
    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


@functools.cache
def reference(cell: str, truncation: str):
    """The unsharded run under ``StoreAll``: ``((loss, (carry, ys)), grads)``."""
    fn = jax.jit(value_and_grads(loss_fn(cell, bj.StoreAll(), TRUNCATIONS[truncation])))
    return jax.device_get(fn(*problem(cell)))


def spec(a) -> tuple:
    """``a``'s partition spec as a tuple with one entry per axis."""
    entries = tuple(a.sharding.spec)
    return entries + (None,) * (a.ndim - len(entries))


def assert_specs(tree, want: tuple, what: str) -> None:
    bad = [
        f"{what}{jax.tree_util.keystr(path)}: {spec(a)}"
        for path, a in jax.tree_util.tree_leaves_with_path(tree)
        if spec(a) != want[: a.ndim] + (None,) * max(0, a.ndim - len(want))
    ]
    assert not bad, f"sharding lost (want {want}): " + "; ".join(bad)


def assert_like_reference(got, cell: str, truncation: str) -> None:
    (loss, aux), grads = got
    (loss0, aux0), grads0 = reference(cell, truncation)
    assert_trees_close(jax.device_get((loss, aux)), (loss0, aux0))
    assert_trees_close(jax.device_get(grads), grads0)


def mesh_1d(axis_type=AxisType.Explicit, devices: int = DEVICES):
    return jax.make_mesh(
        (devices,), ("data",), axis_types=(axis_type,), devices=jax.devices()[:devices]
    )


def on_mesh(tree, sharding_of):
    """``tree`` put on the devices, each leaf sharded as ``sharding_of(leaf)``."""
    return jax.tree.map(lambda a: jax.device_put(a, sharding_of(a)), tree)


def batch_on_mesh(mesh, params, h0, xs):
    """Parameters replicated, the carry's and the inputs' batch axis on ``"data"``."""
    return (
        on_mesh(params, lambda a: NamedSharding(mesh, P())),
        on_mesh(h0, lambda a: NamedSharding(mesh, P("data"))),
        on_mesh(xs, lambda a: NamedSharding(mesh, P(None, "data"))),
    )


def assert_batch_sharded(carry, ys, g_h0, g_xs) -> None:
    """The outputs and the carry's and inputs' gradients keep the batch on ``"data"``."""
    assert_specs(carry, ("data",), "carry")
    assert_specs(ys, (None, "data"), "ys")
    assert_specs(g_h0, ("data",), "grad h0")
    assert_specs(g_xs, (None, "data"), "grad xs")


# --- bj.scan under every strategy and truncation ------------------------------------------

ROTATION = list(TRUNCATIONS)


def _case(i: int, setting: int, cells=CELLS) -> tuple[str, str]:
    """The cell and truncation of strategy ``i`` in ``setting`` 0, 1, 2: a Latin square."""
    return cells[(i + setting) % len(cells)], ROTATION[(i + setting) % len(ROTATION)]


def binding(remat, cell: str, batch: int = B):
    """``remat``, except that a ``Budget`` gets one that ``StoreAll`` just misses.

    The registry's example budget is sized for the shared suite; here the
    budget is set from the step's measured costs for the shapes ``Budget``
    will see (the global batch under ``jax.jit``, one device's share inside
    ``jax.shard_map``), so that it has to choose a remat strategy.
    """
    if not isinstance(remat, bj.Budget):
        return remat
    params, h0, xs = problem(cell)
    h0, xs = jax.tree.map(lambda a: a[:batch], h0), xs[:, :batch]
    step = functools.partial(bj.cells.get(cell).step, params)
    plain = bj.Budget(2**40).plan(step, h0, xs)  # StoreAll, its outputs included
    budget = bj.Budget(plain.predicted_bytes - 1)
    plan = budget.plan(step, h0, xs)
    print(f"    {plan}")
    assert plan.strategy != bj.StoreAll(), plan
    return budget


def check_jit_1d(remat, cell: str, truncation: str) -> None:
    """``jax.jit`` on a batch-sharded input, explicit mesh: values and shardings."""
    mesh = mesh_1d()
    params, h0, xs = problem(cell)
    loss = loss_fn(cell, binding(remat, cell), TRUNCATIONS[truncation])
    with jax.set_mesh(mesh):
        params, h0, xs = batch_on_mesh(mesh, params, h0, xs)
        got = jax.jit(value_and_grads(loss))(params, h0, xs)
    (_, (carry, ys)), (g_params, g_h0, g_xs) = got
    assert_batch_sharded(carry, ys, g_h0, g_xs)
    assert_specs(g_params, (), "grad params")
    assert_like_reference(got, cell, truncation)


def check_shard_map(
    remat, cell: str, truncation: str, vma: bool, layer: bool = False, chunks: int = 1, devices=None
) -> None:
    """``jax.shard_map`` over the batch, each device's gradients averaged with ``pmean``.

    With ``vma`` (JAX's default ``check_vma=True``) the replicated parameters
    are first made device-varying (``pcast``): otherwise their gradient comes
    back already summed over the devices, and a ``pmean`` would leave it
    ``N`` times too large. Without, ``check_vma=False`` gives per-device
    gradients, as the classic data-parallel recipe assumes. ``chunks`` is
    ``bj.cells.run``'s ``batch_chunks``; ``devices`` the mesh's size.
    """
    mesh = mesh_1d(devices=devices or DEVICES)
    local_b = B // mesh.size
    remat = binding(remat, cell, local_b)
    local_loss = loss_fn(
        cell, remat, TRUNCATIONS[truncation], layer=layer, batch=local_b, chunks=chunks
    )

    def local(params, h0, xs):
        if vma:
            params = jax.lax.pcast(params, "data", to="varying")
        (loss, aux), (g_params, g_h0, g_xs) = value_and_grads(local_loss)(params, h0, xs)
        # the batch mean is the mean of the devices' means; h0 and xs are per device
        n = jax.lax.axis_size("data")
        loss, g_params = jax.lax.pmean((loss, g_params), "data")
        return (loss, aux), (g_params, jax.tree.map(lambda g: g / n, g_h0), g_xs / n)

    batch, steps = P("data"), P(None, "data")
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), batch, steps),
        out_specs=((P(), (batch, steps)), (P(), batch, steps)),
        check_vma=vma,
    )
    params, h0, xs = problem(cell)
    with jax.set_mesh(mesh):
        params = on_mesh(params, lambda a: NamedSharding(mesh, P()))
        h0 = on_mesh(h0, lambda a: NamedSharding(mesh, batch))
        xs = on_mesh(xs, lambda a: NamedSharding(mesh, steps))
        got = jax.jit(fn)(params, h0, xs)
    (_, (_, ys)), (_, _, g_xs) = got
    assert_specs(ys, (None, "data"), "ys")
    assert_specs(g_xs, (None, "data"), "grad xs")
    assert_like_reference(got, cell, truncation)


def check_mesh_2d(remat, cell: str, truncation: str, explicit: bool, layer: bool = False) -> None:
    """A (data 4, model 2) mesh: the batch on ``data``, the hidden units on ``model``.

    The parameters' last axis (hidden units, or gates of hidden units) and
    the carry's are sharded on ``model``. On an explicit mesh shardings are
    types, and every gradient must keep its input's. Under GSPMD (``Auto``)
    XLA picks the gradients' layouts (plain ``lax.scan`` returns the LSTM's
    ``W_h`` gradient sharded on its rows): there they must stay sharded on
    ``model``, and on ``data`` where the input was.
    """
    kind = AxisType.Explicit if explicit else AxisType.Auto
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(kind,) * 2)
    params, h0, xs = problem(cell)
    loss = loss_fn(cell, binding(remat, cell), TRUNCATIONS[truncation], layer=layer)
    with jax.set_mesh(mesh) if explicit else contextlib.nullcontext():
        params = on_mesh(params, lambda a: NamedSharding(mesh, P(*(None,) * (a.ndim - 1), "model")))
        h0 = on_mesh(h0, lambda a: NamedSharding(mesh, P("data", "model")))
        xs = on_mesh(xs, lambda a: NamedSharding(mesh, P(None, "data")))
        got = jax.jit(value_and_grads(loss))(params, h0, xs)
    (_, (carry, ys)), (g_params, g_h0, g_xs) = got
    assert_like_reference(got, cell, truncation)
    assert_specs(g_xs, (None, "data"), "grad xs")
    for path, g in jax.tree_util.tree_leaves_with_path(g_params):
        if explicit:
            assert_specs(g, (None,) * (g.ndim - 1) + ("model",), f"grad params{path}")
        else:
            assert "model" in spec(g), f"grad params{path} is not sharded on model: {spec(g)}"
    assert_specs(carry, ("data", "model"), "carry")
    assert_specs(ys, (None, "data", "model"), "ys")
    assert_specs(g_h0, ("data", "model"), "grad h0")


for i, (sid, remat) in enumerate(STRATEGIES.items()):
    if isinstance(remat, bj.Budget):
        sid = "Budget (binding)"
    cell, tr = _case(i, 0)
    check(f"jit 1-D | {sid} | {cell} | {tr}")(functools.partial(check_jit_1d, remat, cell, tr))
    cell, tr = _case(i, 1)
    vma = i % 2 == 0
    known = None
    if isinstance(remat, bj.Budget) and vma:
        known = (
            "Budget's probes trace the step with the shard_map's device-varying parameters "
            "closed over but unvarying abstract carries, which check_vma refuses "
            "(dot_general's varying manual axes); every cell"
        )
    check(f"shard_map+pmean{'' if vma else ' (check_vma=False)'} | {sid} | {cell} | {tr}", known)(
        functools.partial(check_shard_map, remat, cell, tr, vma)
    )
    cell, tr = _case(i, 2, cells=("rnn", "lstm"))
    explicit = i % 2 == 1
    check(f"jit 2-D {'explicit' if explicit else 'GSPMD'} | {sid} | {cell} | {tr}")(
        functools.partial(check_mesh_2d, remat, cell, tr, explicit)
    )


# --- bj.cells.run, the whole-sequence layer -----------------------------------------------


def check_run_auto(remat, cell: str, truncation: str, chunks: int = 1) -> None:
    """``bj.cells.run`` under ``jax.jit`` of a batch-sharded input (1-D mesh, GSPMD)."""
    mesh = mesh_1d(AxisType.Auto)
    params, h0, xs = problem(cell)
    params, h0, xs = batch_on_mesh(mesh, params, h0, xs)
    loss = loss_fn(cell, remat, TRUNCATIONS[truncation], layer=True, chunks=chunks)
    got = jax.jit(value_and_grads(loss))(params, h0, xs)
    assert_like_reference(got, cell, truncation)
    (_, (carry, ys)), (_, g_h0, g_xs) = got
    assert_batch_sharded(carry, ys, g_h0, g_xs)


def check_run_explicit(remat, cell: str, truncation: str, chunks: int = 1) -> None:
    """``bj.cells.run`` under ``jax.jit`` over an explicit mesh."""
    mesh = mesh_1d()
    params, h0, xs = problem(cell)
    with jax.set_mesh(mesh):
        params, h0, xs = batch_on_mesh(mesh, params, h0, xs)
        loss = loss_fn(cell, remat, TRUNCATIONS[truncation], layer=True, chunks=chunks)
        got = jax.jit(value_and_grads(loss))(params, h0, xs)
    assert_like_reference(got, cell, truncation)


_RUN = {"StoreAll": bj.StoreAll(), "Nested-2": bj.Nested(2)}
for j, (sid, remat) in enumerate(_RUN.items()):
    cell, tr = CELLS[j], ROTATION[j]
    check(f"run, jit 1-D GSPMD | {sid} | {cell} | {tr}")(
        functools.partial(check_run_auto, remat, cell, tr)
    )
    cell, tr = CELLS[j + 1], ROTATION[j + 1]
    check(f"run, jit 1-D explicit | {sid} | {cell} | {tr}")(
        functools.partial(check_run_explicit, remat, cell, tr)
    )
    for vma in (True, False):
        name = f"run, shard_map+pmean{'' if vma else ' (check_vma=False)'} | {sid} | {cell} | {tr}"
        check(name)(functools.partial(check_shard_map, remat, cell, tr, vma, layer=True))
    cell, tr = ("rnn", "lstm")[j], ROTATION[(j + 2) % 3]
    check(f"run, jit 2-D GSPMD | {sid} | {cell} | {tr}")(
        functools.partial(check_mesh_2d, remat, cell, tr, False, layer=True)
    )


# batch_chunks: row groups inside shard_map (4 rows per device); a batch sharded over
# the devices (GSPMD, explicit mesh) runs whole, with the same results.
check("run batch_chunks=2, shard_map on 2 devices | StoreAll | lstm | " + ROTATION[0])(
    functools.partial(check_shard_map, bj.StoreAll(), "lstm", ROTATION[0], True, True, 2, 2)
)
check("run batch_chunks=2, jit 1-D GSPMD | Nested-2 | gru | " + ROTATION[1])(
    functools.partial(check_run_auto, bj.Nested(2), "gru", ROTATION[1], 2)
)
check("run batch_chunks=2, jit 1-D explicit | StoreAll | rnn | " + ROTATION[2])(
    functools.partial(check_run_explicit, bj.StoreAll(), "rnn", ROTATION[2], 2)
)


# --- memory per device --------------------------------------------------------------------

MT, MB, MD, MH = 100, 64, 8, 32
"""Sizes of the memory checks (float32, compiled, never run): big enough that the
residuals dominate XLA's small fixed buffers."""


def _model(remat):
    return jax.grad(functools.partial(model_loss, cell="rnn", remat=remat))


def _inputs(batch: int, sharding: NamedSharding | None = None):
    params, xs = abstract_inputs("rnn", MT, batch, MD, MH, jnp.float32)
    if sharding is not None:
        xs = jax.ShapeDtypeStruct(xs.shape, xs.dtype, sharding=sharding)
    return params, xs


@check("measure: bytes per device, and the number of devices")
def check_measure_per_device():
    mesh = mesh_1d(AxisType.Auto)
    sharded = _inputs(MB, NamedSharding(mesh, P(None, "data")))
    grad = _model(bj.StoreAll())
    whole = bj.memory.measure(grad, *_inputs(MB))
    share = bj.memory.measure(grad, *_inputs(MB // DEVICES))
    got = bj.memory.measure(grad, *sharded)
    print(f"    StoreAll temp: 1 device {whole.temp_bytes:,} B; 8 devices {got.temp_bytes:,} B")
    print(f"    per device; one device on B/8 {share.temp_bytes:,} B")
    assert (whole.devices, share.devices, got.devices) == (1, 1, DEVICES)
    # the inputs: the parameters and one eighth of xs, exactly
    assert got.argument_bytes == share.argument_bytes < whole.argument_bytes
    # the working memory: one device's share, plus the gradients' all-reduce buffer
    params_bytes = bj.memory.tree_bytes(sharded[0])
    assert share.temp_bytes <= got.temp_bytes <= share.temp_bytes + params_bytes + 4096
    assert got.temp_bytes < whole.temp_bytes / 4


def _budget_bytes(grad, inputs, fraction: float) -> int:
    return int(fraction * bj.memory.measure(grad, *inputs).temp_bytes)


@check("Budget(bytes) holds per device: jit of a batch-sharded input")
def check_budget_jit():
    mesh = mesh_1d(AxisType.Auto)
    inputs = _inputs(MB, NamedSharding(mesh, P(None, "data")))
    budget = _budget_bytes(_model(bj.StoreAll()), inputs, 0.3)
    rep = bj.memory.measure(_model(bj.Budget(budget)), *inputs)
    print(f"    budget {budget:,} B, per-device temp {rep.temp_bytes:,} B on {rep.devices}")
    assert rep.devices == DEVICES and rep.temp_bytes <= budget


@check("Budget(bytes) holds per device: inside shard_map, planned on the device's share")
def check_budget_shard_map():
    mesh = mesh_1d(AxisType.Auto)

    def data_parallel(remat):
        grad = _model(remat)

        def local(params, xs):
            return jax.lax.pmean(grad(params, xs), "data")

        return jax.shard_map(
            local, mesh=mesh, in_specs=(P(), P(None, "data")), out_specs=P(), check_vma=False
        )

    inputs = _inputs(MB, NamedSharding(mesh, P(None, "data")))
    budget = _budget_bytes(data_parallel(bj.StoreAll()), inputs, 0.3)
    rep = bj.memory.measure(data_parallel(bj.Budget(budget)), *inputs)
    # what it plans on one device for one device's share of the batch
    params = init_model(jax.random.key(0), "rnn", MD, MH, jnp.float32)
    xs = jnp.zeros((MT, MB // DEVICES, MD), jnp.float32)
    h0 = jnp.zeros((MB // DEVICES, MH), jnp.float32)
    plan = bj.Budget(budget).plan(make_step("rnn", params), h0, xs)
    print(f"    budget {budget:,} B, per-device temp {rep.temp_bytes:,} B; plan: {plan}")
    assert rep.devices == DEVICES and rep.temp_bytes <= budget
    assert plan.strategy != bj.StoreAll()  # the budget binds


@check("Budget under bj.cells.run on a mesh: the fused Nested(2) where a long Binomial would run")
def check_budget_fused_nested_on_mesh():
    cell, T, B, D, H = "gru", 1000, DEVICES, 3, 16
    c = bj.cells.get(cell)
    params = c.init(jax.random.key(0), D, H, jnp.float64)
    carry = c.initial_carry(H, (B,), jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (T, B, D), jnp.float64)

    def grad(remat):
        def loss(p, x, h):
            out = bj.cells.run(cell, p, h, x, remat=remat)
            return sum(jnp.mean(a * a) for a in jax.tree.leaves(out))

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    # the budget: what the fused Nested(2) needs, measured unsharded as Budget measures it
    # (a loss over all outputs, the carry a loss creates, the loss's own scalars)
    C = bj.memory.tree_bytes(carry)
    nested = bj.memory.measure(grad(bj.Nested(2)), params, xs, carry).temp_bytes
    budget = bj.Budget(nested + C + _probe.SLACK)
    plan = budget.plan(functools.partial(c.step, params), carry, xs)
    assert isinstance(plan.strategy, bj.Binomial) and plan.recomputed_steps > 1.5 * T, plan
    mesh = mesh_1d()
    xs_s = jax.device_put(xs, NamedSharding(mesh, P(None, "data")))
    carry_s = jax.device_put(carry, NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh):
        got = grad(budget)(params, xs_s, carry_s)
        rep = bj.memory.measure(grad(budget), params, xs_s, carry_s)
        want_rep = bj.memory.measure(grad(bj.Nested(2)), params, xs_s, carry_s)
    print(
        f"    budget {budget.bytes:,} B; per-device temp {rep.temp_bytes:,} B, Nested(2)'s "
        f"{want_rep.temp_bytes:,} B; the plan for bj.scan: {plan.strategy}"
    )
    assert rep.temp_bytes == want_rep.temp_bytes <= budget.bytes  # the fused Nested(2) ran
    assert_trees_close(got, grad(bj.StoreAll())(params, xs, carry))
    assert_specs(got[1], (None, "data"), "xs gradient")


# --- the runner ---------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    if jax.device_count() != DEVICES:
        print(f"FAIL setup: {jax.device_count()} devices, expected {DEVICES}")
        return 1
    part, count = 0, 1
    if argv[:1] == ["--part"]:
        try:
            part, count = (int(v) for v in argv[1].split("/"))
        except (IndexError, ValueError):
            part = count = 0
        if not 1 <= part <= count:
            print(f"FAIL setup: --part expects i/n with 1 <= i <= n, got {argv[1:2]}")
            return 1
        part, argv = part - 1, argv[2:]
    chosen = [c for c in CHECKS if not argv or any(a.lower() in c[0].lower() for a in argv)]
    chosen = chosen[part::count]
    if not chosen:
        print(f"FAIL setup: no check chosen by {sys.argv[1:]}")
        return 1
    failed, start = [], time.perf_counter()
    for name, fn, known in chosen:
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - reported, the others go on
            took = time.perf_counter() - t0
            if known:
                said = " ".join(str(err).split())[:160]
                print(f"known failure  {name}  ({took:.1f} s): {type(err).__name__}: {said}")
                continue
            failed.append(name)
            print(f"FAIL  {name}  ({took:.1f} s)", flush=True)
            print("    " + traceback.format_exc(limit=3).replace("\n", "\n    "), flush=True)
            continue
        took = time.perf_counter() - t0
        if known:
            failed.append(name)
            print(f"XPASS {name}  ({took:.1f} s): fixed? remove its known failure: {known}")
        else:
            print(f"ok    {name}  ({took:.1f} s)", flush=True)
    total = time.perf_counter() - start
    print(f"\n{len(chosen)} checks on {DEVICES} devices in {total:.1f} s, {len(failed)} failed")
    for name in failed:
        print(f"FAILED: {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
