"""Pure recurrent steps (tanh RNN, GRU, LSTM) and adapters for Flax cells.

Every step has the signature ``step(params, carry, x) -> (carry, y)``, so
``functools.partial(step, params)`` is an ``f(carry, x)`` for
:func:`bpttjax.scan` or ``jax.lax.scan``, and ``jax.grad`` with respect to
``params`` is BPTT. ``x`` has shape ``(..., input_size)`` and every carry
array ``(..., hidden_size)``, with any number of leading batch dimensions
(none included); ``x`` and the carry must have the same number of them.

Carries:

- ``rnn`` and ``gru``: ``h``.
- ``lstm``: ``(h, c)``, hidden state first (d2l's order). Flax's
  ``LSTMCell`` uses ``(c, h)``; :func:`from_nnx` and :func:`from_linen` keep
  Flax's own convention.

Parameters are plain dicts of arrays, gates concatenated along the last axis
so that each step does exactly one input matmul and one hidden matmul:

- ``rnn``: ``W_xh (D, H)``, ``W_hh (H, H)``, ``b_h (H,)``.
- ``gru``: ``W_x (D, 3H)``, ``W_h (H, 3H)``, ``b_x (3H,)``, ``b_hn (H,)``;
  gate order ``r, z, n``.
- ``lstm``: ``W_x (D, 4H)``, ``W_h (H, 4H)``, ``b (4H,)``; gate order
  ``i, f, g, o``.

Checkpoint names (for ``jax.checkpoint_policies.save_only_these_names`` and
friends, e.g. ``bj.EveryStep(policy=...)``):

- ``"input_projection"``: ``x @ W_x + b``, shape ``(..., k·H)`` with
  ``k = 1, 3, 4`` for rnn, gru, lstm. It does not depend on the carry.
- ``"hidden_projection"``: ``h @ W_h`` (without biases), same shape.

Saving ``"hidden_projection"`` removes the recurrent matmul from the
recomputation at the cost of ``k·H`` numbers per step and batch element.

Costs in the docstrings count ``B`` (the product of the batch dimensions)
and, for memory, the residuals plain BPTT (``bj.StoreAll()``) keeps per step
as JAX traces them, before XLA's own optimizations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import numbers
import re
import types
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from . import _autotune

__all__ = [
    "CELLS",
    "Cell",
    "get",
    "register",
    "rnn",
    "gru",
    "lstm",
    "init_rnn",
    "init_gru",
    "init_lstm",
    "initial_carry",
    "run",
    "choose_batch_chunks",
    "Split",
    "from_nnx",
    "from_linen",
]

Params = dict[str, jax.Array]
Step = Callable[[Any, Any, jax.Array], tuple[Any, jax.Array]]


def _bias(y: jax.Array, b: jax.Array) -> jax.Array:
    # Explicit reshape: implicit rank promotion is an error in strict mode.
    return y + jnp.reshape(b, (1,) * (y.ndim - 1) + b.shape)


def _project(cell: str, x: jax.Array, h: jax.Array, W_x, W_h, b):
    """Both projections, named for remat policies, after checking shapes."""
    x, h = jnp.asarray(x), jnp.asarray(h)
    if x.shape[-1:] != W_x.shape[:1]:
        raise ValueError(
            f"{cell}: x must have shape (..., {W_x.shape[0]}) to match the input kernel, "
            f"got {x.shape}"
        )
    if h.shape[-1:] != W_h.shape[:1]:
        raise ValueError(
            f"{cell}: the hidden state must have shape (..., {W_h.shape[0]}), got {h.shape}"
        )
    if x.ndim != h.ndim:
        raise ValueError(
            f"{cell}: x {x.shape} and the hidden state {h.shape} must have the same "
            "batch dimensions"
        )
    xw = checkpoint_name(_bias(x @ W_x, b), "input_projection")
    hw = checkpoint_name(h @ W_h, "hidden_projection")
    return xw, hw


def rnn(params: Params, h: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One step of the tanh RNN: ``h' = tanh(x W_xh + h W_hh + b_h)``, ``y = h'``.

    Args:
      params: ``{"W_xh": (D, H), "W_hh": (H, H), "b_h": (H,)}``, see
        :func:`init_rnn`.
      h: hidden state, shape ``(..., H)``.
      x: input, shape ``(..., D)``.

    Returns:
      ``(h', h')``, each of shape ``(..., H)``.

    Cost: ``2·B·H·(D + H)`` flops; plain BPTT keeps ``3·B·H`` numbers per step
    (the carry, ``h'`` and ``1 - h'²``).

    Example:
      >>> params = init_rnn(jax.random.key(0), 8, 16)
      >>> h0 = initial_carry("rnn", 16, batch_shape=(4,))
      >>> h_T, hs = bj.scan(functools.partial(rnn, params), h0, xs)  # xs: (T, 4, 8)

    Reference: d2l.ai, section 9.4,
    https://d2l.ai/chapter_recurrent-neural-networks/rnn.html
    """
    xw, hw = _project("rnn", x, h, params["W_xh"], params["W_hh"], params["b_h"])
    h_new = jnp.tanh(xw + hw)
    return h_new, h_new


def gru(params: Params, h: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One step of a GRU, in the formulation of Flax's ``GRUCell`` (and cuDNN)::

        r  = sigmoid(W_ir x + b_ir + W_hr h)
        z  = sigmoid(W_iz x + b_iz + W_hz h)
        n  = tanh(W_in x + b_in + r * (W_hn h + b_hn))
        h' = (1 - z) * n + z * h,    y = h'

    The reset gate multiplies the *projected* hidden state, so all three
    hidden projections come from one matmul ``h @ W_h`` that does not wait for
    ``r``. d2l (section 10.2, https://d2l.ai/chapter_recurrent-modern/gru.html)
    applies the reset gate before the matmul,
    ``n = tanh(W_xh x + W_hh (r * h) + b_h)``: a different model with the same
    parameter shapes, whose candidate needs a second, sequential matmul.

    Args:
      params: ``{"W_x": (D, 3H), "W_h": (H, 3H), "b_x": (3H,), "b_hn": (H,)}``,
        gates in the order ``r, z, n``; see :func:`init_gru`.
      h: hidden state, shape ``(..., H)``.
      x: input, shape ``(..., D)``.

    Returns:
      ``(h', h')``, each of shape ``(..., H)``.

    Cost: ``6·B·H·(D + H)`` flops; plain BPTT keeps ``9·B·H`` numbers per step.

    Warning:
      ``flax.nnx.GRUCell`` (Flax 0.12) has no ``b_hn`` although its docstring
      shows one; ``flax.linen.GRUCell`` has it. An nnx cell is this step with
      ``b_hn = 0``.

    Example:
      >>> params = init_gru(jax.random.key(0), 8, 16)
      >>> h_T, hs = bj.scan(functools.partial(gru, params), h0, xs)
    """
    xw, hw = _project("gru", x, h, params["W_x"], params["W_h"], params["b_x"])
    x_r, x_z, x_n = jnp.split(xw, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(hw, 3, axis=-1)
    r = jax.nn.sigmoid(x_r + h_r)
    z = jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * _bias(h_n, params["b_hn"]))
    h_new = (1.0 - z) * n + z * h
    return h_new, h_new


def lstm(
    params: Params, carry: tuple[jax.Array, jax.Array], x: jax.Array
) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """One step of an LSTM, the math of Flax's ``LSTMCell`` (no peepholes)::

        i, f, o = sigmoid(W_x[i, f, o] x + W_h[i, f, o] h + b[i, f, o])
        g  = tanh(W_xg x + W_hg h + b_g)
        c' = f * c + i * g
        h' = o * tanh(c'),    y = h'

    Flax puts the single bias on the hidden projection; here it is added to
    the input projection (the sum is the same), so that the carry-independent
    part of each step is one named value.

    Args:
      params: ``{"W_x": (D, 4H), "W_h": (H, 4H), "b": (4H,)}``, gates in the
        order ``i, f, g, o``; see :func:`init_lstm`.
      carry: ``(h, c)``, hidden state first, each of shape ``(..., H)``
        (Flax's cells use ``(c, h)``).
      x: input, shape ``(..., D)``.

    Returns:
      ``((h', c'), h')``.

    Cost: ``8·B·H·(D + H)`` flops; plain BPTT keeps ``12·B·H`` numbers per step.

    Example:
      >>> params = init_lstm(jax.random.key(0), 8, 16)
      >>> carry0 = initial_carry("lstm", 16, batch_shape=(4,))  # (h, c)
      >>> (h_T, c_T), hs = bj.scan(functools.partial(lstm, params), carry0, xs)

    Reference: Hochreiter & Schmidhuber (1997),
    https://doi.org/10.1162/neco.1997.9.8.1735; d2l.ai, section 10.1,
    https://d2l.ai/chapter_recurrent-modern/lstm.html
    """
    if not isinstance(carry, tuple | list) or len(carry) != 2:
        raise TypeError(f"lstm: carry must be a pair (h, c), got {type(carry).__name__}")
    h, c = carry
    xw, hw = _project("lstm", x, h, params["W_x"], params["W_h"], params["b"])
    i, f, g, o = jnp.split(xw + hw, 4, axis=-1)
    c_new = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h_new = jax.nn.sigmoid(o) * jnp.tanh(c_new)
    return (h_new, c_new), h_new


def _check_size(fn: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{fn}({name}=...) expects a positive int, got {type(value).__name__}: {value!r}"
        )
    if value <= 0:
        raise ValueError(f"{fn}({name}=...) expects a positive int, got {value}")
    return int(value)


def _check_dtype(fn: str, dtype: Any) -> jnp.dtype:
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(
            f"{fn}(dtype=...) expects a floating dtype such as jnp.float32, got {dtype!r}"
        )
    return dt


def _check_key(fn: str, key: Any) -> None:
    """``key`` must be one PRNG key: ``jax.random.key(seed)`` or a legacy ``PRNGKey``."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if np.ndim(key) != 0:
            raise ValueError(
                f"{fn}(key=...) expects a single PRNG key, got a key array of shape "
                f"{np.shape(key)}; call {fn} once per key (or jax.vmap it)"
            )
        return
    if isinstance(key, jax.Array | np.ndarray) and dtype == np.uint32 and np.ndim(key) == 1:
        return  # a legacy raw key, jax.random.PRNGKey(seed)
    seed = key if isinstance(key, numbers.Integral) and not isinstance(key, bool) else "seed"
    raise TypeError(
        f"{fn}(key=...) expects a PRNG key, e.g. jax.random.key({seed}), not a seed or other "
        f"value; got {_describe(key)}"
    )


def _describe(x: Any) -> str:
    from . import _scan

    return f"{type(x).__name__} {x!r}" if isinstance(x, numbers.Number) else _scan._describe(x)


def _init(fn: str, gates: int, key, input_size, hidden_size, dtype):
    _check_key(fn, key)
    D = _check_size(fn, "input_size", input_size)
    H = _check_size(fn, "hidden_size", hidden_size)
    dt = _check_dtype(fn, dtype)
    k_x, k_h = jax.random.split(key)
    W_x = jax.nn.initializers.lecun_normal()(k_x, (D, gates * H), dt)
    # One orthogonal matrix per gate, as Flax's per-gate recurrent kernels.
    ortho = jax.nn.initializers.orthogonal()
    W_h = jnp.concatenate([ortho(k, (H, H), dt) for k in jax.random.split(k_h, gates)], axis=1)
    return W_x, W_h, jnp.zeros((gates * H,), dt), H


def init_rnn(key: jax.Array, input_size: int, hidden_size: int, dtype: Any = jnp.float32) -> Params:
    """Parameters for :func:`rnn`: lecun-normal ``W_xh``, orthogonal ``W_hh``, zero bias.

    Args:
      key: a PRNG key, ``jax.random.key(seed)`` (a legacy ``jax.random.PRNGKey``
        works too).
      input_size: ``D``, a positive int.
      hidden_size: ``H``, a positive int.
      dtype: a floating dtype for every array.

    Returns:
      ``{"W_xh": (D, H), "W_hh": (H, H), "b_h": (H,)}``.

    Raises:
      TypeError: ``key`` is not a PRNG key (an int seed: pass
        ``jax.random.key(seed)``), a size is not an int, or ``dtype`` is not
        floating.
      ValueError: a size is not positive, or ``key`` is an array of several keys.
    """
    W_x, W_h, b, _ = _init("init_rnn", 1, key, input_size, hidden_size, dtype)
    return {"W_xh": W_x, "W_hh": W_h, "b_h": b}


def init_gru(key: jax.Array, input_size: int, hidden_size: int, dtype: Any = jnp.float32) -> Params:
    """Parameters for :func:`gru`, initialized like Flax's ``GRUCell``.

    Lecun-normal ``W_x``, one orthogonal ``(H, H)`` block per gate in ``W_h``,
    zero biases. Arguments and errors as :func:`init_rnn`.

    Returns:
      ``{"W_x": (D, 3H), "W_h": (H, 3H), "b_x": (3H,), "b_hn": (H,)}``, gates
      ``r, z, n``.
    """
    W_x, W_h, b, H = _init("init_gru", 3, key, input_size, hidden_size, dtype)
    return {"W_x": W_x, "W_h": W_h, "b_x": b, "b_hn": jnp.zeros((H,), b.dtype)}


def init_lstm(
    key: jax.Array, input_size: int, hidden_size: int, dtype: Any = jnp.float32
) -> Params:
    """Parameters for :func:`lstm`, initialized like Flax's ``LSTMCell``.

    Lecun-normal ``W_x``, one orthogonal ``(H, H)`` block per gate in ``W_h``,
    zero bias (a forget-gate bias of 1 is a common alternative: set
    ``params["b"][H:2 * H]``). Arguments and errors as :func:`init_rnn`.

    Returns:
      ``{"W_x": (D, 4H), "W_h": (H, 4H), "b": (4H,)}``, gates ``i, f, g, o``.
    """
    W_x, W_h, b, _ = _init("init_lstm", 4, key, input_size, hidden_size, dtype)
    return {"W_x": W_x, "W_h": W_h, "b": b}


# --- the whole-sequence path --------------------------------------------------------------


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
        ``T·B × 3H`` arrays, 98 MB each at the benchmark size) before the
        products; the GRU's gives each product its own part of ``dz``.
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
        (the tanh RNN's gradient 4.5% and 9% faster in two A/B runs at the
        benchmark size). It must be the exact VJP of ``elem``; it is not
        checked, but ``run``'s gradient tests would show a wrong one.
    """

    project: Callable[[Params, jax.Array], jax.Array]
    hidden: Callable[[Params, Any], jax.Array]
    mix: Callable[[jax.Array, jax.Array], jax.Array]
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
        return _bias(x @ Wx_a, bx_a) + h @ Wh_a, _bias(x @ Wx_n, bx_n), h @ Wh_n

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
    n = jnp.tanh(x_n + r * _bias(h_n, p["b_hn"]))
    h_new = (1.0 - u) * n + u * h
    return h_new, h_new


def _lstm_elem(_, carry, z):
    h, c = carry
    i, f, g, o = jnp.split(z, 4, axis=-1)
    c_new = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h_new = jax.nn.sigmoid(o) * jnp.tanh(c_new)
    return (h_new, c_new), h_new


RNN_SPLIT = Split(
    project=lambda p, x: _bias(x @ p["W_xh"], p["b_h"]),
    hidden=lambda p, h: h @ p["W_hh"],
    mix=_sum_mix,
    elem=_rnn_elem,
    output_leaf=0,
    output_vjp=_rnn_output_vjp,
)
GRU_SPLIT = Split(
    project=lambda p, x: _bias(x @ p["W_x"], p["b_x"]),
    hidden=lambda p, h: h @ p["W_h"],
    mix=_gru_mix,
    elem=_gru_elem,
    elem_params=("b_hn",),
    bulk_vjp=_gru_bulk_vjp,
    output_leaf=0,
)
LSTM_SPLIT = Split(
    project=lambda p, x: _bias(x @ p["W_x"], p["b"]),
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
            _check_size("Cell", field, getattr(self, field))
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
    H = _check_size("initial_carry", "hidden_size", hidden_size)
    dt = _check_dtype("initial_carry", dtype)
    if isinstance(batch_shape, numbers.Integral) and not isinstance(batch_shape, bool):
        batch_shape = (batch_shape,)
    if not isinstance(batch_shape, tuple | list) or not all(
        isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 0 for n in batch_shape
    ):
        raise TypeError(
            "initial_carry(batch_shape=...) expects a tuple of non-negative ints, "
            f"got {batch_shape!r}"
        )
    shape = (*(int(n) for n in batch_shape), H)
    if cell.carry_arrays == 1:
        return jnp.zeros(shape, dt)
    return tuple(jnp.zeros(shape, dt) for _ in range(cell.carry_arrays))


def run(
    cell: str | Cell,
    params: Params,
    carry: Any,
    xs: jax.Array,
    *,
    remat: Any = None,
    truncation: Any = None,
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
        steps in one product before the loop. On a 2-core CPU this was
        slower for the GRU and LSTM (their ``3H``/``4H`` projected values
        per step are far more memory traffic than the ``D`` inputs), so it is
        off by default; the inputs' and ``W_x``'s gradients are one product
        either way.
      batch_chunks: run each step as this many independent chains, one per
        group of batch rows (the rows' recurrences do not interact), inside
        the same loop. XLA's CPU runtime runs independent operations
        concurrently, so one group's gates and activations run beside
        another's instead of after them. Whether that pays depends on the
        sizes and the machine: on a 2-core CPU, 2 made the gradient 2-6%,
        6-9% and 11-21% faster for rnn, gru and lstm at ``B = 32, H = 256``,
        but up to 48% slower at ``B = 4``, and up to 24% slower for the GRU
        and LSTM at ``B = 256, H = 128`` (``docs/layers.md`` has the table).
        So by default (``"auto"``) it is chosen by timing, once per layer
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
    from . import _scan
    from .remat import RematStrategy, StoreAll
    from .truncation import TruncationStrategy

    cell = get(cell)
    remat = StoreAll() if remat is None else remat
    _scan._check_strategy("remat", remat, RematStrategy, _scan._REMAT_EXAMPLES)
    if truncation is not None:
        _scan._check_strategy(
            "truncation", truncation, TruncationStrategy, _scan._TRUNCATION_EXAMPLES
        )
    batch_chunks = _check_chunks("run", batch_chunks)
    _check_xs("run", carry, xs)
    check_length = getattr(remat, "_check", None)  # Nested's lengths against T, untraced
    if check_length is not None:
        check_length(np.shape(xs)[0])
    kw = dict(reverse=reverse, unroll=unroll, truncation=truncation)
    layer = _layer("run", cell, params, carry, xs, hoist=hoist, **kw)
    if layer is None:
        with _params_checked("run", cell, params):
            return _scan.scan(functools.partial(cell.step, params), carry, xs, remat=remat, **kw)
    if batch_chunks == "auto":
        batch_chunks = _autotune.choose(layer, carry)
    return remat.scan_layer(dataclasses.replace(layer, chunks=batch_chunks), carry)


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
    truncation: Any = None,
) -> Any:
    """``fn``'s fused :class:`~bpttjax._fused.Layer` (one chain), its arguments checked;
    ``None`` where ``cell`` has no :class:`Split` or ``xs`` no steps."""
    from . import _fused, _scan
    from .remat import StoreAll

    if not isinstance(hoist, bool):
        raise TypeError(f"{fn}(hoist=...) expects True or False, got {hoist!r}")
    _check_xs(fn, carry, xs)
    if cell.split is None or xs.shape[0] == 0:
        return None
    # Everything bj.scan checks, checked by tracing its step once (shapes, carry, options).
    step = functools.partial(cell.step, params)
    kw = dict(reverse=reverse, unroll=unroll, truncation=truncation)
    with _params_checked(fn, cell, params):
        jax.eval_shape(lambda c, x: _scan.scan(step, c, x, remat=StoreAll(), **kw), carry, xs)
    return _fused.Layer(
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
    from . import _scan

    if not isinstance(xs, jax.Array | np.ndarray) or np.ndim(xs) < 2:
        raise ValueError(
            f"{fn}(xs=...) expects an array of shape (T, ..., input_size), "
            f"got {_scan._describe(xs)}"
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
        owners = [c.name for c in _REGISTRY.values() if c is not cell and _param_keys(c) == got]
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


def _check_chunks(fn: str, batch_chunks: Any) -> int | str:
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

    On a CPU backend with one device and at least two cores, for a batch of
    at least 16 rows shared by ``carry`` and ``xs``: the gradient of
    ``run`` over its first steps (128, or fewer where a step is large: about
    8 GFLOP in all, at least 16 steps) is compiled with 1 and with 2 chains,
    called in turn a few times (at least 3 each, up to 15, about a second in
    all), and 2 is kept if its fastest call took under 97% of 1's. The answer
    is cached for the layer's shapes, dtypes and options, so a layer is timed
    once per process. Everywhere else the answer is 1, without timing.

    Call it once and pass the result to ``run`` to fix the choice (timings
    vary between runs near the 97% line, and 1 and 2 chains may round
    differently in the last bit).

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
    return _autotune.choose(layer, carry)


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
