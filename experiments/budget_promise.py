"""Does ``bj.Budget`` keep its promise? The whole gradient's memory against the budget.

For each cell, length ``T`` and loss, plain BPTT's working memory is measured
(``lax.scan`` + ``jax.grad``, XLA's temp bytes), then ``bj.Budget`` at
fractions of it: the strategy it chooses, and XLA's temp for the whole
``jax.grad`` of the loss under it. The promise is ``temp <= budget`` in
every row; a budget nothing fits is a row with the least budget the error
names. Three losses:

* ``readme``: ``jnp.mean(hs**2)`` over all outputs (keeps ``hs`` and their
  cotangent);
* ``per_step``: the step returns ``mean(h**2)``, the loss is ``mean(ys)``;
* ``linear``: ``jnp.mean(hs)``, whose cotangent is a constant.

Rows go to ``<out>/budget_promise.csv`` as they are measured (a re-run skips
the points already there unless ``--fresh``).

    python experiments/budget_promise.py --out docs/budget   # the grid on the docs page
    python experiments/budget_promise.py --quick             # small, for a smoke test
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys

import jax
import jax.numpy as jnp

import bpttjax as bj

try:  # python -m experiments.budget_promise, or experiments/ is importable
    from experiments import _cli, _table
except ImportError:  # python experiments/budget_promise.py in a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from experiments import _cli, _table

CSV_NAME = "budget_promise.csv"
LOSSES = ("readme", "per_step", "linear")
DEFAULT_FRACTIONS = (0.01, 0.03, 0.1, 0.3, 0.6, 1.0, 1.2)
QUICK = {"cells": ["rnn"], "lengths": [20, 60], "fractions": [0.3, 1.2]}


@dataclasses.dataclass(frozen=True)
class PromiseRow:
    """One budget for one cell, length and loss: what ran and what XLA measured.

    ``ratio`` is ``temp_bytes / budget_bytes`` (the promise: at most 1);
    ``status`` is ``ok`` or ``too_small``, where ``least_bytes`` is the least
    budget the error names.
    """

    cell: str
    T: int
    loss: str
    fraction: float
    batch: int
    input: int
    hidden: int
    dtype: str
    backend: str
    jax_version: str
    plain_bytes: int
    budget_bytes: int
    strategy: str = ""
    temp_bytes: int | None = None
    ratio: float | None = None
    status: str = "ok"
    least_bytes: int | None = None


def step_for(cell: str, params, loss: str):
    """The step each loss scans: the cell's ``(carry, h)``, or a per-step loss inside."""
    step = functools.partial(bj.cells.get(cell).step, params)
    if loss != "per_step":
        return step

    def per_step(carry, x):
        carry, h = step(carry, x)
        return carry, jnp.mean(h * h)

    return per_step


def grad_temp(cell: str, loss: str, remat, params, xs, hidden: int) -> int:
    """XLA's temp bytes for ``jax.grad`` of ``loss``, the initial carry made inside."""

    def fn(params, xs):
        h0 = bj.cells.initial_carry(cell, hidden, xs.shape[1:-1], dtype=xs.dtype)
        _, ys = bj.scan(step_for(cell, params, loss), h0, xs, remat=remat)
        return jnp.mean(ys**2) if loss == "readme" else jnp.mean(ys)

    return bj.memory.measure(jax.grad(fn), params, xs).temp_bytes


def build_parser():
    p = _cli.parser(__doc__, quick="tiny sizes (smoke test)", fresh="redo points in the CSV")
    p.add_argument("--cells", type=_cli.comma_list(str), default=list(bj.cells.CELLS))
    p.add_argument("--lengths", type=_cli.lengths, default=[100, 600, 3000])
    p.add_argument(
        "--fractions",
        type=_cli.comma_list(_cli.float_in(0, 10, high_included=True)),
        default=list(DEFAULT_FRACTIONS),
        help="budgets, as fractions of plain BPTT's working memory for each loss",
    )
    p.add_argument("--batch", type=_cli.int_at_least(1), default=4)
    p.add_argument("--input", type=_cli.int_at_least(1), default=8)
    p.add_argument("--hidden", type=_cli.int_at_least(1), default=32)
    p.add_argument("--dtype", type=_cli.float_dtype, default="float64")
    return p


def main(argv=None) -> list[PromiseRow]:
    args = _cli.parse(build_parser(), argv, QUICK)
    for cell in args.cells:
        bj.cells.get(cell)  # an unknown cell fails before anything is measured
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    os.makedirs(args.out, exist_ok=True)
    table = _table.Table(os.path.join(args.out, CSV_NAME), PromiseRow)
    if args.fresh and os.path.exists(table.path):
        os.remove(table.path)
    done = {(r.cell, r.T, r.loss, r.fraction) for r in table.read()}
    points = [
        (cell, T, loss)
        for cell in args.cells
        for T in args.lengths
        for loss in LOSSES
        if any((cell, T, loss, f) not in done for f in args.fractions)
    ]
    dtype = jnp.dtype(args.dtype)
    for cell, T, loss in _cli.progress(points, desc="budget promise", unit="point"):
        init = getattr(bj.cells, f"init_{cell}")
        params = init(jax.random.key(0), args.input, args.hidden, dtype)
        xs = jax.random.normal(jax.random.key(1), (T, args.batch, args.input), dtype)
        h0 = bj.cells.initial_carry(cell, args.hidden, (args.batch,), dtype=dtype)
        plain = grad_temp(cell, loss, bj.StoreAll(), params, xs, args.hidden)
        base = dict(
            cell=cell, T=T, loss=loss, batch=args.batch, input=args.input, hidden=args.hidden,
            dtype=args.dtype, backend=jax.default_backend(), jax_version=jax.__version__,
            plain_bytes=plain,
        )  # fmt: skip
        rows = []
        for fraction in args.fractions:
            if (cell, T, loss, fraction) in done:
                continue
            budget = bj.Budget(max(1, int(fraction * plain)))
            row = PromiseRow(fraction=fraction, budget_bytes=budget.bytes, **base)
            try:
                plan = budget.plan(step_for(cell, params, loss), h0, xs)
            except bj.budget.BudgetTooSmallError as err:
                rows.append(
                    dataclasses.replace(row, status="too_small", least_bytes=err.least_bytes)
                )
                continue
            temp = grad_temp(cell, loss, budget, params, xs, args.hidden)
            rows.append(
                dataclasses.replace(
                    row, strategy=repr(plan.strategy), temp_bytes=temp, ratio=temp / budget.bytes
                )
            )
        table.append(rows)
    rows = table.read()
    measured = [r for r in rows if r.status == "ok"]
    worst = max(measured, key=lambda r: r.ratio, default=None)
    print(
        f"{len(measured)} budgets measured, {sum(r.ratio > 1 for r in measured)} over; "
        f"{len(rows) - len(measured)} too small; wrote {table.path}"
    )
    if worst is not None:
        print(
            f"largest temp/budget: {worst.ratio:.3f} ({worst.cell}, T={worst.T}, {worst.loss}, "
            f"{worst.fraction:.0%} of plain: {worst.strategy})"
        )
    return rows


if __name__ == "__main__":
    main()
