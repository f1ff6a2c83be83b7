"""The cell registry, :class:`Cell`, and :class:`Split`: a step taken apart for fusing.

The ground floor of :mod:`bpttjax.cells`, beside the steps: JAX, NumPy and
the standard library only.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
import types
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ._steps import (
    Params,
    Step,
    bias,
    check_dtype,
    check_size,
    gru,
    init_gru,
    init_lstm,
    init_rnn,
    lstm,
    rnn,
)

__all__ = ["CELLS", "Cell", "Split", "get", "initial_carry", "register"]


def _sum_mix(xw: jax.Array, hw: jax.Array) -> jax.Array:
    return xw + hw


@dataclasses.dataclass(frozen=True)
class Split:
    """A step taken apart for the whole-sequence path (:func:`run`).

    ``step(params, carry, x) == elem(elem_args(params), carry, mix(project(params, x),
    hidden(params, carry)))``, where ``project`` and ``hidden`` are linear in
    ``params`` (``x @ W_x + b`` and ``h @ W_h``), ``mix`` is linear, and
    ``elem`` is the elementwise rest of the step. :func:`run` computes the
    gradients of the parameters that ``project`` and ``hidden`` use as large
    matrix products over many steps, outside the backward loop.

    Attributes:
      project: ``project(params, x) -> xw``, the input projection, for ``x``
        of shape ``(..., D)``.
      hidden: ``hidden(params, carry) -> hw``, the recurrent projection.
      mix: ``mix(xw, hw) -> z``, linear; ``z`` (an array or a tuple of
        them) is what the step keeps per step for its backward pass: ``xw +
        hw`` for the tanh RNN and LSTM, the reset and update gates'
        pre-activations with ``x_n`` and ``h_n`` for the GRU.
      elem: ``elem(elem_params, carry, z) -> (carry, y)``, elementwise.
      elem_params: the keys of ``params`` that ``elem`` reads (its gradient
        for them is summed inside the loop, they are small).
      bulk_vjp: optional ``bulk_vjp(params, x, carry, dz) -> (d_params,
        d_x)``, the gradients of ``sum(dz * mix(project(params, x),
        hidden(params, carry)))`` for ``x``, ``carry`` and ``dz`` stacked
        over many steps (leading axes ``(steps·batch,)`` or ``(steps,
        batch)``); ``d_params`` has every key of ``params`` (zeros for
        ``elem_params``). ``None``: they are taken with ``jax.vjp`` through
        ``mix``, which builds ``mix``'s transpose (for the GRU two
        ``T·B × 3H`` arrays) before the products; the GRU's gives each
        product its own part of ``dz``.
      output_leaf: optional index, among ``jax.tree.leaves(carry)``, of the
        leaf that ``elem`` also returns as ``y`` (the hidden state of the
        rnn, GRU and LSTM). The outputs, which the caller gets anyway, then
        stand in for that leaf's per-step residual stack, when the inputs are
        no wider than the leaf (the inputs and their gradient are rolled by
        one step, a copy of their size). :func:`run` checks in ``elem``'s
        jaxpr that its output is that very leaf, and raises ``ValueError``
        otherwise. ``None``: every carry leaf is kept.
      output_vjp: optional ``output_vjp(elem_params, carry, y, (d_carry_new,
        d_y)) -> (d_elem_params, d_carry, dz)``, the VJP of ``elem`` computed
        from its output ``y`` instead of ``z`` (the tanh RNN's ``dz = (d_h +
        d_y)(1 − y²)``). :func:`run` then keeps the outputs instead of the
        stack of ``z`` for the backward loop, which writes the ``dz`` into a
        stack of their own: the same peak memory, one stack fewer between
        the forward and the backward pass, and a write and a read of it saved
        (``docs/layers.md`` has the measurement). It must be the exact VJP of ``elem``; it is not
        checked, but ``run``'s gradient tests would show a wrong one.
    """

    project: Callable[[Params, jax.Array], jax.Array]
    hidden: Callable[[Params, Any], jax.Array]
    mix: Callable[[jax.Array, jax.Array], Any]
    elem: Callable[[Params, Any, jax.Array], tuple[Any, jax.Array]]
    elem_params: tuple[str, ...] = ()
    bulk_vjp: Callable[[Params, jax.Array, Any, Any], tuple[Params, jax.Array]] | None = None
    output_leaf: int | None = None
    output_vjp: Callable[[Params, Any, jax.Array, tuple], tuple] | None = None

    def __post_init__(self):
        for field in ("project", "hidden", "mix", "elem"):
            value = getattr(self, field)
            if not callable(value):
                raise TypeError(f"Split({field}=...) expects a callable, got {value!r}")
        for field in ("bulk_vjp", "output_vjp"):
            value = getattr(self, field)
            if value is not None and not callable(value):
                raise TypeError(f"Split({field}=...) expects None or a callable, got {value!r}")
        k = self.output_leaf
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise TypeError(
                f"Split(output_leaf=...) expects None or the index (an int >= 0) of a carry leaf, "
                f"got {k!r}"
            )

    def elem_args(self, params: Params) -> Params:
        """The part of ``params`` that ``elem`` reads."""
        return {k: params[k] for k in self.elem_params}

    def add_elem_grads(self, grads: Params, elem_grads: Params) -> Params:
        """``grads`` with ``elem``'s parameter gradients added in."""
        return {k: grads[k] + elem_grads[k] if k in elem_grads else grads[k] for k in grads}


def _rnn_elem(_, h, z):
    h_new = jnp.tanh(z)
    return h_new, h_new


def _rnn_output_vjp(_, h, h_new, cotangents):
    # tanh' from tanh's output: z itself is not needed
    d_carry, d_y = cotangents
    return {}, jnp.zeros_like(h), (d_carry + d_y) * (1 - h_new * h_new)


def _gru_mix(xw, hw):
    # (r and z pre-activations, x_n, h_n) as three arrays: no per-step concatenation
    H = hw.shape[-1] // 3
    return xw[..., : 2 * H] + hw[..., : 2 * H], xw[..., 2 * H :], hw[..., 2 * H :]


def _gru_bulk_vjp(p, x, h, dz):
    # the transpose of _gru_mix taken one part of dz at a time: each kernel's
    # gradient is two products with its column blocks, no T·B × 3H arrays
    d_a, d_xn, d_hn = dz
    cut = d_a.shape[-1]

    def blocks(a):
        return a[..., :cut], a[..., cut:]

    def linear(Wx_a, Wx_n, bx_a, bx_n, Wh_a, Wh_n, x):
        return bias(x @ Wx_a, bx_a) + h @ Wh_a, bias(x @ Wx_n, bx_n), h @ Wh_n

    args = (*blocks(p["W_x"]), *blocks(p["b_x"]), *blocks(p["W_h"]), x)
    _, vjp = jax.vjp(linear, *args)
    dWx_a, dWx_n, dbx_a, dbx_n, dWh_a, dWh_n, d_x = vjp((d_a, d_xn, d_hn))
    grads = {
        "W_x": jnp.concatenate([dWx_a, dWx_n], axis=-1),
        "b_x": jnp.concatenate([dbx_a, dbx_n], axis=-1),
        "W_h": jnp.concatenate([dWh_a, dWh_n], axis=-1),
        "b_hn": jnp.zeros_like(p["b_hn"]),
    }
    return grads, d_x


def _gru_elem(p, h, z):
    a, x_n, h_n = z
    r, u = jnp.split(jax.nn.sigmoid(a), 2, axis=-1)
    n = jnp.tanh(x_n + r * bias(h_n, p["b_hn"]))
    h_new = (1.0 - u) * n + u * h
    return h_new, h_new


def _lstm_elem(_, carry, z):
    h, c = carry
    i, f, g, o = jnp.split(z, 4, axis=-1)
    c_new = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h_new = jax.nn.sigmoid(o) * jnp.tanh(c_new)
    return (h_new, c_new), h_new


RNN_SPLIT = Split(
    project=lambda p, x: bias(x @ p["W_xh"], p["b_h"]),
    hidden=lambda p, h: h @ p["W_hh"],
    mix=_sum_mix,
    elem=_rnn_elem,
    output_leaf=0,
    output_vjp=_rnn_output_vjp,
)
GRU_SPLIT = Split(
    project=lambda p, x: bias(x @ p["W_x"], p["b_x"]),
    hidden=lambda p, h: h @ p["W_h"],
    mix=_gru_mix,
    elem=_gru_elem,
    elem_params=("b_hn",),
    bulk_vjp=_gru_bulk_vjp,
    output_leaf=0,
)
LSTM_SPLIT = Split(
    project=lambda p, x: bias(x @ p["W_x"], p["b"]),
    hidden=lambda p, carry: carry[0] @ p["W_h"],
    mix=_sum_mix,
    elem=_lstm_elem,
    output_leaf=0,
)


@dataclasses.dataclass(frozen=True)
class Cell:
    """A recurrent cell as the registry holds it: its step, its parameters, its carry.

    Attributes:
      name: the registry name (``"rnn"``, ``"gru"``, ``"lstm"``), as the
        experiment scripts' ``--cell`` options take it.
      step: ``step(params, carry, x) -> (carry, h)``; the output ``h`` is the
        new hidden state, shape ``(..., hidden_size)``.
      init: ``init(key, input_size, hidden_size, dtype=jnp.float32) -> params``.
      carry_arrays: how many ``(..., hidden_size)`` arrays the carry holds:
        1 for a bare ``h``, ``k > 1`` for a tuple (the LSTM's ``(h, c)``).
      gates: blocks of ``hidden_size`` in each projection (1, 3 and 4 for rnn,
        gru and lstm), for cost estimates.
      split: the step taken apart (:class:`Split`) for :func:`run`'s
        whole-sequence path; ``None`` runs the step as it is.

    Example:
      >>> cell = bj.cells.get("gru")
      >>> params = cell.init(jax.random.key(0), 8, 16)
      >>> carry, h = cell.step(params, cell.initial_carry(16, (4,)), jnp.ones((4, 8)))
    """

    name: str
    step: Step
    init: Callable[..., Params]
    carry_arrays: int = 1
    gates: int = 1
    split: Split | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                f"Cell(name=...) expects a lower-case identifier such as 'gru', got {self.name!r}"
            )
        for field in ("step", "init"):
            if not callable(getattr(self, field)):
                value = getattr(self, field)
                raise TypeError(f"Cell({field}=...) expects a callable, got {value!r}")
        for field in ("carry_arrays", "gates"):
            check_size("Cell", field, getattr(self, field))
        if self.split is not None and not isinstance(self.split, Split):
            raise TypeError(f"Cell(split=...) expects None or a bj.cells.Split, got {self.split!r}")

    def initial_carry(
        self, hidden_size: int, batch_shape: tuple[int, ...] = (), dtype: Any = jnp.float32
    ) -> Any:
        """Zeros for this cell's carry; arguments as :func:`initial_carry`."""
        return initial_carry(self, hidden_size, batch_shape, dtype)


_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_REGISTRY: dict[str, Cell] = {}

CELLS: Mapping[str, Cell] = types.MappingProxyType(_REGISTRY)
"""The registered cells by name (read-only): ``rnn``, ``gru``, ``lstm``, then
any added with :func:`register`. Scripts, tests and ``--cell`` options read it."""


def register(cell: Cell) -> Cell:
    """Add ``cell`` to :data:`CELLS` under ``cell.name``; returns it.

    Raises:
      TypeError: ``cell`` is not a :class:`Cell`.
      ValueError: another cell has that name.
    """
    if not isinstance(cell, Cell):
        raise TypeError(f"register(cell=...) expects a bj.cells.Cell, got {type(cell).__name__}")
    taken = _REGISTRY.get(cell.name)
    if taken is not None and taken != cell:
        raise ValueError(f"register: a different cell is already named {cell.name!r}")
    _REGISTRY[cell.name] = cell
    return cell


def get(name: str | Cell) -> Cell:
    """The registered :class:`Cell` called ``name`` (a ``Cell`` is returned as is).

    Raises:
      ValueError: no cell has that name; the message lists those that exist.
    """
    if isinstance(name, Cell):
        return name
    cell = _REGISTRY.get(name) if isinstance(name, str) else None
    if cell is None:
        raise ValueError(f"unknown cell {name!r}; registered cells: {', '.join(_REGISTRY)}")
    return cell


register(Cell("rnn", rnn, init_rnn, carry_arrays=1, gates=1, split=RNN_SPLIT))
register(Cell("gru", gru, init_gru, carry_arrays=1, gates=3, split=GRU_SPLIT))
register(Cell("lstm", lstm, init_lstm, carry_arrays=2, gates=4, split=LSTM_SPLIT))


def initial_carry(
    kind: str | Cell, hidden_size: int, batch_shape: tuple[int, ...] = (), dtype: Any = jnp.float32
) -> Any:
    """Zero initial carry for a registered cell (:func:`rnn`, :func:`gru`, :func:`lstm`...).

    Args:
      kind: a name in :data:`CELLS` (``"rnn"``, ``"gru"``, ``"lstm"``) or a
        :class:`Cell`.
      hidden_size: ``H``, a positive int.
      batch_shape: leading batch dimensions, a tuple of non-negative ints.
      dtype: a floating dtype; it must match the parameters' dtype.

    Returns:
      zeros of shape ``(*batch_shape, H)``; for a cell with ``carry_arrays =
      k > 1`` (``"lstm"``: ``(h, c)``) a tuple of ``k`` of them.

    Raises:
      ValueError: unknown ``kind``, or a non-positive ``hidden_size``.
      TypeError: ``hidden_size`` or ``batch_shape`` has the wrong type, or
        ``dtype`` is not floating.
    """
    cell = _REGISTRY.get(kind) if isinstance(kind, str) else kind
    if not isinstance(cell, Cell):
        raise ValueError(
            f"initial_carry(kind=...) expects one of {sorted(_REGISTRY)}, got {kind!r}"
        )
    H = check_size("initial_carry", "hidden_size", hidden_size)
    dt = check_dtype("initial_carry", dtype)
    batch: Any = batch_shape  # one int is taken as one batch dimension
    if isinstance(batch, numbers.Integral) and not isinstance(batch, bool):
        batch = (batch,)
    if not isinstance(batch, tuple | list) or not all(
        isinstance(n, numbers.Integral) and not isinstance(n, bool) and int(n) >= 0 for n in batch
    ):
        raise TypeError(
            f"initial_carry(batch_shape=...) expects a tuple of non-negative ints, got {batch!r}"
        )
    shape = (*(int(n) for n in batch), H)
    if cell.carry_arrays == 1:
        return jnp.zeros(shape, dt)
    return tuple(jnp.zeros(shape, dt) for _ in range(cell.carry_arrays))
