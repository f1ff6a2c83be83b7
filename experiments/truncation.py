"""Full BPTT, regular truncation and randomized truncation compared (d2l 9.7.1).

d2l's section 9.7.1 names three ways to compute the gradient of a recurrent
model and argues that regular truncation is biased (it ignores dependencies
longer than ``k`` steps) but has low variance, while randomized truncation
(the ``ξ_t`` estimator) is unbiased but noisy, so that in practice it is no
better than regular truncation. This script measures both claims on the
character language model of ``char_lm.py``:

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

    python experiments/truncation.py            # a few minutes on a laptop CPU
    python experiments/truncation.py --quick    # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

try:
    from experiments import char_lm
    from experiments.common import (
        non_negative_int,
        parse_with_quick,
        positive_float,
        positive_int,
        progress,
        save_figure,
        write_csv,
    )
except ImportError:  # run as a script: experiments/ is on sys.path
    import char_lm
    from common import (
        non_negative_int,
        parse_with_quick,
        positive_float,
        positive_int,
        progress,
        save_figure,
        write_csv,
    )


def _flat(tree) -> jax.Array:
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def make_grad_fn(model: char_lm.Model, params, X, Y):
    """``grad(truncation) -> flat gradient`` at ``params`` on one fixed minibatch."""
    carry0 = model.initial_carry(X.shape[0])

    @functools.partial(jax.jit, static_argnums=0)
    def grad(spec: str, key):
        truncation = char_lm.truncation_from_spec(spec, key)
        g, _ = jax.grad(model.loss, has_aux=True)(params, carry0, X, Y, truncation=truncation)
        return _flat(g)

    return grad


def gradient_bias(grad, ks, probs, samples: int, seed: int):
    """Part (a): rows per strategy, the running-mean curve, the full gradient's norm."""
    g_full = np.asarray(grad("full", jax.random.key(0)), dtype=np.float64)
    norm = float(np.linalg.norm(g_full))

    def compare(g):
        g = np.asarray(g, dtype=np.float64)
        rel = float(np.linalg.norm(g - g_full) / norm)
        cos = float(g @ g_full / (np.linalg.norm(g) * norm))
        return rel, cos

    rows = []
    for k in ks:
        rel, cos = compare(grad(f"truncate:{k}", jax.random.key(0)))
        rows.append(
            {"strategy": f"Truncate({k})", "k_or_pi": k, "mean_window": k, "samples": 1,
             "rel_error": rel, "cosine": cos, "rel_error_of_mean": rel,
             "rel_error_std": 0.0}
        )  # fmt: skip
    curves = {}
    jobs = [(p, s) for p in probs for s in range(samples)]
    draws = {p: [] for p in probs}
    base = jax.random.key(seed)
    for p, s in progress(jobs, total=len(jobs), desc="gradient samples"):
        key = jax.random.fold_in(jax.random.fold_in(base, int(round(p * 1e6))), s)
        draws[p].append(np.asarray(grad(f"random:{p}", key), dtype=np.float64))
    for p in probs:
        gs = np.stack(draws[p])
        single = [compare(g) for g in gs]
        running = np.cumsum(gs, axis=0) / np.arange(1, len(gs) + 1)[:, None]
        curves[p] = np.linalg.norm(running - g_full, axis=1) / norm
        rels = np.array([r for r, _ in single])
        rows.append(
            {"strategy": f"RandomTruncate({p})", "k_or_pi": p, "mean_window": 1 / (1 - p)
             if p < 1 else math.inf, "samples": len(gs), "rel_error": float(rels.mean()),
             "cosine": float(np.mean([c for _, c in single])),
             "rel_error_of_mean": float(curves[p][-1]), "rel_error_std": float(rels.std())}
        )  # fmt: skip
    return rows, curves, norm


QUICK = dict(
    hidden=32, batch=8, length=30, ks="1,5,10", probs="0.5,0.9", samples=30,
    pretrain_steps=40, train_steps=40, eval_every=20, train_k=5, max_chars=60_000,
)  # fmt: skip
"""``--quick`` defaults (seconds); options given explicitly still win."""


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--corpus", default=None, help="UTF-8 text file (default: stdlib docs)")
    parser.add_argument("--max-chars", type=non_negative_int, default=0, help="0: all")
    parser.add_argument("--cell", choices=char_lm.CELLS, default="gru")
    parser.add_argument("--hidden", type=positive_int, default=128)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--length", type=positive_int, default=100, help="BPTT length T")
    parser.add_argument("--ks", default="1,2,5,10,20,50", help="Truncate(k) windows")
    parser.add_argument("--probs", default="0.5,0.8,0.9,0.95", help="RandomTruncate π")
    parser.add_argument("--samples", type=positive_int, default=200, help="ξ draws per π")
    parser.add_argument("--pretrain-steps", type=positive_int, default=500)
    parser.add_argument("--train-steps", type=positive_int, default=1000)
    parser.add_argument("--train-k", type=positive_int, default=10, help="Truncate(k) trained")
    parser.add_argument("--train-prob", type=float, default=0.9, help="RandomTruncate π trained")
    parser.add_argument("--lr", type=positive_float, default=3e-3)
    parser.add_argument("--clip", type=positive_float, default=1.0)
    parser.add_argument("--eval-every", type=positive_int, default=50)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    parser.add_argument("--quick", action="store_true", help="tiny model and corpus: seconds")
    parser.add_argument("--backend", choices=("cpu", "gpu", "tpu"), default=None)
    parser.add_argument("--out", default="results")
    args = parse_with_quick(parser, argv, QUICK)
    try:
        ks = sorted({int(k) for k in args.ks.split(",")})
        probs = sorted({float(p) for p in args.probs.split(",")})
    except ValueError:
        parser.error(
            f"--ks and --probs are comma-separated numbers, got {args.ks!r}, {args.probs!r}"
        )
    if not ks or ks[0] < 1:
        parser.error(f"--ks must be ints >= 1, got {args.ks!r}")
    if any(not 0 < p < 1 for p in probs + [args.train_prob]):
        parser.error(f"--probs and --train-prob must lie in (0, 1), got {probs}, {args.train_prob}")
    if args.length < 2:
        parser.error(f"--length must be >= 2, got {args.length}")
    if args.backend:
        jax.config.update("jax_platforms", args.backend)

    try:
        text = char_lm.load_text(args.corpus, args.max_chars)
        base = char_lm.Config(
            cell=args.cell,
            hidden=args.hidden,
            batch=args.batch,
            num_steps=args.length,
            lr=args.lr,
            clip=args.clip,
            seed=args.seed,
            corpus=args.corpus,
            max_chars=args.max_chars,
        )
    except (OSError, ValueError) as e:
        parser.error(str(e))
    out = args.out
    os.makedirs(out, exist_ok=True)
    print(
        f"{args.cell} hidden {args.hidden}, batch {args.batch} x T={args.length}, "
        f"corpus {len(text):,} characters, {jax.default_backend()}"
    )

    # (a) bias and variance at a fixed parameter point
    t0 = time.perf_counter()
    fixed = char_lm.train(
        base, steps=args.pretrain_steps, out=out, name="pretrained",
        eval_every=min(args.eval_every, args.pretrain_steps), fresh=args.fresh, text=text,
    )  # fmt: skip
    train_tokens, _ = char_lm.split(fixed["vocab"].encode(text))
    X, Y, _ = char_lm.minibatch(
        train_tokens, 10**6, batch=args.batch, num_steps=args.length, partition="random",
        seed=args.seed + 1,
    )  # fmt: skip
    grad = make_grad_fn(fixed["model"], fixed["params"], jnp.asarray(X), jnp.asarray(Y))
    ks = [k for k in ks if k < args.length] + [args.length]  # k = T is full BPTT
    rows, curves, g_norm = gradient_bias(grad, ks, probs, args.samples, args.seed)
    bias_seconds = time.perf_counter() - t0
    write_csv(os.path.join(out, "gradient_bias.csv"), rows)
    write_csv(
        os.path.join(out, "gradient_mean.csv"),
        [
            {"pi": p, "n": n + 1, "rel_error_of_mean": float(c[n])}
            for p, c in curves.items()
            for n in range(len(c))
        ],
    )

    # (b) training curves from the same initialization and minibatches
    runs = {
        "full BPTT": "full",
        f"Truncate({args.train_k})": f"truncate:{args.train_k}",
        f"RandomTruncate({args.train_prob})": f"random:{args.train_prob}",
    }
    training, summary = {}, []
    for label, spec in runs.items():
        cfg = dataclasses.replace(base, truncation=spec)
        name = "train_" + spec.replace(":", "_")
        result = char_lm.train(
            cfg, steps=args.train_steps, out=out, name=name, eval_every=args.eval_every,
            fresh=args.fresh, text=text,
        )  # fmt: skip
        training[label] = result["rows"]
        last = result["rows"][-1]
        summary.append({"strategy": label, **last})
    write_csv(
        os.path.join(out, "training.csv"),
        [{"strategy": label, **r} for label, rs in training.items() for r in rs],
    )
    png = plot(rows, curves, training, args, os.path.join(out, "truncation.png"))

    print(
        f"(a) gradients at step {args.pretrain_steps} of full-BPTT training, T={args.length}, "
        f"‖g_full‖ = {g_norm:.4g} ({bias_seconds:.0f} s)"
    )
    print(f"{'strategy':<22}{'rel. error':>12}{'cosine':>9}{'rel. error of mean':>20}")
    for r in rows:
        n = f" (n={r['samples']})" if r["samples"] > 1 else ""
        spread = f" ± {r['rel_error_std']:.3f}" if r["samples"] > 1 else ""
        print(
            f"{r['strategy']:<22}{r['rel_error']:>12.4f}{spread}{r['cosine']:>9.4f}"
            f"{r['rel_error_of_mean']:>14.4f}{n}"
        )
    print(f"(b) after {args.train_steps} training steps:")
    for s in summary:
        print(
            f"{s['strategy']:<22} validation perplexity {s['val_perplexity']:.3f}, "
            f"training {s['train_perplexity']:.3f}, {s['seconds']:.0f} s"
        )
    print(f"wrote {out}/gradient_bias.csv, gradient_mean.csv, training.csv, {png}")
    return {"bias": rows, "mean_curves": curves, "training": training, "summary": summary}


def plot(rows, curves, training, args, path):
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))
    trunc = [r for r in rows if r["samples"] == 1 and r["k_or_pi"] < args.length]
    ax1.semilogy(
        [r["k_or_pi"] for r in trunc], [r["rel_error"] for r in trunc], "o-",
        label=f"Truncate(k) (k = T = {args.length}: exact)",
    )  # fmt: skip
    for r in rows:
        if r["samples"] > 1:
            ax1.semilogy(
                [r["mean_window"]], [r["rel_error"]], "s", label=f"{r['strategy']}, one draw"
            )
    ax1.set_xscale("log")
    ax1.set_xlabel("k (Truncate) or mean kept window 1/(1-π) (RandomTruncate)")
    ax1.set_ylabel("‖g − g_full‖ / ‖g_full‖")
    ax1.set_title("(a) error of one gradient")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7)
    for p, c in curves.items():
        n = np.arange(1, len(c) + 1)
        ax2.loglog(n, c, label=f"RandomTruncate({p}): mean of n draws")
    first = next(iter(curves.values()))
    n = np.arange(1, len(first) + 1)
    ax2.loglog(n, first[0] / np.sqrt(n), "k--", lw=0.8, label="∝ 1/√n")
    for r in trunc:
        ax2.axhline(r["rel_error"], ls=":", color="gray")
        ax2.annotate(f"k={r['k_or_pi']}", (1, r["rel_error"]), fontsize=7, va="bottom")
    ax2.set_xlabel("n (independent ξ draws averaged)")
    ax2.set_ylabel("relative error of the mean")
    ax2.set_title("(a) unbiased: the mean converges (dotted: Truncate(k))")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7)
    for i, (label, rs) in enumerate(training.items()):
        steps = [r["step"] for r in rs]
        ax3.plot(steps, [r["val_perplexity"] for r in rs], color=f"C{i}", label=label)
        ax3.plot(steps, [r["train_perplexity"] for r in rs], "--", color=f"C{i}", alpha=0.5)
    ax3.set_yscale("log")
    ax3.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax3.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax3.set_xlabel("training step")
    ax3.set_ylabel("validation perplexity (dashed: training)")
    ax3.set_title(f"(b) training, T={args.length}")
    ax3.grid(True, which="both", alpha=0.3)
    ax3.legend(fontsize=8)
    fig.suptitle(
        f"character LM ({args.cell}, hidden {args.hidden}, batch {args.batch}), "
        f"{jax.default_backend()}"
    )
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
