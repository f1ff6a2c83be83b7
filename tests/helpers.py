"""What the test modules share: the strategy and cell lists, and the assertions.

The benchmark model and the budget grid's losses are also here (the library tests
import nothing from ``experiments/``).

The lists come from the library's registries (``bj.remat.STRATEGIES``,
``bj.cells.CELLS``): a strategy registered with ``bj.remat.register`` joins
every parametrized test through its ``examples()``, a cell registered with
``bj.cells.register`` every test that runs the cells.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np

import bpttjax as bj


def strategy_id(strategy: bj.RematStrategy) -> str:
    """A short test id: ``Binomial(snapshots=3)`` -> ``Binomial-3``."""
    text = repr(strategy)
    for name in ("policy=", "levels=", "lengths=", "snapshots=", "bytes=", "policies="):
        text = text.replace(name, "")
    text = text.replace("DotsSaveable(only_if_no_batch_dims=False)", "dots")
    text = text.replace("static=True", "static").replace("overlap=False", "sequential")
    for a, b in (("(", "-"), (")", ""), (", ", "-"), (" ", ""), ("None", ""), ("True", "")):
        text = text.replace(a, b)
    return text.replace(",", "").replace("--", "-").strip("-")


STRATEGIES: dict[str, bj.RematStrategy] = {strategy_id(s): s for s in bj.remat.examples()}
"""Every registered strategy's examples, by test id."""

CELLS: tuple[str, ...] = tuple(bj.cells.CELLS)
"""Every registered cell's name."""


def rel_err(a, b) -> float:
    """``‖a − b‖ / ‖b‖`` (Frobenius), with ``b == 0`` giving the absolute error."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def tree_rel_err(a, b) -> float:
    """The largest :func:`rel_err` over matching leaves (0.0 for no leaves)."""
    errs = jax.tree.leaves(jax.tree.map(rel_err, a, b))
    return max(errs) if errs else 0.0


def assert_trees_close(got, want, rtol: float = 1e-12) -> None:
    """Same structure, shapes and dtypes, and every leaf within ``rtol`` (norm-relative).

    Norm-relative per leaf, as gradients are compared: an elementwise
    ``rtol`` would fail on entries that are tiny only by cancellation.
    """
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    bad = []
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        if np.issubdtype(np.asarray(a).dtype, np.inexact):
            err = rel_err(a, b)
            if not err <= rtol:
                bad.append(f"{jax.tree_util.keystr(path)}: relative error {err:.3g}")
        else:
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert not bad, f"leaves differ by more than rtol={rtol:g}: " + "; ".join(bad)


def assert_trees_equal(got, want) -> None:
    """Same structure and bit-identical leaves (forward values of ``bj.scan``)."""
    chex.assert_trees_all_equal_structs(got, want)
    chex.assert_trees_all_equal(got, want)


# --- the benchmark model ---------------------------------------------------------------------
# The model of experiments/_model.py, which the memory tests measure: a registered cell, a
# read-out to the input size and a per-step squared error. tests/experiments/test_harness.py
# checks that the two give the same values and the same compiled memory.


def init_model(key, cell: str, input_size: int, hidden_size: int, dtype=jnp.float32) -> dict:
    """``{"cell": the cell's parameters, "W_out": (H, D)}``, the read-out of variance ``1/H``."""
    k1, k2 = jax.random.split(key)
    params = bj.cells.get(cell).init(k1, input_size, hidden_size, dtype=dtype)
    w_out = jax.random.normal(k2, (hidden_size, input_size), dtype) / hidden_size**0.5
    return {"cell": params, "W_out": w_out}


def make_step(cell: str, params):
    """``f(carry, x) -> (carry, l_t)`` with ``l_t = mean((h_t W_out - x_t)^2)``."""
    cell_step = bj.cells.get(cell).step

    def step(carry, x):
        carry, h = cell_step(params["cell"], carry, x)
        err = h @ params["W_out"] - x
        return carry, jnp.mean(err * err)

    return step


def model_loss(params, xs, *, cell: str, remat=None):
    """Mean per-step loss over ``xs: (T, B, D)`` under ``bj.scan`` (default ``StoreAll``)."""
    hidden_size = params["W_out"].shape[0]
    h0 = bj.cells.get(cell).initial_carry(hidden_size, xs.shape[1:-1], dtype=xs.dtype)
    _, losses = bj.scan(make_step(cell, params), h0, xs, remat=remat or bj.StoreAll())
    return jnp.mean(losses)


def abstract_inputs(cell: str, T: int, batch: int, input_size: int, hidden_size: int, dtype):
    """``jax.ShapeDtypeStruct`` for ``(params, xs)``: compile without allocating."""
    params = jax.eval_shape(
        lambda: init_model(jax.random.key(0), cell, input_size, hidden_size, dtype)
    )
    return params, jax.ShapeDtypeStruct((T, batch, input_size), jnp.dtype(dtype))


def carry_bytes(cell: str, batch: int, hidden_size: int, dtype) -> int:
    """Bytes of one carry of ``cell`` for ``batch`` sequences."""
    carry = jax.eval_shape(lambda: bj.cells.get(cell).initial_carry(hidden_size, (batch,), dtype))
    return bj.memory.tree_bytes(carry)


# --- the budget grid's losses ----------------------------------------------------------------
# Those of experiments/budget_promise.py (the grid on the docs page), which
# tests/experiments/test_budget_promise.py checks against these.

GRID_LOSSES = ("readme", "per_step", "linear")


def grid_step(cell: str, params, loss: str):
    """The step each loss scans: the cell's ``(carry, h)``, or a per-step loss inside."""
    step = functools.partial(bj.cells.get(cell).step, params)
    if loss != "per_step":
        return step

    def per_step(carry, x):
        carry, h = step(carry, x)
        return carry, jnp.mean(h * h)

    return per_step


def grid_temp(cell: str, loss: str, remat, params, xs, hidden: int) -> int:
    """XLA's temp bytes for ``jax.grad`` of ``loss``, the initial carry made inside."""

    def fn(params, xs):
        h0 = bj.cells.initial_carry(cell, hidden, xs.shape[1:-1], dtype=xs.dtype)
        _, ys = bj.scan(grid_step(cell, params, loss), h0, xs, remat=remat)
        return jnp.mean(ys**2) if loss == "readme" else jnp.mean(ys)

    return bj.memory.measure(jax.grad(fn), params, xs).temp_bytes


# --- a script on simulated CPU devices ----------------------------------------------------


def run_on_cpu_devices(script: str, *args: str, devices: int = 8, path: str = "") -> str:
    """Run ``python script *args`` in a fresh process with ``devices`` simulated CPU
    devices (XLA's flag set before JAX starts; also where a GPU is present), with
    ``path`` in front of ``PYTHONPATH``; return its output, asserting it exited 0."""
    env = dict(os.environ)
    flag = "--xla_force_host_platform_device_count"
    flags = re.sub(rf"{flag}=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} {flag}={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (path, env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=600
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"{os.path.basename(script)} failed:\n" + out
    return out
