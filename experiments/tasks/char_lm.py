"""The character language model of ``char_lm.py`` and ``truncation.py`` (d2l 9.5-9.7).

The text comes from ``tasks/corpus.py``; here are the model (:class:`CharModel`:
a registered cell or Flax NNX's version of it, and a linear read-out) and
its training loop (:func:`train_char_lm`: optax Adam after gradient
clipping, checkpointed and resumable, data-parallel over several devices).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bpttjax as bj

from .._cli import progress
from .._methods import nnx_cell
from .._table import Table
from .corpus import PARTITIONS, Vocab, load_text, minibatch, preprocess, split_tokens

DTYPE = jnp.float32
IMPLS = ("bpttjax", "nnx", "nnx-rnn")
"""How ``CharModel`` runs its cell: the library's step, Flax NNX's cell stepped by
``bj.scan``, or Flax NNX's cell inside the drop-in ``bj.nnx.RNN`` module."""


@dataclasses.dataclass(frozen=True)
class EvalRow:
    """``<name>.csv`` of a character model's training run: one evaluation."""

    step: int
    train_perplexity: float
    val_perplexity: float
    seconds: float


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


@dataclasses.dataclass(frozen=True)
class CharModel:
    """A registered cell (or Flax NNX's version) and a linear read-out over ``vocab`` tokens.

    ``impl``: ``"bpttjax"`` steps the registered cell, ``"nnx"`` Flax NNX's cell
    (the same math) through :func:`bpttjax.cells.from_nnx`, both inside one
    ``bj.scan`` that also computes each step's loss; ``"nnx-rnn"`` runs Flax
    NNX's cell over the whole subsequence with ``bj.nnx.RNN`` (the read-out and
    the loss come after the loop). ``"nnx"`` and ``"nnx-rnn"`` share their
    parameters' layout, Flax's.
    """

    cell: str
    vocab: int
    hidden: int
    impl: str = "bpttjax"

    def init(self, key) -> dict:
        k1, k2 = jax.random.split(key)
        if self.impl == "bpttjax":
            cell = bj.cells.get(self.cell).init(k1, self.vocab, self.hidden, DTYPE)
        else:
            from flax import nnx

            cell = nnx.to_pure_dict(self._nnx(k1)[1])
        w_out = jax.random.normal(k2, (self.hidden, self.vocab), DTYPE) / math.sqrt(self.hidden)
        return {"cell": cell, "W_out": w_out, "b_out": jnp.zeros((self.vocab,), DTYPE)}

    def _nnx_module(self, key):
        from flax import nnx

        cls = nnx_cell(self.cell)
        return cls(self.vocab, self.hidden, rngs=nnx.Rngs(params=key), param_dtype=DTYPE)

    def _nnx(self, key):
        return bj.cells.from_nnx(self._nnx_module(key))

    def nnx_rnn(self, params, remat=None):
        """``bj.nnx.RNN`` over Flax's cell holding ``params["cell"]``."""
        from flax import nnx

        graphdef, state = nnx.split(self._nnx_module(jax.random.key(0)))  # a template
        nnx.replace_by_pure_dict(state, params["cell"])
        return bj.nnx.RNN(nnx.merge(graphdef, state), remat=remat or bj.StoreAll(), rngs=False)

    def initial_carry(self, batch: int):
        # Flax's cells carry the same arrays (all zeros), LSTM's in the order (c, h)
        return bj.cells.get(self.cell).initial_carry(self.hidden, (batch,), DTYPE)

    def cell_step(self, params) -> Callable:
        """``f(carry, x) -> (carry, h)`` with the cell's parameters in ``params``."""
        if self.impl == "bpttjax":
            return functools.partial(bj.cells.get(self.cell).step, params["cell"])
        from flax import nnx

        step, state = self._nnx(jax.random.key(0))  # a template; its values are replaced
        nnx.replace_by_pure_dict(state, params["cell"])
        return functools.partial(step, state)

    def logits(self, params, h):
        z = h @ params["W_out"]
        return z + jnp.broadcast_to(params["b_out"], z.shape)

    def loss(self, params, carry, X, Y, *, remat=None, truncation=None):
        """Mean cross-entropy over ``X, Y: (batch, T)`` and the final carry."""
        if self.impl == "nnx-rnn":
            rnn = self.nnx_rnn(params, remat)
            xs = jax.nn.one_hot(X, self.vocab, dtype=DTYPE)  # (batch, T, vocab)
            carry, hs = rnn(xs, initial_carry=carry, return_carry=True, truncation=truncation)
            nll = optax.softmax_cross_entropy_with_integer_labels(self.logits(params, hs), Y)
            return jnp.mean(nll), carry
        cell = self.cell_step(params)

        def step(carry, xy):
            x, y = xy
            carry, h = cell(carry, jax.nn.one_hot(x, self.vocab, dtype=DTYPE))
            nll = optax.softmax_cross_entropy_with_integer_labels(self.logits(params, h), y)
            return carry, jnp.mean(nll)

        carry, nll = bj.scan(
            step, carry, (X.T, Y.T), remat=remat or bj.StoreAll(), truncation=truncation
        )
        return jnp.mean(nll), carry


def perplexity(model: CharModel, params, tokens: np.ndarray, streams: int) -> float:
    """exp(mean cross-entropy) over ``tokens`` read as ``streams`` contiguous rows."""
    cols = (len(tokens) - 1) // streams
    X = tokens[: streams * cols].reshape(streams, cols)
    Y = tokens[1 : streams * cols + 1].reshape(streams, cols)
    nll, _ = _eval_loss(model, params, jnp.asarray(X), jnp.asarray(Y))
    return float(np.exp(float(nll)))


@functools.partial(jax.jit, static_argnums=0)
def _eval_loss(model, params, X, Y):
    return model.loss(params, model.initial_carry(X.shape[0]), X, Y)


def predict_text(
    model: CharModel, params, vocab: Vocab, prefix: str, num_preds: int, *, temperature=0.0, seed=0
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
    carry, hs = jax.lax.scan(
        lambda c, t: cell(c, one_hot(t)), model.initial_carry(1), tokens[:, None]
    )

    def gen(state, key):
        carry, h = state
        logits = model.logits(params, h)[0]
        sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6))
        token = jnp.where(temperature > 0, sampled, jnp.argmax(logits)).astype(jnp.int32)
        return cell(carry, one_hot(token[None])), token

    _, out = jax.lax.scan(gen, (carry, hs[-1]), jax.random.split(key, num_preds))
    return out


@dataclasses.dataclass(frozen=True)
class CharConfig:
    """A character model's training run (the checkpoint records it; a change starts over)."""

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
        bj.cells.get(self.cell)
        bj.remat.from_string(self.remat)
        truncation_from_spec(self.truncation)
        for name, allowed in (("impl", IMPLS), ("partition", PARTITIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.lr > 0 or not self.clip > 0:
            raise ValueError(f"lr and clip must be > 0, got lr={self.lr}, clip={self.clip}")


def make_char_train_step(model: CharModel, cfg: CharConfig) -> Callable:
    """``(train_step, optimizer)``: a jitted Adam step after ``clip_by_global_norm``.

    ``train_step(params, opt_state, carry, X, Y, step)`` uses ``cfg``'s remat
    and truncation (a fresh ξ sequence per step for ``random:P``).
    """
    optimizer = optax.chain(optax.clip_by_global_norm(cfg.clip), optax.adam(cfg.lr))
    remat = bj.remat.from_string(cfg.remat)
    truncation_key = jax.random.key(cfg.seed + 1)

    @jax.jit
    def train_step(params, opt_state, carry, X, Y, step):
        truncation = truncation_from_spec(cfg.truncation, jax.random.fold_in(truncation_key, step))
        (nll, carry), grads = jax.value_and_grad(model.loss, has_aux=True)(
            params, carry, X, Y, remat=remat, truncation=truncation
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, carry, nll

    return train_step, optimizer


@dataclasses.dataclass(frozen=True)
class CharRun:
    """What :func:`train_char_lm` returns: the model, its parameters, its vocabulary, its rows."""

    model: CharModel
    params: Any
    vocab: Vocab
    rows: list[EvalRow]


class _Checkpoint:
    """The training state in ``path`` (Flax msgpack), tagged with the run's ``meta``."""

    def __init__(self, path: str, meta: str):
        self.path, self.meta = path, meta

    def restore(self, state: dict) -> dict | None:
        from flax import serialization

        if not os.path.exists(self.path):
            return None
        with open(self.path, "rb") as fh:
            saved = serialization.msgpack_restore(fh.read())
        if saved.get("meta") != self.meta:
            raise ValueError(
                f"{self.path} was written by a run with another configuration or text; "
                "pass --fresh to start over or choose another --out"
            )
        return serialization.from_state_dict(state, saved["state"])

    def save(self, state: dict) -> None:
        from flax import serialization

        blob = serialization.msgpack_serialize(
            {"meta": self.meta, "state": serialization.to_state_dict(state)}
        )
        with open(self.path + ".tmp", "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(self.path + ".tmp", self.path)


def train_char_lm(
    cfg: CharConfig,
    *,
    steps: int,
    out: str,
    name: str,
    eval_every: int = 100,
    fresh: bool = False,
    text: str | None = None,
    devices: int = 1,
) -> CharRun:
    """Train (or resume) a character model for ``steps`` steps.

    Every ``eval_every`` steps the state is saved to ``out/name.ckpt``
    (atomically), then an :class:`EvalRow` is appended to ``out/name.csv``. An
    existing checkpoint with the same configuration and text is resumed unless
    ``fresh``; one with another configuration or text is an error (nothing is
    overwritten). ``devices > 1`` trains data-parallel: each minibatch and the
    carried state are sharded by rows over a mesh of the first ``devices``
    devices and the parameters and optimizer state are replicated (``jax.jit``
    sums the gradient across devices); the device count is not part of the
    configuration, so a run may resume on another count.
    """
    text = load_text(cfg.corpus, cfg.max_chars) if text is None else text
    vocab = Vocab.build(text)
    tokens = split_tokens(vocab.encode(text))
    model = CharModel(cfg.cell, len(vocab), cfg.hidden, cfg.impl)
    train_step, optimizer = make_char_train_step(model, cfg)
    params = model.init(jax.random.key(cfg.seed))
    state = {"params": params, "opt_state": optimizer.init(params), "step": 0}
    state["carry"] = model.initial_carry(cfg.batch)
    # the text's hash too: the default corpus differs between Python versions
    digest = hashlib.sha256(text.encode()).hexdigest()
    meta = json.dumps({**dataclasses.asdict(cfg), "text_sha256": digest}, sort_keys=True)
    os.makedirs(out, exist_ok=True)
    ckpt = _Checkpoint(os.path.join(out, f"{name}.ckpt"), meta)
    table = Table(os.path.join(out, f"{name}.csv"), EvalRow)
    restored = None if fresh else ckpt.restore(state)
    rows = [] if restored is None else [r for r in table.read() if r.step <= restored["step"]]
    table.write(rows)  # drops rows written after the checkpoint
    loop = _CharLoop(model, cfg, train_step, ckpt, table, tokens, name, _data_parallel(devices))
    params = loop.run(restored or state, steps, eval_every, rows)
    return CharRun(model, params, vocab, rows)


def _data_parallel(devices: int) -> tuple[Callable, Callable]:
    """``(by_rows, replicated)``: an array's rows spread over ``devices``, or a copy on each."""
    if devices == 1:
        return (lambda a: a), (lambda a: a)
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh(
        (devices,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:devices]
    )
    rows, copies = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    return (lambda a: jax.device_put(a, rows)), (lambda a: jax.device_put(a, copies))


@dataclasses.dataclass
class _CharLoop:
    model: CharModel
    cfg: CharConfig
    train_step: Callable
    ckpt: _Checkpoint
    table: Table
    tokens: tuple[np.ndarray, np.ndarray]
    name: str
    placement: tuple[Callable, Callable] = ((lambda a: a), (lambda a: a))

    def run(self, state: dict, steps: int, eval_every: int, rows: list[EvalRow]):
        """Train from ``state`` to ``steps``, appending to ``rows``; the final parameters."""
        cfg, model = self.cfg, self.model
        by_rows, replicated = self.placement
        params, opt_state = replicated(state["params"]), replicated(state["opt_state"])
        carry = by_rows(state["carry"])
        start = int(state["step"])
        elapsed0 = rows[-1].seconds if rows else 0.0
        t0, nlls = time.perf_counter(), []
        kw = dict(batch=cfg.batch, num_steps=cfg.num_steps, partition=cfg.partition, seed=cfg.seed)
        with progress(total=steps, initial=start, desc=self.name) as bar:
            for step in range(start, steps):
                X, Y, reset = minibatch(self.tokens[0], step, **kw)
                if reset:
                    carry = by_rows(model.initial_carry(cfg.batch))
                params, opt_state, carry, nll = self.train_step(
                    params, opt_state, carry, by_rows(jnp.asarray(X)), by_rows(jnp.asarray(Y)),
                    jnp.int32(step),
                )  # fmt: skip
                nlls.append(float(nll))
                if not math.isfinite(nlls[-1]):
                    raise FloatingPointError(f"{self.name}: loss is {nlls[-1]} at step {step}")
                bar.update(1)
                if (step + 1) % eval_every == 0 or step + 1 == steps:
                    seconds = elapsed0 + time.perf_counter() - t0
                    rows.append(self.evaluate(params, step + 1, nlls, seconds))
                    nlls = []
                    state = {"params": params, "opt_state": opt_state, "carry": carry}
                    self.ckpt.save({**state, "step": step + 1})
                    self.table.append(rows[-1:])
                    bar.set_postfix(val_ppl=f"{rows[-1].val_perplexity:.2f}")
        return params

    def evaluate(self, params, step: int, nlls: list[float], seconds: float) -> EvalRow:
        val = self.tokens[1]
        streams = min(self.cfg.batch, max(1, (len(val) - 1) // self.cfg.num_steps))
        train_ppl = math.exp(sum(nlls) / len(nlls))
        return EvalRow(step, train_ppl, perplexity(self.model, params, val, streams), seconds)
