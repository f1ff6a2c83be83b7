"""The benchmark model shared by the experiment scripts and their tests.

A recurrent cell from ``bpttjax.cells`` with a linear read-out and a per-step
squared-error loss, ``l_t = mean((h_t W_out - x_t)^2)``, averaged over time;
the gradient is taken with respect to every parameter (cell and read-out).
"""

from __future__ import annotations

import argparse
import csv
import functools
import sys

import jax
import jax.numpy as jnp

import bpttjax as bj

CELLS = ("rnn", "gru", "lstm")


def init_model(key, cell: str, input_size: int, hidden_size: int, dtype=jnp.float32):
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
    k1, k2 = jax.random.split(key)
    params = getattr(bj.cells, f"init_{cell}")(k1, input_size, hidden_size, dtype=dtype)
    w_out = jax.random.normal(k2, (hidden_size, input_size), dtype) / hidden_size**0.5
    return {"cell": params, "W_out": w_out}


def hidden(cell: str, carry):
    return carry[0] if cell == "lstm" else carry


def make_step(cell: str, params):
    cell_step = getattr(bj.cells, cell)

    def step(carry, x):
        carry, _ = cell_step(params["cell"], carry, x)
        err = hidden(cell, carry) @ params["W_out"] - x
        return carry, jnp.mean(err * err)

    return step


def loss(params, xs, *, cell: str, remat=None, scan=None):
    """Mean per-step loss over ``xs: (T, B, D)``; ``scan`` defaults to ``bj.scan``."""
    batch = xs.shape[1:-1]
    hidden_size = params["W_out"].shape[0]
    h0 = bj.cells.initial_carry(cell, hidden_size, batch, dtype=xs.dtype)
    step = make_step(cell, params)
    if scan is None:
        scan = functools.partial(bj.scan, remat=remat or bj.StoreAll())
    _, losses = scan(step, h0, xs)
    return jnp.mean(losses)


def abstract_inputs(cell: str, T: int, batch: int, input_size: int, hidden_size: int, dtype):
    """ShapeDtypeStructs for (params, xs): compile without allocating."""
    params = jax.eval_shape(
        lambda: init_model(jax.random.key(0), cell, input_size, hidden_size, dtype)
    )
    xs = jax.ShapeDtypeStruct((T, batch, input_size), jnp.dtype(dtype))
    return params, xs


def carry_bytes(cell: str, batch: int, hidden_size: int, dtype) -> int:
    carry = jax.eval_shape(lambda: bj.cells.initial_carry(cell, hidden_size, (batch,), dtype))
    return bj.memory.tree_bytes(carry)


def _int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects a {what} int, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expects a {what} int, got {value}")
        return value

    return parse


positive_int = _int_at_least(1, "positive")
"""argparse type: an int >= 1 (``1_000_000`` is accepted, as by ``int``)."""
non_negative_int = _int_at_least(0, "non-negative")
"""argparse type: an int >= 0."""


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0 (learning rates, clipping norms)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expects a number > 0, got {value}")
    return value


def parse_with_quick(parser: argparse.ArgumentParser, argv, quick: dict) -> argparse.Namespace:
    """Parse ``argv``; with ``--quick``, ``quick`` replaces the defaults.

    Options given explicitly still win over the quick values.
    """
    args, _ = parser.parse_known_args(argv)
    if args.quick:
        parser.set_defaults(**quick)
    return parser.parse_args(argv)


def write_csv(path: str, rows: list[dict]) -> str:
    """Write ``rows`` (dicts with the same keys) to ``path`` with a header."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def progress(iterable=None, *, total=None, desc=None, initial=0):
    """A tqdm bar when stderr is a terminal; without tqdm, ``iterable`` itself.

    tqdm comes with the ``experiments`` extra; the scripts run without it.
    With ``iterable=None`` the bar is updated by hand (``None`` without tqdm).
    """
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, initial=initial, desc=desc, disable=not sys.stderr.isatty())


def save_figure(fig, path: str, dpi: int = 110) -> str:
    """Lay out, write and close a matplotlib figure; returns ``path``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
