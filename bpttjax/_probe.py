"""Compile-and-measure probes: what a step, a schedule or a layer costs, by XLA's figure.

``Budget`` and the fused layers' autotuner decide from what XLA plans for a
compiled gradient (``memory_analysis().temp_size_in_bytes``), not from a
model alone. The probes here build those gradients from abstract shapes,
compile them and cache the figures by the step's program and the shapes, so
that a second trace of the same scan compiles nothing.

A probe differentiates a loss over the scan's outputs (:func:`probe_grad`):
a per-step loss (:func:`per_step_loss`) to measure the schedule alone, or a
loss over all outputs, which keeps them and their cotangent, to measure the
whole. Every figure gets :data:`SLACK` bytes and the carry a loss usually
creates (the probe takes ``init`` as an argument).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from . import memory
from ._tree import abstract, is_diff, one_step, split_diff
from .remat import Layer, RematStrategy, StepCosts, StoreAll

__all__ = [
    "SLACK",
    "ClosedStep",
    "cached",
    "checking",
    "closed_step",
    "layer_costs",
    "layer_temp",
    "measured_costs",
    "output_bytes",
    "outside_any_mesh",
    "probe_grad",
    "scan_temp",
]

SLACK = 256
"""Bytes added to every measured figure for the loss's own small buffers (its
scalars and reductions), which XLA places in 64-byte aligned slots that the
probe's loss may not have; only programs of a few kilobytes feel them."""
PROBE_LENGTHS = (64, 128)
"""The two lengths at which plain BPTT of a step is compiled to fit its per-step line."""


def output_bytes(f: Callable, init: Any, xs: Any, length: int) -> int:
    """The scan's outputs (final carry, ``ys``) and the cotangent of their inexact
    leaves: what a loss over the outputs holds on top of the schedule."""
    carry, y = jax.eval_shape(f, init, one_step(xs))
    diff = lambda tree: [a for a in jax.tree.leaves(tree) if is_diff(a)]
    outputs = memory.tree_bytes(carry) + length * memory.tree_bytes(y)
    cotangents = memory.tree_bytes(diff(carry)) + length * memory.tree_bytes(diff(y))
    return outputs + cotangents


_COSTS_CACHE: dict[tuple, StepCosts] = {}
_TEMP_CACHE: dict[tuple, int] = {}


def per_step_loss(closed: Callable) -> Callable:
    """``closed`` with its ``y`` replaced by the sum of its inexact leaves (a float32 scalar).

    The probes differentiate this per-step loss, so that what they measure is
    the schedule, the step's residuals for ``y`` included, and not a ``T``-long
    ``ys`` buffer, which :func:`output_bytes` counts (with its cotangent)
    for every strategy alike.
    """

    def step(c, x, *consts):
        c, y = closed(c, x, *consts)
        terms = [jnp.sum(jnp.real(v)).astype(jnp.float32) for v in split_diff(y)[0]]
        return c, sum(terms, jnp.zeros((), jnp.float32))

    return step


def measured_costs(
    f: Callable, init: Any, xs: Any, remat: RematStrategy | None, all_outputs: bool = False
) -> StepCosts:
    """:class:`StepCosts` of ``f`` under ``remat`` (plain BPTT when None), by compiling.

    The gradient compiled is that of a per-step loss (:func:`per_step_loss`)
    and the final carry's sum, or with ``all_outputs`` of a loss over all
    outputs (:func:`probe_grad`), with respect to the step's float
    parameters and ``init``; the result is cached by the step's program, the
    shapes, ``remat`` and the loss.
    """
    closed, consts_a, init_a, x_a = closed_step(f, init, xs)
    key = (str(closed.jaxpr), repr((init_a, x_a, consts_a)), remat, all_outputs)
    remat = remat or StoreAll()
    step = closed if all_outputs else per_step_loss(closed)

    def build(T):
        xs_a = jax.tree.map(lambda a: jax.ShapeDtypeStruct((T, *a.shape), a.dtype), x_a)
        run = lambda consts, init, xs: remat.scan(
            lambda c, x: step(c, x, *consts), init, xs, T, False, 1
        )
        return probe_grad(run, all_outputs), (consts_a, init_a, xs_a)

    return _probe_costs(key, build, init_a)


def probe_grad(run: Callable, all_outputs: bool = False) -> Callable:
    """``grad(a, init, xs)``: the gradient, for the float leaves of ``a`` and
    ``init``, of a loss over the float outputs of ``run(a, init, xs)``.

    The loss sums them, or with ``all_outputs`` takes the mean of their
    squares (as ``jnp.mean(hs**2)``), whose gradient keeps the outputs and
    makes their cotangent: what a loss over all outputs holds.
    """

    def term(o):
        o = jnp.real(o)
        return (jnp.mean(o * o) if all_outputs else jnp.sum(o)).astype(jnp.float32)

    def loss(diff, a, init, xs):
        _, other, merge = split_diff((a, init))
        a, init = merge(diff, other)
        outs = split_diff(run(a, init, xs))[0]
        return sum((term(o) for o in outs), jnp.zeros((), jnp.float32))

    return lambda a, init, xs: jax.grad(loss)(split_diff((a, init))[0], a, init, xs)


def _probe_costs(key: tuple, build: Callable, init_a: Any) -> StepCosts:
    """:func:`bpttjax.memory.step_costs` of ``build`` at the probe lengths, cached by ``key``."""

    def measure():
        C = memory.tree_bytes(init_a)
        costs = memory.step_costs(build, C, PROBE_LENGTHS)
        # The probe takes init as an argument; a loss usually creates it (as a
        # zero state), which holds one more carry in working memory.
        return dataclasses.replace(costs, overhead_bytes=costs.overhead_bytes + C + SLACK)

    return cached(_COSTS_CACHE, key, measure)


def cached(cache: dict, key: tuple, compute: Callable[[], Any]) -> Any:
    """``cache[key]``, computed on a miss; the cache is emptied past 256 entries."""
    if key not in cache:
        if len(cache) > 256:
            cache.clear()
        cache[key] = compute()
    return cache[key]


def _layer_key(kind: str, layer: Layer, *shapes: Any) -> tuple:
    """A cache key for a probe of ``layer``: its program (:attr:`Layer.key`) and ``shapes``."""
    return (kind, layer.key, repr(shapes))


def checking() -> bool:
    """Whether a choice is checked by compiling it: not under a mesh in context, where
    the unsharded program compiled overstates each device's share."""
    return jax.sharding.get_abstract_mesh().empty


def outside_any_mesh():
    """A context compiling a probe as one unsharded program, whatever mesh is in context.

    Under ``jax.set_mesh`` with an explicit mesh, a probe traced with the
    mesh in context compiles with the mesh's shardings on its unsharded
    arguments, and XLA plans several times the memory of the same program
    without them.
    """
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ()))


def layer_costs(layer: Layer, init: Any) -> StepCosts:
    """:class:`StepCosts` of a whole-sequence layer run as one fused block, by compiling.

    As :func:`measured_costs` for plain BPTT, with the block that
    ``StoreAll`` runs for :func:`bpttjax.cells.run` in place of the scan.
    """
    params_a, init_a = abstract(layer.params), abstract(init)
    x_a = jax.ShapeDtypeStruct(layer.xs.shape[1:], layer.xs.dtype)
    key = _layer_key("layer", layer, params_a, init_a, x_a)

    def build(T):
        def run(params, init, xs):
            probe = layer.replace(params=params, xs=xs, length=T, truncation=None)
            return probe.block(init, 0, T)

        xs_a = jax.ShapeDtypeStruct((T, *x_a.shape), x_a.dtype)
        return probe_grad(run, all_outputs=True), (params_a, init_a, xs_a)

    return _probe_costs(key, build, init_a)


def layer_temp(layer: Layer, init: Any, strategy: RematStrategy) -> int:
    """XLA's temp bytes for the gradient of a layer run by ``strategy``, compiled at its length.

    Measured like :func:`layer_costs`'s probes (unsharded, so on several
    devices it is more than each device's share; cached likewise), plus the
    carry a loss usually creates.
    """
    params_a, init_a, xs_a = abstract(layer.params), abstract(init), abstract(layer.xs)

    def run(params, init, xs):
        probe = layer.replace(params=params, xs=xs, truncation=None)
        return strategy.scan_layer(probe, init)

    key = (*_layer_key("layer temp", layer, params_a, init_a, xs_a), strategy)
    return full_temp(key, run, params_a, init_a, xs_a, all_outputs=True)


def scan_temp(
    f: Callable,
    init: Any,
    xs: Any,
    length: int,
    strategy: RematStrategy,
    all_outputs: bool = False,
) -> int:
    """XLA's temp bytes for the gradient of ``bj.scan(f, init, xs, length)`` under ``strategy``.

    Measured like :func:`measured_costs`'s probes (the same loss, the same
    carry added for a loss that creates it) at the full length; cached.
    """
    closed, consts_a, init_a, _ = closed_step(f, init, xs)
    xs_a = None if xs is None else abstract(xs)
    step = closed if all_outputs else per_step_loss(closed)
    run = lambda consts, init, xs: strategy.scan(
        lambda c, x: step(c, x, *consts), init, xs, length, False, 1
    )
    shapes = repr((init_a, xs_a, consts_a, length, all_outputs))
    key = ("scan temp", str(closed.jaxpr), shapes, strategy)
    return full_temp(key, run, consts_a, init_a, xs_a, all_outputs)


def full_temp(
    key: tuple, run: Callable, a: Any, init_a: Any, xs_a: Any, all_outputs: bool = False
) -> int:
    """XLA's temp bytes for :func:`probe_grad` of ``run(a, init, xs)``, compiled as one
    unsharded program, plus the carry a loss usually creates; cached by ``key``."""

    def measure():
        with outside_any_mesh():
            grad = probe_grad(run, all_outputs)
            temp = memory.measure(grad, a, init_a, xs_a).temp_bytes
        return temp + memory.tree_bytes(init_a) + SLACK

    return cached(_TEMP_CACHE, key, measure)


@dataclasses.dataclass(frozen=True, eq=False)
class ClosedStep:
    """A step as a function of ``(carry, x, *consts)``; ``jaxpr`` is its program."""

    jaxpr: jex_core.Jaxpr
    out_tree: Any

    def __call__(self, c: Any, x: Any, *consts: Any) -> Any:
        closed = jex_core.ClosedJaxpr(self.jaxpr, list(consts))
        out = jex_core.jaxpr_as_fun(closed)(*jax.tree.leaves((c, x)))
        return jax.tree.unflatten(self.out_tree, out)


def closed_step(f: Callable, init: Any, xs: Any) -> tuple[ClosedStep, Any, Any, Any]:
    """``f`` with its constants hoisted (:func:`hoist_constants`), and the abstract
    constants, ``init`` and one step's ``x``."""
    init_a = abstract(init)
    x_a = one_step(xs)
    closed, consts = hoist_constants(f, init_a, x_a)
    return closed, abstract(consts), init_a, x_a


def hoist_constants(f: Callable, init: Any, x: Any) -> tuple[ClosedStep, list]:
    """``f`` as a function of ``(carry, x, *consts)`` with *every* constant it closes over.

    Unlike ``jax.closure_convert``, which hoists only traced values, concrete
    parameters are hoisted too, so that a plan made outside ``jax.grad``
    counts their gradients, as the traced scan will.
    """
    closed_jaxpr, out_shape = jax.make_jaxpr(f, return_shape=True)(init, x)
    closed = ClosedStep(closed_jaxpr.jaxpr, jax.tree.structure(out_shape))
    return closed, list(closed_jaxpr.consts)
