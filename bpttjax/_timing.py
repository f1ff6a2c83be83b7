"""A strategy's time on a device: ``bj.budget.Timing``, and its measurement.

A gradient through ``T`` steps under a strategy whose :class:`~bpttjax.remat.Cost`
says ``recomputed_steps``, ``wasted_pullbacks`` and ``host_events`` takes about

    forward_s · (T + recomputed_steps)
    + vjp_s · (T + wasted_pullbacks)
    + host_event_s · host_events

seconds: every step evaluation, every pullback, and every time the control flow
waits for the host. The three constants depend on the device far more than on
anything else: on a CPU a host decision costs about as much as a loop
iteration, on XLA:GPU it is a copy to the host and a wait for the device's
queue to drain, about as long as a small step. :func:`device_timing` measures
them once per process and device with three small programs run on the device
itself.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ._probe import outside_any_mesh
from .remat import Cost

__all__ = ["Timing", "device_timing"]

_PROBE = (32, 256)
"""Batch and hidden size of the tanh RNN step whose forward step and pullback
:func:`device_timing` times: the size where one step is a few small kernels."""


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per forward step, per step pullback and per host-decided event.

    Args:
      forward_s: one evaluation of the step.
      vjp_s: one pullback of the step (its VJP's backward half).
      host_event_s: one test of a loop predicate, or one conditional, that
        the host decides (:attr:`bpttjax.remat.Cost.host_events`).

    Example (GPU-like constants):
      >>> gpu = bj.budget.Timing(forward_s=10e-6, vjp_s=17e-6, host_event_s=20e-6)
      >>> gpu.seconds(1000, bj.Binomial(10, static=True).cost(1000, costs))
      >>> plan = bj.Budget("64MB", timing=gpu).plan(step, h0, xs)
    """

    forward_s: float
    vjp_s: float
    host_event_s: float

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(
                    f"Timing({field.name}=...) expects seconds as a float, got "
                    f"{type(value).__name__}: {value!r}"
                )
            if not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"Timing({field.name}=...) expects finite seconds >= 0, got {value!r}"
                )
            object.__setattr__(self, field.name, float(value))

    def seconds(self, length: int, cost: Cost) -> float:
        """The predicted time of one gradient through ``length`` steps with ``cost``."""
        forward = self.forward_s * (length + cost.recomputed_steps)
        pullbacks = self.vjp_s * (length + cost.wasted_pullbacks)
        return forward + pullbacks + self.host_event_s * cost.host_events

    def __str__(self) -> str:
        us = lambda s: f"{s * 1e6:.3g} µs"
        return (
            f"{us(self.forward_s)} per step, {us(self.vjp_s)} per pullback, "
            f"{us(self.host_event_s)} per host event"
        )


def device_timing(device: jax.Device | None = None) -> Timing:  # pyright: ignore[reportInvalidTypeForm]
    """:class:`Timing` measured on ``device`` (default: JAX's first), once per process.

    Three programs, compiled and run on the device: a loop of tanh RNN steps
    (batch 32, width 256) at two lengths, the same loop's gradient at two lengths,
    and a ``while`` loop whose trip count is an argument, at two trip counts.
    Each constant is the slope between its two lengths (the median of five
    runs each), so the programs' fixed costs cancel. Its cost is compiling and
    running those six small programs, once per process and device.
    """
    return _measured(device or jax.devices()[0])


@functools.cache
def _measured(device) -> Timing:
    # This runs while a gradient is being traced (Budget plans then), where
    # device_put and jnp operations would join that trace: evaluate them now.
    with jax.ensure_compile_time_eval():
        return _measure(device)


def _measure(device) -> Timing:
    B, H = _PROBE
    w = np.full((H, H), 1.0 / H, np.float32)
    h0 = np.zeros((B, H), np.float32)
    w, h0 = jax.device_put((w, h0), device)

    def forward(w, h0, n):
        step = lambda h, _: (jnp.tanh(h @ w + 0.1), None)
        return jax.lax.scan(step, h0, None, length=n)[0]

    def gradient(w, h0, n):
        return jax.grad(lambda w: jnp.sum(forward(w, h0, n)))(w)

    def decisions(x, n):  # a trip count the compiler cannot see
        return jax.lax.while_loop(
            lambda c: c[0] < n, lambda c: (c[0] + 1, c[1] * 0.5), (jnp.int32(0), x)
        )[1]

    short, long = 64, 320
    with outside_any_mesh():
        fwd = _slope(
            lambda n: jax.jit(forward, static_argnums=2).lower(w, h0, n).compile(), (w, h0)
        )
        grad = _slope(
            lambda n: jax.jit(gradient, static_argnums=2).lower(w, h0, n).compile(), (w, h0)
        )
        x = jax.device_put(np.float32(1.0), device)
        host = jax.jit(decisions).lower(x, np.int32(0)).compile()
        per_event = _per_unit(lambda n: host(x, np.int32(n)), short * 4, long * 4)
        forward_s = fwd(short, long)
        vjp_s = max(grad(short, long) - forward_s, 0.0)
    return Timing(forward_s, vjp_s, per_event)


def _slope(compile_at: Callable, args: tuple) -> Callable[[int, int], float]:
    def slope(short: int, long: int) -> float:
        a, b = compile_at(short), compile_at(long)
        return _per_unit(lambda n: (a if n == short else b)(*args), short, long)

    return slope


def _per_unit(run: Callable[[int], object], short: int, long: int) -> float:
    def median(n: int) -> float:
        jax.block_until_ready(run(n))  # warm
        times = []
        for _ in range(5):
            start = time.perf_counter()
            jax.block_until_ready(run(n))
            times.append(time.perf_counter() - start)
        return sorted(times)[2]

    return max(median(long) - median(short), 0.0) / (long - short)
