"""``bpttjax.scan``: ``jax.lax.scan`` with a chosen way to run BPTT."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import (
    REMAT_EXAMPLES,
    TRUNCATION_EXAMPLES,
    PairKind,
    check_leaves,
    check_length,
    check_strategy,
    check_unroll,
    checked_step,
)
from ._tree import promote_weak_init, weak_as
from .remat import RematStrategy, StoreAll
from .truncation import TruncationStrategy, scale_cotangent

Carry = TypeVar("Carry")
X = TypeVar("X")
Y = TypeVar("Y")

__all__ = ["scan"]


def scan(
    f: Callable[[Carry, X], tuple[Carry, Y]],
    init: Carry,
    xs: X | None = None,
    length: int | None = None,
    reverse: bool = False,
    unroll: int | bool = 1,
    *,
    remat: RematStrategy = StoreAll(),  # noqa: B008 - frozen, so one shared default is safe
    truncation: TruncationStrategy | None = None,
) -> tuple[Carry, Y]:
    """Scan ``f`` over the leading axis of ``xs``, like ``jax.lax.scan``.

    A drop-in replacement for ``jax.lax.scan``: same arguments, same results,
    same pytree handling. ``jax.grad`` of a loss computed from the results is
    backpropagation through time; ``remat`` and ``truncation`` choose how that
    gradient is computed and never change forward values.

    Args:
      f: the step, ``f(carry, x) -> (carry, y)``. It must return a carry with
        the same pytree structure, shapes and dtypes as the one it received.
        It may close over parameters; their gradients are BPTT's sum over all
        steps where they occur.
      init: the initial carry, any pytree of arrays.
      xs: pytree of arrays with a common leading axis ``T`` (``xs: leading
        axis T``), or ``None`` together with ``length``.
      length: the number of steps ``T``, a concrete int (it fixes the shape
        of ``ys``, so it cannot be traced); required when ``xs`` is ``None``,
        must agree with ``xs`` otherwise.
      reverse: scan from the end of ``xs`` to the start (``ys`` stay aligned
        with ``xs``).
      unroll: a concrete non-negative int or a bool, passed to ``jax.lax.scan``.
      remat: a rematerialization strategy from ``bpttjax`` (default
        :class:`~bpttjax.StoreAll`, which is exactly ``lax.scan``);
        see ``bpttjax.remat`` for memory and recomputation costs.
      truncation: ``None`` for full BPTT, or :class:`~bpttjax.Truncate` /
        :class:`~bpttjax.RandomTruncate` to cut or randomly rescale the
        carry's gradient between steps.

    Returns:
      ``(carry, ys)``: the final carry and the stacked per-step outputs (leading
      axis ``T``), exactly as ``jax.lax.scan`` returns them, in the same kind
      of container ``f`` returns its pair in (a list if ``f`` returns a list).

    Raises:
      TypeError: ``f`` is not callable, ``remat``/``truncation`` are not
        strategy instances, a leaf of ``init`` or ``xs`` is not an array or a
        number, or ``f`` changes the carry's structure, shape or dtype (every
        mismatch is listed, by its path in the carry).
      jax.errors.ConcretizationTypeError: ``length`` or ``unroll`` is traced.
      ValueError: ``xs`` leaves disagree on the leading axis, ``length``
        disagrees with ``xs``, neither gives the number of steps, or
        ``unroll`` is negative.

    Carry leaves that ``f`` returns unchanged (read-only state kept in the
    carry, such as parameters or a mask) are taken out of the loop, as
    ``jax.lax.scan`` does: no strategy stores them per step, and the final
    carry holds the very value passed in ``init`` (so a scan inside a
    ``jax.lax.cond`` with a batched predicate leaves them unbatched, as
    ``vmap(..., out_axes=None)`` needs). Finding them traces ``f`` once more
    for the strategies other than ``StoreAll``, whose ``lax.scan`` does it
    itself. Under a ``truncation`` they stay in the carry, since the cut
    applies to their gradient too.

    Example:
      >>> def step(h, x):
      ...     h = jnp.tanh(x @ W_xh + h @ W_hh)
      ...     return h, h
      >>> h_T, hs = bj.scan(step, h0, xs, remat=bj.EveryStep())
    """
    if not callable(f):
        raise TypeError(f"scan(f=...) expects a callable step f(carry, x), got {type(f).__name__}")
    check_strategy("remat", remat, RematStrategy, REMAT_EXAMPLES)
    if truncation is not None:
        check_strategy("truncation", truncation, TruncationStrategy, TRUNCATION_EXAMPLES)
    if not isinstance(reverse, bool | np.bool_):
        raise TypeError(f"scan(reverse=...) expects a bool, got {type(reverse).__name__}")
    check_unroll(unroll)
    check_leaves("init", init)
    T = check_length(xs, length)
    remat.check(T)
    if truncation is not None:
        truncation.check(T)

    pair = PairKind()
    step = checked_step(f, pair)
    init, types = promote_weak_init(step, init, xs)
    if truncation is None:
        carry, ys = _scan_moving_passthrough(remat, step, init, xs, T, bool(reverse), unroll)
        return pair.build(*weak_as(types, (carry, ys)))

    def truncated_step(state, x):
        n, carry = state
        t = T - 1 - n if reverse else n
        s = truncation.scale(n, t)
        carry = jax.tree.map(lambda c: _scale_leaf(c, s), carry)
        carry, y = step(carry, x)
        return (n + 1, carry), y

    (_, carry), ys = remat.scan(
        truncated_step, (jnp.zeros((), jnp.int32), init), xs, T, bool(reverse), unroll
    )
    return pair.build(*weak_as(types, (carry, ys)))


def _scale_leaf(c, s):
    c = jnp.asarray(c)
    if not jnp.issubdtype(c.dtype, jnp.inexact):
        return c  # integer/bool carries have no cotangent to cut
    return scale_cotangent(c, s)


# --- read-only carries --------------------------------------------------------------------


def _scan_moving_passthrough(remat, step, init, xs, T, reverse, unroll):
    """``remat.scan``, with the carry leaves ``step`` returns unchanged kept out of the loop.

    ``lax.scan`` does the same (it moves such leaves to the loop's constants),
    but only where it sees them: its analysis does not look inside
    ``jax.checkpoint`` (jax 0.10.2 has no forwarding rule for it; jax-ml/jax
    PR #31251, "Remat forwarding rule", is open), nor inside our custom_vjp
    engine. Without this, ``EveryStep``, ``Nested`` and ``Binomial`` would store
    such leaves at every step, and a pass-through scan inside a ``cond`` with a
    batched predicate would return them batched, so ``vmap(..., out_axes=None)``
    fails (``cond`` keeps unbatched only what its branches return unchanged,
    jax-ml/jax PRs #21673 and #21806). ``lax.scan(jax.checkpoint(f))`` fails
    the same way.
    """
    if T == 0 or type(remat) is StoreAll:
        return remat.scan(step, init, xs, T, reverse, unroll)
    leaves, treedef = jax.tree.flatten(init)
    fixed = _passthrough_leaves(step, init, xs)
    if not any(fixed):
        return remat.scan(step, init, xs, T, reverse, unroll)
    # The step sees arrays, as inside lax.scan; the final carry holds init's own values.
    inside = [jnp.asarray(leaf) if keep else None for leaf, keep in zip(leaves, fixed, strict=True)]

    def merge(fill, moving):
        moving = iter(moving)
        return [f if keep else next(moving) for f, keep in zip(fill, fixed, strict=True)]

    def moving_step(moving, x):
        new_carry, y = step(treedef.unflatten(merge(inside, moving)), x)
        new = jax.tree.leaves(new_carry)
        return [leaf for leaf, keep in zip(new, fixed, strict=True) if not keep], y

    moving = [leaf for leaf, keep in zip(leaves, fixed, strict=True) if not keep]
    moving, ys = remat.scan(moving_step, moving, xs, T, reverse, unroll)
    return treedef.unflatten(merge(leaves, moving)), ys


def _passthrough_leaves(step: Callable, init: Any, xs: Any) -> list[bool]:
    """For each leaf of ``init``, whether ``step`` returns it unchanged (one abstract trace)."""

    def first_step(carry, xs):
        x = jax.tree.map(lambda a: jax.lax.index_in_dim(a, 0, keepdims=False), xs)
        return step(carry, x)[0]

    jaxpr = jax.make_jaxpr(first_step)(init, xs).jaxpr
    n = len(jax.tree.leaves(init))
    return [out is inp for out, inp in zip(jaxpr.outvars, jaxpr.invars[:n], strict=True)]
