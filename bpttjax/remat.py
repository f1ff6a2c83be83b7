"""Rematerialization strategies: how much of the forward pass BPTT keeps.

``jax.grad`` of a ``lax.scan`` stores every step's residuals (the intermediate
values the backward pass needs), so its memory grows linearly in the sequence
length ``T`` with a large constant. A strategy trades that memory for
recomputation. Strategies are small immutable values passed to
``bpttjax.scan(..., remat=...)``; they never change forward values or the
gradient, only how it is computed.

Costs below are per sequence of ``T`` steps, in units of one step's carry
(``C``) or one step's residuals (``R``, usually several times ``C``) and of one
forward pass over the sequence.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

__all__ = ["RematStrategy", "StoreAll", "EveryStep", "Nested"]


class RematStrategy:
    """Base class of every rematerialization strategy.

    A strategy is a frozen dataclass; ``bpttjax.scan`` calls its private
    ``_scan`` method with the already validated arguments of ``lax.scan``.
    Subclass it only inside bpttjax: the hook is not public API.
    """

    def _scan(
        self,
        f: Callable,
        init: Any,
        xs: Any,
        length: int,
        reverse: bool,
        unroll: int | bool,
    ) -> tuple[Any, Any]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class StoreAll(RematStrategy):
    """Store every residual of every step: exactly ``jax.lax.scan``.

    Memory: ``T·R`` (all residuals). Recomputation: none. The fastest choice
    while it fits; the default of ``bpttjax.scan``.
    """

    def _scan(self, f, init, xs, length, reverse, unroll):
        return jax.lax.scan(f, init, xs, length=length, reverse=reverse, unroll=unroll)


@dataclasses.dataclass(frozen=True)
class EveryStep(RematStrategy):
    """Checkpoint every step: store only the carries, recompute each step.

    The step is wrapped in ``jax.checkpoint``; the backward pass recomputes one
    step at a time from its stored input carry.

    Args:
      policy: optional ``jax.checkpoint_policies`` value deciding which
        intermediates of a step are saved instead of recomputed, e.g.
        ``jax.checkpoint_policies.dots_saveable`` (keep matrix products) or
        ``save_only_these_names(...)`` with the names that ``bpttjax.cells``
        attach. ``None`` saves nothing inside a step.

    Memory: ``T·C`` (plus what ``policy`` saves). Recomputation: about one
    extra forward pass.

    Example:
      >>> carry, ys = bj.scan(step, h0, xs, remat=bj.EveryStep())
    """

    policy: Callable[..., Any] | None = None

    def __post_init__(self):
        if self.policy is not None and not callable(self.policy):
            raise TypeError(
                "EveryStep(policy=...) expects None or a jax.checkpoint_policies value "
                f"(a callable), got {type(self.policy).__name__}: {self.policy!r}"
            )

    def _scan(self, f, init, xs, length, reverse, unroll):
        # prevent_cse=False is safe inside a scan (the loop already blocks CSE)
        # and lets XLA fuse the recomputation with the backward step.
        step = jax.checkpoint(f, policy=self.policy, prevent_cse=False)
        return jax.lax.scan(step, init, xs, length=length, reverse=reverse, unroll=unroll)


def _balanced_lengths(length: int, levels: int) -> tuple[int, ...]:
    """Level lengths, outermost first, about ``length**(1/levels)`` each.

    Inner levels get ``b = ceil(length**(1/levels))`` (exact integer root, no
    float rounding surprises); the outermost gets just enough blocks to cover
    ``length``, so the product is ``>= length`` and never much larger.
    """
    b = max(1, round(length ** (1.0 / levels)))
    while b**levels < length:
        b += 1
    while b > 1 and (b - 1) ** levels >= length:
        b -= 1
    inner = b ** (levels - 1)
    return (-(-length // inner),) + (b,) * (levels - 1)


def _weighted_lengths(length: int, levels: int, ratio: float) -> tuple[int, ...]:
    """Level lengths minimizing ``(sum of outer lengths)·C + (inner length)·R``.

    With ``ratio = R/C`` (residual bytes per step over carry bytes), the
    minimum of ``l_1 + ... + l_{L-1} + ratio·l_L`` subject to ``prod(l) = T``
    has equal outer lengths ``a = (ratio·T)**(1/L)`` and an innermost length
    ``a/ratio``: a step costs ``ratio`` carries to keep, so the innermost
    block is made shorter.
    """
    if levels == 1 or length <= 1:
        return _balanced_lengths(length, levels)
    inner = (max(ratio, 1.0) * length) ** (1.0 / levels) / max(ratio, 1.0)
    inner = max(1, min(length, round(inner)))
    return _balanced_lengths(-(-length // inner), levels - 1) + (inner,)


def _residual_ratio(f: Callable, init: Any, xs: Any) -> float:
    """Residuals one step of ``f`` keeps for its backward pass, in carries.

    Traces ``jax.vjp`` of one step abstractly and counts the residuals that
    are per-step values (not closed-over constants, which ``lax.scan`` keeps
    once). It only steers the choice of level lengths.
    """
    x = (
        None
        if xs is None
        else jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), xs)
    )
    carry = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), init)
    carry_bytes = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(carry))
    if carry_bytes == 0:
        return 1.0
    try:
        closed = jax.make_jaxpr(lambda c, x: jax.tree.leaves(jax.vjp(f, c, x)[1]))(carry, x)
    except Exception:  # noqa: BLE001 - only a heuristic; the real trace reports errors
        return 1.0
    consts = {id(v) for v in closed.jaxpr.constvars}
    per_step = 0
    for v in closed.jaxpr.outvars:
        if id(v) in consts or isinstance(v, jex_core.Literal):
            continue
        per_step += math.prod(v.aval.shape) * v.aval.dtype.itemsize
    # XLA keeps about one carry more per step than the jaxpr lists (measured
    # for the tanh RNN, GRU and LSTM cells on CPU).
    return 1.0 + per_step / carry_bytes


def _index(xs: Any, i: jax.Array) -> Any:
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), xs)


def _nested_scan(f, carry, xs, start, n, lengths, reverse, unroll):
    """Run steps ``[start, start + n)`` of ``f`` with ``len(lengths)`` checkpointed levels.

    Steps read their input with a dynamic index into the full ``xs`` instead
    of scanning over a reshaped ``xs``: a reshape into chunks makes XLA copy
    each level's chunk of inputs into temporary memory.
    """
    if len(lengths) == 1 or n == 1:

        def body(c, i):
            return f(c, None if xs is None else _index(xs, start + i))

        steps = jnp.arange(n, dtype=jnp.int32)
        return jax.lax.scan(body, carry, steps, reverse=reverse, unroll=unroll)

    block = math.prod(lengths[1:])
    q, r = divmod(n, block)
    if q == 0:  # fewer steps than one block: descend a level
        return _nested_scan(f, carry, xs, start, n, lengths[1:], reverse, unroll)
    # Full blocks come first in processing order; the remainder is at the end
    # of the sequence going forward and at its start going backward.
    first = start + r if reverse else start

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def block_fn(c, i):
        return _nested_scan(f, c, xs, first + i * block, block, lengths[1:], reverse, unroll)

    blocks = jnp.arange(q, dtype=jnp.int32)
    carry, ys_full = jax.lax.scan(block_fn, carry, blocks, reverse=reverse)
    ys_rem = None
    if r:
        rem_start = start if reverse else start + q * block
        carry, ys_rem = _nested_scan(f, carry, xs, rem_start, r, lengths[1:], reverse, unroll)
    ys_full = jax.tree.map(lambda y: y.reshape((q * block,) + y.shape[2:]), ys_full)
    if ys_rem is None:
        return carry, ys_full
    parts = (ys_rem, ys_full) if reverse else (ys_full, ys_rem)
    return carry, jax.tree.map(lambda a, b: jnp.concatenate([a, b]), *parts)


@dataclasses.dataclass(frozen=True)
class Nested(RematStrategy):
    """Nested checkpointing: ``levels`` scans inside each other, each checkpointed.

    The sequence is cut into blocks, blocks into sub-blocks, and so on; the
    outer levels store only the carry entering each (sub-)block and the
    backward pass recomputes one block at a time, storing the residuals of
    only the innermost sub-block being differentiated. ``levels=2`` is the
    classic √T scheme (Chen et al., 2016, "Training deep nets with sublinear
    memory cost").

    Args:
      levels: number of levels ``L >= 1``; the level lengths are then chosen
        from ``T`` at trace time, about ``T**(1/L)`` each, the innermost
        shortened by the step's residual-to-carry ratio (estimated by tracing
        the step's VJP once more, abstractly; pass ``lengths`` to skip that).
      lengths: explicit level lengths, outermost first (overrides
        ``levels``); their product must be at least ``T``.

    Any ``T`` works, including primes and ``T < L``: when ``T`` is not a
    multiple of the inner block size, the remaining steps run through the
    same scheme one level down; nothing is padded and no step is masked.

    Memory: about ``(L-1)·T**(1/L)`` carries plus ``T**(1/L)`` steps of
    residuals. Recomputation: about ``L-1`` extra forward passes.

    Example:
      >>> carry, ys = bj.scan(step, h0, xs, remat=bj.Nested(levels=3))
    """

    levels: int = 2
    lengths: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.lengths is not None:
            lengths = self.lengths
            if isinstance(lengths, numbers.Integral) or not isinstance(lengths, Sequence):
                raise TypeError(
                    f"Nested(lengths=...) expects a tuple of positive ints, got "
                    f"{type(lengths).__name__}: {lengths!r}"
                )
            if not lengths or not all(_is_pos_int(n) for n in lengths):
                raise ValueError(
                    "Nested(lengths=...) expects a non-empty tuple of positive ints, "
                    f"got {lengths!r}"
                )
            object.__setattr__(self, "lengths", tuple(int(n) for n in lengths))
            object.__setattr__(self, "levels", len(lengths))
        elif isinstance(self.levels, bool) or not isinstance(self.levels, numbers.Integral):
            raise TypeError(
                f"Nested(levels=...) expects a positive int, got "
                f"{type(self.levels).__name__}: {self.levels!r}"
            )
        elif self.levels < 1:
            raise ValueError(f"Nested(levels=...) expects levels >= 1, got levels={self.levels}")

    def level_lengths(self, length: int, ratio: float = 1.0) -> tuple[int, ...]:
        """The level lengths, outermost first, used for a sequence of ``length`` steps.

        ``ratio`` is the residual bytes of one step over the carry's bytes
        (``bj.scan`` estimates it from the step); with ``levels=`` the
        innermost level is made shorter by that factor.
        """
        if self.lengths is not None:
            if math.prod(self.lengths) < length:
                raise ValueError(
                    f"Nested(lengths={self.lengths}) covers only {math.prod(self.lengths)} steps "
                    f"(the product of the lengths), but the sequence has length {length}"
                )
            return self.lengths
        return _weighted_lengths(length, self.levels, ratio)

    def _scan(self, f, init, xs, length, reverse, unroll):
        ratio = 1.0 if self.lengths is not None else _residual_ratio(f, init, xs)
        lengths = self.level_lengths(length, ratio)
        if length == 0:
            return jax.lax.scan(f, init, xs, length=0, reverse=reverse, unroll=unroll)
        return _nested_scan(f, init, xs, 0, length, lengths, reverse, unroll)


def _is_pos_int(n: Any) -> bool:
    return not isinstance(n, bool) and isinstance(n, numbers.Integral) and n >= 1
