"""``bpttjax.scan``: ``jax.lax.scan`` with a chosen way to run BPTT."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from .remat import RematStrategy, StoreAll
from .truncation import TruncationStrategy, scale_cotangent

Carry = TypeVar("Carry")
X = TypeVar("X")
Y = TypeVar("Y")

__all__ = ["scan"]

_STORE_ALL = StoreAll()


def scan(
    f: Callable[[Carry, X], tuple[Carry, Y]],
    init: Carry,
    xs: X | None = None,
    length: int | None = None,
    reverse: bool = False,
    unroll: int | bool = 1,
    *,
    remat: RematStrategy = _STORE_ALL,
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
      length: the number of steps ``T``; required when ``xs`` is ``None``,
        must agree with ``xs`` otherwise.
      reverse: scan from the end of ``xs`` to the start (``ys`` stay aligned
        with ``xs``).
      unroll: passed to ``jax.lax.scan``.
      remat: a rematerialization strategy from ``bpttjax`` (default
        :class:`~bpttjax.StoreAll`, which is exactly ``lax.scan``);
        see ``bpttjax.remat`` for memory and recomputation costs.
      truncation: ``None`` for full BPTT, or :class:`~bpttjax.Truncate` /
        :class:`~bpttjax.RandomTruncate` to cut or randomly rescale the
        carry's gradient between steps.

    Returns:
      ``(carry, ys)``: the final carry and the stacked per-step outputs (leading
      axis ``T``), exactly as ``jax.lax.scan`` returns them.

    Raises:
      TypeError: ``f`` is not callable, ``remat``/``truncation`` are not
        strategies, or ``f`` changes the carry's structure, shape or dtype.
      ValueError: ``xs`` leaves disagree on the leading axis, ``length``
        disagrees with ``xs``, or neither gives the number of steps.

    Example:
      >>> def step(h, x):
      ...     h = jnp.tanh(x @ W_xh + h @ W_hh)
      ...     return h, h
      >>> h_T, hs = bj.scan(step, h0, xs, remat=bj.EveryStep())
    """
    if not callable(f):
        raise TypeError(f"scan(f=...) expects a callable step f(carry, x), got {type(f).__name__}")
    if isinstance(remat, type) and issubclass(remat, RematStrategy):
        raise TypeError(
            f"scan(remat=...) expects a strategy instance, got the class {remat.__name__}; "
            f"write remat={remat.__name__}()"
        )
    if not isinstance(remat, RematStrategy):
        raise TypeError(
            "scan(remat=...) expects a bpttjax remat strategy such as bj.StoreAll() or "
            f"bj.EveryStep(), got {type(remat).__name__}: {remat!r}"
        )
    if isinstance(truncation, type) and issubclass(truncation, TruncationStrategy):
        raise TypeError(
            f"scan(truncation=...) expects a strategy instance, got the class {truncation.__name__}"
        )
    if truncation is not None and not isinstance(truncation, TruncationStrategy):
        raise TypeError(
            "scan(truncation=...) expects None, bj.Truncate(every=k) or "
            f"bj.RandomTruncate(key, ...), got {type(truncation).__name__}: {truncation!r}"
        )
    if not isinstance(reverse, bool | np.bool_):
        raise TypeError(f"scan(reverse=...) expects a bool, got {type(reverse).__name__}")
    if not isinstance(unroll, bool | numbers.Integral):
        raise TypeError(f"scan(unroll=...) expects an int or bool, got {type(unroll).__name__}")
    T = _check_length(xs, length)
    if truncation is not None:
        truncation._check(T)

    step = _checked_step(f)
    if truncation is None:
        return remat.scan(step, init, xs, T, bool(reverse), unroll)

    def truncated_step(state, x):
        n, carry = state
        t = T - 1 - n if reverse else n
        s = truncation._scale(n, t)
        carry = jax.tree.map(lambda c: _scale_leaf(c, s), carry)
        carry, y = step(carry, x)
        return (n + 1, carry), y

    (_, carry), ys = remat.scan(
        truncated_step, (jnp.zeros((), jnp.int32), init), xs, T, bool(reverse), unroll
    )
    return carry, ys


def _scale_leaf(c, s):
    c = jnp.asarray(c)
    if not jnp.issubdtype(c.dtype, jnp.inexact):
        return c  # integer/bool carries have no cotangent to cut
    return scale_cotangent(c, s)


def _check_length(xs: Any, length: Any) -> int:
    """The number of steps, after checking ``xs`` and ``length`` agree."""
    if length is not None:
        if isinstance(length, bool) or not isinstance(length, numbers.Integral):
            raise TypeError(
                f"scan(length=...) expects a non-negative int or None, got "
                f"{type(length).__name__}: {length!r}"
            )
        if length < 0:
            raise ValueError(f"scan(length=...) expects a non-negative int, got {length}")
        length = int(length)
    leaves, _ = jax.tree_util.tree_flatten_with_path(xs)
    sizes = {}
    for path, leaf in leaves:
        shape = np.shape(leaf)
        name = "xs" + jax.tree_util.keystr(path)
        if len(shape) == 0:
            raise ValueError(
                f"scan(xs=...) leaves need a leading time axis, but {name} is a scalar"
            )
        sizes[name] = shape[0]
    if not sizes:
        if length is None:
            raise ValueError(
                "scan needs the number of steps: pass xs with a leading axis or length=T "
                "(xs is None or has no array leaves)"
            )
        return length
    distinct = sorted(set(sizes.values()))
    if len(distinct) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise ValueError(
            f"scan(xs=...) leaves must share the leading (time) axis length, got {listing}"
        )
    T = distinct[0]
    if length is not None and length != T:
        raise ValueError(
            f"scan(length={length}) disagrees with the leading axis of xs, which is {T}"
        )
    return T


def _checked_step(f: Callable) -> Callable:
    """Wrap ``f`` so that a carry mismatch is reported in terms of the user's step."""

    def step(carry, x):
        out = f(carry, x)
        if not isinstance(out, tuple | list) or len(out) != 2:
            raise TypeError(
                "scan(f=...) must return a pair (carry, y), got "
                f"{type(out).__name__}"
                + (f" of length {len(out)}" if hasattr(out, "__len__") else "")
            )
        new_carry, y = out
        in_def = jax.tree.structure(carry)
        out_def = jax.tree.structure(new_carry)
        if in_def != out_def:
            raise TypeError(
                "scan(f=...) must return a carry with the same pytree structure as init; "
                f"expected {in_def}, got {out_def}"
            )
        paths = jax.tree_util.tree_flatten_with_path(carry)[0]
        for (path, a), b in zip(paths, jax.tree.leaves(new_carry), strict=True):
            a_t, b_t = jax.typeof(a), jax.typeof(jnp.asarray(b))
            same_dtype = a_t.dtype == b_t.dtype or a_t.weak_type
            if a_t.shape != b_t.shape or not same_dtype:
                raise TypeError(
                    f"scan(f=...) changed the carry at carry{jax.tree_util.keystr(path)}: "
                    f"init has {a_t.dtype}{list(a_t.shape)}, f returned "
                    f"{b_t.dtype}{list(b_t.shape)}; the carry must keep its shape and dtype"
                )
        return new_carry, y

    return step
