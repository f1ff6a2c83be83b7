"""d2l's explicit BPTT formulas for the linear RNN, in NumPy float64.

Section 9.7.2 of "Dive into Deep Learning" (Zhang, Lipton, Li & Smola,
https://d2l.ai/chapter_recurrent-neural-networks/bptt.html) works
out backpropagation through time by hand for the simplest recurrent model: no
biases and the identity as activation,

    h_t = W_hx x_t + W_hh h_{t-1},    o_t = W_qh h_t,      (d2l eq. 9.7.9)
    L   = (1/T) Σ_{t=1..T} l(o_t, y_t).                    (d2l eq. 9.7.10)

This module writes those formulas down directly, with NumPy and float64 and no
JAX at all, so that it is an *independent* check of ``jax.grad`` through
``bpttjax.scan`` under every rematerialization strategy (with
``truncation=None``: a truncation changes the gradient on purpose). When both
agree to ~1e-10 in float64, neither the autodiff of the scan nor a remat
schedule has dropped or double-counted a term. It is a reference, not a fast
path: plain Python loops over time.

Conventions. The maths is column-vector maths as in d2l; arrays put time
first: ``xs`` is ``(T, d)`` and row ``t-1`` is ``x_t``; ``hs`` is ``(T, h)``
and holds ``h_1 … h_T`` (``h_0`` is passed separately, default zeros).
Weights are ``W_hx: (h, d)``, ``W_hh: (h, h)``, ``W_qh: (q, h)``.
Equation numbers refer to d2l 1.0 (labels ``eq_bptt_partial_L_ot``,
``eq_bptt_partial_L_hT_final_step``, ``eq_bptt_partial_L_ht_recur``,
``eq_bptt_partial_L_ht`` in its source).

Every input is converted to float64 and its shape checked against the others
at the boundary; a mismatch raises ``ValueError`` naming the argument.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "LinearRNNGrads",
    "linear_rnn_forward",
    "linear_rnn_grads",
    "dL_dh_expanded",
    "linear_rnn_squared_loss",
]


class LinearRNNGrads(NamedTuple):
    """Gradients of ``L = (1/T) Σ_t l(o_t, y_t)`` for the linear RNN.

    Attributes:
      dL_dh: ``(T, h)``; row ``t-1`` is ``∂L/∂h_t``, the total derivative
        through ``o_t`` and every later step (eq. 9.7.13-9.7.14).
      dL_dW_qh: ``(q, h)``, ``Σ_t ∂L/∂o_t h_tᵀ`` (eq. 9.7.12).
      dL_dW_hx: ``(h, d)``, ``Σ_t ∂L/∂h_t x_tᵀ`` (eq. 9.7.16).
      dL_dW_hh: ``(h, h)``, ``Σ_t ∂L/∂h_t h_{t-1}ᵀ`` (eq. 9.7.16).
      dL_dh0: ``(h,)``, ``W_hhᵀ ∂L/∂h_1``, the gradient w.r.t. the initial state.
    """

    dL_dh: np.ndarray
    dL_dW_qh: np.ndarray
    dL_dW_hx: np.ndarray
    dL_dW_hh: np.ndarray
    dL_dh0: np.ndarray


def linear_rnn_forward(
    W_hx: ArrayLike,
    W_hh: ArrayLike,
    W_qh: ArrayLike,
    xs: ArrayLike,
    h0: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run the linear RNN of d2l eq. 9.7.9 forward.

    Args:
      W_hx: ``(h, d)`` input-to-hidden weights.
      W_hh: ``(h, h)`` hidden-to-hidden weights.
      W_qh: ``(q, h)`` hidden-to-output weights.
      xs: ``(T, d)`` inputs, ``T >= 1``; row ``t-1`` is ``x_t``.
      h0: ``(h,)`` initial state; ``None`` means zeros.

    Returns:
      ``(hs, os)``: ``hs`` is ``(T, h)`` with ``h_1 … h_T``, ``os`` is
      ``(T, q)`` with ``o_1 … o_T``, both float64.

    Cost: ``O(T·(h·d + h² + q·h))`` time, ``O(T·(h + q))`` memory.

    Example:
      >>> hs, os = linear_rnn_forward(W_hx, W_hh, W_qh, xs)
    """
    W_hx, W_hh, W_qh, xs, h0, _ = _validate("linear_rnn_forward", W_hx, W_hh, W_qh, xs, h0)
    hs = _run(W_hx, W_hh, xs, h0)
    return hs, hs @ W_qh.T


def linear_rnn_grads(
    W_hx: ArrayLike,
    W_hh: ArrayLike,
    W_qh: ArrayLike,
    xs: ArrayLike,
    dl_do: ArrayLike,
    h0: ArrayLike | None = None,
) -> LinearRNNGrads:
    """Gradients of ``L = (1/T) Σ_t l(o_t, y_t)`` by d2l's BPTT recursion.

    The per-step loss enters only through its output gradient ``∂l/∂o_t``,
    so any differentiable ``l`` works: evaluate ``∂l/∂o_t`` at the outputs of
    :func:`linear_rnn_forward` and pass it as ``dl_do``. Then, following d2l:

    * ``∂L/∂o_t = (1/T) ∂l/∂o_t``                                   (9.7.11)
    * ``∂L/∂W_qh = Σ_t ∂L/∂o_t h_tᵀ``                               (9.7.12)
    * ``∂L/∂h_T = W_qhᵀ ∂L/∂o_T``                                   (9.7.13)
    * ``∂L/∂h_t = W_hhᵀ ∂L/∂h_{t+1} + W_qhᵀ ∂L/∂o_t`` for ``t < T``  (9.7.14)
    * ``∂L/∂W_hx = Σ_t ∂L/∂h_t x_tᵀ``, ``∂L/∂W_hh = Σ_t ∂L/∂h_t h_{t-1}ᵀ``
      (9.7.16), and ``∂L/∂h_0 = W_hhᵀ ∂L/∂h_1`` (not in d2l, which fixes
      ``h_0``; it is the same chain rule one step further).

    Args:
      W_hx, W_hh, W_qh, xs, h0: as in :func:`linear_rnn_forward`.
      dl_do: ``(T, q)``; row ``t-1`` is ``∂l(o_t, y_t)/∂o_t``, *without* the
        ``1/T`` factor (this function applies it).

    Returns:
      :class:`LinearRNNGrads`, all float64.

    Cost: one forward and one backward sweep, ``O(T·(h·d + h² + q·h))`` time;
    stores ``hs`` and ``∂L/∂h``, ``O(T·h)`` memory.

    Example:
      >>> hs, os = linear_rnn_forward(W_hx, W_hh, W_qh, xs)
      >>> g = linear_rnn_grads(W_hx, W_hh, W_qh, xs, os - ys)
      >>> g.dL_dW_hh.shape
      (5, 5)
    """
    fn = "linear_rnn_grads"
    W_hx, W_hh, W_qh, xs, h0, dims = _validate(fn, W_hx, W_hh, W_qh, xs, h0)
    dl_do = _checked(fn, "dl_do", dl_do, ("T", "q"), dims)
    return _grads(W_hx, W_hh, W_qh, xs, h0, dl_do)


def dL_dh_expanded(W_hh: ArrayLike, W_qh: ArrayLike, dL_do: ArrayLike) -> np.ndarray:
    """``∂L/∂h_t`` for every ``t`` from d2l's closed form, eq. 9.7.15.

    Unrolling the recursion 9.7.13-9.7.14 gives

        ∂L/∂h_t = Σ_{i=t..T} (W_hhᵀ)^{T-i} W_qhᵀ ∂L/∂o_{T+t-i},

    i.e. the output gradient of step ``j >= t`` reaches ``h_t`` multiplied by
    the ``(j - t)``-th power of ``W_hhᵀ``. This function evaluates that sum
    term by term with explicit matrix powers, to show where vanishing and
    exploding gradients come from: eigenvalues of ``W_hh`` below 1 in modulus
    shrink distant terms geometrically, those above 1 blow them up. The
    recursion in :func:`linear_rnn_grads` is Horner's scheme for the same
    matrix polynomial and should be preferred for any real use.

    Args:
      W_hh: ``(h, h)`` hidden-to-hidden weights.
      W_qh: ``(q, h)`` hidden-to-output weights.
      dL_do: ``(T, q)``; row ``t-1`` is ``∂L/∂o_t``, *with* the ``1/T``
        factor already applied (eq. 9.7.11), unlike ``dl_do`` of
        :func:`linear_rnn_grads`.

    Returns:
      ``(T, h)`` float64 array; row ``t-1`` is ``∂L/∂h_t``.

    Cost: ``O(T²·h² + T·h³)`` time (all ``T`` powers of ``W_hhᵀ``, each
    applied to up to ``T`` vectors), ``O(T·h + h²)`` memory.

    Warning:
      Numerically unstable for large ``T`` when the spectral radius ``ρ`` of
      ``W_hh`` is far from 1; nothing is detected or raised. For ``ρ > 1`` the
      powers grow like ``ρ^k`` and overflow to ``inf`` (and ``nan`` where an
      infinite power meets a zero) once ``ρ^T`` passes ~1e308; for ``ρ < 1``
      distant terms underflow to zero. A non-normal ``W_hh`` has powers far
      larger than ``ρ^k`` for a while, and their rounding error carries over
      into the small late powers. The recursion is no better conditioned
      (the gradient itself vanishes or explodes), but it never forms a
      matrix power and costs ``O(T·h²)``; use this function for small ``T`` and
      for illustration.

    Example:
      >>> g = linear_rnn_grads(W_hx, W_hh, W_qh, xs, dl_do)
      >>> np.allclose(dL_dh_expanded(W_hh, W_qh, dl_do / len(xs)), g.dL_dh)
      True
    """
    fn = "dL_dh_expanded"
    dims: dict[str, tuple[int, str]] = {}
    W_hh = _checked(fn, "W_hh", W_hh, ("h", "h"), dims)
    W_qh = _checked(fn, "W_qh", W_qh, ("q", "h"), dims)
    dL_do = _checked(fn, "dL_do", dL_do, ("T", "q"), dims)
    _check_nonempty(fn, "dL_do", dL_do)
    T = dL_do.shape[0]
    # Row j-1 of g is W_qhᵀ ∂L/∂o_j; in row-vector form v ↦ (Mᵀ)^k v is v @ M^k.
    g = dL_do @ W_qh
    out = np.zeros_like(g)
    power = np.eye(W_hh.shape[0])  # W_hh^k, k = j - t = T - i
    for k in range(T):
        out[: T - k] += g[k:] @ power
        power = power @ W_hh
    return out


def linear_rnn_squared_loss(
    W_hx: ArrayLike,
    W_hh: ArrayLike,
    W_qh: ArrayLike,
    xs: ArrayLike,
    ys: ArrayLike,
    h0: ArrayLike | None = None,
) -> tuple[float, LinearRNNGrads]:
    """Loss and gradients for the squared loss ``l(o, y) = ½‖o − y‖²``.

    ``L = (1/T) Σ_t ½‖o_t − y_t‖²``, so ``∂l/∂o_t = o_t − y_t``; the gradients
    come from :func:`linear_rnn_grads`.

    Args:
      W_hx, W_hh, W_qh, xs, h0: as in :func:`linear_rnn_forward`.
      ys: ``(T, q)`` targets; row ``t-1`` is ``y_t``.

    Returns:
      ``(loss, grads)``: the loss as a Python float and a
      :class:`LinearRNNGrads`.

    Cost: as :func:`linear_rnn_grads`.

    Example:
      >>> loss, g = linear_rnn_squared_loss(W_hx, W_hh, W_qh, xs, ys)
    """
    fn = "linear_rnn_squared_loss"
    W_hx, W_hh, W_qh, xs, h0, dims = _validate(fn, W_hx, W_hh, W_qh, xs, h0)
    ys = _checked(fn, "ys", ys, ("T", "q"), dims)
    hs = _run(W_hx, W_hh, xs, h0)
    err = hs @ W_qh.T - ys
    loss = 0.5 * float(np.sum(err * err)) / xs.shape[0]
    return loss, _grads(W_hx, W_hh, W_qh, xs, h0, err, hs)


def _run(W_hx, W_hh, xs, h0):
    hs = np.empty((xs.shape[0], W_hh.shape[0]))
    h = h0
    for t, x in enumerate(xs):
        h = W_hx @ x + W_hh @ h
        hs[t] = h
    return hs


def _grads(W_hx, W_hh, W_qh, xs, h0, dl_do, hs=None):
    if hs is None:
        hs = _run(W_hx, W_hh, xs, h0)
    T = xs.shape[0]
    dL_do = dl_do / T
    dL_dh = np.empty_like(hs)
    carry = np.zeros(W_hh.shape[0])  # W_hhᵀ ∂L/∂h_{t+1}; nothing follows h_T
    for t in range(T - 1, -1, -1):
        dL_dh[t] = carry + W_qh.T @ dL_do[t]
        carry = W_hh.T @ dL_dh[t]
    hs_prev = np.concatenate([h0[None], hs[:-1]])
    # Σ_t a_t b_tᵀ over time is one matrix product with time as the inner axis.
    return LinearRNNGrads(
        dL_dh=dL_dh,
        dL_dW_qh=dL_do.T @ hs,
        dL_dW_hx=dL_dh.T @ xs,
        dL_dW_hh=dL_dh.T @ hs_prev,
        dL_dh0=carry,
    )


def _validate(fn, W_hx, W_hh, W_qh, xs, h0):
    """Convert the model's arguments to float64 and check their shapes agree."""
    dims: dict[str, tuple[int, str]] = {}
    W_hx = _checked(fn, "W_hx", W_hx, ("h", "d"), dims)
    W_hh = _checked(fn, "W_hh", W_hh, ("h", "h"), dims)
    W_qh = _checked(fn, "W_qh", W_qh, ("q", "h"), dims)
    xs = _checked(fn, "xs", xs, ("T", "d"), dims)
    _check_nonempty(fn, "xs", xs)
    if h0 is None:
        h0 = np.zeros(W_hx.shape[0])
    else:
        h0 = _checked(fn, "h0", h0, ("h",), dims)
    return W_hx, W_hh, W_qh, xs, h0, dims


def _checked(fn, name, value, pattern, dims):
    """``value`` as float64 after checking its shape against ``pattern``.

    ``pattern`` names each axis (``("T", "q")``); ``dims`` maps the names
    seen so far to ``(size, argument that fixed it)`` and gains the new ones.
    """
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{fn}({name}=...) expects a real numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    want = ", ".join(str(dims[s][0]) if s in dims else s for s in pattern)
    sources = sorted({f"{s}={dims[s][0]} from {dims[s][1]}" for s in pattern if s in dims})
    where = f" ({', '.join(sources)})" if sources else ""
    ok = arr.ndim == len(pattern)
    bound: dict[str, int] = {}
    if ok:
        for s, n in zip(pattern, arr.shape, strict=True):
            expected = dims[s][0] if s in dims else bound.get(s, int(n))
            ok = ok and n == expected
            bound[s] = expected
    if not ok:
        trailing = "," if len(pattern) == 1 else ""
        symbolic = ", ".join(pattern)
        shown = f"({symbolic}{trailing})" + (f" = ({want}{trailing})" if want != symbolic else "")
        raise ValueError(f"{fn}({name}=...) expects shape {shown}{where}, got {arr.shape}")
    for s, n in bound.items():
        dims.setdefault(s, (n, name))
    return arr


def _check_nonempty(fn, name, arr):
    if arr.shape[0] == 0:
        raise ValueError(
            f"{fn}({name}=...) needs at least one time step (T >= 1, the loss averages "
            f"over T), got shape {arr.shape}"
        )
