"""A character-level language model trained with BPTT (d2l 9.5-9.7).

d2l's recurrent language model: characters are one-hot inputs to a recurrent
cell (any registered cell of ``bpttjax.cells``; Flax NNX's version of it with
``--impl nnx``; or Flax NNX's cell inside the drop-in ``bj.nnx.RNN`` module,
``--remat`` its ``remat=``, with ``--impl nnx-rnn``), a linear read-out gives
the next character's logits, and
the loss is the mean cross-entropy over every step of a subsequence of
``--num-steps`` characters; ``jax.grad`` through ``bj.scan`` is BPTT over that
subsequence. Training uses optax (Adam by default) after
``optax.clip_by_global_norm`` (d2l clips at 1). Minibatches are drawn with
d2l's two partitionings:

* ``random``: subsequences from random positions; the state starts at zero
  for every minibatch.
* ``sequential``: minibatch ``i + 1`` continues the text of minibatch ``i``
  row by row, so the final state of one minibatch is the initial state of the
  next (detached: its gradient is not propagated back into the previous
  minibatch). This *is* regular truncation at ``--num-steps``.

Perplexity is ``exp(mean cross-entropy)``: on training minibatches (averaged
over the last ``--eval-every`` steps) and on held-out text (the last 5% of
the corpus, at most 50,000 characters, read as ``--batch`` contiguous streams
in one scan). After training the model continues ``--prefix``.

Text is preprocessed as d2l does for "The Time Machine": every run of
characters other than ``A-Za-z`` becomes one space and letters are
lower-cased (27 tokens). With no ``--corpus`` the text is the docstrings of
the Python standard library's top-level modules, read from their source with
``ast`` in sorted order (no import, no download: the same text on every
machine with the same Python version, about 0.8 million characters for
Python 3.11). ``--corpus PATH`` reads any UTF-8 file, for example d2l's
corpus: ``curl -O https://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt``.

The training state (parameters, optimizer state, step, carried state) is
saved with Flax serialization to ``--out/<name>.ckpt`` every
``--eval-every`` steps; running the same command again resumes from it
(``--fresh`` starts over), and ``--steps`` may be raised to train longer.
The model, the data and the training loop are ``tasks.char_lm.CharModel``,
``tasks.corpus.minibatch`` and ``tasks.char_lm.train_char_lm``.

    python experiments/char_lm.py                      # GRU, 2000 steps
    python experiments/char_lm.py --cell lstm --partition sequential
    python experiments/char_lm.py --corpus timemachine.txt --steps 5000
    python experiments/char_lm.py --impl nnx-rnn --remat binomial:4
    python experiments/char_lm.py --quick              # seconds; used by the tests
    python experiments/char_lm.py --quick --devices 8  # data-parallel on 8 (simulated) devices
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

try:  # python -m experiments.char_lm, or experiments/ is importable
    from experiments import _cli
    from experiments.tasks import char_lm as char_lm_task
    from experiments.tasks import corpus
except ImportError:  # python experiments/char_lm.py in a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from experiments import _cli
    from experiments.tasks import char_lm as char_lm_task
    from experiments.tasks import corpus

QUICK = dict(hidden=32, batch=16, num_steps=20, steps=60, eval_every=20, max_chars=60_000)
"""``--quick`` defaults (seconds); options given explicitly still win."""


def build_parser() -> argparse.ArgumentParser:
    p = _cli.parser(
        __doc__,
        quick="tiny model and corpus: seconds",
        fresh="ignore an existing checkpoint",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--corpus", default=None, help="UTF-8 text file (default: stdlib docs)")
    p.add_argument("--max-chars", type=_cli.non_negative_int, default=0, help="0: all")
    _cli.add_cell_option(p, "gru")
    p.add_argument("--impl", choices=char_lm_task.IMPLS, default="bpttjax")
    p.add_argument("--hidden", type=_cli.positive_int, default=256)
    p.add_argument("--batch", type=_cli.positive_int, default=32)
    p.add_argument("--num-steps", type=_cli.positive_int, default=35, help="BPTT length")
    p.add_argument("--steps", type=_cli.positive_int, default=2000, help="training steps")
    p.add_argument("--lr", type=_cli.positive_float, default=3e-3, help="Adam learning rate")
    p.add_argument("--clip", type=_cli.positive_float, default=1.0, help="global norm clip")
    p.add_argument("--partition", choices=corpus.PARTITIONS, default="random")
    p.add_argument(
        "--truncation", default="full", help="full | truncate:K | random:P (within --num-steps)"
    )
    _cli.add_remat_option(p, "store_all")
    p.add_argument("--seed", type=_cli.non_negative_int, default=0)
    p.add_argument(
        "--devices",
        type=_cli.positive_int,
        default=1,
        help="data-parallel over N devices (the batch sharded by rows, parameters "
        "replicated); on CPU, N simulated devices are asked of XLA before JAX starts",
    )
    p.add_argument("--eval-every", type=_cli.positive_int, default=100)
    p.add_argument("--prefix", default="the time traveller")
    p.add_argument("--num-preds", type=_cli.non_negative_int, default=100)
    p.add_argument(
        "--temperature",
        type=_cli.float_in(0, float("inf"), low_included=True),
        default=0.0,
        help="0: greedy (d2l)",
    )
    return p


def plot(curves: dict[str, list[char_lm_task.EvalRow]], path: str, title: str = "") -> str:
    """Perplexity against training step; one colour per run, dashed = training."""
    fig, ax = _cli.pyplot().subplots(figsize=(7, 4.5))
    for i, (label, rows) in enumerate(curves.items()):
        steps = [r.step for r in rows]
        color = f"C{i}"
        ax.plot(steps, [r.val_perplexity for r in rows], color=color, label=f"{label} (val)")
        ax.plot(steps, [r.train_perplexity for r in rows], "--", color=color, alpha=0.6)
    ax.set_xlabel("training step")
    ax.set_ylabel("perplexity (dashed: training minibatches)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"character language model {title} ({jax.default_backend()})")
    return _cli.save_figure(fig, path)


def main(argv=None) -> None:
    p = build_parser()
    args = _cli.parse(p, argv, QUICK)
    try:
        cfg = _cli.from_args(char_lm_task.CharConfig, args)
        text = corpus.load_text(cfg.corpus, cfg.max_chars)
    except (OSError, ValueError) as e:
        p.error(str(e))
    name = f"char_lm_{args.cell}" + ("" if args.impl == "bpttjax" else "_" + args.impl)
    name = name.replace("-", "_")
    name += "_sequential" if args.partition == "sequential" else ""
    print(
        f"corpus: {len(text):,} characters, {len(set(text))} tokens; {args.cell} ({args.impl}) "
        f"hidden {args.hidden}, batch {args.batch} x {args.num_steps} steps, {args.partition} "
        f"partitioning, truncation {args.truncation}, {jax.default_backend()}"
    )
    if args.batch % args.devices:
        p.error(f"--batch {args.batch} must be a multiple of --devices {args.devices}")
    run = char_lm_task.train_char_lm(
        cfg, steps=args.steps, out=args.out, name=name, eval_every=args.eval_every,
        fresh=args.fresh, text=text, devices=args.devices,
    )  # fmt: skip
    sample = char_lm_task.predict_text(
        run.model, run.params, run.vocab, args.prefix, args.num_preds,
        temperature=args.temperature, seed=args.seed,
    )  # fmt: skip
    with open(os.path.join(args.out, f"{name}_sample.txt"), "w", encoding="utf-8") as fh:
        fh.write(sample + "\n")
    png = plot({name: run.rows}, os.path.join(args.out, f"{name}.png"), title=str(cfg.cell))
    last = run.rows[-1]
    print(
        f"step {last.step}: train perplexity {last.train_perplexity:.2f}, "
        f"validation perplexity {last.val_perplexity:.2f}, {last.seconds:.0f} s"
    )
    print(f"sample: {sample!r}")
    print(f"wrote {args.out}/{name}.csv, {name}.ckpt, {name}_sample.txt, {png}")


if __name__ == "__main__":
    main()
