"""Boundary validation and error text, shared by every public entry point.

The ground floor of the package: it imports only JAX and NumPy. Each check
raises a ``TypeError`` or ``ValueError`` that names the argument, what was
expected and what was given, before a step is traced (see STYLE: errors a
person can act on).
"""

from __future__ import annotations

import inspect
import math
import numbers
import operator
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

__all__ = [
    "REMAT_EXAMPLES",
    "TRUNCATION_EXAMPLES",
    "PairKind",
    "bullets",
    "check_leaves",
    "check_length",
    "check_strategy",
    "check_unroll",
    "checked_step",
    "describe",
    "parse_bytes",
]

REMAT_EXAMPLES = (
    "bj.StoreAll(), bj.EveryStep(), bj.Nested(levels=2), bj.Binomial(snapshots=...) "
    "or bj.Budget(bytes)"
)
TRUNCATION_EXAMPLES = "None, bj.Truncate(every=k) or bj.RandomTruncate(key, keep_prob)"


# --- the arguments ------------------------------------------------------------------------


def check_strategy(name: str, value: Any, base: type, examples: str) -> None:
    """Reject anything but an instance of a concrete subclass of ``base``."""
    if isinstance(value, type) and issubclass(value, base):
        if inspect.isabstract(value):
            raise TypeError(
                f"scan({name}=...) expects a strategy instance, got the abstract base class "
                f"{value.__name__}; pass one of {examples}"
            )
        raise TypeError(
            f"scan({name}=...) expects a strategy instance, got the class {value.__name__}; "
            f"write {name}={value.__name__}({_required_args(value)})"
        )
    if not isinstance(value, base):
        raise TypeError(
            f"scan({name}=...) expects a bpttjax {name} strategy such as {examples}, "
            f"got {type(value).__name__}: {value!r}"
        )


def _required_args(cls: type) -> str:
    """``"every=..."`` for the arguments ``cls`` cannot be built without."""
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return "..."
    return ", ".join(
        f"{p.name}=..."
        for p in params
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    )


def check_unroll(unroll: Any) -> None:
    if isinstance(unroll, jax.core.Tracer):
        raise jax.errors.ConcretizationTypeError(
            unroll,
            "scan(unroll=...) must be a Python int or bool when the scan is traced: it "
            "decides how many steps the compiled loop body holds, so it cannot depend on "
            "the arguments of a jitted function (mark it static, e.g. "
            "jax.jit(fn, static_argnames='unroll')).\n",
        )
    if not isinstance(unroll, bool | numbers.Integral):
        raise TypeError(f"scan(unroll=...) expects an int or bool, got {type(unroll).__name__}")
    if unroll < 0:
        raise ValueError(f"scan(unroll=...) expects a bool or a non-negative int, got {unroll}")


def check_leaves(name: str, tree: Any) -> None:
    """Every leaf of ``tree`` must be something JAX can trace: an array or a number."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        try:
            jax.typeof(leaf)
        except (TypeError, OverflowError) as err:
            raise TypeError(
                f"scan({name}=...) leaves must be arrays or numbers, but "
                f"{name}{jax.tree_util.keystr(path)} is {describe(leaf)}: {err}"
            ) from None


def check_length(xs: Any, length: Any) -> int:
    """The number of steps, after checking ``xs`` and ``length`` agree."""
    if length is not None:
        length = _concrete_length(length)
    check_leaves("xs", xs)
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


def _concrete_length(length: Any) -> int:
    """``length`` as a non-negative Python int; a concrete integer array is accepted."""
    bad_type = TypeError(
        f"scan(length=...) expects a non-negative int or None, got "
        f"{type(length).__name__}: {length!r}"
    )
    if isinstance(length, bool):
        raise bad_type
    if isinstance(length, jax.core.Tracer):
        try:
            length = operator.index(length)
        except TypeError:  # traced (JAX's conversion errors are TypeErrors)
            raise jax.errors.ConcretizationTypeError(
                length,
                "scan(length=...) must be a Python int when the scan is traced: the number "
                "of steps fixes the shape of ys, so it cannot depend on the arguments of a "
                "jitted function. Pass it as a static argument (e.g. "
                "jax.jit(fn, static_argnames='length')), or, for a number of steps known "
                "only at run time, use jax.lax.while_loop or jax.lax.fori_loop, or scan "
                "over a maximum length and mask the steps past the end.\n",
            ) from None
    try:
        length = operator.index(length)
    except TypeError:
        raise bad_type from None
    if length < 0:
        raise ValueError(f"scan(length=...) expects a non-negative int, got {length}")
    return length


# --- the step -----------------------------------------------------------------------------


class PairKind:
    """The container ``f`` returns ``(carry, y)`` in, so that ``scan`` returns the same."""

    def __init__(self):
        self.cls: type = tuple

    def record(self, out: tuple | list) -> None:
        self.cls = type(out)

    def build(self, carry: Any, ys: Any) -> Any:
        if self.cls is list:
            return [carry, ys]
        if self.cls is not tuple and hasattr(self.cls, "_make"):  # a namedtuple
            return self.cls._make((carry, ys))
        return (carry, ys)


def checked_step(f: Callable, pair: PairKind | None = None) -> Callable:
    """Wrap ``f`` so that a carry mismatch is reported in terms of the user's step.

    ``pair``, if given, records the container ``f`` returns its pair in. A
    shape error raised inside ``f`` gets a note on the layout ``bj.scan``
    expects (:func:`_call_with_layout_note`).
    """

    def step(carry, x):
        out = _call_with_layout_note(f, carry, x)
        if not isinstance(out, tuple | list) or len(out) != 2:
            raise TypeError(
                f"scan(f=...) must return a pair (carry, y) as a tuple or list, got {describe(out)}"
            )
        if pair is not None:
            pair.record(out)
        new_carry, y = out
        if jax.tree.structure(carry) != jax.tree.structure(new_carry):
            diffs = _structure_diffs(carry, new_carry, ())
            if not diffs:  # only node metadata differs; show both whole
                diffs = [
                    f"init is {jax.tree.structure(carry)}, "
                    f"f returned {jax.tree.structure(new_carry)}"
                ]
            raise TypeError(
                "scan(f=...) must return a carry with the same pytree structure as init, "
                "but they differ:\n"
                + bullets(diffs)
                + "\n\nReturn the carry in the same containers (same dict keys, sequence "
                "lengths and None entries) as init."
            )
        paths = jax.tree_util.tree_flatten_with_path(carry)[0]
        diffs = []
        for (path, a), b in zip(paths, jax.tree.leaves(new_carry), strict=True):
            a_t, b_t = jax.typeof(a), jax.typeof(jnp.asarray(b))
            same_dtype = a_t.dtype == b_t.dtype or a_t.weak_type
            if a_t.shape != b_t.shape or not same_dtype:
                what = " and ".join(
                    w
                    for w, bad in (("shape", a_t.shape != b_t.shape), ("dtype", not same_dtype))
                    if bad
                )
                diffs.append(
                    f"carry{jax.tree_util.keystr(path)}: init has "
                    f"{a_t.dtype}{list(a_t.shape)}, f returned {b_t.dtype}{list(b_t.shape)} "
                    f"({what} changed)"
                )
        if diffs:
            raise TypeError(
                "scan(f=...) changed the shape or dtype of the carry, which must keep both:\n"
                + bullets(diffs)
            )
        return new_carry, y

    return step


def bullets(lines: list[str]) -> str:
    return "\n".join(f"  * {line}" for line in lines)


def describe(x: Any) -> str:
    """A value in the user's terms: ``an array of shape (2,) and dtype float64``."""
    if x is None:
        return "None"
    if isinstance(x, dict):
        return f"a dict with keys {sorted(x, key=repr)}"
    fields = getattr(x, "_fields", None) if isinstance(x, tuple) else None
    if fields is not None:
        return f"a {type(x).__name__} (namedtuple) with fields {list(fields)}"
    if isinstance(x, tuple | list):
        return f"a {type(x).__name__} of length {len(x)}"
    if isinstance(x, str | bytes):
        return f"a {type(x).__name__} {x!r}"
    try:
        aval = jax.typeof(x)
    except (TypeError, OverflowError):
        return f"a {type(x).__name__}"
    if not hasattr(aval, "shape"):
        return f"a {type(x).__name__}"
    if isinstance(x, numbers.Number):
        return f"a Python {type(x).__name__} ({aval.dtype})"
    return f"an array of shape {tuple(aval.shape)} and dtype {aval.dtype}"


def _structure_diffs(a: Any, b: Any, path: tuple) -> list[str]:
    """Every place where the pytrees ``a`` (init's carry) and ``b`` (f's) differ."""
    if jax.tree.structure(a) == jax.tree.structure(b):
        return []
    where = "carry" + jax.tree_util.keystr(path)
    a_kids, b_kids = _children(a), _children(b)
    if a_kids is None or b_kids is None or type(a) is not type(b):
        return [f"{where} is {describe(a)} in init, but f returned {describe(b)}"]
    a_keys, b_keys = [k for k, _ in a_kids], [k for k, _ in b_kids]
    if a_keys != b_keys:
        if isinstance(a, dict):
            extra = sorted(set(b) - set(a), key=repr)
            missing = sorted(set(a) - set(b), key=repr)
            notes = [
                f"extra keys {extra}" if extra else "",
                f"missing keys {missing}" if missing else "",
            ]
            note = "; ".join(n for n in notes if n)
            return [f"{where} is {describe(a)} in init, but f returned {describe(b)} ({note})"]
        return [f"{where} is {describe(a)} in init, but f returned {describe(b)}"]
    diffs = []
    for (key, a_kid), (_, b_kid) in zip(a_kids, b_kids, strict=True):
        diffs += _structure_diffs(a_kid, b_kid, (*path, key))
    return diffs


def _children(x: Any) -> list | None:
    """``x``'s children with their keys, or ``None`` if ``x`` is a leaf."""
    if x is None:
        return []
    try:
        kids, _ = jax.tree_util.flatten_one_level_with_keys(x)
    except ValueError:
        return None
    return list(kids)


# --- the layout note ----------------------------------------------------------------------

_NOTED = "_bpttjax_layout_noted"


def _call_with_layout_note(f: Callable, carry: Any, x: Any) -> Any:
    """``f(carry, x)``; a shape error inside ``f`` is re-raised with :func:`_layout_note`.

    Only a plain ``TypeError`` or ``ValueError`` whose message speaks of
    shapes (JAX's ``add got incompatible shapes for broadcasting``, ``dot_general
    requires contracting dimensions to have the same shape``...) is re-raised,
    as the same type, its message kept and the original chained. It costs
    nothing unless ``f`` raises: no extra trace.
    """
    try:
        return f(carry, x)
    except (TypeError, ValueError) as err:
        note = _layout_note(err, carry, x)
        if note is None:
            raise
        noted = type(err)(f"{err}\n\n{note}")
        setattr(noted, _NOTED, True)
        raise noted from err


def _layout_note(err: Exception, carry: Any, x: Any) -> str | None:
    """What ``bj.scan`` fed the step, for an error that may come from the layout of ``xs``.

    ``None`` for an error that is not about shapes, already has the note (an
    inner ``bj.scan``'s), or is ``bj.scan``'s own (``scan(...)``). The hint
    that ``xs`` may be batch-major is given when the carry has a leading
    (batch) axis in front of its features and a leaf of ``x`` (one step of
    ``xs``) has a different leading axis: time-major inputs give both the
    batch axis first.
    """
    message = str(err)
    if (
        type(err) not in (TypeError, ValueError)
        or "shape" not in message.lower()
        or getattr(err, _NOTED, False)
        or message.startswith("scan(")
    ):
        return None
    x_leaves = jax.tree_util.tree_flatten_with_path(x)[0]
    carry_leaves = jax.tree_util.tree_flatten_with_path(carry)[0]
    shapes = lambda name, leaves: ", ".join(
        f"{name}{jax.tree_util.keystr(path)} of shape {tuple(jnp.shape(a))}" for path, a in leaves
    )
    note = (
        "bj.scan scans over the leading axis of xs (time-major, xs: (T, ...)), and the step "
        "received one time step of xs with that axis removed, "
        f"{shapes('x', x_leaves) or 'x None'}, and {shapes('carry', carry_leaves) or 'no carry'}."
    )
    batch = {jnp.shape(a)[0] for _, a in carry_leaves if jnp.ndim(a) >= 2}
    leading = {jnp.shape(a)[0] for _, a in x_leaves if jnp.ndim(a) >= 2}
    if len(batch) == 1 and leading and leading != batch:
        note += (
            f" The carry's leading (batch) axis is {batch.pop()} but x's is "
            f"{', '.join(map(str, sorted(leading)))}: if xs is batch-major, (B, T, ...) as "
            "with batch_first=True, pass jnp.swapaxes(xs, 0, 1)."
        )
    return note


# --- sizes -------------------------------------------------------------------------------

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: int | str) -> int:
    """Bytes from an int or a size such as ``"64MB"``, ``"1.5GiB"`` or ``"512 KiB"``.

    ``KB``/``MB``/``GB``/``TB`` are powers of 1000, ``KiB``/``MiB``/``GiB``/``TiB``
    powers of 1024 (case-insensitive).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral | str):
        raise TypeError(
            "Budget(bytes=...) expects an int or a size string such as '64MB' or '1.5GiB', "
            f"got {type(value).__name__}: {value!r}"
        )
    if isinstance(value, str):
        match = _SIZE.match(value)
        unit = match and match.group(2).lower()
        if not match or unit not in _UNITS:
            raise ValueError(
                f"Budget(bytes={value!r}) is not a size: write e.g. 64MB, 1.5GiB or 500000 "
                f"(units: {', '.join(u for u in _UNITS if u)})"
            )
        number = float(match.group(1)) * _UNITS[unit]
        if not math.isfinite(number):
            raise ValueError(
                f"Budget(bytes={value!r}) is not a finite size: write e.g. 64MB or 1.5GiB"
            )
        value = int(number)
    if value <= 0:
        raise ValueError(f"Budget(bytes=...) expects a positive number of bytes, got {value}")
    return int(value)
