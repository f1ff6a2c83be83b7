"""``bj.linen.RNN``: Flax Linen's ``nn.RNN`` with a rematerialization and a truncation strategy.

Swap ``nn.RNN(cell)`` for ``bj.linen.RNN(cell, remat=bj.Budget("64MB"))``:
the same attributes and call arguments, the same variables (``init`` makes
the same tree, ``{"params": {"cell": ...}}``, so parameters trained with one
load into the other), outputs and gradients; the time loop is
:func:`bpttjax.scan`, so that the backward pass keeps only what ``remat``
allows. Flax's ``nn.RNN`` runs ``nn.scan``, which stores every step's
residuals.

For the cells whose math the library knows (``nn.SimpleCell`` with ``tanh``,
``nn.GRUCell``, ``nn.LSTMCell`` and ``nn.OptimizedLSTMCell`` with their
default activations, all arrays in one floating dtype) the loop runs
:mod:`bpttjax.cells`' own step on the cell's parameters, concatenated into
one input and one hidden kernel; any other cell runs as
``cell.apply(variables, carry, x)`` at every step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
from flax.core import FrozenDict

from . import _flax
from ._flax_cells import LINEN
from .cells._run import check_chunks
from .remat import RematStrategy, StoreAll
from .truncation import TruncationStrategy

__all__ = ["RNN"]


class RNN(nn.Module):
    """Run a Linen recurrent cell over a sequence, with BPTT's memory chosen by ``remat``.

    A drop-in for ``flax.linen.RNN`` (Flax 0.12): the same attributes in the
    same order, the same call arguments and return values, plus ``remat`` and
    ``truncation``, which change how the gradient is computed and never the
    forward values.

    Attributes:
      cell: a ``flax.linen.Module`` called as ``cell(carry, x) -> (carry, y)``
        with an ``initialize_carry(rng, input_shape)`` method, such as
        ``nn.SimpleCell``, ``nn.GRUCell``, ``nn.LSTMCell``,
        ``nn.OptimizedLSTMCell`` or a cell of your own.
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
      variable_axes: only ``nn.RNN``'s default ``{}``.
      variable_broadcast: only ``nn.RNN``'s default ``"params"``: the cell's
        variables are read once and shared by every step.
      variable_carry: only ``nn.RNN``'s default ``False``.
      split_rngs: only ``nn.RNN``'s default ``{"params": False}``.
      remat: a rematerialization strategy (default :class:`~bpttjax.StoreAll`,
        what ``nn.RNN`` does); its docstring states its memory, as a multiple
        of the carry, and its recomputation, as a multiple of a forward pass.
        :class:`~bpttjax.Budget` picks the cheapest strategy that fits a
        memory budget.
      truncation: ``None`` (full BPTT), :class:`~bpttjax.Truncate` or
        :class:`~bpttjax.RandomTruncate` (better passed per call, with a fresh
        key for every training step).

    Raises:
      TypeError: at construction, ``cell`` is not a ``flax.linen.Module``
        instance, or ``remat`` or ``truncation`` is not a strategy instance.
      NotImplementedError: at construction, one of ``variable_axes``,
        ``variable_broadcast``, ``variable_carry`` or ``split_rngs`` differs
        from ``nn.RNN``'s default.

    Cost: the cell's forward pass, plus what ``remat`` keeps and recomputes.
    With ``seq_lengths`` and ``return_carry`` the carries of all steps are
    stacked as outputs (as ``nn.RNN`` does), ``T`` carries more.

    Warning:
      The cell is applied to its variables without RNGs and without mutable
      collections: a cell that draws random numbers (dropout) or updates
      state (batch statistics) inside its step is not supported.

    Example:
      >>> rnn = bj.linen.RNN(nn.LSTMCell(features=256), remat=bj.Budget("64MB"))
      >>> variables = rnn.init(jax.random.key(0), xs)  # xs: (batch, time, 64)
      >>> ys = rnn.apply(variables, xs)  # (batch, time, 256)
    """

    cell: nn.Module
    time_major: bool = False
    return_carry: bool = False
    reverse: bool = False
    keep_order: bool = False
    unroll: int = 1
    batch_chunks: int | str = "auto"
    variable_axes: Mapping[Any, Any] = FrozenDict()
    variable_broadcast: Any = "params"
    variable_carry: Any = False
    split_rngs: Mapping[Any, bool] = FrozenDict({"params": False})
    remat: RematStrategy = StoreAll()
    truncation: TruncationStrategy | None = None

    def __post_init__(self):
        _check_cell(self.cell)
        _flax.check_strategies("RNN", self.remat, self.truncation)
        check_chunks("RNN", self.batch_chunks)
        defaults = (
            ("variable_axes", FrozenDict(), lambda v: not v),
            ("variable_broadcast", "params", lambda v: v == "params"),
            ("variable_carry", False, lambda v: v is False),
            ("split_rngs", FrozenDict({"params": False}), lambda v: dict(v) == {"params": False}),
        )
        for name, default, ok in defaults:
            value = getattr(self, name)
            if not ok(value):
                raise NotImplementedError(
                    f"bj.linen.RNN({name}=...) supports only nn.RNN's default {default!r}, "
                    f"got {value!r}"
                )
        super().__post_init__()

    def __call__(
        self,
        inputs: jax.Array,
        *,
        initial_carry: Any = None,
        init_key: jax.Array | None = None,
        seq_lengths: jax.Array | None = None,
        return_carry: bool | None = None,
        time_major: bool | None = None,
        reverse: bool | None = None,
        keep_order: bool | None = None,
        remat: RematStrategy | None = None,
        truncation: TruncationStrategy | None = _flax.UNSET,
    ) -> Any:
        """Run the cell over ``inputs``; the arguments override the attributes of the same name.

        Args:
          inputs: ``(*batch, time, *features)``, or ``(time, *batch,
            *features)`` with ``time_major``.
          initial_carry: the carry before the first step; by default
            ``cell.initialize_carry(init_key, one step's shape)``.
          init_key: the PRNG key for ``initialize_carry`` (default
            ``jax.random.key(0)``, as ``nn.RNN``).
          seq_lengths: ``(batch,)`` ints, each sequence's length, as in
            ``nn.RNN``: steps past a sequence's end are still computed (their
            outputs are not zeroed); with ``return_carry`` the carry returned is
            the one after the last valid step, and with ``reverse`` the padding
            stays at the end. One batch axis.
          return_carry, time_major, reverse, keep_order: as the attributes.
          remat: overrides the module's ``remat``.
          truncation: overrides the module's ``truncation`` (``None``: none).

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
            key = jax.random.key(0) if init_key is None else init_key
            initial_carry = self.cell.initialize_carry(key, _flax.carry_input_shape(inputs, axis))
        if self.is_initializing() and not self.cell.variables:
            # nn.RNN's lifted scan creates the broadcast parameters by calling
            # the cell once; only the shape of the step matters.
            self.cell(initial_carry, jax.lax.index_in_dim(inputs, 0, axis, keepdims=False))
        module, variables = self.cell.unbind()
        loop: dict[str, Any] = dict(remat=remat, truncation=truncation, unroll=self.unroll)

        fast = _library_params(module, variables)
        if fast is not None and _flax.fast_ok(fast[1], initial_carry, inputs, module.dtype):
            name, params = fast

            def scan_fn(carry, xs, **kw):
                return _flax.fast_scan(
                    name, params, carry, xs, batch_chunks=self.batch_chunks, **kw, **loop
                )
        else:

            def step(carry, x):
                return module.apply(variables, carry, x)

            def scan_fn(carry, xs, **kw):
                return _flax.scan_step(step, carry, xs, **kw, **loop)

        return _flax.run(
            scan_fn, inputs, initial_carry, axis=axis, n_features=n_features,
            time_major=time_major, reverse=reverse, keep_order=keep_order,
            seq_lengths=seq_lengths, return_carry=return_carry,
        )  # fmt: skip


def _check_cell(cell: Any) -> None:
    if isinstance(cell, type):
        raise TypeError(
            f"RNN(cell=...) expects a flax.linen.Module instance, got the class "
            f"{cell.__name__}; construct the cell first, e.g. nn.GRUCell(features=...)"
        )
    if not isinstance(cell, nn.Module):
        from flax import nnx

        hint = " (an nnx module: use bj.nnx.RNN)" if isinstance(cell, nnx.Module) else ""
        raise TypeError(
            f"RNN(cell=...) expects a flax.linen.Module cell, got {type(cell).__name__}{hint}"
        )


def _library_params(module: nn.Module, variables: Mapping) -> tuple[str, dict] | None:
    """The registered cell computing ``module`` and its parameters in the library's layout.

    ``("rnn" | "gru" | "lstm", params)`` with the dicts of
    :func:`bpttjax.cells.init_rnn`, :func:`~bpttjax.cells.init_gru` and
    :func:`~bpttjax.cells.init_lstm`, kernels concatenated (differentiably)
    from the cell's own; ``None`` for any other cell, non-default
    activations, or variables other than ``"params"``.
    """
    kind = type(module)
    if kind not in LINEN or set(variables) != {"params"}:
        return None
    if module.activation_fn not in _flax.FLAX_TANH:
        return None
    if kind is nn.SimpleCell:
        if module.residual:
            return None
    elif module.gate_fn not in _flax.FLAX_SIGMOID:
        return None
    name, layout = LINEN[kind]
    return name, layout(variables["params"])
