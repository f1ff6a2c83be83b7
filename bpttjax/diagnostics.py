"""Gradient diagnostics: per-step carry gradients, their norms, Jacobian spectra.

Section 9.7 of "Dive into Deep Learning" (Zhang, Lipton, Li & Smola,
https://d2l.ai/chapter_recurrent-neural-networks/bptt.html) shows why
recurrent gradients vanish or explode: for the linear RNN
``h_t = W_hx x_t + W_hh h_{t-1}`` the gradient reaching ``h_t`` from the loss
at step ``j`` is multiplied by ``(W_hhᵀ)^(j-t)`` (d2l eq. 9.7.15), so it
shrinks or grows like ``ρ^(j-t)`` where ``ρ`` is the spectral radius of
``W_hh``. For a nonlinear step the power of ``W_hh`` becomes a product of the
step Jacobians ``∂h_k/∂h_{k-1}`` along the trajectory. This module measures
both sides of that story:

* :func:`carry_grads` / :func:`carry_grad_norms`: ``∂L/∂h_t`` for *every*
  step in one backward pass through :func:`bpttjax.scan` (any remat or
  truncation strategy), and the per-step norms ``‖∂L/∂h_t‖``;
* :func:`step_jacobian`, :func:`jacobian_product`,
  :func:`jacobian_product_spectrum`: the Jacobians themselves for small
  hidden sizes, and the singular values of their products;
* :func:`spectral_radius`: ``ρ(W)``, e.g. of ``W_hh`` at initialisation.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

from ._checks import check_length, checked_step
from ._scan import scan as _bj_scan
from .remat import RematStrategy, StoreAll
from .truncation import TruncationStrategy

Carry = TypeVar("Carry")
X = TypeVar("X")
Y = TypeVar("Y")

__all__ = [
    "Spectrum",
    "carry_grads",
    "carry_grad_norms",
    "step_jacobian",
    "jacobian_product",
    "jacobian_product_spectrum",
    "spectral_radius",
]


def carry_grads(
    f: Callable[[Carry, X], tuple[Carry, Y]],
    init: Carry,
    xs: X | None,
    loss: Callable[[Carry, Y], jax.Array],
    *,
    length: int | None = None,
    reverse: bool = False,
    remat: RematStrategy = StoreAll(),  # noqa: B008 - frozen, so one shared default is safe
    truncation: TruncationStrategy | None = None,
) -> tuple[jax.Array, Carry]:
    """``∂L/∂h_t`` for every step ``t``, in one backward pass.

    Runs ``carry, ys = bpttjax.scan(f, init, xs, ...)`` and ``L = loss(carry,
    ys)``. A zero perturbation ``δ_t`` (same structure as the carry) is added
    to the carry that step ``t`` returns, and ``L`` is differentiated with
    respect to all ``δ`` at ``δ = 0``: the cotangent of ``δ_t`` is the
    gradient with respect to that carry. One backward pass gives all ``T`` of
    them, with the strategies' own memory behaviour.

    Convention: ``grads[t]`` is ``∂L/∂(carry output by step t)``, where step
    ``t`` is the one that consumes ``xs[t]`` (also with ``reverse=True``).
    In d2l's 1-based notation with ``h_0 = init`` and ``reverse=False``,
    ``grads[t]`` is ``∂L/∂h_{t+1}``, row ``t`` of
    :attr:`bpttjax.reference.LinearRNNGrads.dL_dh`; ``grads[T-1]`` is
    ``∂L/∂(final carry)``.

    What the gradient includes: every use of that carry by later steps (their
    carries *and* their outputs ``y``) and by ``loss`` through the final
    carry. Under the ``lax.scan`` contract the output ``y_t`` of step ``t`` is
    a function of the carry *entering* step ``t`` and ``xs[t]``; a dependence
    of ``y_t`` on the new carry computed inside ``f`` is not visible, so it is
    not part of ``grads[t]`` (it is then ``∂L/∂h`` with ``y_t`` held fixed,
    the cotangent BPTT carries back through the recurrence). To get d2l's
    total ``∂L/∂h_t`` with ``o_t = W_qh h_t``, let the step emit its
    *incoming* carry and build the outputs in ``loss``, as in the example.
    With a ``truncation``, the result is the truncated gradient: the cut
    carry cotangents are exactly zero.

    Args:
      f: the step ``f(carry, x) -> (carry, y)``, as for :func:`bpttjax.scan`.
      init: the initial carry, any pytree of arrays.
      xs: pytree with leading axis ``T``, or ``None`` with ``length``.
      loss: ``loss(final_carry, ys) -> scalar``, a real scalar computed from
        the scan's results (``ys``: leading axis ``T``).
      length, reverse, remat, truncation: as for :func:`bpttjax.scan`.

    Returns:
      ``(value, grads)``: ``value`` is the loss, ``grads`` has the carry's
      pytree structure with each leaf ``(T, *leaf.shape)``. Inexact leaves
      get their gradient in their own dtype (complex leaves: the cotangent
      ``jax.vjp`` returns, i.e. the conjugate of ``∂L/∂Re + i∂L/∂Im``); integer and bool
      leaves have no gradient and get zeros of dtype ``jax.dtypes.float0``,
      as ``jax.grad(..., allow_int=True)`` returns.

    Cost: one forward and one backward pass of ``bpttjax.scan`` with the
    chosen ``remat`` (recomputation as that strategy), plus the inputs
    ``δ`` and the result: ``2·T`` carries of extra memory. Not jitted
    here; wrap it in ``jax.jit`` (``f`` and ``loss`` closed over) to reuse.

    Raises:
      TypeError: ``f`` or ``loss`` is not callable, ``loss`` does not return
        a real scalar, or any error :func:`bpttjax.scan` raises.
      ValueError: ``xs``/``length`` do not give a consistent ``T``.

    Example:
      >>> def step(h, x):                       # emit the incoming carry
      ...     return W_hx @ x + W_hh @ h, h
      >>> def loss(h_T, hs_prev):               # hs = h_1 … h_T
      ...     hs = jnp.concatenate([hs_prev[1:], h_T[None]])
      ...     return jnp.mean(0.5 * jnp.sum((hs @ W_qh.T - ys) ** 2, axis=1))
      >>> value, dL_dh = carry_grads(step, h0, xs, loss, remat=bj.EveryStep())
    """
    if not callable(f):
        raise TypeError(
            f"carry_grads(f=...) expects a callable step f(carry, x), got {type(f).__name__}"
        )
    if not callable(loss):
        raise TypeError(
            "carry_grads(loss=...) expects a callable loss(final_carry, ys) -> scalar, got "
            f"{type(loss).__name__}"
        )
    T = check_length(xs, length)
    leaves, treedef = jax.tree.flatten(init)
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    inexact = [i for i, leaf in enumerate(leaves) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    deltas = [jnp.zeros((T, *leaves[i].shape), leaves[i].dtype) for i in inexact]
    step = checked_step(f)

    def perturbed_step(carry, inp):
        x, ds = inp
        new_carry, y = step(carry, x)
        new_leaves = jax.tree.leaves(new_carry)
        for i, d in zip(inexact, ds, strict=True):
            leaf = jnp.asarray(new_leaves[i])
            new_leaves[i] = leaf + d.astype(leaf.dtype)
        return jax.tree.unflatten(treedef, new_leaves), y

    def objective(ds):
        carry, ys = _bj_scan(
            perturbed_step,
            init,
            (xs, ds),
            length=T,
            reverse=reverse,
            remat=remat,
            truncation=truncation,
        )
        value = loss(carry, ys)
        shape, dtype = np.shape(value), getattr(value, "dtype", None)
        if dtype is None:
            dtype = jnp.asarray(value).dtype
        if shape != () or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                "carry_grads(loss=...) must return a real floating-point scalar, got "
                f"{dtype}{list(shape)}"
            )
        return value

    # vjp rather than grad: it also accepts complex leaves of the carry.
    value, pullback = jax.vjp(objective, deltas)
    (g,) = pullback(jnp.ones_like(value))
    out: list[Any] = [np.zeros((T, *leaf.shape), jax.dtypes.float0) for leaf in leaves]
    for i, gi in zip(inexact, g, strict=True):
        out[i] = gi
    return value, jax.tree.unflatten(treedef, out)


def carry_grad_norms(
    f: Callable[[Carry, X], tuple[Carry, Y]],
    init: Carry,
    xs: X | None,
    loss: Callable[[Carry, Y], jax.Array],
    *,
    length: int | None = None,
    reverse: bool = False,
    remat: RematStrategy = StoreAll(),  # noqa: B008 - frozen, so one shared default is safe
    truncation: TruncationStrategy | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per-step gradient norms ``‖∂L/∂h_t‖``, the vanishing/exploding picture.

    Same arguments and convention as :func:`carry_grads` (index ``t`` is the
    carry output by the step that consumes ``xs[t]``). The norm of step ``t``
    is the global L2 norm over every inexact leaf of the carry and every
    element of it (batch axes included); integer leaves are ignored.

    Returns:
      ``(value, norms)``: the loss and ``norms`` of shape ``(T,)``, in the
      widest floating dtype among the carry's inexact leaves (zeros if there
      are none). Norms are computed with a max-abs rescaling, so they do not
      overflow before the gradients themselves do.

    Cost: as :func:`carry_grads`, plus ``O(T·C)`` for the reductions.

    Example:
      >>> _, norms = carry_grad_norms(step, h0, xs, loss)
      >>> plt.semilogy(norms)            # straight line: geometric decay
    """
    value, grads = carry_grads(
        f,
        init,
        xs,
        loss,
        length=length,
        reverse=reverse,
        remat=remat,
        truncation=truncation,
    )
    T = check_length(xs, length)
    leaves = [g for g in jax.tree.leaves(grads) if g.dtype != jax.dtypes.float0]
    if not leaves:
        return value, jnp.zeros((T,), jnp.result_type(float))
    real = [jnp.abs(g).reshape(T, -1) for g in leaves]
    dtype = max((a.dtype for a in real), key=lambda d: jnp.finfo(d).bits)
    real = [a.astype(dtype) for a in real]
    scale = jnp.max(jnp.stack([jnp.max(a, axis=1, initial=0.0) for a in real]), axis=0)
    safe = jnp.where(scale > 0, scale, jnp.ones((), dtype))
    sq = sum(jnp.sum(jnp.square(a / safe[:, None]), axis=1) for a in real)
    return value, safe * jnp.sqrt(sq) * (scale > 0).astype(dtype)


def _check_vector_carry(fn: str, name: str, carry: Any) -> jax.Array:
    if not isinstance(carry, jax.Array | np.ndarray) or np.ndim(carry) != 1:
        got = (
            f"an array of shape {tuple(np.shape(carry))}"
            if isinstance(carry, jax.Array | np.ndarray)
            else f"a {type(carry).__name__}"
        )
        raise ValueError(
            f"{fn}({name}=...) needs the carry as a single 1-D array; use a single unbatched "
            f"carry of shape (H,), got {got}"
        )
    carry = jnp.asarray(carry)
    if not jnp.issubdtype(carry.dtype, jnp.floating):
        raise TypeError(f"{fn}({name}=...) expects a real floating carry, got {carry.dtype}")
    return carry


def step_jacobian(f: Callable[[jax.Array, X], tuple[jax.Array, Y]], carry: ArrayLike, x: X):
    """The step Jacobian ``∂h_t/∂h_{t-1}`` at ``(carry, x)``.

    Args:
      f: the step ``f(carry, x) -> (carry, y)``.
      carry: ``h_{t-1}``, a single unbatched array of shape ``(H,)``.
      x: the step's input (any pytree ``f`` accepts).

    Returns:
      ``(H, H)`` array ``J`` with ``J[i, j] = ∂h_t[i]/∂h_{t-1}[j]`` (rows:
      new carry, columns: old carry). For ``h_t = tanh(W_hh h_{t-1} + …)``
      it is ``diag(1 - h_t²) W_hh``; for the linear RNN it is ``W_hh``.

    Cost: ``H`` reverse-mode passes through one step (``jax.jacrev``), ``H²``
    memory. Meant for small ``H``.

    Raises:
      ValueError: ``carry`` is not a 1-D array (a pytree or a batched carry).

    Example:
      >>> J = step_jacobian(step, h, x)
      >>> spectral_radius(J)
    """
    carry = _check_vector_carry("step_jacobian", "carry", carry)
    return jax.jacrev(lambda h: f(h, x)[0])(carry)


def _check_index(fn: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fn}({name}=...) expects an int, got {type(value).__name__}: {value!r}")
    return int(value)


def jacobian_product(
    f: Callable[[jax.Array, X], tuple[jax.Array, Y]],
    init: ArrayLike,
    xs: X | None,
    start: int,
    stop: int,
    *,
    length: int | None = None,
) -> jax.Array:
    """``∂h_stop/∂h_start`` along the actual trajectory: a product of step Jacobians.

    Here ``h_k`` is the carry after ``k`` steps (``h_0 = init``, ``h_k`` is
    what the step consuming ``xs[k-1]`` returns), so the result is
    ``J_stop ⋯ J_{start+1}`` with ``J_k = ∂h_k/∂h_{k-1}``. (Note the shift
    against :func:`carry_grads`, whose index ``t`` is ``h_{t+1}``.) For the
    linear RNN it is ``W_hh^(stop - start)``; in general it is the factor
    that carries ``∂L/∂h_stop`` back to ``h_start`` (d2l eq. 9.7.15):
    ``∂L/∂h_start ⊇ productᵀ ∂L/∂h_stop``.

    Args:
      f: the step, with a single 1-D carry.
      init: ``(H,)`` initial carry.
      xs: inputs with leading axis ``T``, or ``None`` with ``length``.
      start, stop: Python ints with ``0 <= start <= stop <= T``;
        ``start == stop`` gives the identity.
      length: the number of steps when ``xs`` is ``None``.

    Returns:
      ``(H, H)`` array, rows indexed by ``h_stop``, columns by ``h_start``.

    Cost: ``start`` forward steps, then ``stop - start`` steps each with ``H``
    reverse passes and one ``H×H`` matmul; ``O(H²)`` memory.

    Warning:
      The product under- or overflows for long spans when ``ρ`` is far from
      1; nothing is detected. Split the span and use
      :func:`jacobian_product_spectrum` on pieces if needed.

    Raises:
      ValueError: ``init`` is not 1-D, or not ``0 <= start <= stop <= T``.
      TypeError: ``start``/``stop`` are not ints.

    Example:
      >>> P = jacobian_product(step, h0, xs, 0, 50)
    """
    fn = "jacobian_product"
    init = _check_vector_carry(fn, "init", init)
    start = _check_index(fn, "start", start)
    stop = _check_index(fn, "stop", stop)
    T = check_length(xs, length)
    if not 0 <= start <= stop <= T:
        raise ValueError(
            f"{fn} needs 0 <= start <= stop <= T, got start={start}, stop={stop}, T={T}"
        )

    def piece(a, b):
        return jax.tree.map(lambda x: x[a:b], xs)

    def forward(h, x):
        return f(h, x)[0], None

    h, _ = jax.lax.scan(forward, init, piece(0, start), length=start)

    def accumulate(state, x):
        h, P = state
        J = step_jacobian(f, h, x)
        return (f(h, x)[0], J @ P), None

    eye = jnp.eye(init.shape[0], dtype=init.dtype)
    (_, P), _ = jax.lax.scan(accumulate, (h, eye), piece(start, stop), length=stop - start)
    return P


class Spectrum(NamedTuple):
    """Singular-value summary of a Jacobian product.

    Attributes:
      norm: the spectral (2-)norm ``σ_max``: the largest factor by which the
        product can grow a gradient vector.
      singular_values: the leading ``k`` singular values, descending.
    """

    norm: jax.Array
    singular_values: jax.Array


def jacobian_product_spectrum(
    f: Callable[[jax.Array, X], tuple[jax.Array, Y]],
    init: ArrayLike,
    xs: X | None,
    start: int,
    stop: int,
    k: int | None = None,
    *,
    length: int | None = None,
) -> Spectrum:
    """Spectral norm and leading singular values of :func:`jacobian_product`.

    Singular values of ``∂h_stop/∂h_start`` all below 1 mean every direction
    of the gradient vanishes over the span; one above 1 means some direction
    explodes (d2l 9.7: powers of ``W_hh``).

    Args:
      f, init, xs, start, stop, length: as :func:`jacobian_product`.
      k: how many leading singular values to return, ``1 <= k <= H``;
        ``None`` returns all ``H``.

    Returns:
      :class:`Spectrum` ``(norm, singular_values)``; ``singular_values`` has
      shape ``(k,)``.

    Cost: :func:`jacobian_product` plus one ``H×H`` SVD (``O(H³)``).

    Warning:
      Singular values far below ``σ_max · eps`` are rounding noise: the
      product is formed explicitly.

    Example:
      >>> s = jacobian_product_spectrum(step, h0, xs, 0, 100, k=3)
      >>> s.norm, s.singular_values
    """
    P = jacobian_product(f, init, xs, start, stop, length=length)
    H = P.shape[0]
    if k is None:
        k = H
    k = _check_index("jacobian_product_spectrum", "k", k)
    if not 1 <= k <= H:
        raise ValueError(f"jacobian_product_spectrum needs 1 <= k <= H={H}, got k={k}")
    s = jnp.linalg.svd(P, compute_uv=False)
    return Spectrum(norm=s[0], singular_values=s[:k])


def spectral_radius(W: ArrayLike) -> float:
    """``ρ(W) = max |λ_i(W)|``, the growth rate of ``‖W^k‖`` for large ``k``.

    For the linear RNN, ``ρ(W_hh) < 1`` makes long-range gradients vanish
    geometrically and ``ρ(W_hh) > 1`` lets them explode (d2l 9.7.15).

    Args:
      W: a square ``(n, n)`` real or complex matrix (NumPy or concrete JAX).

    Returns:
      ``ρ`` as a Python float.

    Cost: one dense eigenvalue decomposition on the host, ``O(n³)``; not
    traceable (do not call it under ``jit``).

    Raises:
      ValueError: ``W`` is not a square 2-D matrix.

    Example:
      >>> spectral_radius(0.9 * Q)    # Q orthogonal
      0.9
    """
    arr = np.asarray(W)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(
            f"spectral_radius(W=...) expects a square matrix of shape (n, n), got shape {arr.shape}"
        )
    if arr.shape[0] == 0:
        return 0.0
    return float(np.max(np.abs(np.linalg.eigvals(arr))))
