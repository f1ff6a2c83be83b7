"""What the test modules share: the strategy and cell lists, and the assertions.

The lists come from the library's registries (``bj.remat.STRATEGIES``,
``bj.cells.CELLS``): a strategy registered with ``bj.remat.register`` joins
every parametrized test through its ``examples()``, a cell registered with
``bj.cells.register`` every test that runs the cells.
"""

from __future__ import annotations

import chex
import jax
import numpy as np

import bpttjax as bj


def strategy_id(strategy: bj.RematStrategy) -> str:
    """A short test id: ``Binomial(snapshots=3)`` -> ``Binomial-3``."""
    text = repr(strategy)
    for name in ("policy=", "levels=", "lengths=", "snapshots=", "overlap=", "bytes=", "policies="):
        text = text.replace(name, "")
    text = text.replace("DotsSaveable(only_if_no_batch_dims=False)", "dots")
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
