"""Strategies as pytrees: array fields are leaves, every other field is static.

A strategy (``StoreAll()``, ``Binomial(14)``, ``RandomTruncate(key)``...) is a
frozen dataclass. Registered this way it can be passed to a ``jax.jit``-ed
function as an ordinary argument: its numbers and policies become part of
the compiled program's static structure (a new value retraces, as for a
static argument), and its arrays, such as ``RandomTruncate``'s key, are
traced (a new key does not retrace). Hashable strategies also work as
``static_argnums``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np


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
