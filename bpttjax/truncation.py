"""Truncation strategies: how far back the carry's gradient is propagated.

Section 9.7 of "Dive into Deep Learning"
(https://d2l.ai/chapter_recurrent-neural-networks/bptt.html) compares three
ways to compute the gradient of a recurrent model:

* full BPTT (``truncation=None``): the exact gradient, a product of up to
  ``T`` Jacobians ``∂h_t/∂h_{t-1}`` that may vanish or explode;
* regular truncation (:class:`Truncate`): the carry's gradient is cut every
  ``k`` steps, as when training on consecutive windows of ``k`` steps with the
  state detached between windows; biased towards short-term dependencies;
* randomized truncation (:class:`RandomTruncate`): d2l's ``ξ_t`` estimator;
  the carry's gradient is kept with probability ``π_t`` and then scaled by
  ``1/π_t``, else cut, which gives an unbiased estimate of the full gradient.

A truncation only changes the cotangent that flows from step ``t`` back into
the carry that entered it (``h_{t-1}``, or the output of step ``t + 1`` with
``reverse=True``); forward values are never changed, and gradients that
reach parameters or inputs directly inside a step are kept. Every strategy
composes with every rematerialization strategy.

Second derivatives. The cut is an identity on the carry whose *tangent* is
multiplied by a factor ``ξ_t`` (``0`` or ``1`` for :class:`Truncate`, ``0`` or
``1/π_t`` for :class:`RandomTruncate`) that depends only on the step index and
the key, never on the inputs. Differentiating the truncated gradient again
therefore differentiates the truncated gradient map ``g̃(θ)`` itself:
``jax.hessian(loss)(θ)[i, j] = ∂g̃_i/∂θ_j`` exactly, the forward states'
dependence on ``θ`` through the whole history included (they are never cut).
``jax.jvp(jax.grad(loss), (θ,), (v,))`` is the product ``J_g̃(θ)·v`` a
Newton-type method on the truncated gradient field needs; reverse over reverse
(``jax.grad`` of ``vdot(jax.grad(loss)(θ), v)``, with the strategies that
support it) gives ``J_g̃(θ)ᵀ·v``. ``g̃`` is in general not the gradient of
any scalar function, so ``J_g̃`` need not be symmetric and the two can differ.
For :class:`RandomTruncate` this holds for the fixed ``ξ`` that the key draws.
It holds for every remat strategy (``Binomial``'s engine evaluates its
forward and recomputed steps as the primal half of the step's JVP, so an
outer ``jvp`` does not meet the tangent rule there).

This is not what the ``jax.lax.stop_gradient`` formulation (windows of ``k``
steps with the state detached between them) gives. Its first gradient is the
same, but ``stop_gradient`` also zeroes forward tangents, so its
``jax.hessian`` drops how each window's starting state depends on ``θ``: it
is not the Jacobian of its own gradient.
"""

from __future__ import annotations

import abc
import dataclasses
import numbers
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from . import _tree

__all__ = ["TruncationStrategy", "Truncate", "RandomTruncate"]

_INT32_MAX = int(np.iinfo(np.int32).max)


class TruncationStrategy(abc.ABC):
    """Abstract base class of the truncation strategies (not public API to subclass).

    ``scale(n, t)`` returns the factor applied to the cotangent of the
    carry entering processing step ``n`` (``t`` is the index of that step in
    ``xs``; ``t == n`` unless ``reverse=True``). It is called inside the
    traced scan body with ``n`` an int32 counter; ``check(length)`` is called
    once at the public boundary.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # a pytree: RandomTruncate's key is a leaf, so a jitted function that
        # takes the strategy as an argument does not retrace for a new key
        _tree.register(cls)

    def check(self, length: int) -> None:
        if length > _INT32_MAX:
            raise ValueError(
                f"truncation counts steps in int32 and supports up to 2**31 - 1 steps, "
                f"got length {length}"
            )

    def scale(self, n: jax.Array, t: jax.Array) -> jax.Array:
        """The factor for the cotangent of the carry entering processing step ``n``."""
        return self._scale(n, t)

    @abc.abstractmethod
    def _scale(self, n: jax.Array, t: jax.Array) -> jax.Array:
        """:meth:`scale`, as each strategy of this module defines it."""


@dataclasses.dataclass(frozen=True)
class Truncate(TruncationStrategy):
    """Regular truncation: cut the carry's gradient every ``every`` steps.

    The sequence is split, in processing order, into windows of ``every``
    steps (the last one shorter when ``T`` is not a multiple); the gradient
    that flows out of a window into the carry that entered it is dropped. This
    is exactly the gradient of training on consecutive windows with
    ``jax.lax.stop_gradient`` on the state between them. With
    ``reverse=True`` the windows start at the end of ``xs``.

    Args:
      every: window length ``k >= 1``, any Python int. ``every >= T`` is full
        BPTT.

    Cost: one integer counter in the carry; no extra memory per step.

    Second derivatives (``jax.hessian``, ``jvp∘grad``) are those of the
    truncated gradient map, not of a ``stop_gradient`` formulation; see
    :mod:`bpttjax.truncation`.

    References:
      d2l.ai, section 9.7.1, regular truncation:
      https://d2l.ai/chapter_recurrent-neural-networks/bptt.html

    Example:
      >>> carry, ys = bj.scan(step, h0, xs, truncation=bj.Truncate(every=35))
    """

    every: int

    def __post_init__(self):
        if isinstance(self.every, bool) or not isinstance(self.every, numbers.Integral):
            raise TypeError(
                f"Truncate(every=...) expects a positive int, got "
                f"{type(self.every).__name__}: {self.every!r}"
            )
        if self.every <= 0:
            raise ValueError(f"Truncate(every=...) expects every >= 1, got every={self.every}")

    def _scale(self, n, t):
        del t
        # n < T <= 2**31 - 1 (checked), so no multiple of a larger `every` is
        # ever reached: clipping it changes no cut, and keeps it an int32 (a
        # larger Python int would wrap to a wrong divisor, or overflow).
        cut = (n > 0) & (n % min(self.every, _INT32_MAX) == 0)
        return jnp.where(cut, 0.0, 1.0)


def _is_key(x: Any) -> bool:
    if isinstance(x, jax.Array | np.ndarray):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return x.ndim == 0
        return x.dtype == jnp.uint32 and x.shape == (2,)
    return False


@dataclasses.dataclass(frozen=True, eq=False)
class RandomTruncate(TruncationStrategy):
    """Randomized truncation (d2l 9.7.1.3; Tallec & Ollivier, 2017).

    At every step ``t`` (an index of ``xs``) except the first one processed, an
    independent ``ξ_t`` is drawn with ``P(ξ_t = 1/π_t) = π_t`` and
    ``P(ξ_t = 0) = 1 - π_t``, and the cotangent flowing back from step ``t``
    into the carry entering it is multiplied by ``ξ_t``: into ``h_{t-1}``,
    the output of step ``t - 1``, or with ``reverse=True`` into the output of
    step ``t + 1``, which is processed just before ``t``. Since ``E[ξ_t] = 1``
    and the draws are independent, the expected gradient equals the
    full-BPTT gradient (the estimator is unbiased); its variance grows as
    ``π_t`` shrinks. With a constant ``π`` the length of the
    kept history is geometric with mean ``1/(1 - π)`` steps.

    Args:
      key: a JAX PRNG key (``jax.random.key`` or the raw ``uint32[2]`` kind).
        The same key gives the same ``ξ`` sequence, independent of the
        rematerialization strategy. Use a fresh key for every gradient
        (``jax.random.split`` per training step), or all steps share one
        truncation pattern.
      keep_prob: ``π``, the probability of keeping the carry's gradient at a
        step: a float in ``(0, 1]`` for every step, or an array of shape
        ``(T,)`` giving ``π_t`` per index ``t`` of ``xs``. The entry of the
        first step processed is never used, and every other entry is:
        ``keep_prob[0]`` is the unused one going forward, ``keep_prob[T - 1]``
        with ``reverse=True`` (where ``keep_prob[0]`` is used, for the last
        step processed). Nothing is processed before that first step, whose
        carry is ``init``, and the gradient of ``init`` is always kept.

    Cost: one integer counter in the carry; ``ξ_t`` is recomputed from
    ``fold_in(key, t)`` in the backward pass, never stored.

    Second derivatives are those of the sampled gradient map for this key's
    ``ξ``; see :mod:`bpttjax.truncation`.

    Warning:
      ``keep_prob`` is checked to lie in ``(0, 1]`` only when it is concrete;
      a traced ``keep_prob`` is used as given.

    References:
      d2l.ai, section 9.7.1.3, randomized truncation:
      https://d2l.ai/chapter_recurrent-neural-networks/bptt.html

      C. Tallec and Y. Ollivier, "Unbiasing truncated backpropagation through
      time", 2017: https://arxiv.org/abs/1705.08209

    Example:
      >>> tr = bj.RandomTruncate(jax.random.key(0), keep_prob=0.9)
      >>> carry, ys = bj.scan(step, h0, xs, truncation=tr)
    """

    key: jax.Array
    keep_prob: float | jax.Array = 0.9

    def __post_init__(self):
        if not isinstance(self.key, jax.core.Tracer) and not _is_key(self.key):
            raise TypeError(
                "RandomTruncate(key=...) expects a JAX PRNG key (jax.random.key(seed) or "
                f"jax.random.PRNGKey(seed)), got {type(self.key).__name__}"
                f"{_shape_dtype(self.key)}"
            )
        p = self.keep_prob
        if isinstance(p, bool) or not (isinstance(p, numbers.Real | jax.Array | np.ndarray)):
            raise TypeError(
                "RandomTruncate(keep_prob=...) expects a float in (0, 1] or an array of "
                f"shape (T,), got {type(p).__name__}: {p!r}"
            )
        if isinstance(p, jax.Array | np.ndarray) and np.ndim(p) > 1:
            raise ValueError(
                "RandomTruncate(keep_prob=...) expects a scalar or an array of shape (T,), "
                f"got shape {np.shape(p)}"
            )
        if not isinstance(p, jax.core.Tracer):
            arr = np.asarray(p, dtype=np.float64)
            bad = ~((arr > 0.0) & (arr <= 1.0))
            if np.any(bad):
                hint = (
                    " (probability 0 would divide by zero; use Truncate to always cut)"
                    if np.any(arr == 0.0)
                    else ""
                )
                raise ValueError(
                    "RandomTruncate(keep_prob=...) expects probabilities in (0, 1], got "
                    f"{arr[bad].ravel()[:5].tolist()}{hint}"
                )

    def _value(self) -> tuple | None:
        """The key's bits and ``keep_prob``, or None while either is traced."""
        if isinstance(self.key, jax.core.Tracer) or isinstance(self.keep_prob, jax.core.Tracer):
            return None
        key = self.key
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        key, p = np.asarray(key), np.asarray(self.keep_prob)
        return (str(self.key.dtype), key.tobytes(), p.shape, str(p.dtype), p.tobytes())

    # By value, so that equal strategies hit jit's cache as static arguments.
    def __eq__(self, other):
        if not isinstance(other, RandomTruncate):
            return NotImplemented
        a, b = self._value(), other._value()
        return self is other if a is None or b is None else a == b

    def __hash__(self):
        value = self._value()
        return id(self) if value is None else hash(value)

    def check(self, length):
        super().check(length)
        if np.ndim(self.keep_prob) == 1 and np.shape(self.keep_prob)[0] != length:
            raise ValueError(
                "RandomTruncate(keep_prob=...) array must have one entry per step, shape "
                f"({length},), got shape {np.shape(self.keep_prob)}"
            )

    def _scale(self, n, t):
        p = jnp.asarray(self.keep_prob)
        if p.ndim == 1:
            p = p[t]
        p = p.astype(jnp.result_type(float))
        u = jax.random.uniform(jax.random.fold_in(self.key, t), dtype=p.dtype)
        keep = (n == 0) | (u < p)
        return jnp.where(keep, jnp.where(n == 0, 1.0, 1.0 / p), 0.0)


def _shape_dtype(x: Any) -> str:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f" of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f": {x!r}"


@jax.custom_jvp
def scale_cotangent(x: jax.Array, s: jax.Array) -> jax.Array:
    """Identity on ``x`` whose tangent (and so cotangent) is multiplied by ``s``.

    A ``custom_jvp`` rather than ``stop_gradient`` arithmetic keeps forward
    values bit-exact (``sg(x) + s·(x - sg(x))`` turns ``inf`` into ``nan``) and
    keeps forward-mode differentiation working.
    """
    del s
    return x


@scale_cotangent.defjvp
def _scale_cotangent_jvp(primals, tangents):
    x, s = primals
    dx, _ = tangents
    s = s.astype(dx.dtype)
    # An exact zero (not 0 * dx) so that a cut also stops inf/nan cotangents,
    # as stop_gradient would.
    return x, jnp.where(s == 0, jnp.zeros_like(dx), dx * s)
