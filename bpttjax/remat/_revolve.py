"""The revolve engine: a binomial checkpointing schedule inside one compiled program.

Griewank and Walther's binomial checkpointing reverses ``T`` steps of a
recurrence while storing at most ``s`` carries ("snapshots"), with the fewest
forward recomputations possible for that memory:

* A. Griewank, "Achieving logarithmic growth of temporal and spatial
  complexity in reverse automatic differentiation", Optimization Methods and
  Software 1 (1992). https://doi.org/10.1080/10556789208805505
* A. Griewank and A. Walther, "Algorithm 799: revolve", ACM TOMS 26(1)
  (2000). https://doi.org/10.1145/347837.347846

Cost, in this module's terms. Let ``β(s, r) = C(s + r, s)`` and ``r`` the
smallest integer with ``β(s, r) >= T``. Reversing ``T`` steps with ``s``
snapshots, the first holding the initial carry, takes
``r·T − β(s + 1, r − 1)`` forward *advances* (steps evaluated only to move
the state forward, the first sweep included) and ``T`` step VJPs. The engine
evaluates the step exactly ``advances + T`` times: the forward pass runs the
last step through ``jax.vjp`` and keeps its residuals (revolve's "youturn"),
so that step is not evaluated a second time.

How it runs. ``binomial_scan`` is a ``jax.custom_vjp``:

* forward: one loop over the steps that writes ``ys`` and places the first
  sweep's snapshots in a buffer of ``s`` carries;
* backward: one loop with one iteration per step to reverse (a known trip
  count, unless ``steps`` is given). Each iteration
  restores the newest snapshot, advances (storing new snapshots where the
  schedule says), then reverses one step with ``jax.vjp`` and adds the
  parameters' cotangent into a single accumulator.

The schedule is computed inside the loops from integers (no table of
actions), so the compiled program has the same size for every ``T``. Its
inner loops' trip counts and its ``lax.cond`` branches are data, which on a
GPU the host waits for: :func:`._revolve_events.host_events` counts them.

Known costs, stated here rather than hidden: every forward step writes the
carry into the snapshot buffer (a select, so that the buffer never holds a
partial write), which is a carry-sized copy per step; and the split point is
found by a small integer loop of ``r`` iterations at every new snapshot.
``custom_vjp`` gives up forward-mode differentiation of the scan (``jax.jvp``,
``jax.linearize``) and reverse-mode differentiation of the gradient
(``grad∘grad``); ``jvp∘grad`` and ``linearize∘grad`` work. Each refusal is a
``TypeError`` naming ``Nested``, raised while tracing, except where the scan
runs inside a ``jax.jit`` that ``jax.linearize`` differentiates from outside:
JAX linearizes the compiled function's jaxpr without running this module's
code, and raises its own error when the linear function is called.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._trace import linearized, transposed
from .._tree import index, split_diff, stack_zeros, store, with_zeros, zero_cotangent

__all__ = [
    "UNSUPPORTED",
    "beta",
    "binomial_advances",
    "binomial_scan",
    "binomial_steps",
    "close_step",
    "has_jvp",
    "primal",
    "refuse_second_order",
    "refusing_forward_mode",
    "split",
    "step_index",
    "step_vjp",
    "sweeps",
]

_I32 = jnp.int32
_INT32_MAX = np.iinfo(np.int32).max
MAX_LENGTH = 2**30
"""Longest sequence the int32 schedule arithmetic is exact for."""


# --- the schedule, in Python (the cost model) -------------------------------------------


def beta(s: int, r: int) -> int:
    """``β(s, r) = C(s + r, s)``: the most steps ``s`` snapshots reverse with ``r`` sweeps."""
    return math.comb(s + r, s) if r >= 0 else 0


def sweeps(length: int, snapshots: int) -> int:
    """The smallest ``r`` with ``β(snapshots, r) >= length`` (doubling, then bisection)."""
    if length <= 1:
        return 0
    lo, hi = 0, 1  # β(snapshots, lo) < length throughout
    while beta(snapshots, hi) < length:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if beta(snapshots, mid) >= length else (mid, hi)
    return hi


def binomial_advances(length: int, snapshots: int) -> int:
    """Forward advances of the binomial schedule: ``r·T − β(s + 1, r − 1)``.

    Counts the steps evaluated only to move the state forward (the first sweep
    included, the ``T`` step VJPs not). It is the minimum over all schedules
    that store at most ``snapshots`` carries (Griewank, 1992).
    """
    if length <= 1:
        return 0
    if snapshots == 1:  # one snapshot: replay from the start for every step
        return length * (length - 1) // 2
    r = sweeps(length, snapshots)
    return r * length - beta(snapshots + 1, r - 1)


def binomial_steps(length: int, snapshots: int) -> int:
    """Every evaluation of the step by the engine: ``advances + T``."""
    return binomial_advances(length, snapshots) + length


def split(n: int, k: int) -> int:
    """How far to advance before the next snapshot: ``n >= 2`` steps left, ``k`` slots.

    ``k`` counts the slot already holding the range's first state. With one
    slot, advance to the last step. Otherwise, with ``β(k, r − 1) < n <= β(k, r)``,
    any ``m`` with ``β(k, r − 2) <= m <= β(k, r − 1)`` and
    ``n − m <= β(k − 1, r)`` is optimal (both remainders stay in their cheapest
    slope); this takes the smallest such ``m``. Mirrors :func:`_split_traced`.
    """
    if k == 1:
        return n - 1
    r = sweeps(n, k)
    return max(beta(k, r - 2), n - beta(k - 1, r), 1)


# --- the schedule, traced (int32, inside the loops) -----------------------------------


def _split_traced(n: jax.Array, k: jax.Array) -> jax.Array:
    """:func:`split` on int32 scalars; exact for ``n <= MAX_LENGTH``.

    ``β(k, r) = β(k, r − 1) + β(k − 1, r)`` with ``β(k − 1, r) = β(k, r − 1)·k/r``
    computed as ``q·k + (ρ·k)/r`` (``β(k, r − 1) = q·r + ρ``), so no product
    overflows. A value above the int32 maximum saturates there; it then only
    enters ``n − β(k − 1, r)``, which is negative for ``n <= 2**30`` either way.
    """

    def cond(state):
        _, _, _, b = state
        return (k >= 2) & (b < n)

    def body(state):
        r, _, b_prev, b = state
        r = r + 1
        q, rho = b // r, b % r
        head = jnp.where(q > (_INT32_MAX - b) // k, _INT32_MAX, b + q * k)
        tail = (rho * k) // r
        b_next = jnp.where(head > _INT32_MAX - tail, _INT32_MAX, head + tail)
        return r, b_prev, b, b_next

    zero, one = jnp.zeros((), _I32), jnp.ones((), _I32)
    _, b2, b1, b = jax.lax.while_loop(cond, body, (zero, zero, zero, one))
    m = jnp.maximum(jnp.maximum(b2, n - (b - b1)), 1)
    return jnp.where(k >= 2, m, n - 1)


def _first_sweep(n: jax.Array, snapshots: int) -> jax.Array:
    """Positions of the snapshots the first sweep stores (``int32[s]``; unused: ``n``)."""
    pos = jnp.full((snapshots,), n, _I32).at[0].set(0)

    def cond(state):
        k, cur, _ = state
        return (snapshots - k >= 2) & (n - cur > 1)

    def body(state):
        k, cur, pos = state
        cur = cur + _split_traced(n - cur, snapshots - k)
        push = n - cur > 1
        k = k + push.astype(_I32)
        pos = pos.at[k].set(jnp.where(push, cur, pos[k]))
        return jnp.where(push, k, snapshots), cur, pos

    _, _, pos = jax.lax.while_loop(cond, body, (jnp.zeros((), _I32), jnp.zeros((), _I32), pos))
    return pos


# --- the engine -----------------------------------------------------------------------


def binomial_scan(
    f: Callable,
    init: Any,
    xs: Any,
    length: int,
    snapshots: int,
    reverse: bool = False,
    unroll: int | bool = 1,
    steps: jax.Array | None = None,
    overlap: bool = True,
) -> tuple[Any, Any]:
    """``lax.scan(f, init, xs, length)`` whose gradient follows the binomial schedule.

    Args:
      f, init, xs, length, reverse, unroll: as ``jax.lax.scan`` (already
        validated; ``length >= 1``). ``unroll`` applies to the forward pass.
      snapshots: ``s >= 1`` stored carries, the first holding ``init``.
      steps: for tests only, a traced number of steps ``<= length`` to run
        (one compiled program for many lengths); ``ys`` past it are zeros.
      overlap: let the backward pass recompute the next state while it pulls
        back the current step (two independent computations that XLA may run
        side by side), or run them one after the other.

    Returns:
      ``(carry, ys)`` as ``jax.lax.scan``.
    """
    closed, consts, by_jvp = close_step(f, init, xs)
    n = jnp.asarray(length if steps is None else steps, _I32)
    spec = (length, snapshots, bool(reverse), unroll, steps is None, bool(overlap), by_jvp)
    return refusing_forward_mode(lambda: _scan(spec, closed, consts, init, xs, n))


def close_step(f: Callable, init: Any, xs: Any) -> tuple[Callable, list, bool]:
    """``f`` with its traced constants hoisted (``jax.closure_convert``), those
    constants, and whether it can run under ``jax.jvp`` (:func:`has_jvp`).

    Raises the library's ``TypeError`` where the scan itself is being linearized
    (``jax.linearize``), which a ``custom_vjp`` engine cannot follow.
    """
    x0 = None if xs is None else index(xs, jnp.zeros((), _I32))
    closed, consts = jax.closure_convert(lambda c, x: f(c, x), init, x0)
    by_jvp = has_jvp(closed, init, x0, consts)
    if any(linearized(x) for x in jax.tree.leaves((consts, init, xs))):
        raise TypeError(UNSUPPORTED.format(what="forward-mode jax.linearize of the scan"))
    return closed, list(consts), by_jvp


def refusing_forward_mode(call: Callable[[], Any]) -> Any:
    """``call()``, with JAX's error for ``jax.jvp`` of a ``custom_vjp`` replaced by the
    library's, which names ``Nested``."""
    try:
        return call()
    except TypeError as err:
        if "forward-mode autodiff" not in str(err):
            raise
        raise TypeError(UNSUPPORTED.format(what="forward-mode jax.jvp of the scan")) from err


UNSUPPORTED = (
    "bj.Binomial does not support {what}: it is a jax.custom_vjp, which has no "
    "forward-mode rule, and its backward pass is a while loop that reverse mode cannot "
    "differentiate again. Use remat=bj.Nested(levels) here, which supports every "
    "transformation; jax.jvp or jax.linearize of jax.grad (Hessian-vector products) does "
    "work with Binomial."
)


def refuse_second_order(bwd: Callable) -> Callable:
    """Refuse, with an error naming ``Nested``, to be differentiated in reverse mode.

    Under ``grad∘grad`` the backward pass runs under the outer ``grad``'s
    linearization, whose transpose would fail later, inside JAX, on the
    engine's while loops. ``jvp∘grad`` runs it under plain JVP and works, and
    so does ``linearize∘grad``: its linearization (``is_vjp`` unset) is
    evaluated, never transposed.
    """

    @functools.wraps(bwd)
    def wrapped(spec, closed, residuals, cotangents):
        leaves = jax.tree.leaves((residuals, cotangents))
        if any(map(transposed, leaves)):
            what = "reverse-mode differentiation of its gradient"
            raise TypeError(UNSUPPORTED.format(what=what))
        return bwd(spec, closed, residuals, cotangents)

    return wrapped


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _scan(spec, closed, consts, init, xs, n):
    length, _, reverse, unroll, static, *_ = spec
    if static:
        return jax.lax.scan(
            lambda c, x: closed(c, x, *consts),
            init,
            xs,
            length=length,
            reverse=reverse,
            unroll=unroll,
        )
    return _forward(spec, closed, consts, init, xs, n)[0]


def step_index(n, reverse):
    return (lambda t: n - 1 - t) if reverse else (lambda t: t)


def _forward(spec, closed, consts, init, xs, n):
    """Run steps ``0 .. n−2`` storing the first sweep's snapshots, then the VJP of the last."""
    length, snapshots, reverse, unroll, static, _, by_jvp = spec
    idx = step_index(n, reverse)
    x_at = lambda t: None if xs is None else index(xs, idx(t))
    _, y_shape = jax.eval_shape(closed, init, x_at(0), *consts)
    pos = _first_sweep(n, snapshots)
    buf = store(stack_zeros(snapshots, init), jnp.zeros((), _I32), init)

    def body(t, state):
        carry, buf, ys, k = state
        push = (k + 1 < snapshots) & (t == pos[jnp.minimum(k + 1, snapshots - 1)])
        k = k + push.astype(_I32)
        keep = jax.tree.map(lambda c, b: jnp.where(push, c, b[k]), carry, buf)
        buf = store(buf, k, keep)
        carry, y = primal(closed, carry, x_at(t), consts, by_jvp)
        return carry, buf, store(ys, idx(t), y), k

    ys = stack_zeros(length, y_shape)
    state = (init, buf, ys, jnp.zeros((), _I32))
    if static:
        carry, buf, ys, k = jax.lax.fori_loop(0, length - 1, body, state, unroll=unroll)
    else:
        carry, buf, ys, k = jax.lax.fori_loop(0, n - 1, body, state)
    (carry, y), last_vjp = step_vjp(closed, consts, carry, x_at(n - 1))
    ys = store(ys, idx(n - 1), y)
    return (carry, ys), (buf, pos, k, last_vjp)


def primal(closed, carry, x, consts, by_jvp):
    """The step's outputs, computed as the primal half of its JVP.

    The same values as ``closed(carry, x, *consts)``. The difference shows
    under an outer ``jax.jvp`` (``jvp∘grad``): a ``custom_jvp`` in the step,
    such as the truncation's ``scale_cotangent``, then sees its primal rule
    only, as it does in plain BPTT's forward pass, instead of rescaling the
    outer tangents of the forward and recomputed values.

    A step that calls a ``jax.custom_vjp`` function (gradient clipping, a
    library's fused op) has no JVP; it is then called as it is, which gives
    the same values (and ``jvp∘grad`` of such a step fails inside JAX with
    any strategy); ``by_jvp`` is ``False`` for such a step (:func:`has_jvp`).
    """
    if not by_jvp:
        return closed(carry, x, *consts)
    args = (carry, x, list(consts))
    zeros = jax.tree.map(zero_cotangent, args)
    return jax.jvp(lambda c, x, k: closed(c, x, *k), args, zeros)[0]


def has_jvp(closed, init, x0, consts) -> bool:
    """Whether the step can run under ``jax.jvp``: not if it calls a ``custom_vjp`` function.

    JAX traces the JVP of a ``custom_vjp`` call without complaint and fails
    only when the tangent part is evaluated, which a loop may do; so the
    step's jaxpr is searched for such a call instead.
    """
    jaxpr = jax.make_jaxpr(closed)(init, x0, *consts).jaxpr
    return not _calls_custom_vjp(jaxpr)


def _calls_custom_vjp(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if "custom_vjp" in eqn.primitive.name:
            return True
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(item, "jaxpr", item)  # a ClosedJaxpr's, or a Jaxpr
                if hasattr(sub, "eqns") and _calls_custom_vjp(sub):
                    return True
    return False


def step_vjp(closed, consts, carry, x):
    """``jax.vjp`` of one step with respect to its inexact inputs only.

    Returns the step's outputs and ``pull(ct_carry, ct_y)``, which maps the
    cotangents of the outputs' inexact leaves (lists of leaves) to those of
    the inputs' inexact leaves: ``(consts, carry, x)``, each a list.
    """
    dc, oc, mc = split_diff(list(consts))
    dh, oh, mh = split_diff(carry)
    dx, ox, mx = split_diff(x)

    def fn(dc, dh, dx):
        new_carry, y = closed(mh(dh, oh), mx(dx, ox), *mc(dc, oc))
        return (split_diff(new_carry)[0], split_diff(y)[0]), (new_carry, y)

    _, pullback, out = jax.vjp(fn, dc, dh, dx, has_aux=True)
    return out, jax.tree_util.Partial(_pull, pullback)


def _pull(pullback, ct_carry, ct_y):
    return pullback((ct_carry, ct_y))


def _scan_fwd(spec, closed, consts, init, xs, n):
    out, res = _forward(spec, closed, consts, init, xs, n)
    return out, (consts, init, xs, n, res)


def _scan_bwd(spec, closed, residuals, cotangents):
    length, snapshots, reverse, _, static, overlap, by_jvp = spec
    consts, init, xs, n, (buf, pos, k, last_vjp) = residuals
    ct_carry, ct_ys = cotangents
    ct_ys = split_diff(ct_ys)[0]  # float0 cotangents of integer outputs carry nothing
    idx = step_index(n, reverse)
    x_at = lambda t: None if xs is None else index(xs, idx(t))
    step = lambda c, t: primal(closed, c, x_at(t), consts, by_jvp)[0]

    # youturn: the last step's residuals came from the forward pass
    g_consts, g_carry, g_x = last_vjp(split_diff(ct_carry)[0], index(ct_ys, idx(n - 1)))
    xs_bar = None if xs is None else store(stack_zeros(length, g_x), idx(n - 1), g_x)

    def restore_and_advance(e, k, buf, pos):
        """The state before step ``e − 1``: restore the newest snapshot, advance to it.

        One loop of single steps; where a step reaches the schedule's split
        point, its state becomes a new snapshot and the next split is computed,
        both under one ``cond`` (so neither the snapshot write nor the small
        integer loop runs at the other steps).
        """
        cur = pos[k]
        next_split = lambda cur, k: cur + _split_traced(e - cur, snapshots - k)
        target = jax.lax.cond(e - cur > 1, next_split, lambda cur, k: cur, cur, k)

        def advance(loop):
            cur, target, k, buf, pos, state = loop
            state = step(state, cur)
            cur = cur + 1
            push = (cur == target) & (e - cur > 1)

            def do_push(k, buf, pos):
                k = jnp.minimum(k + 1, snapshots - 1)
                return k, store(buf, k, state), pos.at[k].set(cur), next_split(cur, k)

            k, buf, pos, target = jax.lax.cond(
                push, do_push, lambda k, buf, pos: (k, buf, pos, target), k, buf, pos
            )
            return cur, target, k, buf, pos, state

        loop = (cur, target, k, buf, pos, index(buf, k))
        _, _, k, buf, pos, state = jax.lax.while_loop(lambda s: s[0] < e - 1, advance, loop)
        return k, buf, pos, state

    def reverse_one(loop):
        """Reverse step ``e − 1``, then get the state for step ``e − 2``.

        The two are independent. With ``overlap``, XLA may run the
        recomputation alongside the pullback's products (software pipelining
        across iterations); without, a barrier orders them.
        """
        e, k, buf, pos, state, g_consts, g_carry, xs_bar = loop
        e = e - 1
        _, pull = step_vjp(closed, consts, state, x_at(e))
        d_consts, g_carry, g_x = pull(g_carry, index(ct_ys, idx(e)))
        g_carry = _live_until(g_carry, split_diff(state)[0], e < 0)
        g_consts = jax.tree.map(jnp.add, g_consts, d_consts)
        if xs_bar is not None:
            xs_bar = store(xs_bar, idx(e), g_x)
        k = jnp.where((pos[k] == e) & (k > 0), k - 1, k)
        if not overlap:
            g_consts, g_carry, buf = jax.lax.optimization_barrier((g_consts, g_carry, buf))
        k, buf, pos, state = restore_and_advance(e, k, buf, pos)
        return e, k, buf, pos, state, g_consts, g_carry, xs_bar

    k, buf, pos, state = restore_and_advance(n - 1, k, buf, pos)
    loop = (n - 1, k, buf, pos, state, g_consts, g_carry, xs_bar)
    if static:  # a known trip count: XLA queues the iterations without asking the host
        loop = jax.lax.fori_loop(0, length - 1, lambda _, loop: reverse_one(loop), loop)
    else:
        loop = jax.lax.while_loop(lambda s: s[0] > 0, reverse_one, loop)
    *_, g_consts, g_carry, xs_bar = loop
    ct_xs = None if xs_bar is None else with_zeros(xs, xs_bar)  # xs_bar is None iff xs is
    return with_zeros(list(consts), g_consts), with_zeros(init, g_carry), ct_xs, None


def _live_until(outs: list, keep: list, never: jax.Array) -> list:
    """``outs``, unchanged, computed so that ``keep`` stays live until they exist.

    One slice of each leaf becomes ``where(never, keep's slice, its slice)``,
    where ``never`` is a traced false that XLA cannot prove false. The values
    are the same; what changes is XLA's buffer assignment. In the backward
    loop, the state a step is reversed from is read last by the
    weight-gradient products (``h^T dz``). Once those have read it, buffer
    assignment may give its buffer to the carry's cotangent (``dz W^T``), and
    XLA's CPU runtime, which runs a loop body's operations side by side as far
    as their buffers allow, must then run the two products one after the
    other. Keeping the state live until the cotangent exists lets them run
    together, at the price of up to one carry of memory (docs/strategies.md
    has the measurement). A select over one slice costs next to nothing;
    over the whole leaf it is a pass that XLA may not fuse.
    """

    def one(out, kept):
        axis = _unsharded_axis(out)
        if axis is None:
            return jnp.where(never, kept, out)
        part = lambda a: jax.lax.slice_in_dim(a, 0, 1, axis=axis)
        head = jnp.where(never, part(kept), part(out))
        return jax.lax.dynamic_update_slice_in_dim(out, head, 0, axis)

    return [one(out, kept) for out, kept in zip(outs, keep, strict=True)]


def _unsharded_axis(x: jax.Array) -> int | None:
    """The axis of ``x`` that :func:`_live_until` slices: non-empty and not
    sharded explicitly by a mesh axis (slicing such an axis raises in JAX).

    With one device, the first such axis: a row, contiguous in memory, which
    XLA slices without a strided copy. With several, the last: usually a
    feature axis, which data parallelism leaves whole, so the slice stays on
    each device.
    """
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None) or ()
    axes = [
        axis
        for axis in range(x.ndim)
        if x.shape[axis] > 0 and (axis >= len(spec) or spec[axis] is None)
    ]
    if not axes:
        return None
    return axes[0] if jax.device_count() == 1 else axes[-1]


_scan.defvjp(_scan_fwd, refuse_second_order(_scan_bwd))
