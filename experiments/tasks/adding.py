"""The adding problem of ``long_range.py`` (Hochreiter & Schmidhuber, 1997).

Each step's input is ``(value ~ U[0, 1], marker in {0, 1})``; exactly two
steps are marked and the target is the sum of their values, read from a
linear read-out of an LSTM's last hidden state. :func:`adding_batch` draws
batches (with the markers placed so that truncation cannot see them, or as
in the original), :func:`adding_params` initializes the LSTM (chrono, forget
bias 1 or zero), :func:`marker_blind_floor` is the least error of a model
that never sees a marker.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bpttjax as bj

DTYPE = jnp.float32
LSTM = bj.cells.get("lstm")
"""The adding problem's cell: its gates (input, forget) are what ``chrono`` initializes."""
ADDING_BASELINE_MSE = 1.0 / 6.0
"""MSE of predicting the constant 1 (the target's mean): ``Var(v1 + v2) = 2/12``."""
PLACEMENTS = ("gap", "hochreiter")
INITS = ("chrono", "forget1", "zero")


def marker_region(length: int, placement: str, min_gap: int) -> tuple[int, int]:
    """``(a, b)``: the first marker is drawn from ``[0, a)``, the second from ``[0, b)``."""
    if placement == "gap":
        return length - min_gap, length - min_gap
    if placement == "hochreiter":
        b = length // 2 - 1
        return min(10, b), b
    raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")


def marker_blind_floor(length: int, placement: str, min_gap: int) -> float:
    """The least expected MSE of a predictor that sees the values but not the markers.

    With ``p_t`` the probability that step ``t`` is marked, the best such
    predictor is ``E[target | values] = Σ p_t v_t``, and by the law of total
    variance its MSE is ``1/6 - Σ p_t² / 12``; ``(1 - 2/P)/6`` for ``gap``.
    """
    a, b = marker_region(length, placement, min_gap)
    t = np.arange(length)
    first = (t < a) / a  # P(first marker at t)
    p = first + (t < b) / (b - 1) * (1 - first)  # + P(second at t), second != first
    return float(ADDING_BASELINE_MSE - np.sum(p * p) / 12)


def adding_batch(key, batch: int, length: int, placement: str = "gap", min_gap: int = 0):
    """One batch of the adding problem.

    Returns ``(xs, target)``: ``xs`` of shape ``(T, batch, 2)`` (time first, as
    ``bj.scan`` wants it), channel 0 the values, channel 1 the markers; and
    ``target`` of shape ``(batch,)``, the sum of the two marked values. All
    float32; the two marker positions are distinct.
    """
    a, b = marker_region(length, placement, min_gap)
    if a < 1 or b < 2:
        raise ValueError(
            f"no room for two markers: T={length}, placement={placement!r}, min_gap={min_gap}"
        )
    k_v, k_i, k_j = jax.random.split(key, 3)
    values = jax.random.uniform(k_v, (batch, length), DTYPE)
    i = jax.random.randint(k_i, (batch,), 0, a, dtype=jnp.int32)
    j = jax.random.randint(k_j, (batch,), 0, b - 1, dtype=jnp.int32)
    j = j + (j >= i).astype(jnp.int32)  # uniform over [0, b) without i
    steps = jnp.arange(length, dtype=jnp.int32)[None, :]
    markers = ((steps == i[:, None]) | (steps == j[:, None])).astype(DTYPE)
    target = jnp.sum(values * markers, axis=1)
    xs = jnp.stack([values, markers], axis=-1).transpose(1, 0, 2)
    return xs, target


def adding_eval_batch(seed: int, batch: int, length: int, placement: str, min_gap: int):
    """The fixed held-out batch of ``long_range.py`` for ``seed``."""
    return adding_batch(jax.random.key(10_000 + seed), batch, length, placement, min_gap)


def adding_params(key, hidden: int, length: int, init: str = "chrono", marker_weights="random"):
    """An LSTM (``bj.cells.lstm``) on ``(value, marker)`` and a read-out of ``h_T`` biased to 1.

    ``init``: ``chrono`` (Tallec & Ollivier: forget biases ``log U[1, T-1]``,
    input biases their negative), ``forget1`` or ``zero``; ``marker_weights``
    ``zero`` starts the marker channel's input weights (row 1 of ``W_x``) at 0.
    """
    k_cell, k_out, k_chrono = jax.random.split(key, 3)
    cell = LSTM.init(k_cell, 2, hidden, dtype=DTYPE)
    if marker_weights == "zero":  # row 1 of W_x: the marker channel's input weights
        cell["W_x"] = cell["W_x"].at[1].set(jnp.zeros((4 * hidden,), DTYPE))
    elif marker_weights != "random":
        raise ValueError(f"marker_weights must be 'random' or 'zero', got {marker_weights!r}")
    b = cell["b"]
    if init == "chrono":
        # Tallec & Ollivier: b_f ~ log U[1, T_max - 1], b_i = -b_f, with T_max = T.
        u = jax.random.uniform(k_chrono, (hidden,), DTYPE, 1.0, float(length - 1))
        b_f = jnp.log(u)
        b = b.at[hidden : 2 * hidden].set(b_f).at[:hidden].set(-b_f)
    elif init == "forget1":
        b = b.at[hidden : 2 * hidden].set(jnp.ones((hidden,), DTYPE))
    elif init != "zero":
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    cell["b"] = b
    w_out = jax.random.normal(k_out, (hidden,), DTYPE) / math.sqrt(hidden)
    return {"cell": cell, "w_out": w_out, "b_out": jnp.ones((), DTYPE)}


def adding_predict(params, xs, truncate: int | None = None, remat=None):
    """The read-out of ``h_T``, shape ``(batch,)``; ``truncate=k`` cuts BPTT every k steps."""
    hidden = params["w_out"].shape[0]
    carry0 = LSTM.initial_carry(hidden, xs.shape[1:2], DTYPE)

    def step(carry, x):
        carry, _ = LSTM.step(params["cell"], carry, x)
        return carry, None

    (h_T, _), _ = bj.scan(
        step,
        carry0,
        xs,
        remat=remat or bj.Nested(levels=2),
        truncation=None if truncate is None else bj.Truncate(truncate),
    )
    return h_T @ params["w_out"] + params["b_out"]


def adding_mse(params, xs, target, truncate=None):
    """Mean squared error of :func:`adding_predict`."""
    err = adding_predict(params, xs, truncate) - target
    return jnp.mean(err * err)


def adding_train_step(optimizer, batch: int, length: int, placement: str, min_gap: int, truncate):
    """A jitted step on a fresh batch: ``(params, opt_state, key) -> (params, opt_state, loss)``."""

    @jax.jit
    def train_step(params, opt_state, key):
        xs, target = adding_batch(key, batch, length, placement, min_gap)
        loss, grads = jax.value_and_grad(adding_mse)(params, xs, target, truncate)
        # optax mixes Python floats with its int32 step count (Adam's bias
        # correction), which strict dtype promotion (the tests') rejects.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step
