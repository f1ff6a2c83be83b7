"""Full BPTT, regular truncation and randomized truncation compared (d2l 9.7.1).

d2l's section 9.7.1 names three ways to compute the gradient of a recurrent
model and argues that regular truncation is biased (it ignores dependencies
longer than ``k`` steps) but has low variance, while randomized truncation
(the ``ξ_t`` estimator) is unbiased but noisy, so that in practice it is no
better than regular truncation. This script measures both claims on the
character language model of ``char_lm.py`` (``tasks.char_lm.CharModel``):

(a) At one fixed parameter point (the model after ``--pretrain-steps`` steps
    of full-BPTT training) and one fixed minibatch of ``--length``
    characters, the gradient of ``bj.Truncate(k)`` for several ``k`` and of
    ``bj.RandomTruncate(π)`` for several ``π`` (``--samples`` independent ξ
    draws each) against the full-BPTT gradient: relative error
    ``‖g - g_full‖/‖g_full‖`` and cosine of single gradients, and the
    relative error of the mean of ``n`` random-truncation gradients as ``n``
    grows (bias: a floor that does not fall; variance: a fall as ``1/√n``).
(b) Training curves (validation perplexity against steps) from the same
    initial parameters and minibatches for full BPTT, ``Truncate(k)`` and
    ``RandomTruncate(π)``, with optax Adam after ``clip_by_global_norm``.

Writes ``gradient_bias.csv``, ``gradient_mean.csv``, ``training.csv`` (plus
one CSV and checkpoint per training run, resumed when run again) and
``truncation.png`` under ``--out``.

    python experiments/truncation.py            # the study of the docs page
    python experiments/truncation.py --quick    # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

try:  # python -m experiments.truncation, or experiments/ is importable
    from experiments import _cli, _table
    from experiments.tasks import char_lm as char_lm_task
    from experiments.tasks import corpus
except ImportError:  # python experiments/truncation.py in a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from experiments import _cli, _table
    from experiments.tasks import char_lm as char_lm_task
    from experiments.tasks import corpus

CSV_NAMES = ("gradient_bias", "gradient_mean", "training")
PNG_NAME = "truncation.png"
QUICK = dict(
    hidden=32, batch=8, length=30, ks="1,5,10", probs="0.5,0.9", samples=30,
    pretrain_steps=40, train_steps=40, eval_every=20, train_k=5, max_chars=60_000,
)  # fmt: skip
"""``--quick`` defaults (seconds); options given explicitly still win."""


@dataclasses.dataclass(frozen=True)
class BiasRow:
    """``gradient_bias.csv``: one truncation's gradient against full BPTT's."""

    strategy: str
    k_or_pi: int | float
    mean_window: int | float
    samples: int
    rel_error: float
    cosine: float
    rel_error_of_mean: float
    rel_error_std: float


@dataclasses.dataclass(frozen=True)
class MeanRow:
    """``gradient_mean.csv``: error of the mean of ``n`` RandomTruncate(pi) gradients."""

    pi: float
    n: int
    rel_error_of_mean: float


@dataclasses.dataclass(frozen=True)
class TrainingRow:
    """``training.csv`` of ``truncation.py``: an :class:`EvalRow` and its strategy."""

    strategy: str
    step: int
    train_perplexity: float
    val_perplexity: float
    seconds: float


def build_parser() -> argparse.ArgumentParser:
    p = _cli.parser(
        __doc__,
        quick="tiny model and corpus: seconds",
        fresh="ignore existing checkpoints",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    probability = _cli.float_in(0, 1)
    p.add_argument("--corpus", default=None, help="UTF-8 text file (default: stdlib docs)")
    p.add_argument("--max-chars", type=_cli.non_negative_int, default=0, help="0: all")
    _cli.add_cell_option(p, "gru")
    p.add_argument("--hidden", type=_cli.positive_int, default=128)
    p.add_argument("--batch", type=_cli.positive_int, default=32)
    p.add_argument("--length", type=_cli.int_at_least(2), default=100, help="BPTT length T")
    p.add_argument("--ks", type=_cli.comma_list(_cli.positive_int), default="1,2,5,10,20,50")
    p.add_argument("--probs", type=_cli.comma_list(probability), default="0.5,0.8,0.9,0.95")
    p.add_argument("--samples", type=_cli.positive_int, default=200, help="ξ draws per π")
    p.add_argument("--pretrain-steps", type=_cli.positive_int, default=500)
    p.add_argument("--train-steps", type=_cli.positive_int, default=1000)
    p.add_argument("--train-k", type=_cli.positive_int, default=10, help="Truncate(k) trained")
    p.add_argument("--train-prob", type=probability, default=0.9, help="RandomTruncate π trained")
    p.add_argument("--lr", type=_cli.positive_float, default=3e-3)
    p.add_argument("--clip", type=_cli.positive_float, default=1.0)
    p.add_argument("--eval-every", type=_cli.positive_int, default=50)
    p.add_argument("--seed", type=_cli.non_negative_int, default=0)
    p.add_argument(
        "--plot-only", action="store_true", help="redraw the figure from the CSVs under --out"
    )
    return p


def _flat(tree) -> jax.Array:
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def make_grad_fn(model: char_lm_task.CharModel, params, X, Y):
    """``grad(truncation spec, key) -> flat gradient`` at ``params`` on one fixed minibatch."""
    carry0 = model.initial_carry(X.shape[0])

    @functools.partial(jax.jit, static_argnums=0)
    def grad(spec: str, key):
        truncation = char_lm_task.truncation_from_spec(spec, key)
        g, _ = jax.grad(model.loss, has_aux=True)(params, carry0, X, Y, truncation=truncation)
        return _flat(g)

    return grad


def gradient_bias(grad, ks, probs, samples: int, seed: int):
    """Part (a): a :class:`~BiasRow` per strategy and each π's running-mean curve."""
    g_full = np.asarray(grad("full", jax.random.key(0)), dtype=np.float64)
    norm = float(np.linalg.norm(g_full))

    def compare(g):
        rel = float(np.linalg.norm(g - g_full) / norm)
        return rel, float(g @ g_full / (np.linalg.norm(g) * norm))

    rows = []
    for k in ks:
        rel, cos = compare(np.asarray(grad(f"truncate:{k}", jax.random.key(0)), np.float64))
        rows.append(BiasRow(f"Truncate({k})", k, k, 1, rel, cos, rel, 0.0))
    draws = {p: [] for p in probs}
    jobs = [(p, s) for p in probs for s in range(samples)]
    base = jax.random.key(seed)
    for p, s in _cli.progress(jobs, total=len(jobs), desc="gradient samples"):
        key = jax.random.fold_in(jax.random.fold_in(base, int(round(p * 1e6))), s)
        draws[p].append(np.asarray(grad(f"random:{p}", key), dtype=np.float64))
    curves = {}
    for p, gs in ((p, np.stack(d)) for p, d in draws.items()):
        rels, coss = np.array([compare(g) for g in gs]).T
        running = np.cumsum(gs, axis=0) / np.arange(1, len(gs) + 1)[:, None]
        curves[p] = np.linalg.norm(running - g_full, axis=1) / norm
        rows.append(
            BiasRow(
                f"RandomTruncate({p})",
                p,
                1 / (1 - p),
                len(gs),
                float(rels.mean()),
                float(coss.mean()),
                float(curves[p][-1]),
                float(rels.std()),
            )  # fmt: skip
        )
    return rows, curves, norm


def train_runs(base, train_k, train_prob, **kw) -> dict[str, list[char_lm_task.EvalRow]]:
    """Part (b): full BPTT, ``Truncate(k)`` and ``RandomTruncate(π)`` from the same start."""
    runs = {
        "full BPTT": "full",
        f"Truncate({train_k})": f"truncate:{train_k}",
        f"RandomTruncate({train_prob})": f"random:{train_prob}",
    }
    training = {}
    for label, spec in runs.items():
        cfg = dataclasses.replace(base, truncation=spec)
        name = "train_" + spec.replace(":", "_")
        training[label] = char_lm_task.train_char_lm(cfg, name=name, **kw).rows
    return training


def report(rows, training, steps: tuple[int, int], length, g_norm, seconds) -> None:
    """Print part (a)'s table and part (b)'s final perplexities; ``steps``: (pretrain, train)."""
    print(
        f"(a) gradients at step {steps[0]} of full-BPTT training, T={length}, "
        f"‖g_full‖ = {g_norm:.4g} ({seconds:.0f} s)"
    )
    print(f"{'strategy':<22}{'rel. error':>12}{'cosine':>9}{'rel. error of mean':>20}")
    for r in rows:
        n = f" (n={r.samples})" if r.samples > 1 else ""
        spread = f" ± {r.rel_error_std:.3f}" if r.samples > 1 else ""
        print(
            f"{r.strategy:<22}{r.rel_error:>12.4f}{spread}{r.cosine:>9.4f}"
            f"{r.rel_error_of_mean:>14.4f}{n}"
        )
    print(f"(b) after {steps[1]} training steps:")
    for label, rs in training.items():
        s = rs[-1]
        print(
            f"{label:<22} validation perplexity {s.val_perplexity:.3f}, "
            f"training {s.train_perplexity:.3f}, {s.seconds:.0f} s"
        )


FULL_COLOR, TRUNCATE_COLOR = "black", "C0"
"""Full BPTT and ``Truncate(k)`` keep their colour in every panel; each ``π`` of
``RandomTruncate(π)`` gets its own (:func:`pi_colors`)."""


def pi_colors(probs) -> dict[float, str]:
    """One colour per ``π``, the same in every panel."""
    return {p: f"C{i + 1}" for i, p in enumerate(sorted(set(probs)))}


def _pi_of(label: str) -> float | None:
    """``π`` of a ``RandomTruncate(π)`` label (None for any other)."""
    if label.startswith("RandomTruncate(") and label.endswith(")"):
        return float(label[len("RandomTruncate(") : -1])
    return None


def _plot_bias(ax, rows, length: int, colors) -> None:
    trunc = [r for r in rows if r.samples == 1 and r.k_or_pi < length]
    ax.semilogy(
        [r.k_or_pi for r in trunc], [r.rel_error for r in trunc], "o-", color=TRUNCATE_COLOR,
        label=f"Truncate(k) (k = T = {length}: exact)",
    )  # fmt: skip
    for r in rows:
        if r.samples > 1:
            ax.semilogy(
                [r.mean_window], [r.rel_error], "s", color=colors[r.k_or_pi],
                label=f"{r.strategy}, one draw",
            )  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("k (Truncate) or mean kept window 1/(1-π) (RandomTruncate)")
    ax.set_ylabel("‖g − g_full‖ / ‖g_full‖")
    ax.set_title("(a1) bias: error of one gradient")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _plot_means(ax, rows, curves, length: int, colors) -> None:
    for p, c in curves.items():
        ax.loglog(
            np.arange(1, len(c) + 1), c, color=colors[p],
            label=f"RandomTruncate({p}): mean of n draws",
        )  # fmt: skip
    first = next(iter(curves.values()))
    n = np.arange(1, len(first) + 1)
    ax.loglog(n, first[0] / np.sqrt(n), "k--", lw=0.8, label="∝ 1/√n")
    for r in rows:
        if r.samples == 1 and r.k_or_pi < length:
            ax.axhline(r.rel_error, ls=":", color=TRUNCATE_COLOR, alpha=0.6)
            ax.annotate(f"k={r.k_or_pi}", (1, r.rel_error), fontsize=7, va="bottom")
    ax.set_xlabel("n (independent ξ draws averaged)")
    ax.set_ylabel("relative error of the mean")
    ax.set_title("(a2) unbiased: the mean converges (dotted: Truncate(k))")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _plot_training(ax, training, length: int, colors) -> None:
    import matplotlib.ticker

    for label, rs in training.items():
        pi = _pi_of(label)
        if pi is not None:
            color = colors[pi]
        else:
            color = TRUNCATE_COLOR if label.startswith("Truncate(") else FULL_COLOR
        steps = [r.step for r in rs]
        ax.plot(steps, [r.val_perplexity for r in rs], color=color, label=label)
        ax.plot(steps, [r.train_perplexity for r in rs], "--", color=color, alpha=0.5)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("training step")
    ax.set_ylabel("validation perplexity (dashed: training)")
    ax.set_title(f"(b) training, T={length}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def plot(rows, curves, training, base: char_lm_task.CharConfig, path: str) -> str:
    """Part (a) in two panels, (a1) and (a2); part (b) in the third."""
    probs = [*curves, *(p for p in map(_pi_of, training) if p is not None)]
    colors = pi_colors(probs)
    fig, (ax1, ax2, ax3) = _cli.pyplot().subplots(1, 3, figsize=(16, 4.5))
    _plot_bias(ax1, rows, base.num_steps, colors)
    _plot_means(ax2, rows, curves, base.num_steps, colors)
    _plot_training(ax3, training, base.num_steps, colors)
    fig.suptitle(
        f"character LM ({base.cell}, hidden {base.hidden}, batch {base.batch}), "
        f"{jax.default_backend()}"
    )
    return _cli.save_figure(fig, path)


def plot_only(base: char_lm_task.CharConfig, out: str) -> str:
    """``--plot-only``: the figure from the CSVs a run wrote under ``out``."""
    paths = {name: os.path.join(out, f"{name}.csv") for name in CSV_NAMES}
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if missing:
        raise SystemExit(f"no results at {', '.join(missing)}: run the study first")
    rows = _table.Table(paths["gradient_bias"], BiasRow).read()
    curves = {}
    for r in _table.Table(paths["gradient_mean"], MeanRow).read():
        curves.setdefault(r.pi, []).append((r.n, r.rel_error_of_mean))
    curves = {p: np.array([e for _, e in sorted(c)]) for p, c in curves.items()}
    training = {}
    for r in _table.Table(paths["training"], TrainingRow).read():
        training.setdefault(r.strategy, []).append(r)
    return plot(rows, curves, training, base, os.path.join(out, PNG_NAME))


def main(argv=None) -> None:
    p = build_parser()
    args = _cli.parse(p, argv, QUICK)
    try:
        base = char_lm_task.CharConfig(
            cell=args.cell, hidden=args.hidden, batch=args.batch, num_steps=args.length,
            lr=args.lr, clip=args.clip, seed=args.seed, corpus=args.corpus,
            max_chars=args.max_chars,
        )  # fmt: skip
        if args.plot_only:
            print(f"wrote {plot_only(base, args.out)}")
            return
        text = corpus.load_text(args.corpus, args.max_chars)
    except (OSError, ValueError) as e:
        p.error(str(e))
    out = args.out
    os.makedirs(out, exist_ok=True)
    print(
        f"{args.cell} hidden {args.hidden}, batch {args.batch} x T={args.length}, "
        f"corpus {len(text):,} characters, {jax.default_backend()}"
    )
    # (a) bias and variance at a fixed parameter point
    t0 = time.perf_counter()
    kw = dict(out=out, fresh=args.fresh, text=text)
    eval_every = min(args.eval_every, args.pretrain_steps)
    fixed = char_lm_task.train_char_lm(
        base, steps=args.pretrain_steps, name="pretrained", eval_every=eval_every, **kw
    )
    train_tokens, _ = corpus.split_tokens(fixed.vocab.encode(text))
    X, Y, _ = corpus.minibatch(
        train_tokens, 10**6, batch=args.batch, num_steps=args.length, partition="random",
        seed=args.seed + 1,
    )  # fmt: skip
    grad = make_grad_fn(fixed.model, fixed.params, jnp.asarray(X), jnp.asarray(Y))
    ks = [k for k in args.ks if k < args.length] + [args.length]  # k = T is full BPTT
    rows, curves, g_norm = gradient_bias(grad, ks, args.probs, args.samples, args.seed)
    bias_seconds = time.perf_counter() - t0
    _table.Table(os.path.join(out, "gradient_bias.csv"), BiasRow).write(rows)
    means = [MeanRow(p, n + 1, float(c[n])) for p, c in curves.items() for n in range(len(c))]
    _table.Table(os.path.join(out, "gradient_mean.csv"), MeanRow).write(means)
    # (b) training curves from the same initialization and minibatches
    training = train_runs(
        base, args.train_k, args.train_prob, steps=args.train_steps, eval_every=args.eval_every,
        **kw,
    )  # fmt: skip
    lines = [
        TrainingRow(label, *dataclasses.astuple(r)) for label, rs in training.items() for r in rs
    ]
    _table.Table(os.path.join(out, "training.csv"), TrainingRow).write(lines)
    png = plot(rows, curves, training, base, os.path.join(out, PNG_NAME))
    steps = (args.pretrain_steps, args.train_steps)
    report(rows, training, steps, args.length, g_norm, bias_seconds)
    print(f"wrote {out}/gradient_bias.csv, gradient_mean.csv, training.csv, {png}")


if __name__ == "__main__":
    main()
