"""``bj.cells.run``: a registered cell over a whole sequence, fused where it can be.

The top floor of :mod:`bpttjax.cells`: it checks the arguments, builds the
cell's :class:`~bpttjax.cells._fused.FusedLayer` (a
:class:`bpttjax.remat.Layer`) and hands it to the strategy, or runs the step
through :func:`bpttjax.scan` for a cell without a :class:`Split`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._checks import (
    REMAT_EXAMPLES,
    TRUNCATION_EXAMPLES,
    check_strategy,
    describe,
)
from .._scan import scan
from ..remat import RematStrategy, StoreAll
from ..truncation import TruncationStrategy
from ._autotune import choose as autotuned_chunks
from ._fused import FusedLayer
from ._registry import CELLS, Cell, get
from ._steps import Params

__all__ = ["check_chunks", "choose_batch_chunks", "run"]


def run(
    cell: str | Cell,
    params: Params,
    carry: Any,
    xs: jax.Array,
    *,
    remat: RematStrategy | None = None,
    truncation: TruncationStrategy | None = None,
    reverse: bool = False,
    unroll: int | bool = 1,
    hoist: bool = False,
    batch_chunks: int | str = "auto",
) -> tuple[Any, jax.Array]:
    """Run a registered cell over a whole sequence: ``bj.scan`` of its step, faster.

    The same results, and the same gradients, as
    ``bj.scan(functools.partial(cell.step, params), carry, xs, reverse=reverse,
    unroll=unroll, remat=remat, truncation=truncation)``. For a cell with a
    :class:`Split` (``rnn``, ``gru``, ``lstm``), the steps that ``remat``
    keeps every residual of (all of them under ``StoreAll``, each innermost
    block under ``Nested``) run as one block whose backward loop computes
    only the carry's cotangent; the gradients of the input and recurrent
    kernels and of the inputs are then a few large matrix products over the
    block's steps, instead of several ``batch``-row products per step. Other
    strategies (``EveryStep``, ``Binomial``, ``Budget``, your own) run step
    by step as ``bj.scan`` does, with the memory bound they state.

    Args:
      cell: a name in :data:`CELLS` or a :class:`Cell`.
      params: the cell's parameters (``cell.init(...)``).
      carry: the initial carry (``cell.initial_carry(...)``).
      xs: inputs, time-major, shape ``(T, ..., D)``.
      remat: a rematerialization strategy (default ``bj.StoreAll()``).
      truncation: ``None``, ``bj.Truncate`` or ``bj.RandomTruncate``.
      reverse: run from the last step to the first (``ys`` stay aligned with ``xs``).
      unroll: as in ``jax.lax.scan``.
      hoist: compute a block's input projection ``x_t W_x + b`` for all its
        steps in one product before the loop. Off by default: for the GRU
        and LSTM the ``3H``/``4H`` projected values per step are far more
        memory traffic than the ``D`` inputs (``docs/layers.md``). The
        inputs' and ``W_x``'s gradients are one product either way.
      batch_chunks: run each step as this many independent chains, one per
        group of batch rows (the rows' recurrences do not interact), inside
        the same loop. XLA's CPU runtime runs independent operations
        concurrently, so one group's gates and activations run beside
        another's instead of after them. Whether that pays depends on the
        cell, the sizes and the machine, either way (``docs/layers.md`` has
        the table). So by default (``"auto"``) it is chosen by timing, once per layer
        shape: see :func:`choose_batch_chunks`, which says what ``"auto"``
        picks. An int pins it. Values and gradients agree to rounding (the
        split products may round differently in the last bit, so pin an int
        for bitwise-reproducible runs); memory does not depend on it. The
        step runs whole with unbatched inputs, and with several devices
        except inside ``jax.shard_map`` (a batch sharded across devices is
        not sliced).

    Returns:
      ``(carry, ys)`` as :func:`bpttjax.scan`.

    Memory: under ``StoreAll`` a block keeps per step the carry and the
    step's ``z`` (see :class:`Split`: ``4H`` numbers per batch element for
    the GRU and the LSTM; the tanh RNN keeps its output instead, see
    ``Split.output_vjp``), and its backward pass the cotangents of ``z``;
    that is no more than plain BPTT keeps. Under
    ``Nested`` the same holds for one innermost block at a time.

    Transformations: ``grad``, ``jit``, ``vmap`` and ``jvp`` of ``grad`` (a
    ``jax.custom_vjp``); forward-mode ``jvp`` of ``run`` itself raises
    JAX's ``custom_vjp`` error; use :func:`bpttjax.scan` with the step for it.

    Raises:
      ValueError: unknown cell; ``xs`` is not at least 2-D, or its axes
        after the first (time) are not the carry's batch shape (a
        batch-major ``xs`` is told to ``jnp.swapaxes(xs, 0, 1)``); ``params``
        lack a key the cell reads (the message lists the keys it expects);
        ``Nested(lengths=...)`` does not cover ``T`` (checked before any
        trace).
      TypeError: as :func:`bpttjax.scan` for ``remat``, ``truncation``,
        ``reverse`` and ``unroll``; ``hoist`` not a bool; ``batch_chunks``
        neither an int nor ``"auto"``.
      ValueError: ``batch_chunks`` below 1.

    Example:
      >>> params = init_lstm(jax.random.key(0), 64, 256)
      >>> carry0 = initial_carry("lstm", 256, batch_shape=(32,))
      >>> (h_T, c_T), hs = run("lstm", params, carry0, xs, remat=bj.Nested(2))
    """
    cell = get(cell)
    remat = StoreAll() if remat is None else remat
    check_strategy("remat", remat, RematStrategy, REMAT_EXAMPLES)
    if truncation is not None:
        check_strategy("truncation", truncation, TruncationStrategy, TRUNCATION_EXAMPLES)
    batch_chunks = check_chunks("run", batch_chunks)
    _check_xs("run", carry, xs)
    remat.check(np.shape(xs)[0])  # e.g. Nested's lengths against T, before any trace
    kw: dict[str, Any] = dict(reverse=reverse, unroll=unroll, truncation=truncation)
    layer = _layer("run", cell, params, carry, xs, hoist=hoist, **kw)
    if layer is None:
        with _params_checked("run", cell, params):
            return scan(functools.partial(cell.step, params), carry, xs, remat=remat, **kw)
    if batch_chunks == "auto":
        batch_chunks = autotuned_chunks(layer, carry)
    return remat.scan_layer(layer.replace(chunks=batch_chunks), carry)


def _layer(
    fn: str,
    cell: Cell,
    params: Params,
    carry: Any,
    xs: Any,
    *,
    hoist: Any,
    reverse: bool = False,
    unroll: int | bool = 1,
    truncation: TruncationStrategy | None = None,
) -> FusedLayer | None:
    """``fn``'s :class:`FusedLayer` (one chain), its arguments checked;
    ``None`` where ``cell`` has no :class:`Split` or ``xs`` no steps."""
    if not isinstance(hoist, bool):
        raise TypeError(f"{fn}(hoist=...) expects True or False, got {hoist!r}")
    _check_xs(fn, carry, xs)
    if cell.split is None or xs.shape[0] == 0:
        return None
    # Everything bj.scan checks, checked by tracing its step once (shapes, carry, options).
    step = functools.partial(cell.step, params)
    kw: dict[str, Any] = dict(reverse=reverse, unroll=unroll, truncation=truncation)
    with _params_checked(fn, cell, params):
        jax.eval_shape(lambda c, x: scan(step, c, x, remat=StoreAll(), **kw), carry, xs)
    return FusedLayer(
        split=cell.split, step_fn=cell.step, params=params, xs=jnp.asarray(xs),
        length=xs.shape[0], reverse=bool(reverse), unroll=unroll, truncation=truncation,
        hoist=hoist, chunks=1,
    )  # fmt: skip


def _check_xs(fn: str, carry: Any, xs: Any) -> None:
    """``xs`` must be time-major, ``(T, *batch, input_size)``, with the carry's ``batch``.

    The carry's arrays are ``(*batch, hidden_size)``; a batch-major ``xs``
    (``(B, T, D)``, as ``batch_first=True`` layers take) would otherwise fail
    inside the step with JAX's broadcasting error.
    """
    if not isinstance(xs, jax.Array | np.ndarray) or np.ndim(xs) < 2:
        raise ValueError(
            f"{fn}(xs=...) expects an array of shape (T, ..., input_size), got {describe(xs)}"
        )
    batches = {tuple(np.shape(a)[:-1]) for a in jax.tree.leaves(carry) if np.ndim(a) >= 1}
    if len(batches) != 1:
        return  # no single batch shape to compare with (the step reports what is wrong)
    batch = batches.pop()
    shape = tuple(np.shape(xs))
    if shape[1:-1] == batch:
        return
    swapped = (shape[1], shape[0], *shape[2:])
    hint = (
        "; xs looks batch-major (B, T, ...): pass jnp.swapaxes(xs, 0, 1)"
        if swapped[1:-1] == batch
        else ""
    )
    raise ValueError(
        f"{fn}(xs=...): time is the leading axis of xs, whose shape must be (T, *batch, "
        f"input_size) with the carry's batch shape {batch}, i.e. (T, "
        f"{', '.join(map(str, batch)) + ', ' if batch else ''}input_size); got xs of shape "
        f"{shape} for a carry of shape {(*batch, _hidden(carry))}{hint}"
    )


def _hidden(carry: Any) -> int | str:
    sizes = {np.shape(a)[-1] for a in jax.tree.leaves(carry) if np.ndim(a) >= 1}
    return sizes.pop() if len(sizes) == 1 else "H"


@contextlib.contextmanager
def _params_checked(fn: str, cell: Cell, params: Any):
    """Turn the ``KeyError`` of a parameter that ``params`` lacks into a ``ValueError``
    naming the cell, the keys it expects and the keys it got."""
    try:
        yield
    except KeyError as err:
        if not isinstance(params, Mapping) or not err.args or err.args[0] in params:
            raise
        want = _param_keys(cell)
        got = sorted(params, key=str)
        owners = [c.name for c in CELLS.values() if c is not cell and _param_keys(c) == got]
        like = f" (the parameters of the {owners[0]!r} cell)" if owners else ""
        expects = f"keys {want}" if want is not None else f"a key {err.args[0]!r}"
        raise ValueError(
            f"{fn}(params=...): the {cell.name!r} cell expects parameters with {expects}, got "
            f"keys {got}{like}; build them with bj.cells.get({cell.name!r}).init(key, "
            "input_size, hidden_size)"
        ) from err


def _param_keys(cell: Cell) -> list | None:
    """The keys of ``cell.init``'s parameters (an abstract trace), or None if not a dict."""
    try:
        shapes = jax.eval_shape(lambda k: cell.init(k, 1, 1), jax.random.key(0))
    except Exception:  # noqa: BLE001 - only for an error message
        return None
    return sorted(shapes, key=str) if isinstance(shapes, Mapping) else None


def check_chunks(fn: str, batch_chunks: Any) -> int | str:
    """``fn``'s ``batch_chunks`` (see :func:`run`), checked."""
    if batch_chunks == "auto" and isinstance(batch_chunks, str):
        return batch_chunks
    if isinstance(batch_chunks, bool) or not isinstance(batch_chunks, int | np.integer):
        raise TypeError(
            f'{fn}(batch_chunks=...) expects a positive int or "auto", got {batch_chunks!r}'
        )
    if batch_chunks < 1:
        raise ValueError(f"{fn}(batch_chunks=...) must be at least 1, got {batch_chunks}")
    return int(batch_chunks)


def choose_batch_chunks(
    cell: str | Cell, params: Params, carry: Any, xs: jax.Array, *, hoist: bool = False
) -> int:
    """The ``batch_chunks`` that :func:`run` picks for ``"auto"`` (its default).

    On a CPU backend with one device and at least two cores, for a batch
    large enough to split: the gradient of ``run`` over its first steps (a
    probe long enough that the per-step work dominates) is compiled with 1
    and with 2 chains, called in turn a few times, and 2 is kept only if it
    is faster by a margin, so that a tie keeps the simpler program
    (``docs/layers.md`` gives the sizes, the rounds and the margin). The
    answer is cached for the layer's shapes, dtypes and options, so a layer
    is timed once per process. Everywhere else the answer is 1, without
    timing.

    Call it once and pass the result to ``run`` to fix the choice (near the
    margin the timing can go either way between runs, and 1 and 2 chains may
    round differently in the last bit).

    Args:
      cell, params, carry, xs, hoist: as :func:`run` (only their shapes and
        dtypes matter; they may be traced).

    Returns:
      1 or 2.

    Raises:
      ValueError, TypeError: as :func:`run`.
    """
    layer = _layer("choose_batch_chunks", get(cell), params, carry, xs, hoist=hoist)
    if layer is None:
        return 1
    return autotuned_chunks(layer, carry)
