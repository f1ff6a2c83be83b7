"""What :mod:`bpttjax.nnx` and :mod:`bpttjax.linen` share: Flax's sequence layout and the fast path.

Flax's ``RNN`` modules (``flax/nnx/nn/recurrent.py``, ``flax/linen/recurrent.py``)
move the time axis, flip the sequence for ``reverse`` (keeping padding at the
end when ``seq_lengths`` is given), scan, pick the last valid carry and flip
the outputs back for ``keep_order``. :func:`run` reproduces those steps around
any scan, so that only the loop itself differs: :func:`bpttjax.scan` with a
rematerialization and a truncation strategy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ._checks import REMAT_EXAMPLES, TRUNCATION_EXAMPLES, check_strategy
from ._scan import scan
from .cells._registry import get as get_cell
from .cells._run import run as run_cell
from .cells._steps import Step
from .remat import RematStrategy
from .truncation import TruncationStrategy

UNSET: Any = object()
"""Default of the call-time ``truncation`` override (``None`` means no truncation)."""


def check_strategies(owner: str, remat: Any, truncation: Any) -> None:
    """:func:`bpttjax.scan`'s checks of ``remat`` and ``truncation``, naming ``owner``."""
    try:
        check_strategy("remat", remat, RematStrategy, REMAT_EXAMPLES)
        if truncation is not None:
            check_strategy("truncation", truncation, TruncationStrategy, TRUNCATION_EXAMPLES)
    except TypeError as err:
        raise TypeError(str(err).replace("scan(", f"{owner}(", 1)) from None


def call_options(
    module: Any, return_carry, time_major, reverse, keep_order, remat, truncation
) -> tuple[bool, bool, bool, bool, RematStrategy, TruncationStrategy | None]:
    """A call's options, each ``None`` (``UNSET`` for ``truncation``) taken from ``module``.

    Returns ``(return_carry, time_major, reverse, keep_order, remat,
    truncation)``, after checking the two strategies.
    """
    return_carry = module.return_carry if return_carry is None else return_carry
    time_major = module.time_major if time_major is None else time_major
    reverse = module.reverse if reverse is None else reverse
    keep_order = module.keep_order if keep_order is None else keep_order
    remat = module.remat if remat is None else remat
    truncation = module.truncation if truncation is UNSET else truncation
    check_strategies("RNN.__call__", remat, truncation)
    return return_carry, time_major, reverse, keep_order, remat, truncation


def feature_axes(cell: Any) -> int:
    """``cell.num_feature_axes``; 1 where the cell does not say (most cells)."""
    try:
        return int(cell.num_feature_axes)
    except (AttributeError, NotImplementedError):
        return 1


def time_axis(inputs: jax.Array, n_features: int, time_major: bool) -> int:
    """The axis of ``inputs`` holding time, computed as Flax's ``RNN`` does."""
    if not hasattr(inputs, "ndim") or not hasattr(inputs, "shape"):
        raise TypeError(
            f"RNN(inputs) expects an array of shape (*batch, time, *features), got "
            f"{type(inputs).__name__}"
        )
    axis = 0 if time_major else inputs.ndim - (n_features + 1)
    if axis < 0:
        axis += inputs.ndim
    if not 0 <= axis < inputs.ndim:
        raise ValueError(
            f"RNN(inputs) needs a time axis and {n_features} feature axis(es), got an array "
            f"of shape {inputs.shape}"
        )
    return axis


def carry_input_shape(inputs: jax.Array, axis: int) -> tuple[int, ...]:
    """The shape of one time step of ``inputs``: what ``initialize_carry`` receives."""
    return inputs.shape[:axis] + inputs.shape[axis + 1 :]


Scan = Callable[..., tuple[Any, Any]]


def run(
    scan_fn: Scan,
    inputs: jax.Array,
    carry: Any,
    *,
    axis: int,
    n_features: int,
    time_major: bool,
    reverse: bool,
    keep_order: bool,
    seq_lengths: jax.Array | None,
    return_carry: bool,
) -> Any:
    """Flax's ``RNN.__call__`` around ``scan_fn``.

    ``scan_fn(carry, xs, *, reverse, stack_carries) -> (carry, ys)`` scans
    time-major ``xs``; with ``stack_carries`` its ``ys`` are ``(carries, ys)``.
    Without ``seq_lengths`` a reversed sequence is scanned backwards in place
    (``bj.scan(reverse=True)``: no flipped copy of the inputs), which gives
    Flax's values; with ``seq_lengths`` the inputs are flipped as Flax flips
    them, padding kept at the end.
    """
    from flax.linen.recurrent import flip_sequences  # here: `import bpttjax` needs no Flax

    # Flax's count: the axes before time, or those between time and the features.
    num_batch = inputs.ndim - 1 - n_features if time_major else axis
    flip = functools.partial(
        flip_sequences, seq_lengths=seq_lengths, num_batch_dims=num_batch, time_major=time_major
    )
    slice_carry = seq_lengths is not None and return_carry
    if reverse and seq_lengths is not None:
        inputs = flip(inputs)
    xs = jnp.moveaxis(inputs, axis, 0)
    carry, ys = scan_fn(
        carry, xs, reverse=bool(reverse and seq_lengths is None), stack_carries=slice_carry
    )
    if slice_carry:
        carries, ys = ys
        assert seq_lengths is not None  # slice_carry says so
        last = seq_lengths - 1
        carry = jax.tree.map(lambda c: c[last, jnp.arange(c.shape[1])], carries)
    ys = jax.tree.map(lambda y: jnp.moveaxis(y, 0, axis), ys)
    if reverse and seq_lengths is None and not keep_order:
        ys = jax.tree.map(lambda y: jnp.flip(y, axis=axis), ys)
    elif reverse and seq_lengths is not None and keep_order:
        ys = jax.tree.map(flip, ys)
    return (carry, ys) if return_carry else ys


def stacking(step: Callable) -> Callable:
    """``step`` whose ``y`` becomes ``(carry, y)``: for the last valid carry of each sequence."""

    def stacked(carry, x):
        carry, y = step(carry, x)
        return carry, (carry, y)

    return stacked


def scan_step(
    step: Callable,
    carry: Any,
    xs: Any,
    *,
    reverse: bool,
    stack_carries: bool,
    remat: RematStrategy,
    truncation: TruncationStrategy | None,
    unroll: int | bool,
) -> tuple[Any, Any]:
    """``bj.scan(step, carry, xs, ...)`` with ``step``'s carries stacked on request."""
    f = stacking(step) if stack_carries else step
    return scan(f, carry, xs, reverse=reverse, unroll=unroll, remat=remat, truncation=truncation)


# --- the fast path --------------------------------------------------------------------------

FLAX_TANH = (jnp.tanh,)
FLAX_SIGMOID = (jax.nn.sigmoid,)


def fast_ok(params: dict, carry: Any, inputs: jax.Array, compute_dtype: Any) -> bool:
    """Whether the library's step computes exactly what the Flax cell would.

    Every array in one floating dtype (the cell's ``dtype``, if set): Flax's
    ``promote_dtype`` casts nothing then. The carry's arrays have one axis
    less than ``inputs`` (the library's cells want the same batch dimensions
    on ``x`` and the carry, where Flax would broadcast).
    """
    leaves = jax.tree.leaves(carry)
    arrays = [*jax.tree.leaves(params), *leaves, inputs]
    if not all(hasattr(a, "dtype") and hasattr(a, "ndim") for a in arrays):
        return False
    dtypes = {jnp.dtype(a.dtype) for a in arrays}
    if len(dtypes) != 1:
        return False
    (dtype,) = dtypes
    if not jnp.issubdtype(dtype, jnp.floating):
        return False
    if compute_dtype is not None and jnp.dtype(compute_dtype) != dtype:
        return False
    return all(leaf.ndim == inputs.ndim - 1 for leaf in leaves)


def fast_scan(
    name: str,
    params: dict,
    carry: Any,
    xs: jax.Array,
    *,
    reverse: bool,
    stack_carries: bool,
    remat: RematStrategy,
    truncation: TruncationStrategy | None,
    unroll: int | bool,
    batch_chunks: int | str = "auto",
) -> tuple[Any, Any]:
    """The registered cell ``name`` over time-major ``xs``, with Flax's carry convention.

    ``params`` are in the layout of :func:`bpttjax.cells.init_rnn` (``"rnn"``),
    :func:`~bpttjax.cells.init_gru` (``"gru"``) or
    :func:`~bpttjax.cells.init_lstm` (``"lstm"``); the LSTM's carry is Flax's
    ``(c, h)`` here and the library's ``(h, c)`` inside. The loop is
    ``bj.cells.run`` (with ``batch_chunks``), or ``bj.scan`` over the cell's
    step where the carries are stacked (the same semantics).
    """
    lstm = name == "lstm"
    if lstm:
        carry = (carry[1], carry[0])
    kw: dict[str, Any] = dict(remat=remat, truncation=truncation, reverse=reverse, unroll=unroll)
    if not stack_carries:
        carry, ys = run_cell(name, params, carry, xs, batch_chunks=batch_chunks, **kw)
    else:
        step = functools.partial(get_cell(name).step, params)
        carry, ys = scan_step(step, carry, xs, stack_carries=stack_carries, **kw)
        if stack_carries and lstm:
            (hs, cs), ys = ys
            ys = ((cs, hs), ys)
    if lstm:
        carry = (carry[1], carry[0])
    return carry, ys


# --- Flax cells as pure steps (bj.cells.from_nnx, bj.cells.from_linen) ---------------


def from_nnx(cell: Any) -> tuple[Step, Any]:
    """A pure step and its parameters from a Flax NNX recurrent cell.

    Args:
      cell: an ``nnx.Module`` called as ``cell(carry, x) -> (carry, y)``, such
        as ``nnx.SimpleCell``, ``nnx.GRUCell`` or ``nnx.LSTMCell``.

    Returns:
      ``(step, params)``: ``params`` is the ``nnx.State`` of the cell's
      ``nnx.Param`` variables (a pytree, so ``jax.grad`` and optax work on
      it) and ``step(params, carry, x) -> (carry, y)`` rebuilds the cell from
      it with ``nnx.merge`` and calls it. The carry is Flax's convention:
      ``(c, h)`` for ``LSTMCell`` (cell first, unlike :func:`lstm`), ``h``
      for the others; build it with ``cell.initialize_carry(x.shape, rngs)``.
      Cost: the cell's own; rebuilding is Python work at trace time only.

    Raises:
      TypeError: ``cell`` is not an ``nnx.Module`` instance.

    Warning:
      Variables other than ``nnx.Param`` (batch statistics, RNG counters) are
      fixed at their values at the time of the call, and updates the cell
      makes to them inside ``step`` are dropped.

    Example:
      >>> step, params = from_nnx(nnx.LSTMCell(8, 16, rngs=nnx.Rngs(0)))
      >>> carry0 = (jnp.zeros((4, 16)), jnp.zeros((4, 16)))  # (c, h)
      >>> loss = lambda p: bj.scan(functools.partial(step, p), carry0, xs)[1].sum()
      >>> grads = jax.grad(loss)(params)
    """
    from flax import nnx

    _check_module("from_nnx", cell, nnx.Module, "flax.nnx.Module")
    graphdef, params, rest = nnx.split(cell, nnx.Param, ...)

    def step(params, carry, x):
        return nnx.merge(graphdef, params, rest)(carry, x)

    return step, params


def from_linen(module: Any) -> Step:
    """A pure step from a Flax Linen recurrent cell.

    Args:
      module: an unbound ``flax.linen.Module`` called as
        ``module(carry, x) -> (carry, y)``, such as ``nn.GRUCell(features=H)``.

    Returns:
      ``step(variables, carry, x) = module.apply(variables, carry, x)``, with
      ``variables`` from ``module.init(key, carry, x)``. The carry is Flax's
      convention: ``(c, h)`` for ``LSTMCell``, ``h`` for the others.

    Raises:
      TypeError: ``module`` is not a ``flax.linen.Module`` instance.

    Example:
      >>> cell = nn.GRUCell(features=16)
      >>> variables = cell.init(jax.random.key(0), h0, xs[0])
      >>> step = from_linen(cell)
      >>> h_T, hs = bj.scan(functools.partial(step, variables), h0, xs)
    """
    import flax.linen as nn

    _check_module("from_linen", module, nn.Module, "flax.linen.Module")

    def step(variables, carry, x):
        return module.apply(variables, carry, x)

    return step


def _check_module(fn: str, obj: Any, cls: type, cls_name: str) -> None:
    if isinstance(obj, type) and issubclass(obj, cls):
        raise TypeError(
            f"{fn} expects a {cls_name} instance, got the class {obj.__name__}; "
            "construct the cell first"
        )
    if not isinstance(obj, cls):
        raise TypeError(f"{fn} expects a {cls_name} instance, got {type(obj).__name__}: {obj!r}")
