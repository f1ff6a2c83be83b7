"""Which JAX transformation is tracing a value (the ground floor: imports only JAX).

Two decisions depend on it, and JAX exposes neither publicly, so the tracer
classes are imported from ``jax._src``; where an import fails (a JAX that
moved them), each answer falls back to the safe side.

* :func:`linearized`: ``Binomial``'s ``custom_vjp`` refuses ``jax.linearize``
  of the scan with an error naming ``Nested`` instead of JAX's later one.
* :func:`linearizing`: ``Budget`` plans only when the tangents reaching its
  ``custom_jvp`` rule come from a linearization, whose backward pass keeps
  residuals, and not under ``jax.jvp`` alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.core
from jax.custom_derivatives import SymbolicZero

from ._tree import is_diff

try:  # the tracer of jax.linearize / the outer jax.grad of grad∘grad (private)
    from jax._src.interpreters.ad import LinearizeTracer as _LINEARIZE_TRACER
except ImportError:  # pragma: no cover - then grad∘grad fails later, inside JAX
    _LINEARIZE_TRACER = ()
try:  # vmap's tracer, which passes a custom_vjp call on to the trace below it (private)
    from jax._src.interpreters.batching import BatchTracer as _BATCH_TRACER
except ImportError:  # pragma: no cover
    _BATCH_TRACER = ()
try:  # the tracers a custom_jvp rule sees (private; without them every JVP plans)
    from jax._src.interpreters.ad import JVPTracer as _JVP_TRACER
    from jax._src.interpreters.partial_eval import DynamicJaxprTracer as _JIT_TRACER
    from jax._src.interpreters.partial_eval import JaxprTracer as _JAXPR_TRACER

    _PURE_TRACERS: tuple = (_JIT_TRACER, _JVP_TRACER)
except ImportError:  # pragma: no cover
    _JAXPR_TRACER = None
    _PURE_TRACERS = ()

__all__ = ["linearized", "linearizing", "transposed", "unbatched", "when_linearized"]


def unbatched(x: Any) -> Any:
    """``x`` with ``vmap``'s tracers peeled off: the value the trace below sees."""
    while isinstance(x, _BATCH_TRACER):
        x = x.val
    return x


def linearized(x: Any) -> bool:
    """Whether a ``custom_vjp`` called with leaf ``x`` is linearized by ``jax.linearize``.

    A ``custom_vjp`` call goes to the current trace; ``vmap``'s passes it on
    to the trace below. Under ``jax.linearize`` (a linearization that is not
    a VJP's) JAX records the call as a primitive that refuses to be
    evaluated, so the error would come only when the linear function is
    called, in JAX's words. Under ``jax.vjp`` and ``jax.grad`` the same trace
    has ``is_vjp`` set and the call is transposed instead, which works.
    """
    x = unbatched(x)
    return isinstance(x, _LINEARIZE_TRACER) and not getattr(x._trace, "is_vjp", True)


def transposed(x: Any) -> bool:
    """Whether ``x`` belongs to a linearization that will be transposed (``jax.grad``,
    ``jax.vjp``): under ``grad∘grad`` the inner backward pass is such a value."""
    return isinstance(x, _LINEARIZE_TRACER) and getattr(x._trace, "is_vjp", True)


def linearizing(tangents: list) -> bool:
    """Whether the tangents come from a linearization (``jax.grad``, ``jax.vjp``,
    ``jax.linearize``), whose backward pass needs residuals, rather than from
    forward-mode ``jax.jvp``, which needs none.

    JAX hands a ``custom_jvp`` rule partial-evaluation tracers under a
    linearization, possibly inside ``vmap``'s tracers; under ``jax.jvp`` the
    tangents are values or ``jit``'s tracers. Anything else is taken as a
    linearization, so that a budget is never skipped where it may matter.
    """
    if _JAXPR_TRACER is None:
        return True
    for t in tangents:
        t = unbatched(t)
        if not isinstance(t, jax.core.Tracer) or isinstance(t, _PURE_TRACERS):
            continue
        return True
    return False


def when_linearized(run: Callable, default: Any, choose: Callable, args: tuple) -> Any:
    """``run(default, *args)``, or ``run(choose(*args), *args)`` where it is linearized.

    A ``jax.custom_jvp`` whose primal is ``run(default, ...)``. JAX calls its rule
    only when a tangent flows in; the rule then runs the JVP of the chosen
    strategy, which ``jax.grad`` partially evaluates and transposes exactly
    as if the strategy had been called directly, so the residuals are the
    strategy's. Under ``jax.jvp`` alone nothing is stored for a backward
    pass, so the rule keeps ``default`` and never plans (``Budget``: ``StoreAll``).
    """
    if not any(map(is_diff, jax.tree.leaves(args))):
        return run(default, *args)

    @jax.custom_jvp
    def call(*args):
        return run(default, *args)

    @functools.partial(call.defjvp, symbolic_zeros=True)
    def call_jvp(primals, tangents):
        flat, tree = jax.tree.flatten(primals)
        flat_t = jax.tree.leaves(tangents, is_leaf=lambda t: isinstance(t, SymbolicZero))
        live = [not isinstance(t, SymbolicZero) for t in flat_t]
        tangent_in = [t for t, keep in zip(flat_t, live, strict=True) if keep]
        strategy = choose(*primals) if linearizing(tangent_in) else default

        def on_live(*values):
            values = iter(values)
            full = [next(values) if keep else x for x, keep in zip(flat, live, strict=True)]
            return run(strategy, *tree.unflatten(full))

        primal_in = [x for x, keep in zip(flat, live, strict=True) if keep]
        return jax.jvp(on_live, primal_in, tangent_in)

    return call(*args)
