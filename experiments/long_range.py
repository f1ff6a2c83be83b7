"""Long-range learning: full BPTT versus truncated BPTT on the adding problem.

The adding problem (Hochreiter & Schmidhuber, 1997): at every step the input
is a pair ``(value, marker)`` with ``value ~ U[0, 1]`` and ``marker ∈ {0, 1}``;
exactly two steps carry ``marker = 1`` and the target is the sum of their two
values, read from a linear read-out of the LSTM's last hidden state and scored
by the squared error. Predicting the constant 1 (the target's mean) gives MSE
``Var(v1 + v2) = 2/12 = 1/6 ≈ 0.167``.

Marker placement (``--placement``):

* ``gap`` (the default): both markers uniformly at random among the first
  ``P = T - M`` steps, distinct, with ``M = --min-gap`` (default ``T // 4``),
  so every marker is at least ``M`` steps before the loss. ``Truncate(k)``
  with ``k <= M`` (default ``k = T // 10``) cuts the carry's gradient at a
  window boundary at or after step ``T - k``: no gradient ever reaches a step
  that holds a marker. Full BPTT has to learn across at least ``M`` steps;
  the rule it learns (open the input gate on a marker, keep the cell) then
  also works for markers further back. With markers anywhere in ``[0, T)``
  (``--min-gap 0``) a truncated model learns the same rule from the pairs
  that fall inside its last window and generalizes it, and the comparison
  shows nothing.
* ``hochreiter``: the original placement, first marker among the first ten
  steps, second among the first ``T/2 - 1`` steps (distinct): every marker is
  at least ``T/2 + 1`` steps before the loss.

Why truncation fails here by construction (``--marker-weights zero``, the
default): the marker channel's input weights (row 1 of ``W_x``) start at
zero. Their gradient is a sum over the steps the loss reaches of
``marker_t · ∂L/∂(x_t W_x)``, and under ``Truncate(k)`` every such step has
``marker_t = 0``: the gradient is exactly zero, Adam leaves them at zero, and
the truncated model never sees a marker at all. A predictor that sees only the
values can at best predict ``2 · mean(values in the first P steps)``, MSE
``(1 - 2/P)/6`` (0.1644 for T = 200). Full BPTT's gradient for those weights
is not zero, so it learns to use the marker. With ``--marker-weights random``
(the usual lecun-normal initialization) the frozen random marker weights
still make the forward pass store marked values a little differently, and
because the weights are shared over time, what the truncated gradient learns
in the last window (keep the cells, read them out, ignore unmarked values)
also acts at the marker steps: truncated BPTT then learns part of the task,
slowly.

Model: ``bj.cells.lstm`` (``--hidden`` units) with a linear read-out of
``h_T`` whose bias starts at 1, so that both methods start near the
constant-prediction baseline. The gate biases use the chrono initialization
of Tallec & Ollivier (2018, "Can recurrent neural networks warp time?"):
forget-gate biases ``log U[1, T - 1]``, input-gate biases their negative, so
that at initialization cells keep their content for up to ``T`` steps.
Without it (``--init forget1``: forget bias 1; ``--init zero``: bpttjax's zero
biases) the gradient from a marker ``M`` steps back is a product of ``M``
forget gates of about 0.73 (or 0.5), and full BPTT stayed on the 1/6
plateau too when tried (T = 200, ``forget1``, 2000 steps).

Training: Adam on a fresh batch every step, after
``optax.clip_by_global_norm(--clip)``; full BPTT runs
``bj.scan(..., remat=bj.Nested(levels=2))``, truncated BPTT adds
``truncation=bj.Truncate(K)`` (same remat). Both methods start from the same
parameters and see the same batches; every ``--eval-every`` steps both are
scored on one fixed held-out batch of ``--eval-batch`` sequences.

Writes ``long_range.csv`` (``step, method, train_mse, eval_mse, wall_s``: one
row per evaluation, written and flushed as soon as it is measured, so a
killed run keeps its curves so far; ``train_mse`` is the mean training loss
since the previous row, ``wall_s`` the seconds since that method started,
compilation and evaluations included) and ``long_range.png`` under ``--out``,
and prints a summary table.

    python experiments/long_range.py                  # T = 200: about 2.5 min on 2 CPU cores
    python experiments/long_range.py --length 1000 --steps 1000   # the long version
    python experiments/long_range.py --quick          # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bpttjax as bj

try:  # run from the repository root as a package, or as a script
    from experiments import common
except ImportError:
    import common

DTYPE = jnp.float32
BASELINE_MSE = 1.0 / 6.0
PLACEMENTS = ("gap", "hochreiter")
INITS = ("chrono", "forget1", "zero")
FIELDS = ("step", "method", "train_mse", "eval_mse", "wall_s")
CSV_NAME = "long_range.csv"
PNG_NAME = "long_range.png"


def marker_region(length: int, placement: str, min_gap: int) -> tuple[int, int]:
    """``(a, b)``: the first marker is drawn from ``[0, a)``, the second from ``[0, b)``."""
    if placement == "gap":
        return length - min_gap, length - min_gap
    if placement == "hochreiter":
        b = length // 2 - 1
        return min(10, b), b
    raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")


def marker_blind_floor(length: int, placement: str, min_gap: int) -> float:
    """The least expected MSE of a predictor that sees the values but not the markers.

    With ``p_t`` the probability that step ``t`` is marked, the best such
    predictor is ``E[target | values] = Σ p_t v_t``, and by the law of total
    variance its MSE is ``1/6 - Σ p_t² / 12``; ``(1 - 2/P)/6`` for ``gap``.
    """
    a, b = marker_region(length, placement, min_gap)
    t = np.arange(length)
    first = (t < a) / a  # P(first marker at t)
    p = first + (t < b) / (b - 1) * (1 - first)  # + P(second at t), second != first
    return float(BASELINE_MSE - np.sum(p * p) / 12)


def adding_batch(key, batch: int, length: int, placement: str = "gap", min_gap: int = 0):
    """One batch of the adding problem.

    Returns ``(xs, target)``: ``xs`` of shape ``(T, batch, 2)`` (time first, as
    ``bj.scan`` wants it), channel 0 the values, channel 1 the markers; and
    ``target`` of shape ``(batch,)``, the sum of the two marked values. All
    float32; the two marker positions are distinct.
    """
    a, b = marker_region(length, placement, min_gap)
    if a < 1 or b < 2:
        raise ValueError(
            f"no room for two markers: T={length}, placement={placement!r}, min_gap={min_gap}"
        )
    k_v, k_i, k_j = jax.random.split(key, 3)
    values = jax.random.uniform(k_v, (batch, length), DTYPE)
    i = jax.random.randint(k_i, (batch,), 0, a, dtype=jnp.int32)
    j = jax.random.randint(k_j, (batch,), 0, b - 1, dtype=jnp.int32)
    j = j + (j >= i).astype(jnp.int32)  # uniform over [0, b) without i
    steps = jnp.arange(length, dtype=jnp.int32)[None, :]
    markers = ((steps == i[:, None]) | (steps == j[:, None])).astype(DTYPE)
    target = jnp.sum(values * markers, axis=1)
    xs = jnp.stack([values, markers], axis=-1).transpose(1, 0, 2)
    return xs, target


def init_params(key, hidden: int, length: int, init: str = "chrono", marker_weights="random"):
    k_cell, k_out, k_chrono = jax.random.split(key, 3)
    cell = bj.cells.init_lstm(k_cell, 2, hidden, dtype=DTYPE)
    if marker_weights == "zero":  # row 1 of W_x: the marker channel's input weights
        cell["W_x"] = cell["W_x"].at[1].set(jnp.zeros((4 * hidden,), DTYPE))
    elif marker_weights != "random":
        raise ValueError(f"marker_weights must be 'random' or 'zero', got {marker_weights!r}")
    b = cell["b"]
    if init == "chrono":
        # Tallec & Ollivier: b_f ~ log U[1, T_max - 1], b_i = -b_f, with T_max = T.
        u = jax.random.uniform(k_chrono, (hidden,), DTYPE, 1.0, float(length - 1))
        b_f = jnp.log(u)
        b = b.at[hidden : 2 * hidden].set(b_f).at[:hidden].set(-b_f)
    elif init == "forget1":
        b = b.at[hidden : 2 * hidden].set(jnp.ones((hidden,), DTYPE))
    elif init != "zero":
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    cell["b"] = b
    w_out = jax.random.normal(k_out, (hidden,), DTYPE) / math.sqrt(hidden)
    return {"cell": cell, "w_out": w_out, "b_out": jnp.ones((), DTYPE)}


def predict(params, xs, truncate: int | None = None, remat=None):
    """The read-out of ``h_T``, shape ``(batch,)``; ``truncate=k`` cuts BPTT every k steps."""
    hidden = params["w_out"].shape[0]
    carry0 = bj.cells.initial_carry("lstm", hidden, xs.shape[1:2], DTYPE)

    def step(carry, x):
        carry, _ = bj.cells.lstm(params["cell"], carry, x)
        return carry, None

    (h_T, _), _ = bj.scan(
        step,
        carry0,
        xs,
        remat=remat or bj.Nested(levels=2),
        truncation=None if truncate is None else bj.Truncate(truncate),
    )
    return h_T @ params["w_out"] + params["b_out"]


def mse(params, xs, target, truncate=None):
    err = predict(params, xs, truncate) - target
    return jnp.mean(err * err)


def make_train_step(optimizer, args, truncate):
    @jax.jit
    def train_step(params, opt_state, key):
        xs, target = adding_batch(key, args.batch, args.length, args.placement, args.min_gap)
        loss, grads = jax.value_and_grad(mse)(params, xs, target, truncate)
        # optax mixes Python floats with its int32 step count (Adam's bias
        # correction), which strict dtype promotion (the tests') rejects.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def train(method, truncate, params, eval_data, args, writer, fh):
    """Train one method; append a CSV row per evaluation. Returns its rows and parameters."""
    optimizer = optax.chain(optax.clip_by_global_norm(args.clip), optax.adam(args.lr))
    opt_state = optimizer.init(params)
    train_step = make_train_step(optimizer, args, truncate)
    evaluate = jax.jit(mse)
    data_key = jax.random.key(args.seed + 1)  # the same batches for every method
    rows, losses = [], []

    def record(step, start):
        eval_mse = float(evaluate(params, *eval_data))
        train_mse = float(np.mean(losses)) if losses else float("nan")
        row = {
            "step": step,
            "method": method,
            "train_mse": train_mse,
            "eval_mse": eval_mse,
            "wall_s": time.perf_counter() - start,
        }
        writer.writerow(row)
        fh.flush()
        rows.append(row)
        losses.clear()

    start = time.perf_counter()
    record(0, start)
    for step in common.progress(range(1, args.steps + 1), total=args.steps, desc=method):
        params, opt_state, loss = train_step(params, opt_state, jax.random.fold_in(data_key, step))
        losses.append(loss)
        if step % args.eval_every == 0 or step == args.steps:
            losses[:] = [float(x) for x in losses]
            record(step, start)
    return rows, params


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=common.positive_int, default=200, help="T (default 200)")
    parser.add_argument(
        "--min-gap",
        type=common.non_negative_int,
        default=None,
        help="placement 'gap': no marker in the last M steps (default T // 4; 0: anywhere)",
    )
    parser.add_argument("--placement", choices=PLACEMENTS, default="gap")
    parser.add_argument(
        "--truncate", type=common.positive_int, default=None, help="K of Truncate(K) (T // 10)"
    )
    parser.add_argument("--steps", type=common.positive_int, default=2000)
    parser.add_argument("--batch", type=common.positive_int, default=64)
    parser.add_argument("--hidden", type=common.positive_int, default=64)
    parser.add_argument("--lr", type=common.positive_float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--clip", type=common.positive_float, default=1.0, help="global norm clip")
    parser.add_argument("--init", choices=INITS, default="chrono", help="LSTM gate biases")
    parser.add_argument(
        "--marker-weights",
        choices=("random", "zero"),
        default="zero",
        help="initial input weights of the marker channel",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=common.positive_int, default=50)
    parser.add_argument("--eval-batch", type=common.positive_int, default=1000)
    parser.add_argument("--quick", action="store_true", help="T=50, 500 steps: seconds")
    parser.add_argument("--backend", choices=("cpu", "gpu", "tpu"), default=None)
    parser.add_argument("--out", default="results")
    quick = dict(length=50, steps=500, hidden=32, batch=32, eval_batch=500, eval_every=25)
    args = common.parse_with_quick(parser, argv, quick)
    if args.length < 4:
        parser.error(f"--length must be >= 4, got {args.length}")
    if args.min_gap is None:
        args.min_gap = args.length // 4
    if args.truncate is None:
        args.truncate = max(1, args.length // 10)
    if args.truncate >= args.length:
        parser.error(f"--truncate must be < --length ({args.length}), got {args.truncate}")
    a, b = marker_region(args.length, args.placement, args.min_gap)
    if a < 1 or b < 2:
        where = f"--min-gap {args.min_gap}" if args.placement == "gap" else "Hochreiter's placement"
        parser.error(f"no room for two markers with --length {args.length} and {where}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.backend:
        jax.config.update("jax_platforms", args.backend)

    params0 = init_params(
        jax.random.key(args.seed), args.hidden, args.length, args.init, args.marker_weights
    )
    eval_data = adding_batch(
        jax.random.key(10_000 + args.seed),
        args.eval_batch,
        args.length,
        args.placement,
        args.min_gap,
    )
    constant_mse = float(jnp.mean((eval_data[1] - 1.0) ** 2))
    floor = marker_blind_floor(args.length, args.placement, args.min_gap)
    methods = (("full BPTT", None), (f"Truncate({args.truncate})", args.truncate))

    os.makedirs(args.out, exist_ok=True)
    curves, final_params = {}, {}
    with open(os.path.join(args.out, CSV_NAME), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        fh.flush()
        for method, truncate in methods:
            curves[method], final_params[method] = train(
                method, truncate, params0, eval_data, args, writer, fh
            )
    png = plot(curves, args, floor, os.path.join(args.out, PNG_NAME))

    where = (
        f"no marker in the last {args.min_gap} steps"
        if args.placement == "gap"
        else "Hochreiter's placement"
    )
    print(
        f"adding problem, T={args.length}, {where}; LSTM hidden {args.hidden} "
        f"({args.init} init, marker weights {args.marker_weights}), batch {args.batch}, "
        f"{args.steps} steps, Adam {args.lr}, clip {args.clip}, seed {args.seed}, "
        f"{jax.default_backend()}"
    )
    print(f"held-out MSE ({args.eval_batch} sequences), 1/6 = {BASELINE_MSE:.4f}:")
    print(f"{'method':<16}{'final':>9}{'best':>9}{'final·6':>9}{'wall s':>9}")
    summary = {}
    for method, rows in curves.items():
        final = rows[-1]["eval_mse"]
        best = min(r["eval_mse"] for r in rows)
        summary[method] = {
            "final_eval_mse": final,
            "best_eval_mse": best,
            "wall_s": rows[-1]["wall_s"],
        }
        print(
            f"{method:<16}{final:>9.3g}{best:>9.3g}{final / BASELINE_MSE:>9.3f}"
            f"{rows[-1]['wall_s']:>9.1f}"
        )
    print(f"{'constant 1.0':<16}{constant_mse:>9.3g}{'':>9}{constant_mse * 6:>9.3f}")
    print(f"without the markers no model beats MSE {floor:.4f} (expected over batches)")
    print(f"wrote {args.out}/{CSV_NAME}, {png}")
    return {
        "args": vars(args),
        "curves": curves,
        "summary": summary,
        "constant_mse": constant_mse,
        "marker_blind_floor": floor,
        "params": final_params,
    }


def plot(curves, args, floor, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for (method, rows), color in zip(curves.items(), ("C0", "C3"), strict=False):
        steps = [r["step"] for r in rows]
        ax.semilogy(steps, [r["eval_mse"] for r in rows], color=color, label=f"{method}, held-out")
        ax.semilogy(
            steps[1:],
            [r["train_mse"] for r in rows[1:]],
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
        f"markers ≥ {args.min_gap} steps before the end"
        if args.placement == "gap"
        else "Hochreiter's placement"
    )
    ax.set_title(
        f"adding problem, T={args.length}, {where}\nLSTM {args.hidden} ({args.init} init, "
        f"marker weights {args.marker_weights}), batch {args.batch}, Adam {args.lr}, "
        f"{jax.default_backend()}",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return common.save_figure(fig, path)


if __name__ == "__main__":
    main()
