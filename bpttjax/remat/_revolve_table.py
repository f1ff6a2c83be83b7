"""The revolve schedule as data: binomial checkpointing in fixed-trip loops only.

The same schedule as :mod:`._revolve` (Griewank and Walther's revolve, with
the engine's choice of split points), with every decision taken on the host
while tracing. ``T``, ``s`` and ``reverse`` are static, so the host can list
the backward pass's *actions* once, cache them per ``(T, s)``, and hand the
device a table to read:

* advance: evaluate the current step, its output becomes the current state;
* advance and store: the same, and the output also goes into the next
  snapshot slot (revolve's "takeshot");
* reverse: pull back the current step with the running cotangent, drop the
  top snapshot if it holds the state just reversed, and restore the top
  snapshot as the current state.

Each action is two bits; sixteen are packed into one ``uint32``. The forward
pass is a loop of ``T − 1`` steps that places the first sweep's snapshots at
positions computed on the host; the backward pass is one loop with one
iteration per action. Both trip counts are Python integers, so XLA knows them
(``known_trip_count``) and on a GPU queues the loop body without asking the
host; there is no ``cond``. The choice between the three actions is a
``where`` on the state and the cotangent, and a dynamic index into the
snapshot buffer (a write that is not a store goes to one spare slot).

The price of executing the schedule as data is that every action runs the
step's VJP: an advance pulls back a cotangent and throws it away. So one
gradient evaluates the step ``advances + T`` times, as the dynamic engine
does, and runs ``advances − (T − 1)`` pullbacks more than it (those of the
backward pass's advances). On a GPU this trades work for the host round trip
that each of the dynamic engine's decisions costs; on a CPU, where a round
trip is cheap, the dynamic engine is faster.

Under :func:`bpttjax.cells.run` (:func:`table_layer`) the waste is smaller.
Each action evaluates the step and pulls back only the cotangent of the carry
it entered with (:meth:`~bpttjax.remat.Layer.step_back`: one product with the
recurrent kernel besides the forward ones). A reversal also files what the
weight and input gradients need into a group's rows. The actions run in
groups of fixed size, each with at most a fixed number of reversals, a group
cut short by its reversals filled with do-nothing actions. After each group,
:meth:`~bpttjax.remat.Layer.bulk_grads` computes those gradients as a few
products over the group's rows, as the fused block does over its steps. So an
advance wastes the elementwise pullback and one product, where the step's
VJP wastes four (the carry's, the two kernels' and the input's); the filler
actions and the unused rows are the rest of the waste (``docs/strategies.md``
measures both).

References: A. Griewank and A. Walther, `Algorithm 799: revolve
<https://doi.org/10.1145/347837.347846>`_, ACM TOMS 26(1), 2000.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._trace import linearized
from .._tree import index, split_diff, stack_zeros, store, with_zeros
from . import _revolve
from ._base import Layer

__all__ = [
    "ACTIONS_PER_WORD",
    "Schedule",
    "grouped",
    "schedule",
    "slots",
    "table_bytes",
    "table_layer",
    "table_scan",
]

_I32 = jnp.int32
ADVANCE, STORE, REVERSE = 0, 1, 2
ACTIONS_PER_WORD = 16
"""Actions packed into one ``uint32`` of the table (two bits each)."""


class Schedule:
    """Revolve's schedule for ``(T, s)``, computed on the host.

    Attributes:
      length: ``T``.
      first_sweep: ``int32[s]``, the positions of the snapshots the forward
        pass stores (slot 0 holds ``init``; an unused slot holds ``T``).
      stored: how many of ``first_sweep``'s slots are used.
      actions: the backward pass's actions, in order (``uint8``).
      words: ``actions`` packed sixteen to a ``uint32`` (the table the device reads).
    """

    def __init__(self, length: int, first_sweep: np.ndarray, stored: int, actions: np.ndarray):
        self.length = length
        self.first_sweep = first_sweep
        self.stored = stored
        self.actions = actions
        self.words = _pack(actions)

    @property
    def table_bytes(self) -> int:
        """Bytes of the table the device reads (``words``)."""
        return int(self.words.nbytes)


@functools.lru_cache(maxsize=32)
def schedule(length: int, snapshots: int) -> Schedule:
    """The actions of one gradient through ``length >= 1`` steps with ``snapshots`` slots.

    Mirrors the dynamic engine's decisions (:func:`._revolve.split` at each new
    snapshot), so both run the same schedule; the work is a loop over the
    stored snapshots and the reversals, with the advances between them
    emitted as runs.
    """
    s = snapshots
    pos = [0]
    cur = 0
    while s - (len(pos) - 1) >= 2 and length - cur > 1:
        cur += _split(length - cur, s - (len(pos) - 1))
        if length - cur <= 1:
            break
        pos.append(cur)
    first = np.full(s, length, np.int32)
    first[: len(pos)] = pos
    stored = len(pos)

    kinds: list[int] = []
    runs: list[int] = []

    def restore_and_advance(e: int) -> None:
        # from the top snapshot to the state before step e − 1, storing at splits
        cur = pos[-1]
        target = cur + _split(e - cur, s - (len(pos) - 1)) if e - cur > 1 else cur
        while cur < e - 1:
            if target > cur and e - target > 1:
                if target - cur > 1:
                    kinds.append(ADVANCE)
                    runs.append(target - cur - 1)
                kinds.append(STORE)
                runs.append(1)
                cur = target
                pos.append(cur)
                target = cur + _split(e - cur, s - (len(pos) - 1))
            else:
                kinds.append(ADVANCE)
                runs.append(e - 1 - cur)
                cur = e - 1

    restore_and_advance(length - 1)
    for e in range(length - 2, -1, -1):
        kinds.append(REVERSE)
        runs.append(1)
        if pos[-1] == e and len(pos) > 1:
            pos.pop()
        restore_and_advance(e)
    actions = np.repeat(np.asarray(kinds, np.uint8), np.asarray(runs, np.int64))
    return Schedule(length, first, stored, actions)


def table_bytes(length: int, snapshots: int) -> int:
    """Bytes of the table for ``(T, s)``, from revolve's count alone: one action per
    advance after the first sweep and per reversal, ``binomial_advances`` in all."""
    actions = _revolve.binomial_advances(length, slots(length, snapshots))
    return 4 * max(-(-actions // ACTIONS_PER_WORD), 1)


def slots(length: int, snapshots: int) -> int:
    """The snapshots the engine keeps: at most ``T − 1`` (more would never be read)."""
    return max(min(snapshots, length - 1), 1)


@functools.lru_cache(maxsize=4096)
def _split(n: int, k: int) -> int:
    return _revolve.split(n, k)


# --- the engine -----------------------------------------------------------------------


def table_scan(
    f: Callable,
    init: Any,
    xs: Any,
    length: int,
    snapshots: int,
    reverse: bool = False,
    unroll: int | bool = 1,
) -> tuple[Any, Any]:
    """``lax.scan(f, init, xs, length)`` whose gradient runs revolve's schedule as data.

    Arguments as :func:`._revolve.binomial_scan` (already validated;
    ``length >= 1``); ``unroll`` applies to the forward pass.
    """
    closed, consts, by_jvp = _revolve.close_step(f, init, xs)
    spec = (length, slots(length, snapshots), bool(reverse), unroll, by_jvp)
    return _revolve.refusing_forward_mode(lambda: _scan(spec, closed, consts, init, xs))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _scan(spec, closed, consts, init, xs):
    length, _, reverse, unroll, _ = spec
    step = lambda c, x: closed(c, x, *consts)
    return jax.lax.scan(step, init, xs, length=length, reverse=reverse, unroll=unroll)


def _forward(spec, closed, consts, init, xs):
    """Steps ``0 .. T−2`` storing the first sweep's snapshots, then the VJP of the last.

    The snapshot buffer has ``s + 1`` slots: a step that stores nothing writes
    its state into the last, spare one, so that no step selects between the
    state and the buffer's old contents.
    """
    length, s, reverse, unroll, by_jvp = spec
    idx = _revolve.step_index(length, reverse)
    x_at = lambda t: None if xs is None else index(xs, idx(t))
    step = lambda carry, t: _revolve.primal(closed, carry, x_at(t), consts, by_jvp)
    last, ys, (buf, pos, k) = _first_sweep(step, init, length, s, reverse, unroll)
    (carry, y), last_vjp = _revolve.step_vjp(closed, consts, last, x_at(length - 1))
    ys = store(ys, idx(length - 1), y)
    return (carry, ys), (buf, pos, k, last_vjp)


def _first_sweep(step, init, length, s, reverse, unroll):
    """Steps ``0 .. T−2`` of ``step(carry, t) -> (carry, y)``, storing the first sweep's
    snapshots: the carry entering step ``T − 1``, ``ys`` (that step's row still zero),
    and the snapshot buffer, positions and top index."""
    plan = schedule(length, s)
    idx = _revolve.step_index(length, reverse)
    _, y_shape = jax.eval_shape(step, init, 0)
    pos = jnp.asarray(np.append(plan.first_sweep, length).astype(np.int32))
    buf = store(stack_zeros(s + 1, init), jnp.zeros((), _I32), init)

    def body(t, state):
        carry, buf, ys, k = state
        push = (k + 1 < plan.stored) & (t == pos[jnp.minimum(k + 1, s)])
        k = k + push.astype(_I32)
        buf = store(buf, jnp.where(push, k, s), carry)
        carry, y = step(carry, t)
        return carry, buf, store(ys, idx(t), y), k

    state = (init, buf, stack_zeros(length, y_shape), jnp.zeros((), _I32))
    last, buf, ys, k = jax.lax.fori_loop(0, length - 1, body, state, unroll=unroll)
    return last, ys, (buf, pos, k)


def _scan_fwd(spec, closed, consts, init, xs):
    out, res = _forward(spec, closed, consts, init, xs)
    return out, (consts, init, xs, res)


def _scan_bwd(spec, closed, residuals, cotangents):
    length, s, reverse, _, by_jvp = spec
    consts, init, xs, (buf, pos, top, last_vjp) = residuals
    pos = jnp.asarray(pos)  # a residual that is a constant of the program may come as numpy
    plan = schedule(length, s)
    ct_carry, ct_ys = cotangents
    ct_ys = split_diff(ct_ys)[0]  # float0 cotangents of integer outputs carry nothing
    idx = _revolve.step_index(length, reverse)
    x_at = lambda t: None if xs is None else index(xs, idx(t))

    # youturn: the last step's residuals came from the forward pass
    g_consts, g_carry, g_x = last_vjp(split_diff(ct_carry)[0], index(ct_ys, idx(length - 1)))
    xs_bar = None if xs is None else store(stack_zeros(length, g_x), idx(length - 1), g_x)
    words = jnp.asarray(plan.words)

    def act(i, loop):
        cur, top, buf, pos, state, g_consts, g_carry, xs_bar = loop
        word = words[i // ACTIONS_PER_WORD]
        shift = (2 * (i % ACTIONS_PER_WORD)).astype(jnp.uint32)
        kind = ((word >> shift) & 3).astype(_I32)
        rev, push = kind == REVERSE, kind == STORE

        # every action evaluates the current step through its VJP; only a
        # reversal keeps the pullback, only an advance keeps the new state
        (new_state, _), pull = _revolve.step_vjp(closed, consts, state, x_at(cur))
        d_consts, d_carry, d_x = pull(g_carry, index(ct_ys, idx(cur)))
        keep = lambda new, old: jnp.where(rev, new, old)
        g_carry = jax.tree.map(keep, d_carry, g_carry)
        g_consts = jax.tree.map(
            lambda g, d: g + jnp.where(rev, d, jnp.zeros_like(d)), g_consts, d_consts
        )
        if xs_bar is not None:
            xs_bar = store(
                xs_bar, idx(cur), jax.tree.map(lambda d: jnp.where(rev, d, jnp.zeros_like(d)), d_x)
            )

        # advance: store the new state in the next slot, or in the spare one
        slot = jnp.where(push, top + 1, s)
        buf = store(buf, slot, new_state)
        pos = pos.at[slot].set(cur + 1)
        top = jnp.where(push, top + 1, top)

        # reversal: drop the top snapshot if it held the state just reversed, restore the top
        drop = rev & (pos[top] == cur) & (top > 0)
        top = jnp.where(drop, top - 1, top)
        state = jax.tree.map(lambda r, n: jnp.where(rev, r, n), index(buf, top), new_state)
        cur = jnp.where(rev, pos[top], cur + 1)
        return cur, top, buf, pos, state, g_consts, g_carry, xs_bar

    loop = (pos[top], top, buf, pos, index(buf, top), g_consts, g_carry, xs_bar)
    *_, g_consts, g_carry, xs_bar = jax.lax.fori_loop(0, len(plan.actions), act, loop)
    ct_xs = None if xs_bar is None else with_zeros(xs, xs_bar)  # xs_bar is None iff xs is
    return with_zeros(list(consts), g_consts), with_zeros(init, g_carry), ct_xs


_scan.defvjp(_scan_fwd, _revolve.refuse_second_order(_scan_bwd))


# --- the engine for a whole-sequence layer (bj.cells.run) -------------------------------

PAD = 3
"""An action that does nothing: it fills a group of actions up to its fixed size."""

GROUP_ACTIONS, GROUP_REVERSALS = 16, 8
"""The layer engine's groups: at most this many actions, of which at most this many
reversals, whose weight gradients are computed together after the group. Larger groups
make fewer, larger products but pad more actions and hold more rows; smaller ones run
more products of a few rows each. The pair was chosen by timing a few of them
(``docs/strategies.md``, "Without host decisions")."""


@functools.lru_cache(maxsize=32)
def grouped(length: int, snapshots: int) -> tuple[np.ndarray, int]:
    """The layer engine's table: the youturn's reversal, then :func:`schedule`'s actions,
    cut into groups of ``GROUP_ACTIONS`` with at most ``GROUP_REVERSALS`` reversals each,
    a group cut short by its reversals filled up with ``PAD``. Returns the packed
    words and the number of groups."""
    acts = np.concatenate([[REVERSE], schedule(length, snapshots).actions]).astype(np.uint8)
    rev = np.cumsum(acts == REVERSE)
    starts, i, n = [], 0, len(acts)
    while i < n:
        starts.append(i)
        before = rev[i - 1] if i else 0
        i = min(i + GROUP_ACTIONS, n, int(np.searchsorted(rev, before + GROUP_REVERSALS + 1)))
    starts = np.asarray(starts)
    sizes = np.diff(np.append(starts, n))
    group = np.repeat(np.arange(len(starts)), sizes)
    padded = np.full(len(starts) * GROUP_ACTIONS, PAD, np.uint8)
    padded[group * GROUP_ACTIONS + np.arange(n) - np.repeat(starts, sizes)] = acts
    return _pack(padded), len(starts)


def _pack(actions: np.ndarray) -> np.ndarray:
    """Actions packed sixteen to a ``uint32``, the first in the lowest bits."""
    words = max(-(-len(actions) // ACTIONS_PER_WORD), 1)
    padded = np.zeros(words * ACTIONS_PER_WORD, np.uint32)
    padded[: len(actions)] = actions
    shifts = 2 * np.arange(ACTIONS_PER_WORD, dtype=np.uint32)
    return np.bitwise_or.reduce(padded.reshape(-1, ACTIONS_PER_WORD) << shifts, axis=1).astype(
        np.uint32
    )


def table_layer(layer: Layer, init: Any, snapshots: int) -> tuple[Any, Any]:
    """A :func:`bpttjax.cells.run` layer whose gradient runs revolve's schedule as data,
    each action doing only what it needs (``length >= 1``).

    Every action evaluates the step and the cotangent of the carry it
    entered with (:meth:`Layer.step_back`); an advance keeps the new state,
    a reversal the cotangent, and the row that :meth:`Layer.bulk_grads`
    turns into weight and input gradients after each group of actions.
    """
    length, reverse = layer.length, layer.reverse
    scales = None
    if layer.truncation is not None:
        pos = jnp.arange(length, dtype=_I32)
        counter = length - 1 - pos if reverse else pos
        scales = jax.vmap(layer.truncation.scale)(counter, pos)
    arrays = jax.tree.leaves((layer.params, init, layer.xs, scales))
    if any(linearized(x) for x in arrays):
        raise TypeError(_revolve.UNSUPPORTED.format(what="forward-mode jax.linearize of the scan"))
    bare = layer.replace(params=None, xs=None, truncation=None)
    spec = (length, slots(length, snapshots), bool(reverse), layer.unroll)
    return _revolve.refusing_forward_mode(
        lambda: _layer_scan(spec, bare, layer.params, init, layer.xs, scales)
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _layer_scan(spec, bare, params, init, xs, scales):
    length, _, reverse, unroll = spec
    step = bare.replace(params=params, xs=xs).step
    return jax.lax.scan(step, init, xs, length=length, reverse=reverse, unroll=unroll)


def _layer_fwd(spec, bare, params, init, xs, scales):
    # the dynamic engine's forward pass, with the layer's step, and without the
    # last step's VJP: the backward pass starts by reversing that step
    length, s, reverse, unroll = spec
    step = bare.replace(params=params, xs=xs).step
    idx = _revolve.step_index(length, reverse)
    at = lambda carry, t: step(carry, index(xs, idx(t)))
    last, ys, (buf, pos, k) = _first_sweep(at, init, length, s, reverse, unroll)
    carry, y = at(last, length - 1)
    ys = store(ys, idx(length - 1), y)
    return (carry, ys), (params, xs, scales, buf, pos, k, last)


def _layer_bwd(spec, bare, residuals, cotangents):
    length, s, reverse, _ = spec
    params, xs, scales, buf, pos, top, last = residuals
    pos = jnp.asarray(pos)
    layer = bare.replace(params=params, xs=xs)
    words, groups = grouped(length, s)
    words = jnp.asarray(words)
    ct_carry, ct_ys = cotangents
    idx = _revolve.step_index(length, reverse)
    K = GROUP_REVERSALS
    _, _, row0 = jax.eval_shape(layer.step_back, last, 0, ct_carry, index(ct_ys, 0))
    bare_rows = (stack_zeros(K + 1, last), jnp.zeros(K + 1, _I32), stack_zeros(K + 1, row0))

    def act(i, loop):
        cur, top, buf, pos, state, g_carry, rows, n = loop
        word = words[i // ACTIONS_PER_WORD]
        shift = (2 * (i % ACTIONS_PER_WORD)).astype(jnp.uint32)
        kind = ((word >> shift) & 3).astype(_I32)
        rev, push, pad = kind == REVERSE, kind == STORE, kind == PAD
        t = idx(cur)
        (new_state, _), d_in, row = layer.step_back(state, t, g_carry, index(ct_ys, t))
        if scales is not None:  # an exact zero at a cut, so that it also stops inf/nan
            scale = scales[t]
            d_in = jax.tree.map(lambda a: jnp.where(scale == 0, 0, a * scale.astype(a.dtype)), d_in)
        g_carry = jax.tree.map(lambda new, old: jnp.where(rev, new, old), d_in, g_carry)
        # a reversal's row goes into the group's next row, any other into the spare one
        slot = jnp.where(rev, n, K)
        carries, ts, kept = rows
        rows = (store(carries, slot, state), ts.at[slot].set(t), store(kept, slot, row))
        n = n + rev.astype(_I32)

        # advance: the new state into the next slot, or into the spare one
        slot = jnp.where(push, top + 1, s)
        buf = store(buf, slot, new_state)
        pos = pos.at[slot].set(cur + 1)
        top = jnp.where(push, top + 1, top)
        # reversal: drop the top snapshot if it held the state just reversed, restore the top
        drop = rev & (pos[top] == cur) & (top > 0)
        top = jnp.where(drop, top - 1, top)
        restored = index(buf, top)
        state = jax.tree.map(
            lambda r, a, o: jnp.where(rev, r, jnp.where(pad, o, a)), restored, new_state, state
        )
        cur = jnp.where(rev, pos[top], jnp.where(pad, cur, cur + 1))
        return cur, top, buf, pos, state, g_carry, rows, n

    def group(g, loop):
        cur, top, buf, pos, state, g_carry, g_params, xs_bar = loop
        inner = (cur, top, buf, pos, state, g_carry, bare_rows, jnp.zeros((), _I32))
        # Python bounds: a known trip count (traced bounds would make it unknown to XLA)
        at = lambda j, inner: act(g * GROUP_ACTIONS + j, inner)
        inner = jax.lax.fori_loop(0, GROUP_ACTIONS, at, inner)
        cur, top, buf, pos, state, g_carry, (carries, ts, kept), _ = inner
        first = lambda tree: jax.tree.map(lambda a: a[:K], tree)
        d_params, d_xs = layer.bulk_grads(first(carries), ts[:K], first(kept))
        g_params = jax.tree.map(jnp.add, g_params, d_params)
        xs_bar = xs_bar.at[ts[:K]].add(d_xs)
        return cur, top, buf, pos, state, g_carry, g_params, xs_bar

    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    loop = (jnp.asarray(length - 1, _I32), top, buf, pos, last, ct_carry, zeros(params), zeros(xs))
    *_, g_carry, g_params, xs_bar = jax.lax.fori_loop(0, groups, group, loop)
    d_scales = None if scales is None else jnp.zeros_like(scales)
    return g_params, g_carry, xs_bar, d_scales


_layer_scan.defvjp(_layer_fwd, _revolve.refuse_second_order(_layer_bwd))
