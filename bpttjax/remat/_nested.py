"""Nested checkpointing: :class:`Nested`, ``levels`` of ``jax.checkpoint``-ed scans."""

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

from .._tree import index
from ._base import Cost, Layer, RematStrategy, register

__all__ = ["Nested"]

_MAX_LEVELS = 6  # the most levels Budget considers; beyond, revolve stores less for the time


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
    # XLA keeps about one carry more per step than the jaxpr lists: the
    # carry entering the step, which the jaxpr's residuals do not name.
    return 1.0 + per_step / carry_bytes


def _nested_scan(f, carry, xs, start, n, lengths, reverse, unroll, leaf=None):
    """Run steps ``[start, start + n)`` of ``f`` with ``len(lengths)`` checkpointed levels.

    Steps read their input with a dynamic index into the full ``xs`` instead
    of scanning over a reshaped ``xs``: a reshape into chunks makes XLA copy
    each level's chunk of inputs into temporary memory. ``leaf(carry, start,
    n)``, if given, runs the innermost blocks instead of a scan of ``f``.
    """
    if leaf is not None and (len(lengths) == 1 or n == 1):
        return leaf(carry, start, n)
    if len(lengths) == 1 or n == 1:

        def body(c, i):
            return f(c, None if xs is None else index(xs, start + i))

        steps = jnp.arange(n, dtype=jnp.int32)
        return jax.lax.scan(body, carry, steps, reverse=reverse, unroll=unroll)

    block = math.prod(lengths[1:])
    q, r = divmod(n, block)
    if q == 0:  # fewer steps than one block: descend a level
        return _nested_scan(f, carry, xs, start, n, lengths[1:], reverse, unroll, leaf)
    # Full blocks come first in processing order; the remainder is at the end
    # of the sequence going forward and at its start going backward.
    first = start + r if reverse else start

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def block_fn(c, i):
        return _nested_scan(f, c, xs, first + i * block, block, lengths[1:], reverse, unroll, leaf)

    blocks = jnp.arange(q, dtype=jnp.int32)
    carry, ys_full = jax.lax.scan(block_fn, carry, blocks, reverse=reverse)
    ys_rem = None
    if r:
        rem_start = start if reverse else start + q * block
        carry, ys_rem = _nested_scan(f, carry, xs, rem_start, r, lengths[1:], reverse, unroll, leaf)
    ys_full = jax.tree.map(lambda y: y.reshape((q * block,) + y.shape[2:]), ys_full)
    if ys_rem is None:
        return carry, ys_full
    parts = (ys_rem, ys_full) if reverse else (ys_full, ys_rem)
    return carry, jax.tree.map(lambda a, b: jnp.concatenate([a, b]), *parts)


@register("nested")
@dataclasses.dataclass(frozen=True)
class Nested(RematStrategy):
    """Nested checkpointing: ``levels`` scans inside each other, each checkpointed.

    The sequence is cut into blocks, blocks into sub-blocks, and so on; the
    outer levels store only the carry entering each (sub-)block and the
    backward pass recomputes one block at a time, storing the residuals of
    only the innermost sub-block being differentiated. ``levels=2`` is the
    classic √T scheme (Chen et al., 2016, "Training deep nets with sublinear
    memory cost", https://arxiv.org/abs/1604.06174).

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
            if not lengths:
                raise ValueError(
                    "Nested(lengths=...) expects a non-empty tuple of positive ints, got ()"
                )
            for i, n in enumerate(lengths):
                if isinstance(n, bool) or not isinstance(n, numbers.Integral):
                    raise TypeError(
                        f"Nested(lengths=...) expects a tuple of positive ints, but lengths[{i}] "
                        f"is {type(n).__name__}: {n!r}"
                    )
                if n < 1:
                    raise ValueError(
                        "Nested(lengths=...) expects a non-empty tuple of positive ints, but "
                        f"lengths[{i}] is {n}"
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

    @classmethod
    def from_arg(cls, arg):
        if arg is not None and "x" in arg:
            try:
                lengths = tuple(int(n.replace("_", "")) for n in arg.split("x"))
            except ValueError:
                raise ValueError(
                    f"nested expects levels ('nested:3') or level lengths separated by 'x' "
                    f"('nested:10x10'), got {arg!r}"
                ) from None
            return cls(lengths=lengths)
        return super().from_arg(arg)

    @classmethod
    def examples(cls):
        return (cls(2), cls(3), cls(lengths=(12, 3, 2, 4)))

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

    @classmethod
    def candidates(cls, length, costs):
        # One plan per level count L (L - 1 forward passes recomputed), most
        # memory first: the lengths that minimize the stored bytes for the
        # step's residual-to-carry ratio, or L - 1 balanced levels whose
        # innermost keeps carries only (a last level of length 1), whichever
        # the cost model says is smaller. Past the level count where one more
        # level no longer saves memory, revolve does better (Binomial).
        if length < 4:
            return ()
        ratio = costs.residual_bytes / costs.carry_bytes if costs.carry_bytes else 1.0
        offered, least = [], math.inf
        for levels in range(2, min(_MAX_LEVELS, length.bit_length()) + 1):
            weighted = cls(lengths=_weighted_lengths(length, levels, ratio))
            carries = cls(lengths=(*_balanced_lengths(length, levels - 1), 1))
            best = min((weighted, carries), key=lambda s: s.cost(length, costs).temp_bytes)
            temp = best.cost(length, costs).temp_bytes
            if temp >= least:
                break
            offered.append(best)
            least = temp
        return tuple(offered)

    def check(self, length: int) -> None:
        """Refuse, before the step is traced, ``lengths`` that do not cover ``length`` steps."""
        if self.lengths is not None:
            self.level_lengths(length)

    def cost(self, length, costs):
        C, R = costs.carry_bytes, costs.residual_bytes
        # bj.scan estimates R/C from the traced step; the measured ratio is
        # the best stand-in here, so the two schedules can differ slightly.
        lengths = self.level_lengths(length, R / C if C else 1.0)
        stored, loops, evaluations = _nested_peak(length, lengths, C, R)
        return Cost(stored + loops * costs.overhead_bytes, evaluations - length)

    def scan(self, f, init, xs, length, reverse, unroll):
        ratio = 1.0 if self.lengths is not None else _residual_ratio(f, init, xs)
        lengths = self.level_lengths(length, ratio)
        if length == 0:
            return jax.lax.scan(f, init, xs, length=0, reverse=reverse, unroll=unroll)
        return _nested_scan(f, init, xs, 0, length, lengths, reverse, unroll)

    def layer_lengths(self, layer: Layer, init: Any) -> tuple[int, ...]:
        """The level lengths ``scan_layer`` uses for a ``bj.cells.run`` layer."""
        if self.lengths is not None:
            return self.level_lengths(layer.length)
        x0 = jax.tree.map(lambda a: a[:1], layer.xs)
        return self.level_lengths(layer.length, _residual_ratio(layer.step, init, x0))

    def scan_layer(self, layer, init):
        # The innermost blocks, whose residuals Nested keeps, run as whole blocks.
        lengths = self.layer_lengths(layer, init)
        return _nested_scan(
            None, init, None, 0, layer.length, lengths, layer.reverse, layer.unroll, layer.block
        )


def _nested_peak(n: int, lengths: tuple[int, ...], C: int, R: int) -> tuple[int, int, int]:
    """Peak stored bytes, live scan loops and step evaluations of ``_nested_scan``.

    Each live loop holds its own gradient accumulators, hence the loop count.
    Evaluations: a checkpointed block runs once forward and once more when
    its backward pass comes; the innermost level stores its residuals.
    """
    if len(lengths) == 1 or n <= 1:
        return n * R, 1, n
    block = math.prod(lengths[1:])
    q, r = divmod(n, block)
    if q == 0:
        return _nested_peak(n, lengths[1:], C, R)
    stored, loops, evals = _nested_peak(block, lengths[1:], C, R)
    evals = q * (block + evals)
    if r:
        # the remainder runs after the blocks and is differentiated first,
        # while the q block carries are still stored
        r_stored, r_loops, r_evals = _nested_peak(r, lengths[1:], C, R)
        stored, loops = max(stored, r_stored), max(loops, r_loops)
        evals += r_evals
    return q * C + stored, 1 + loops, evals
