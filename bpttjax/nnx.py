"""``bj.nnx.RNN``: Flax NNX's ``nnx.RNN`` with a rematerialization and a truncation strategy.

Swap ``nnx.RNN(cell)`` for ``bj.nnx.RNN(cell, remat=bj.Budget("64MB"))``: the
same constructor and call arguments, the same outputs and gradients, the same
state (so a checkpoint of one loads into the other), and the time loop is
:func:`bpttjax.scan`, so that the backward pass keeps only what ``remat``
allows. Flax's own ``RNN`` has no such option: its ``nnx.scan`` stores every
step's residuals.

For the cells whose math the library knows (``nnx.SimpleCell`` with ``tanh``,
``nnx.GRUCell``, ``nnx.LSTMCell`` and ``nnx.OptimizedLSTMCell`` with their
default activations, all arrays in one floating dtype) the loop runs
:mod:`bpttjax.cells`' own step on the Flax parameters, concatenated into one
input and one hidden kernel; any other cell runs as Flax calls it, rebuilt
from its state at every step as :func:`bpttjax.cells.from_nnx` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from flax.nnx.nn import dtypes as _dtypes

from . import _flax
from ._flax_cells import NNX
from .cells._run import check_chunks
from .remat import RematStrategy, StoreAll
from .truncation import TruncationStrategy

__all__ = ["RNN"]


class RNN(nnx.Module):
    """Run an NNX recurrent cell over a sequence, with BPTT's memory chosen by ``remat``.

    A drop-in for ``flax.nnx.RNN`` (Flax 0.12): the same arguments, defaults
    and return values, plus ``remat`` and ``truncation``, which change how
    the gradient is computed and never the forward values.

    Args:
      cell: an ``nnx.Module`` called as ``cell(carry, x) -> (carry, y)`` with
        an ``initialize_carry(input_shape, rngs)`` method, such as
        ``nnx.SimpleCell``, ``nnx.GRUCell``, ``nnx.LSTMCell``,
        ``nnx.OptimizedLSTMCell`` or a cell of your own.
      remat: a rematerialization strategy (default :class:`~bpttjax.StoreAll`,
        what ``nnx.RNN`` does); its docstring states its memory, as a multiple
        of the carry, and its recomputation, as a multiple of a forward pass.
        :class:`~bpttjax.Budget` picks the cheapest strategy that fits a
        memory budget.
      truncation: ``None`` (full BPTT) or :class:`~bpttjax.Truncate`. It is a
        static attribute, so it cannot hold arrays: pass a
        :class:`~bpttjax.RandomTruncate` (whose key is an array) per call
        instead, with a fresh key for every training step.
      time_major: inputs are ``(time, *batch, *features)`` if ``True``, else
        ``(*batch, time, *features)``.
      return_carry: return ``(carry, outputs)`` instead of ``outputs``.
      reverse: process the sequence from its end; the outputs come in the
        order processed unless ``keep_order``. With ``seq_lengths`` the
        padding stays at the end.
      keep_order: with ``reverse``, return the outputs in the inputs' order.
      unroll: steps per loop iteration, as ``jax.lax.scan``'s ``unroll``.
      batch_chunks: for the cells the library runs itself (those of
        :func:`bpttjax.cells.run`), run each step as this many independent
        chains of batch rows; faster or slower depending on the sizes, so
        by default (``"auto"``) timed once per shape on a multi-core CPU
        (see ``bj.cells.choose_batch_chunks``); an int pins it. Other
        cells ignore it.
      state_axes: only ``None`` (every variable of the cell is carried from
        step to step, ``nnx.RNN``'s default).
      broadcast_rngs: only ``None`` (``nnx.RNN``'s default).
      rngs: ``True`` (a stream seeded with 0), an ``nnx.Rngs`` (its
        ``carry`` stream, forked) or ``False``: the randomness that
        ``initialize_carry`` gets when no ``initial_carry`` is passed.

    Raises:
      TypeError: ``cell`` is not an ``nnx.Module`` instance, or ``remat`` or
        ``truncation`` is not a strategy instance (or holds arrays).
      NotImplementedError: ``state_axes`` or ``broadcast_rngs`` is set.
      ValueError: ``rngs`` has another type (as ``nnx.RNN``).

    Cost: the cell's forward pass, plus what ``remat`` keeps and recomputes.
    With ``seq_lengths`` and ``return_carry`` the carries of all steps are
    stacked as outputs (as ``nnx.RNN`` does), ``T`` carries more.

    Warning:
      Variables other than ``nnx.Param`` (RNG streams, counters) are carried
      through the loop and written back, as ``nnx.RNN`` does; changes the cell
      makes to its ``nnx.Param`` values inside the loop are dropped.

    Example:
      >>> cell = nnx.LSTMCell(64, 256, rngs=nnx.Rngs(0))
      >>> rnn = bj.nnx.RNN(cell, remat=bj.Budget("64MB"))
      >>> ys = rnn(xs)  # xs: (batch, time, 64) -> ys: (batch, time, 256)
      >>> grads = nnx.grad(lambda m: jnp.mean(m(xs) ** 2))(rnn)
    """

    def __init__(
        self,
        cell: nnx.Module,
        *,
        remat: RematStrategy = StoreAll(),  # noqa: B008 - frozen, so one shared default is safe
        truncation: TruncationStrategy | None = None,
        time_major: bool = False,
        return_carry: bool = False,
        reverse: bool = False,
        keep_order: bool = False,
        unroll: int = 1,
        batch_chunks: int | str = "auto",
        state_axes: Any = None,
        broadcast_rngs: Any = None,
        rngs: nnx.Rngs | bool = True,
    ):
        _check_cell(cell)
        _flax.check_strategies("RNN", remat, truncation)
        for name, value in (("remat", remat), ("truncation", truncation)):
            if jax.tree.leaves(value):
                raise TypeError(
                    f"RNN({name}=...) is a static attribute and cannot hold arrays, but this "
                    f"{type(value).__name__} does; pass it per call instead, "
                    f"rnn(x, {name}=...), with a fresh key for every training step"
                )
        for name, value in (("state_axes", state_axes), ("broadcast_rngs", broadcast_rngs)):
            if value is not None:
                raise NotImplementedError(
                    f"bj.nnx.RNN({name}=...) is not supported: every variable of the cell "
                    f"is carried through the loop (nnx.RNN's default); got {value!r}"
                )
        self.cell: Any = cell  # any nnx cell: initialize_carry, dtype, ...
        self.remat = remat
        self.truncation = truncation
        self.time_major = time_major
        self.return_carry = return_carry
        self.reverse = reverse
        self.keep_order = keep_order
        self.unroll = unroll
        self.batch_chunks = check_chunks("RNN", batch_chunks)
        self.rngs: nnx.RngStream | None
        if rngs is True:
            self.rngs = nnx.RngStream(0, tag="carry")
        elif isinstance(rngs, nnx.Rngs):
            self.rngs = rngs.carry.fork()
        elif rngs is False:
            self.rngs = nnx.data(None)
        else:
            raise ValueError(
                f"Expected rngs to be a jax.Array, int, Rngs, or bool. Got {type(rngs)}."
            )

    def __call__(
        self,
        inputs: jax.Array,
        *,
        initial_carry: Any = None,
        seq_lengths: jax.Array | None = None,
        return_carry: bool | None = None,
        time_major: bool | None = None,
        reverse: bool | None = None,
        keep_order: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | None = None,
        remat: RematStrategy | None = None,
        truncation: TruncationStrategy | None = _flax.UNSET,
    ) -> Any:
        """Run the cell over ``inputs``; the arguments override the attributes of the same name.

        Args:
          inputs: ``(*batch, time, *features)``, or ``(time, *batch,
            *features)`` with ``time_major``.
          initial_carry: the carry before the first step; by default
            ``cell.initialize_carry`` of one step's shape.
          seq_lengths: ``(batch,)`` ints, each sequence's length, as in
            ``nnx.RNN``: steps past a sequence's end are still computed (their
            outputs are not zeroed); with ``return_carry`` the carry returned is
            the one after the last valid step, and with ``reverse`` the padding
            stays at the end. One batch axis.
          return_carry, time_major, reverse, keep_order: as the attributes.
          rngs: for ``initialize_carry``; by default the module's stream.
          remat: overrides the module's ``remat``.
          truncation: overrides the module's ``truncation`` (``None``: none);
            here a :class:`~bpttjax.RandomTruncate` is allowed.

        Returns:
          ``outputs`` with the time axis where ``inputs`` has it, or
          ``(carry, outputs)`` with ``return_carry``.
        """
        return_carry, time_major, reverse, keep_order, remat, truncation = _flax.call_options(
            self, return_carry, time_major, reverse, keep_order, remat, truncation
        )

        n_features = _flax.feature_axes(self.cell)
        axis = _flax.time_axis(inputs, n_features, time_major)
        if initial_carry is None:
            if rngs is None:
                rngs = self.rngs
            if isinstance(rngs, nnx.Rngs):
                rngs = rngs.carry.fork()
            initial_carry = self.cell.initialize_carry(_flax.carry_input_shape(inputs, axis), rngs)
        loop: dict[str, Any] = dict(remat=remat, truncation=truncation, unroll=self.unroll)

        fast = _library_params(self.cell)
        if fast is not None and _flax.fast_ok(fast[1], initial_carry, inputs, self.cell.dtype):
            name, params = fast

            def scan_fn(carry, xs, **kw):
                return _flax.fast_scan(
                    name, params, carry, xs, batch_chunks=self.batch_chunks, **kw, **loop
                )
        else:
            scan_fn = self._generic_scan(loop)

        return _flax.run(
            scan_fn, inputs, initial_carry, axis=axis, n_features=n_features,
            time_major=time_major, reverse=reverse, keep_order=keep_order,
            seq_lengths=seq_lengths, return_carry=return_carry,
        )  # fmt: skip

    def _generic_scan(self, loop: dict) -> Callable[..., tuple[Any, Any]]:
        """The cell rebuilt from its state at every step, its non-parameter state carried."""
        graphdef, params, rest = nnx.split(self.cell, nnx.Param, ...)
        stateful = bool(jax.tree.leaves(rest))

        def step(carry, x):
            if not stateful:
                return nnx.merge(graphdef, params, rest)(carry, x)
            carry, state = carry
            cell = nnx.merge(graphdef, params, state)
            carry, y = cell(carry, x)
            return (carry, nnx.split(cell, nnx.Param, ...)[2]), y

        def scan_fn(carry, xs, *, reverse, stack_carries):
            if not stateful:
                return _flax.scan_step(
                    step, carry, xs, reverse=reverse, stack_carries=stack_carries, **loop
                )
            f = step
            if stack_carries:

                def f(carry, x):
                    (cell_carry, state), y = step(carry, x)
                    return (cell_carry, state), (cell_carry, y)

            (carry, state), ys = _flax.scan_step(
                f, (carry, rest), xs, reverse=reverse, stack_carries=False, **loop
            )
            nnx.update(self.cell, state)
            return carry, ys

        return scan_fn


def _check_cell(cell: Any) -> None:
    if isinstance(cell, type):
        raise TypeError(
            f"RNN(cell=...) expects an nnx.Module instance, got the class {cell.__name__}; "
            "construct the cell first, e.g. nnx.GRUCell(in_features, hidden_features, rngs=...)"
        )
    if not isinstance(cell, nnx.Module):
        raise TypeError(
            f"RNN(cell=...) expects a flax.nnx.Module cell, got {type(cell).__name__}"
            + (" (a flax.linen module: use bj.linen.RNN)" if _is_linen(cell) else "")
        )


def _is_linen(obj: Any) -> bool:
    import flax.linen as nn

    return isinstance(obj, nn.Module)


def _library_params(cell: Any) -> tuple[str, dict] | None:
    """The registered cell computing ``cell`` and its parameters in the library's layout.

    ``("rnn" | "gru" | "lstm", params)`` with the dicts of
    :func:`bpttjax.cells.init_rnn`, :func:`~bpttjax.cells.init_gru` and
    :func:`~bpttjax.cells.init_lstm`, kernels concatenated (differentiably) from
    the cell's own; ``None`` for any other cell or non-default activations.
    """
    kind = type(cell)
    if kind not in NNX or getattr(cell, "promote_dtype", None) is not _dtypes.promote_dtype:
        return None
    if getattr(cell, "activation_fn", None) not in _flax.FLAX_TANH:
        return None
    if kind is nnx.SimpleCell:
        if cell.residual:
            return None
    elif cell.gate_fn not in _flax.FLAX_SIGMOID:
        return None
    p = nnx.to_pure_dict(nnx.state(cell, nnx.Param))
    name, layout = NNX[kind]
    return name, layout(p)
