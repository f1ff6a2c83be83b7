"""``bpttjax.scan``: ``jax.lax.scan`` with a chosen way to run BPTT."""

from __future__ import annotations

import inspect
import numbers
import operator
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.lax.lax import _convert_element_type  # the one way to set weak_type

from .remat import RematStrategy, StoreAll
from .truncation import TruncationStrategy, scale_cotangent

Carry = TypeVar("Carry")
X = TypeVar("X")
Y = TypeVar("Y")

__all__ = ["scan"]

_STORE_ALL = StoreAll()
_REMAT_EXAMPLES = (
    "bj.StoreAll(), bj.EveryStep(), bj.Nested(levels=2), bj.Binomial(snapshots=...) "
    "or bj.Budget(bytes)"
)
_TRUNCATION_EXAMPLES = "None, bj.Truncate(every=k) or bj.RandomTruncate(key, keep_prob)"


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
    _check_strategy("remat", remat, RematStrategy, _REMAT_EXAMPLES)
    if truncation is not None:
        _check_strategy("truncation", truncation, TruncationStrategy, _TRUNCATION_EXAMPLES)
    if not isinstance(reverse, bool | np.bool_):
        raise TypeError(f"scan(reverse=...) expects a bool, got {type(reverse).__name__}")
    _check_unroll(unroll)
    _check_leaves("init", init)
    T = _check_length(xs, length)
    remat._check(T)
    if truncation is not None:
        truncation._check(T)

    pair = _PairKind()
    step = _checked_step(f, pair)
    init, types = _promote_weak_init(step, init, xs)
    if truncation is None:
        carry, ys = _scan_moving_passthrough(remat, step, init, xs, T, bool(reverse), unroll)
        return pair.build(*_weak_as(types, (carry, ys)))

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
    return pair.build(*_weak_as(types, (carry, ys)))


def _scale_leaf(c, s):
    c = jnp.asarray(c)
    if not jnp.issubdtype(c.dtype, jnp.inexact):
        return c  # integer/bool carries have no cotangent to cut
    return scale_cotangent(c, s)


# --- the arguments ------------------------------------------------------------------------


def _check_strategy(name: str, value: Any, base: type, examples: str) -> None:
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


def _check_unroll(unroll: Any) -> None:
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


def _check_leaves(name: str, tree: Any) -> None:
    """Every leaf of ``tree`` must be something JAX can trace: an array or a number."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        try:
            jax.typeof(leaf)
        except (TypeError, OverflowError) as err:
            raise TypeError(
                f"scan({name}=...) leaves must be arrays or numbers, but "
                f"{name}{jax.tree_util.keystr(path)} is {_describe(leaf)}: {err}"
            ) from None


def _check_length(xs: Any, length: Any) -> int:
    """The number of steps, after checking ``xs`` and ``length`` agree."""
    if length is not None:
        length = _concrete_length(length)
    _check_leaves("xs", xs)
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


class _PairKind:
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


def _checked_step(f: Callable, pair: _PairKind | None = None) -> Callable:
    """Wrap ``f`` so that a carry mismatch is reported in terms of the user's step.

    ``pair``, if given, records the container ``f`` returns its pair in. A
    shape error raised inside ``f`` gets a note on the layout ``bj.scan``
    expects (:func:`_call_with_layout_note`).
    """

    def step(carry, x):
        out = _call_with_layout_note(f, carry, x)
        if not isinstance(out, tuple | list) or len(out) != 2:
            raise TypeError(
                "scan(f=...) must return a pair (carry, y) as a tuple or list, got "
                f"{_describe(out)}"
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
                + _bullets(diffs)
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
                + _bullets(diffs)
            )
        return new_carry, y

    return step


def _bullets(lines: list[str]) -> str:
    return "\n".join(f"  * {line}" for line in lines)


def _describe(x: Any) -> str:
    """A value in the user's terms: ``an array of shape (2,) and dtype float64``."""
    if x is None:
        return "None"
    if isinstance(x, dict):
        return f"a dict with keys {sorted(x, key=repr)}"
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return f"a {type(x).__name__} (namedtuple) with fields {list(x._fields)}"
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
        return [f"{where} is {_describe(a)} in init, but f returned {_describe(b)}"]
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
            return [f"{where} is {_describe(a)} in init, but f returned {_describe(b)} ({note})"]
        return [f"{where} is {_describe(a)} in init, but f returned {_describe(b)}"]
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


def _promote_weak_init(step: Callable, init: Any, xs: Any) -> tuple[Any, Any]:
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
    (:func:`_weak_as` restores them).
    """
    leaves, treedef = jax.tree.flatten(init)
    avals = [jax.typeof(leaf) for leaf in leaves]
    if not any(getattr(a, "weak_type", False) for a in avals):
        return init, None
    x = _one_step(xs)
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


def _weak_as(types: Any, out: tuple) -> tuple:
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


def _one_step(xs: Any) -> Any:
    """One step's ``x`` of ``xs`` (leading axis dropped), abstractly, weak types kept."""
    return None if xs is None else jax.tree.map(_one_step_aval, xs)


def _one_step_aval(a: Any) -> jax.ShapeDtypeStruct:
    aval = jax.typeof(a)
    return jax.ShapeDtypeStruct(aval.shape[1:], aval.dtype, weak_type=aval.weak_type)


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
