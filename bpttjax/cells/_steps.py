"""The pure recurrent steps (tanh RNN, GRU, LSTM) and their ``init_*`` functions.

The ground floor of :mod:`bpttjax.cells`: JAX, NumPy and the standard
library only. The conventions (shapes, carries, parameter layouts and
checkpoint names) are in :mod:`bpttjax.cells`'s docstring.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

__all__ = [
    "bias",
    "check_dtype",
    "check_size",
    "gru",
    "init_gru",
    "init_lstm",
    "init_rnn",
    "lstm",
    "rnn",
]

Params = dict[str, jax.Array]
Step = Callable[[Any, Any, jax.Array], tuple[Any, jax.Array]]


def bias(y: jax.Array, b: jax.Array) -> jax.Array:
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
    xw = checkpoint_name(bias(x @ W_x, b), "input_projection")
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
    n = jnp.tanh(x_n + r * bias(h_n, params["b_hn"]))
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


def check_size(fn: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{fn}({name}=...) expects a positive int, got {type(value).__name__}: {value!r}"
        )
    if value <= 0:
        raise ValueError(f"{fn}({name}=...) expects a positive int, got {value}")
    return int(value)


def check_dtype(fn: str, dtype: Any) -> jnp.dtype:
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
    """A value in the user's terms, for the error messages of the ``init_*`` functions."""
    if isinstance(x, numbers.Number) or x is None:
        return f"{type(x).__name__} {x!r}"
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"an array of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"a {type(x).__name__}"


def _init(fn: str, gates: int, key, input_size, hidden_size, dtype):
    _check_key(fn, key)
    D = check_size(fn, "input_size", input_size)
    H = check_size(fn, "hidden_size", hidden_size)
    dt = check_dtype(fn, dtype)
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
