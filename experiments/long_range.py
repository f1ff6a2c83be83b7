"""Long-range learning: full BPTT versus truncated BPTT on the adding problem.

The adding problem (Hochreiter & Schmidhuber, 1997): each step's input is
``(value ~ U[0, 1], marker ∈ {0, 1})``, exactly two steps are marked, and the
target is the sum of the two marked values, read from a linear read-out of an
LSTM's last hidden state (``tasks.adding.adding_params``); predicting the constant 1
gives MSE ``1/6``. The same LSTM is trained from the same parameters on the
same batches twice, with Adam after ``optax.clip_by_global_norm(--clip)``:
full BPTT (``bj.scan(..., remat=bj.Nested(levels=2))``) and with
``truncation=bj.Truncate(K)`` (``--truncate``, default ``T // 10``).

Truncation fails here by construction. ``--placement gap`` (the default) puts
both markers in the first ``T - M`` steps (``--min-gap M``, default
``T // 4``), so none lies in the last truncation window; ``hochreiter`` is the
original placement (all markers in the first half). ``--marker-weights zero``
(the default) starts the marker channel's input weights (row 1 of ``W_x``) at
zero: under ``Truncate(K)`` their gradient is exactly zero, so the truncated
model never sees a marker and cannot beat ``tasks.adding.marker_blind_floor``
(``(1 - 2/(T - M))/6``). ``--init chrono`` (Tallec & Ollivier, 2018) sets the
forget-gate biases to ``log U[1, T - 1]`` and the input-gate biases to their
negative, so that cells keep their content for up to ``T`` steps. The
numbers and the other settings tried are in ``docs/experiments/long_range.md``.

Writes ``long_range.csv`` (``step, method, train_mse, eval_mse, wall_s``: one
row per evaluation on one fixed held-out batch of ``--eval-batch`` sequences,
written as soon as it is measured, so a killed run keeps its curves so far;
``train_mse`` is the mean training loss since the previous row, ``wall_s`` the
seconds since that method started, compilation and evaluations included) and
``long_range.png`` under ``--out``, and prints a summary table.

    python experiments/long_range.py                  # T = 200
    python experiments/long_range.py --length 1000 --steps 1000   # the long version
    python experiments/long_range.py --quick          # seconds; used by the tests
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

try:  # python -m experiments.long_range, or experiments/ is importable
    from experiments import _cli, _table
    from experiments.tasks import adding
except ImportError:  # python experiments/long_range.py in a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from experiments import _cli, _table
    from experiments.tasks import adding

BASELINE_MSE = adding.ADDING_BASELINE_MSE
CSV_NAME = "long_range.csv"
PNG_NAME = "long_range.png"
QUICK = dict(length=50, steps=500, hidden=32, batch=32, eval_batch=500, eval_every=25)


@dataclasses.dataclass(frozen=True)
class AddingRow:
    """``long_range.csv``: one evaluation of one method on the adding problem."""

    step: int
    method: str
    train_mse: float
    eval_mse: float
    wall_s: float


@dataclasses.dataclass(frozen=True)
class Run:
    """The options of one run (``min_gap`` and ``truncate`` resolved from ``length``)."""

    length: int
    min_gap: int
    placement: str
    truncate: int
    steps: int
    batch: int
    hidden: int
    lr: float
    clip: float
    init: str
    marker_weights: str
    seed: int
    eval_every: int
    eval_batch: int

    def where(self) -> str:
        if self.placement == "gap":
            return f"no marker in the last {self.min_gap} steps"
        return "Hochreiter's placement"


def build_parser():
    p = _cli.parser(__doc__, quick="T=50, 500 steps: seconds")
    p.add_argument("--length", type=_cli.int_at_least(4), default=200, help="T (default 200)")
    p.add_argument(
        "--min-gap",
        type=_cli.non_negative_int,
        default=None,
        help="placement 'gap': no marker in the last M steps (default T // 4; 0: anywhere)",
    )
    p.add_argument("--placement", choices=adding.PLACEMENTS, default="gap")
    p.add_argument(
        "--truncate", type=_cli.positive_int, default=None, help="K of Truncate(K) (T // 10)"
    )
    p.add_argument("--steps", type=_cli.positive_int, default=2000)
    p.add_argument("--batch", type=_cli.positive_int, default=64)
    p.add_argument("--hidden", type=_cli.positive_int, default=64)
    p.add_argument("--lr", type=_cli.positive_float, default=3e-3, help="Adam learning rate")
    p.add_argument("--clip", type=_cli.positive_float, default=1.0, help="global norm clip")
    p.add_argument("--init", choices=adding.INITS, default="chrono", help="LSTM gate biases")
    p.add_argument(
        "--marker-weights",
        choices=("random", "zero"),
        default="zero",
        help="initial input weights of the marker channel",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=_cli.positive_int, default=50)
    p.add_argument("--eval-batch", type=_cli.positive_int, default=1000)
    return p


def parse_run(argv) -> tuple[Run, str]:
    """The run's options, checked, and the output folder."""
    p = build_parser()
    args = _cli.parse(p, argv, QUICK)
    if args.min_gap is None:
        args.min_gap = args.length // 4
    if args.truncate is None:
        args.truncate = max(1, args.length // 10)
    if args.truncate >= args.length:
        p.error(f"--truncate must be < --length ({args.length}), got {args.truncate}")
    a, b = adding.marker_region(args.length, args.placement, args.min_gap)
    if a < 1 or b < 2:
        where = f"--min-gap {args.min_gap}" if args.placement == "gap" else "Hochreiter's placement"
        p.error(f"no room for two markers with --length {args.length} and {where}")
    return _cli.from_args(Run, args), args.out


def train(run: Run, method: str, truncate, params, eval_data, table) -> list[AddingRow]:
    """Train one method; append a row to ``table`` at every evaluation. Returns its rows."""
    optimizer = optax.chain(optax.clip_by_global_norm(run.clip), optax.adam(run.lr))
    opt_state = optimizer.init(params)
    train_step = adding.adding_train_step(
        optimizer, run.batch, run.length, run.placement, run.min_gap, truncate
    )
    evaluate = jax.jit(adding.adding_mse)
    data_key = jax.random.key(run.seed + 1)  # the same batches for every method
    rows, losses = [], []

    def record(step, start):
        train_mse = float(np.mean(losses)) if losses else math.nan
        eval_mse = float(evaluate(params, *eval_data))
        rows.append(AddingRow(step, method, train_mse, eval_mse, time.perf_counter() - start))
        table.append(rows[-1:])
        losses.clear()

    start = time.perf_counter()
    record(0, start)
    for step in _cli.progress(range(1, run.steps + 1), total=run.steps, desc=method):
        params, opt_state, loss = train_step(params, opt_state, jax.random.fold_in(data_key, step))
        losses.append(loss)
        if step % run.eval_every == 0 or step == run.steps:
            losses[:] = [float(x) for x in losses]
            record(step, start)
    return rows


def report(run: Run, curves, constant_mse: float, floor: float) -> None:
    print(
        f"adding problem, T={run.length}, {run.where()}; LSTM hidden {run.hidden} "
        f"({run.init} init, marker weights {run.marker_weights}), batch {run.batch}, "
        f"{run.steps} steps, Adam {run.lr}, clip {run.clip}, seed {run.seed}, "
        f"{jax.default_backend()}"
    )
    print(f"held-out MSE ({run.eval_batch} sequences), 1/6 = {BASELINE_MSE:.4f}:")
    print(f"{'method':<16}{'final':>9}{'best':>9}{'final·6':>9}{'wall s':>9}")
    for method, rows in curves.items():
        final, best = rows[-1].eval_mse, min(r.eval_mse for r in rows)
        print(
            f"{method:<16}{final:>9.3g}{best:>9.3g}{final / BASELINE_MSE:>9.3f}"
            f"{rows[-1].wall_s:>9.1f}"
        )
    print(f"{'constant 1.0':<16}{constant_mse:>9.3g}{'':>9}{constant_mse * 6:>9.3f}")
    print(f"without the markers no model beats MSE {floor:.4f} (expected over batches)")


def plot(curves, run: Run, floor: float, path: str) -> str:
    fig, ax = _cli.pyplot().subplots(figsize=(8, 4.8))
    for (method, rows), color in zip(curves.items(), ("C0", "C3"), strict=False):
        steps = [r.step for r in rows]
        ax.semilogy(steps, [r.eval_mse for r in rows], color=color, label=f"{method}, held-out")
        ax.semilogy(
            steps[1:],
            [r.train_mse for r in rows[1:]],
            color=color,
            alpha=0.35,
            lw=1,
            label=f"{method}, training (mean since last point)",
        )
    ax.axhline(BASELINE_MSE, color="gray", ls="--", label="constant prediction, MSE 1/6")
    ax.axhline(floor, color="gray", ls=":", label=f"best without the markers, {floor:.4f}")
    ax.set_xlabel("training step")
    ax.set_ylabel("MSE")
    where = (
        f"markers ≥ {run.min_gap} steps before the end"
        if run.placement == "gap"
        else "Hochreiter's placement"
    )
    ax.set_title(
        f"adding problem, T={run.length}, {where}\nLSTM {run.hidden} ({run.init} init, "
        f"marker weights {run.marker_weights}), batch {run.batch}, Adam {run.lr}, "
        f"{jax.default_backend()}",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return _cli.save_figure(fig, path)


def main(argv=None) -> None:
    run, out = parse_run(argv)
    params0 = adding.adding_params(
        jax.random.key(run.seed), run.hidden, run.length, run.init, run.marker_weights
    )
    eval_data = adding.adding_eval_batch(
        run.seed, run.eval_batch, run.length, run.placement, run.min_gap
    )
    constant_mse = float(jnp.mean((eval_data[1] - 1.0) ** 2))
    floor = adding.marker_blind_floor(run.length, run.placement, run.min_gap)
    os.makedirs(out, exist_ok=True)
    table = _table.Table(os.path.join(out, CSV_NAME), AddingRow)
    table.write([])
    curves = {}
    for method, truncate in (("full BPTT", None), (f"Truncate({run.truncate})", run.truncate)):
        curves[method] = train(run, method, truncate, params0, eval_data, table)
    png = plot(curves, run, floor, os.path.join(out, PNG_NAME))
    report(run, curves, constant_mse, floor)
    print(f"wrote {out}/{CSV_NAME}, {png}")


if __name__ == "__main__":
    main()
