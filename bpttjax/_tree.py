"""Pytree plumbing shared across the package (the ground floor: imports only JAX/NumPy).

* Strategies as pytrees (:func:`register`): a strategy (``StoreAll()``,
  ``Binomial(14)``, ``RandomTruncate(key)``...) is a frozen dataclass whose
  array fields are leaves and every other field static. Registered this way
  it can be passed to a ``jax.jit``-ed function as an ordinary argument: its
  numbers and policies become part of the compiled program's static
  structure (a new value retraces, as for a static argument), and its
  arrays, such as ``RandomTruncate``'s key, are traced (a new key does not
  retrace). Hashable strategies also work as ``static_argnums``.
* Leaves that have a cotangent and those that do not (:func:`split_diff`),
  buffers indexed by step (:func:`index`, :func:`store`, :func:`stack_zeros`).
* ``lax.scan``'s weak-type promotion of ``init`` (:func:`promote_weak_init`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from jax._src.lax.lax import _convert_element_type  # the one way to set weak_type

__all__ = [
    "abstract",
    "index",
    "is_diff",
    "one_step",
    "promote_weak_init",
    "register",
    "split_diff",
    "stack_zeros",
    "store",
    "weak_as",
    "with_zeros",
    "zero_cotangent",
]


# --- strategies as pytrees -------------------------------------------------------------


def _is_array(value: Any) -> bool:
    return isinstance(value, jax.Array | np.ndarray | jax.core.Tracer)


def _flatten(obj: Any):
    if not dataclasses.is_dataclass(obj):
        return (), obj
    names = tuple(f.name for f in dataclasses.fields(obj))
    values = [getattr(obj, n) for n in names]
    dynamic = tuple(_is_array(v) for v in values)
    leaves = [v for v, d in zip(values, dynamic, strict=True) if d]
    static = tuple(None if d else v for v, d in zip(values, dynamic, strict=True))
    return leaves, (names, dynamic, static)


def _unflatten(cls: type, aux: Any, leaves: Any) -> Any:
    if not isinstance(aux, tuple) or len(aux) != 3 or isinstance(aux, cls):
        return aux
    names, dynamic, static = aux
    # Built without __init__: leaves may be tracers or placeholders here, which
    # the constructors' validation (meant for users' values) would refuse.
    obj = object.__new__(cls)
    leaves = iter(leaves)
    for name, d, value in zip(names, dynamic, static, strict=True):
        object.__setattr__(obj, name, next(leaves) if d else value)
    return obj


def register(cls: type) -> None:
    """Make ``cls`` (a strategy class, usually a frozen dataclass) a pytree node."""
    try:
        jax.tree_util.register_pytree_node(
            cls, _flatten, lambda aux, leaves: _unflatten(cls, aux, leaves)
        )
    except ValueError:  # already registered, e.g. by a subclass's own library
        pass


# --- leaves with and without a cotangent, buffers by step ----------------------


def is_diff(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def split_diff(tree: Any) -> tuple[list, list, Callable]:
    """The inexact leaves, the others, and a function putting them back together."""
    leaves, treedef = jax.tree.flatten(tree)
    mask = [is_diff(x) for x in leaves]

    def merge(diff, other):
        diff, other = iter(diff), iter(other)
        return treedef.unflatten([next(diff) if m else next(other) for m in mask])

    return (
        [x for x, m in zip(leaves, mask, strict=True) if m],
        [x for x, m in zip(leaves, mask, strict=True) if not m],
        merge,
    )


def zero_cotangent(x: Any) -> Any:
    if is_diff(x):
        return jnp.zeros_like(x)
    return np.zeros(np.shape(x), jax.dtypes.float0)


def index(tree: Any, i: int | jax.Array) -> Any:
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), tree)


def store(buf: Any, i: jax.Array, value: Any) -> Any:
    return jax.tree.map(lambda b, v: jax.lax.dynamic_update_index_in_dim(b, v, i, 0), buf, value)


def stack_zeros(n: int, example: Any) -> Any:
    """Zeros of shape ``(n, *a.shape)`` for each leaf ``a``, of ``a``'s type on its axes.

    Broadcast from a zero like ``a`` rather than made by ``jnp.zeros``, so the
    buffer has ``a``'s sharding and varying manual axes: under an explicit
    mesh (``jax.make_mesh``'s default) an unsharded buffer cannot take a
    batch-sharded carry (``dynamic_update_slice`` raises a ShardingTypeError),
    and inside ``jax.shard_map`` a loop whose buffer is not device-varying
    while its writes are fails to trace.
    """

    def zeros(a):
        z = jnp.zeros_like(a, dtype=jnp.result_type(a))
        return jnp.broadcast_to(z[None], (n, *jnp.shape(a)))

    return jax.tree.map(zeros, example)


def with_zeros(example: Any, diff_leaves: list) -> Any:
    """A cotangent shaped like ``example``: ``diff_leaves`` where inexact, float0 elsewhere."""
    _, other, merge = split_diff(example)
    return merge(diff_leaves, [zero_cotangent(x) for x in other])


def aval(a: Any) -> jax.ShapeDtypeStruct:
    """``a``'s shape, dtype and weak type, abstractly."""
    t = jax.typeof(a)
    return jax.ShapeDtypeStruct(t.shape, t.dtype, weak_type=t.weak_type)


def abstract(tree: Any) -> Any:
    """``tree`` with every leaf replaced by :func:`aval` of it."""
    return jax.tree.map(aval, tree)


# --- lax.scan's weak types -------------------------------------------------------------


def promote_weak_init(step: Callable, init: Any, xs: Any) -> tuple[Any, Any]:
    """``init`` with its weakly typed leaves promoted as ``jax.lax.scan`` promotes them,
    and the types of ``lax.scan``'s results (``None`` where no leaf is weakly typed).

    A Python scalar (or other weakly typed) carry leaf takes the dtype that
    ``jax.numpy`` promotion gives it against what the step returns for it, as
    in ``lax.scan``'s own two-pass trace: ``scan(lambda c, x: ((c + x) / 3,
    c), 7, xs)`` runs a float carry. Done once, here, so that every strategy
    traces the step with the carry type it will run with; a strategy that
    traced with the unpromoted ``int`` would cast the float carry back to an
    integer at every step. Costs one or two abstract traces, and only when a
    leaf of ``init`` is weakly typed.

    The types returned are the final carry and one step's ``y`` as the step
    returns them for the promoted ``init``: ``lax.scan``'s results have these
    weak types, which a strategy that splits the loop may not keep
    (:func:`weak_as` restores them).
    """
    leaves, treedef = jax.tree.flatten(init)
    avals = [jax.typeof(leaf) for leaf in leaves]
    if not any(getattr(a, "weak_type", False) for a in avals):
        return init, None
    x = one_step(xs)
    types = jax.eval_shape(step, init, x)
    promoted, changed = [], False
    for leaf, aval, out in zip(leaves, avals, jax.tree.leaves(types[0]), strict=True):
        if getattr(aval, "weak_type", False) and aval.dtype != out.dtype:
            leaf, changed = jax.lax.convert_element_type(leaf, jnp.result_type(leaf, out)), True
        promoted.append(leaf)
    init = treedef.unflatten(promoted)
    if changed:
        types = jax.eval_shape(step, init, x)
    return init, types


def weak_as(types: Any, out: tuple) -> tuple:
    """``out`` (the final carry and ``ys``) with the weak types ``lax.scan`` gives them."""
    if types is None:
        return out

    def like(a, t):
        if jax.typeof(a).weak_type == t.weak_type or a.dtype != t.dtype:
            return a
        return _convert_element_type(a, a.dtype, weak_type=t.weak_type)

    carry_t, y_t = types
    carry, ys = out
    return jax.tree.map(like, carry, carry_t), jax.tree.map(like, ys, y_t)


def one_step(xs: Any) -> Any:
    """One step's ``x`` of ``xs`` (leading axis dropped), abstractly, weak types kept."""
    return None if xs is None else jax.tree.map(_one_step_aval, xs)


def _one_step_aval(a: Any) -> jax.ShapeDtypeStruct:
    aval = jax.typeof(a)
    return jax.ShapeDtypeStruct(aval.shape[1:], aval.dtype, weak_type=aval.weak_type)
