"""A character-level language model trained with BPTT (d2l 9.5-9.7).

d2l's recurrent language model: characters are one-hot inputs to a recurrent
cell (tanh RNN, GRU or LSTM from ``bpttjax.cells``, or Flax NNX's cells with
``--impl nnx``), a linear read-out gives the next character's logits, and the
loss is the mean cross-entropy over every step of a subsequence of
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

    python experiments/char_lm.py                      # GRU, 2000 steps, ~2 min
    python experiments/char_lm.py --cell lstm --partition sequential
    python experiments/char_lm.py --corpus timemachine.txt --steps 5000
    python experiments/char_lm.py --quick              # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bpttjax as bj

try:
    from experiments.common import (
        non_negative_int,
        parse_with_quick,
        positive_float,
        positive_int,
        progress,
        save_figure,
    )
except ImportError:  # run as a script: experiments/ is on sys.path
    from common import (
        non_negative_int,
        parse_with_quick,
        positive_float,
        positive_int,
        progress,
        save_figure,
    )

CELLS = ("rnn", "gru", "lstm")
PARTITIONS = ("random", "sequential")
REMATS = {
    "store_all": bj.StoreAll,
    "every_step": bj.EveryStep,
    "nested2": functools.partial(bj.Nested, levels=2),
    "nested3": functools.partial(bj.Nested, levels=3),
}
DTYPE = jnp.float32
VAL_FRACTION, VAL_MAX_CHARS = 0.05, 50_000

# ---------------------------------------------------------------- corpus ---


def stdlib_docstrings() -> str:
    """Docstrings of the standard library's top-level modules, deterministic.

    Files are read in sorted order and parsed with ``ast`` (nothing is
    imported); module, class and function docstrings are taken in ``ast.walk``
    order, without their interactive examples (lines starting ``>>>`` or
    ``...``).
    """
    root = sysconfig.get_paths()["stdlib"]
    texts = []
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        try:
            with open(os.path.join(root, name), encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue  # an unreadable file is skipped, the same way everywhere
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    lines = doc.splitlines()
                    texts.append(
                        "\n".join(s for s in lines if not s.lstrip().startswith((">>>", "...")))
                    )
    return "\n".join(texts)


def preprocess(text: str) -> str:
    """d2l's preprocessing: non-letters to one space, lower case."""
    return re.sub("[^A-Za-z]+", " ", text).lower().strip()


def load_text(path: str | None, max_chars: int = 0) -> str:
    if path is None:
        text = preprocess(stdlib_docstrings())
        source = "the standard library's docstrings"
    else:
        try:
            with open(path, encoding="utf-8") as fh:
                text = preprocess(fh.read())
        except UnicodeDecodeError as e:
            raise ValueError(f"--corpus {path!r} is not UTF-8 text: {e}") from None
        source = repr(path)
    if max_chars:
        text = text[:max_chars]
    if len(text) < 1000:
        raise ValueError(
            f"the corpus from {source} has {len(text)} characters after preprocessing "
            "(letters and spaces); at least 1000 are needed"
        )
    return text


@dataclasses.dataclass(frozen=True)
class Vocab:
    chars: str

    @classmethod
    def build(cls, text: str) -> Vocab:
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.chars)}
        unknown = sorted(set(text) - set(index))
        if unknown:
            raise ValueError(f"characters not in the vocabulary {self.chars!r}: {unknown}")
        return np.fromiter((index[c] for c in text), dtype=np.int32, count=len(text))

    def decode(self, tokens) -> str:
        return "".join(self.chars[int(i)] for i in tokens)


def split(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation): the validation text is the corpus' tail."""
    n_val = min(int(len(tokens) * VAL_FRACTION), VAL_MAX_CHARS)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]


# ------------------------------------------------------------ minibatches ---


def steps_per_epoch(n_tokens: int, batch: int, num_steps: int) -> int:
    """Minibatches per epoch, either partitioning, at the largest start offset."""
    return max(0, n_tokens - num_steps) // (num_steps * batch)


def minibatch(
    tokens: np.ndarray, step: int, *, batch: int, num_steps: int, partition: str, seed: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(X, Y, reset)`` for training step ``step``; a pure function of its arguments.

    ``X, Y: (batch, num_steps)`` with ``Y`` the next characters. An epoch
    starts at a random offset in ``[0, num_steps)``. ``random``: the epoch's
    subsequences are shuffled. ``sequential``: row ``b`` of minibatch ``i``
    continues row ``b`` of minibatch ``i - 1``. ``reset`` is True when the
    carried state must start from zero (always for ``random``; at the start
    of each epoch for ``sequential``).
    """
    per_epoch = steps_per_epoch(len(tokens), batch, num_steps)
    if per_epoch == 0:
        raise ValueError(
            f"the training text ({len(tokens)} characters) is too short for one minibatch "
            f"of --batch {batch} x --num-steps {num_steps}"
        )
    epoch, i = divmod(step, per_epoch)
    rng = np.random.default_rng([seed, epoch])
    offset = int(rng.integers(num_steps))
    if partition == "random":
        n_sub = (len(tokens) - offset - 1) // num_steps
        starts = offset + num_steps * rng.permutation(n_sub)[i * batch : (i + 1) * batch]
        idx = starts[:, None] + np.arange(num_steps)[None, :]
        return tokens[idx], tokens[idx + 1], True
    if partition == "sequential":
        cols = (len(tokens) - offset - 1) // batch
        rows = offset + cols * np.arange(batch)
        idx = rows[:, None] + i * num_steps + np.arange(num_steps)[None, :]
        return tokens[idx], tokens[idx + 1], i == 0
    raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")


# ------------------------------------------------------------------ model ---


@dataclasses.dataclass(frozen=True)
class Model:
    """A recurrent cell, its carry layout and a linear read-out over ``vocab`` tokens."""

    cell: str
    vocab: int
    hidden: int
    impl: str = "bpttjax"

    def init(self, key) -> dict:
        k1, k2 = jax.random.split(key)
        if self.impl == "bpttjax":
            cell = getattr(bj.cells, f"init_{self.cell}")(k1, self.vocab, self.hidden, DTYPE)
        else:
            from flax import nnx

            cell = nnx.to_pure_dict(self._nnx(k1)[1])
        w_out = jax.random.normal(k2, (self.hidden, self.vocab), DTYPE) / math.sqrt(self.hidden)
        return {"cell": cell, "W_out": w_out, "b_out": jnp.zeros((self.vocab,), DTYPE)}

    def _nnx(self, key):
        from flax import nnx

        cls = {"rnn": nnx.SimpleCell, "gru": nnx.GRUCell, "lstm": nnx.LSTMCell}[self.cell]
        module = cls(self.vocab, self.hidden, rngs=nnx.Rngs(params=key), param_dtype=DTYPE)
        return bj.cells.from_nnx(module)

    def initial_carry(self, batch: int):
        h = jnp.zeros((batch, self.hidden), DTYPE)
        return (h, jnp.zeros_like(h)) if self.cell == "lstm" else h

    def hidden_state(self, carry):
        if self.cell != "lstm":
            return carry
        return carry[0] if self.impl == "bpttjax" else carry[1]  # Flax's LSTM carry is (c, h)

    def cell_step(self, params):
        if self.impl == "bpttjax":
            return functools.partial(getattr(bj.cells, self.cell), params["cell"])
        from flax import nnx

        step, state = self._nnx(jax.random.key(0))  # a template; its values are replaced
        nnx.replace_by_pure_dict(state, params["cell"])
        return functools.partial(step, state)

    def logits(self, params, carry):
        z = self.hidden_state(carry) @ params["W_out"]
        return z + jnp.broadcast_to(params["b_out"], z.shape)

    def loss(self, params, carry, X, Y, *, remat=None, truncation=None):
        """Mean cross-entropy over ``X, Y: (batch, T)`` and the final carry."""
        cell = self.cell_step(params)

        def step(carry, xy):
            x, y = xy
            carry, _ = cell(carry, jax.nn.one_hot(x, self.vocab, dtype=DTYPE))
            nll = optax.softmax_cross_entropy_with_integer_labels(self.logits(params, carry), y)
            return carry, jnp.mean(nll)

        carry, nll = bj.scan(
            step, carry, (X.T, Y.T), remat=remat or bj.StoreAll(), truncation=truncation
        )
        return jnp.mean(nll), carry


def truncation_from_spec(spec: str, key=None):
    """``full`` | ``truncate:K`` | ``random:P`` -> a truncation strategy (or None)."""
    kind, _, arg = spec.partition(":")
    try:
        if kind == "full" and not arg:
            return None
        if kind == "truncate":
            return bj.Truncate(int(arg))
        if kind == "random":
            return bj.RandomTruncate(jax.random.key(0) if key is None else key, float(arg))
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad truncation {spec!r}: {e}") from None
    raise ValueError(f"truncation must be 'full', 'truncate:K' or 'random:P', got {spec!r}")


def perplexity(model: Model, params, tokens: np.ndarray, streams: int) -> float:
    """exp(mean cross-entropy) over ``tokens`` read as ``streams`` contiguous rows."""
    cols = (len(tokens) - 1) // streams
    X = tokens[: streams * cols].reshape(streams, cols)
    Y = tokens[1 : streams * cols + 1].reshape(streams, cols)
    nll, _ = _eval_loss(model, params, jnp.asarray(X), jnp.asarray(Y))
    return float(np.exp(float(nll)))


@functools.partial(jax.jit, static_argnums=0)
def _eval_loss(model, params, X, Y):
    return model.loss(params, model.initial_carry(X.shape[0]), X, Y)


def predict(
    model: Model, params, vocab: Vocab, prefix: str, num_preds: int, *, temperature=0.0, seed=0
) -> str:
    """Continue ``prefix`` by ``num_preds`` characters (greedy when temperature is 0)."""
    prefix = preprocess(prefix) or " "
    tokens = jnp.asarray(vocab.encode(prefix))
    out = _generate(model, params, tokens, num_preds, float(temperature), jax.random.key(seed))
    return prefix + vocab.decode(np.asarray(out))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _generate(model, params, tokens, num_preds, temperature, key):
    cell = model.cell_step(params)
    one_hot = lambda t: jax.nn.one_hot(t, model.vocab, dtype=DTYPE)
    carry, _ = jax.lax.scan(
        lambda c, t: cell(c, one_hot(t)), model.initial_carry(1), tokens[:, None]
    )

    def gen(state, key):
        carry = state
        logits = model.logits(params, carry)[0]
        sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6))
        token = jnp.where(temperature > 0, sampled, jnp.argmax(logits)).astype(jnp.int32)
        carry, _ = cell(carry, one_hot(token[None]))
        return carry, token

    _, out = jax.lax.scan(gen, carry, jax.random.split(key, num_preds))
    return out


# --------------------------------------------------------------- training ---


@dataclasses.dataclass(frozen=True)
class Config:
    cell: str = "gru"
    impl: str = "bpttjax"
    hidden: int = 256
    batch: int = 32
    num_steps: int = 35
    lr: float = 3e-3
    clip: float = 1.0
    partition: str = "random"
    truncation: str = "full"
    remat: str = "store_all"
    seed: int = 0
    corpus: str | None = None
    max_chars: int = 0

    def __post_init__(self):
        for name, allowed in (
            ("cell", CELLS),
            ("impl", ("bpttjax", "nnx")),
            ("partition", PARTITIONS),
            ("remat", tuple(REMATS)),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        truncation_from_spec(self.truncation)
        if not self.lr > 0 or not self.clip > 0:
            raise ValueError(f"lr and clip must be > 0, got lr={self.lr}, clip={self.clip}")


def make_optimizer(cfg: Config):
    return optax.chain(optax.clip_by_global_norm(cfg.clip), optax.adam(cfg.lr))


def make_train_step(model: Model, cfg: Config):
    optimizer = make_optimizer(cfg)
    remat = REMATS[cfg.remat]()
    truncation_key = jax.random.key(cfg.seed + 1)

    @jax.jit
    def train_step(params, opt_state, carry, X, Y, step):
        # A fresh ξ sequence per step for randomized truncation.
        truncation = truncation_from_spec(cfg.truncation, jax.random.fold_in(truncation_key, step))
        (nll, carry), grads = jax.value_and_grad(model.loss, has_aux=True)(
            params, carry, X, Y, remat=remat, truncation=truncation
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, carry, nll

    return train_step


FIELDS = ("step", "train_perplexity", "val_perplexity", "seconds")


def train(
    cfg: Config,
    *,
    steps: int,
    out: str,
    name: str,
    eval_every: int = 100,
    fresh: bool = False,
    text: str | None = None,
) -> dict:
    """Train (or resume) and return ``{"model", "params", "vocab", "rows"}``.

    Every ``eval_every`` steps the state is saved to ``out/name.ckpt``
    (atomically) and then a row is appended to ``out/name.csv``. An existing
    checkpoint with the same configuration and text is resumed unless
    ``fresh``; one with another configuration or text is an error (nothing is
    overwritten).
    """
    from flax import serialization

    text = load_text(cfg.corpus, cfg.max_chars) if text is None else text
    vocab = Vocab.build(text)
    train_tokens, val_tokens = split(vocab.encode(text))
    model = Model(cfg.cell, len(vocab), cfg.hidden, cfg.impl)
    streams = min(cfg.batch, max(1, (len(val_tokens) - 1) // cfg.num_steps))

    params = model.init(jax.random.key(cfg.seed))
    opt_state = make_optimizer(cfg).init(params)
    carry = model.initial_carry(cfg.batch)
    state = {"params": params, "opt_state": opt_state, "carry": carry, "step": 0}
    # the text's hash too: the default corpus differs between Python versions
    digest = hashlib.sha256(text.encode()).hexdigest()
    meta = json.dumps({**dataclasses.asdict(cfg), "text_sha256": digest}, sort_keys=True)

    os.makedirs(out, exist_ok=True)
    ckpt, csv_path = os.path.join(out, f"{name}.ckpt"), os.path.join(out, f"{name}.csv")
    rows: list[dict] = []
    if os.path.exists(ckpt) and not fresh:
        with open(ckpt, "rb") as fh:
            saved = serialization.msgpack_restore(fh.read())
        if saved.get("meta") != meta:
            raise ValueError(
                f"{ckpt} was written by a run with another configuration or text; "
                "pass --fresh to start over or choose another --out"
            )
        state = serialization.from_state_dict(state, saved["state"])
        if os.path.exists(csv_path):
            with open(csv_path, newline="") as fh:
                rows = [
                    {k: float(v) if k != "step" else int(v) for k, v in r.items()}
                    for r in csv.DictReader(fh)
                    if int(r["step"]) <= int(state["step"])
                ]
    with open(csv_path, "w", newline="") as fh:  # rewritten: drops rows after the checkpoint
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)

    train_step = make_train_step(model, cfg)
    params, opt_state, carry = state["params"], state["opt_state"], state["carry"]
    start = int(state["step"])
    elapsed0 = rows[-1]["seconds"] if rows else 0.0
    t0, nll_sum, nll_count = time.perf_counter(), 0.0, 0
    bar = progress(total=steps, initial=start, desc=name)
    for step in range(start, steps):
        X, Y, reset = minibatch(
            train_tokens,
            step,
            batch=cfg.batch,
            num_steps=cfg.num_steps,
            partition=cfg.partition,
            seed=cfg.seed,
        )
        if reset:
            carry = model.initial_carry(cfg.batch)
        params, opt_state, carry, nll = train_step(
            params, opt_state, carry, jnp.asarray(X), jnp.asarray(Y), jnp.int32(step)
        )
        nll = float(nll)
        if not math.isfinite(nll):
            raise FloatingPointError(f"{name}: loss is {nll} at step {step}")
        nll_sum, nll_count = nll_sum + nll, nll_count + 1
        if bar is not None:
            bar.update(1)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            row = {
                "step": step + 1,
                "train_perplexity": math.exp(nll_sum / nll_count),
                "val_perplexity": perplexity(model, params, val_tokens, streams),
                "seconds": elapsed0 + time.perf_counter() - t0,
            }
            nll_sum, nll_count = 0.0, 0
            state = {"params": params, "opt_state": opt_state, "carry": carry, "step": step + 1}
            blob = serialization.msgpack_serialize(
                {"meta": meta, "state": serialization.to_state_dict(state)}
            )
            with open(ckpt + ".tmp", "wb") as fh:
                fh.write(blob)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(ckpt + ".tmp", ckpt)
            with open(csv_path, "a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=FIELDS).writerow(row)
                fh.flush()
                os.fsync(fh.fileno())
            rows.append(row)
            if bar is not None:
                bar.set_postfix(val_ppl=f"{row['val_perplexity']:.2f}")
    if bar is not None:
        bar.close()
    return {"model": model, "params": params, "vocab": vocab, "rows": rows}


# -------------------------------------------------------------------- CLI ---


QUICK = dict(hidden=32, batch=16, num_steps=20, steps=60, eval_every=20, max_chars=60_000)
"""``--quick`` defaults (seconds); options given explicitly still win."""


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--corpus", default=None, help="UTF-8 text file (default: stdlib docs)")
    parser.add_argument("--max-chars", type=non_negative_int, default=0, help="0: all")
    parser.add_argument("--cell", choices=CELLS, default="gru")
    parser.add_argument("--impl", choices=("bpttjax", "nnx"), default="bpttjax")
    parser.add_argument("--hidden", type=positive_int, default=256)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--num-steps", type=positive_int, default=35, help="BPTT length")
    parser.add_argument("--steps", type=positive_int, default=2000, help="training steps")
    parser.add_argument("--lr", type=positive_float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--clip", type=positive_float, default=1.0, help="global norm clip")
    parser.add_argument("--partition", choices=PARTITIONS, default="random")
    parser.add_argument(
        "--truncation", default="full", help="full | truncate:K | random:P (within --num-steps)"
    )
    parser.add_argument("--remat", choices=tuple(REMATS), default="store_all")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--eval-every", type=positive_int, default=100)
    parser.add_argument("--prefix", default="the time traveller")
    parser.add_argument("--num-preds", type=non_negative_int, default=100)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (d2l)")
    parser.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--quick", action="store_true", help="tiny model and corpus: seconds")
    parser.add_argument("--backend", choices=("cpu", "gpu", "tpu"), default=None)
    parser.add_argument("--out", default="results")
    args = parse_with_quick(parser, argv, QUICK)
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.backend:
        jax.config.update("jax_platforms", args.backend)
    try:
        cfg = Config(
            cell=args.cell,
            impl=args.impl,
            hidden=args.hidden,
            batch=args.batch,
            num_steps=args.num_steps,
            lr=args.lr,
            clip=args.clip,
            partition=args.partition,
            truncation=args.truncation,
            remat=args.remat,
            seed=args.seed,
            corpus=args.corpus,
            max_chars=args.max_chars,
        )
        text = load_text(cfg.corpus, cfg.max_chars)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    name = f"char_lm_{args.cell}" + ("_nnx" if args.impl == "nnx" else "")
    name += "_sequential" if args.partition == "sequential" else ""
    print(
        f"corpus: {len(text):,} characters, {len(set(text))} tokens; {args.cell} ({args.impl}) "
        f"hidden {args.hidden}, batch {args.batch} x {args.num_steps} steps, {args.partition} "
        f"partitioning, truncation {args.truncation}, {jax.default_backend()}"
    )
    result = train(
        cfg,
        steps=args.steps,
        out=args.out,
        name=name,
        eval_every=args.eval_every,
        fresh=args.fresh,
        text=text,
    )
    rows = result["rows"]
    sample = predict(
        result["model"],
        result["params"],
        result["vocab"],
        args.prefix,
        args.num_preds,
        temperature=args.temperature,
        seed=args.seed,
    )
    with open(os.path.join(args.out, f"{name}_sample.txt"), "w", encoding="utf-8") as fh:
        fh.write(sample + "\n")
    png = plot({name: rows}, os.path.join(args.out, f"{name}.png"), title=str(cfg.cell))
    last = rows[-1]
    print(
        f"step {last['step']}: train perplexity {last['train_perplexity']:.2f}, "
        f"validation perplexity {last['val_perplexity']:.2f}, {last['seconds']:.0f} s"
    )
    print(f"sample: {sample!r}")
    print(f"wrote {args.out}/{name}.csv, {name}.ckpt, {name}_sample.txt, {png}")
    return {**result, "sample": sample, "config": cfg}


def plot(curves: dict[str, list[dict]], path: str, title: str = "") -> str:
    """Perplexity against training step; one colour per run, dashed = training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, rows) in enumerate(curves.items()):
        steps = [r["step"] for r in rows]
        color = f"C{i}"
        ax.plot(steps, [r["val_perplexity"] for r in rows], color=color, label=f"{label} (val)")
        ax.plot(steps, [r["train_perplexity"] for r in rows], "--", color=color, alpha=0.6)
    ax.set_xlabel("training step")
    ax.set_ylabel("perplexity (dashed: training minibatches)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"character language model {title} ({jax.default_backend()})")
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
