"""bj.memory.control_flow, and every strategy's claim of host-decided events.

On a GPU a loop without a known trip count, and every conditional, waits for
the host (docs/strategies.md). Every registered strategy's cost states how
many times one gradient does so (``Cost.host_events``): where it says none,
the compiled gradient must have neither, for ``bj.scan``, ``bj.cells.run`` and
``bj.nnx.RNN``, with truncation and ``reverse``; where it says some, it must
have them. For the dynamic revolve engine (``Binomial``) the count itself is
checked against the loop tests and conditionals executed at run time.
"""

import collections
import functools
import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from helpers import strategy_id

import bpttjax as bj
from bpttjax.remat import _revolve_events

T, B, D, H = 37, 2, 3, 4
COSTS = bj.remat.StepCosts(carry_bytes=B * H * 8, residual_bytes=9 * B * H * 8)  # any will do
EXAMPLES = bj.remat.examples()


def claimed(remat, step, h0, xs):
    """The host events ``remat``'s cost states for this scan; a Budget's, its plan's."""
    if isinstance(remat, bj.Budget):
        remat = remat.plan(step, h0, xs).strategy
    return remat.cost(T, COSTS).host_events


def scan_gradient(remat, reverse=False, truncation=None):
    params = bj.cells.init_rnn(jax.random.key(0), D, H, jnp.float64)
    xs = jnp.ones((T, B, D))
    h0 = bj.cells.initial_carry("rnn", H, (B,), dtype=jnp.float64)

    def loss(params, h0, xs):
        step = functools.partial(bj.cells.rnn, params)
        _, hs = bj.scan(step, h0, xs, remat=remat, reverse=reverse, truncation=truncation)
        return jnp.sum(hs**2)

    cf = bj.memory.control_flow(jax.grad(loss, argnums=(0, 1, 2)), params, h0, xs)
    return cf, claimed(remat, functools.partial(bj.cells.rnn, params), h0, xs)


def fused_gradient(remat, reverse=False, truncation=None):
    params = bj.cells.init_lstm(jax.random.key(0), D, H, jnp.float64)
    xs = jnp.ones((T, B, D))
    h0 = bj.cells.initial_carry("lstm", H, (B,), dtype=jnp.float64)
    options = dict(remat=remat, reverse=reverse, truncation=truncation, batch_chunks=1)

    def loss(params, xs):
        _, hs = bj.cells.run("lstm", params, h0, xs, **options)
        return jnp.sum(hs**2)

    cf = bj.memory.control_flow(jax.grad(loss), params, xs)
    return cf, remat.cost(T, COSTS).host_events


def nnx_gradient(remat, reverse=False, truncation=None):
    cell = nnx.GRUCell(D, H, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    options = dict(remat=remat, truncation=truncation, reverse=reverse, batch_chunks=1)
    model = bj.nnx.RNN(cell, rngs=False, **options)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x, h0 = jnp.ones((B, T, D)), jnp.zeros((B, H))

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params, rest)(x, initial_carry=h0) ** 2)

    cf = bj.memory.control_flow(jax.grad(loss), params)
    return cf, remat.cost(T, COSTS).host_events


TRUNCATED = dict(reverse=True, truncation=bj.Truncate(5))
RUNS = {
    "scan": scan_gradient,
    "scan-reverse-truncated": functools.partial(scan_gradient, **TRUNCATED),
    "cells.run": fused_gradient,
    "cells.run-reverse-truncated": functools.partial(fused_gradient, **TRUNCATED),
    "nnx.RNN": nnx_gradient,
    "nnx.RNN-reverse-truncated": functools.partial(nnx_gradient, **TRUNCATED),
}


def cases():
    """Every example under ``bj.scan``, then each other way to run a scan in turn, for
    every example but ``Budget`` (whose plan can be read for ``bj.scan`` only), and those
    claiming host events (``Binomial``) under ``bj.nnx.RNN`` too."""
    others = [name for name in RUNS if name != "scan"]
    layered = [remat for remat in EXAMPLES if not isinstance(remat, bj.Budget)]
    rotation = [(remat, others[i % len(others)]) for i, remat in enumerate(layered)]
    deciding = [remat for remat in layered if remat.cost(T, COSTS).host_events]
    extra = [(remat, "nnx.RNN-reverse-truncated") for remat in deciding]
    return (
        [(remat, "scan") for remat in EXAMPLES]
        + rotation
        + [case for case in extra if case not in rotation]
    )


@pytest.mark.parametrize(
    ("remat", "run"), cases(), ids=lambda v: strategy_id(v) if not isinstance(v, str) else v
)
def test_every_strategy_has_the_host_events_its_cost_states(remat, run):
    cf, events = RUNS[run](remat)
    if events == 0:
        assert cf.on_device and cf.while_loops >= 1, (remat, run, cf)
    else:
        assert not cf.on_device, (remat, run, events, cf)


COUNTED = [(1, 1), (2, 2), (3, 1), (12, 2), (20, 40), (37, 3)]
"""``(T, s)``: one step and two (whose schedules XLA could fold, were nothing counted),
one snapshot, two, more snapshots than steps, and a few in between."""


def test_binomial_host_events_are_the_decisions_its_engine_executes(monkeypatch):
    """Count, at run time, every test of a ``while`` loop's predicate and every branch
    taken by a ``cond`` in the revolve engine's gradient, against ``host_events``.

    The engine calls ``jax.lax.while_loop`` and ``jax.lax.cond``; here they are
    wrapped so that the predicate and each branch first bump a counter through a
    host callback, tagged by ``(T, s)``, and every case is one program. A loop
    whose trip count XLA proves runs without testing its predicate, so makes no
    count, as it makes no host event. The second half checks that, uncounted,
    XLA keeps every loop and conditional the engine traces (from ``T = 3`` on;
    it could fold a one- or two-step schedule, computable while compiling), so
    each execution counted is a host event in the program users run.
    """
    executed, sites, case = collections.Counter(), collections.Counter(), [None]
    while_loop, cond = jax.lax.while_loop, jax.lax.cond

    def count(tag):
        jax.debug.callback(lambda: executed.update([tag]))

    def counted_while_loop(cond_fun, body_fun, init):
        tag, sites[case[0], "while"] = case[0], sites[case[0], "while"] + 1

        def test(state):
            count(tag)
            return cond_fun(state)

        return while_loop(test, body_fun, init)

    def counted_cond(pred, true_fun, false_fun, *operands):
        tag, sites[case[0], "cond"] = case[0], sites[case[0], "cond"] + 1

        def counted(branch):
            def run(*args):
                count(tag)
                return branch(*args)

            return run

        return cond(pred, counted(true_fun), counted(false_fun), *operands)

    def gradient(T, s, h):
        xs = jnp.arange(T, dtype=jnp.float64)
        step = lambda h, x: (jnp.sin(h) * 0.9 + 0.01 * x, h)
        return jax.grad(lambda h: bj.scan(step, h, xs, remat=bj.Binomial(s))[0])(h)

    @jax.jit
    def gradients(h):
        for case[0] in COUNTED:
            h = h + gradient(*case[0], h)
        return h

    monkeypatch.setattr(jax.lax, "while_loop", counted_while_loop)
    monkeypatch.setattr(jax.lax, "cond", counted_cond)
    jax.block_until_ready(gradients(1.0))
    jax.effects_barrier()
    assert dict(executed) == {(T, s): _revolve_events.host_events(T, s) for T, s in COUNTED}
    assert all(bj.Binomial(s).cost(T, COSTS).host_events == executed[T, s] for T, s in COUNTED)

    monkeypatch.undo()
    cf = bj.memory.control_flow(functools.partial(gradient, 37, 3), 1.0)
    loops, conditionals = sites[(37, 3), "while"], sites[(37, 3), "cond"]
    assert (cf.unknown_trip_loops, cf.conditionals) == (loops, conditionals), (cf, sites)


def test_it_tells_known_from_unknown_trip_counts_and_counts_conditionals():
    def fixed(x):
        return jax.lax.fori_loop(0, 10, lambda i, c: c * 1.01, x)

    def traced(x, n):
        return jax.lax.fori_loop(0, n, lambda i, c: c * 1.01, x)

    def branchy(x, p):
        return jax.lax.cond(p > 0, jnp.sin, jnp.cos, x)

    x = jnp.ones(3)
    assert bj.memory.control_flow(fixed, x) == bj.memory.ControlFlow(1, 0, 0)
    assert bj.memory.control_flow(traced, x, 7) == bj.memory.ControlFlow(1, 1, 0)
    cf = bj.memory.control_flow(branchy, x, 1.0)
    assert cf.conditionals == 1 and cf.while_loops == 0 and not cf.on_device
    assert bj.memory.control_flow(lambda x: x + 1, x).on_device


def test_rejects_what_is_not_a_function():
    with pytest.raises(TypeError, match=r"control_flow\(fn=...\) expects a callable, got int"):
        bj.memory.control_flow(3, jnp.ones(2))


def test_a_budgets_cost_carries_its_choices_host_events():
    """``Budget.cost`` is its choice's: a budget that only revolve fits states revolve's
    host events (and, where it runs the static engine, its wasted pullbacks)."""
    costs = bj.remat.StepCosts(carry_bytes=1_000, residual_bytes=4_000, overhead_bytes=0)
    tight = math.ceil(bj.Binomial(2).cost(T, costs).temp_bytes / 0.95)  # revolve only
    events = []
    for budget in (bj.Budget(30_000), bj.Budget(tight)):
        chosen = budget.choose(T, costs).strategy
        own = chosen.cost(T, costs)
        got = budget.cost(T, costs)
        assert (got.host_events, got.wasted_pullbacks) == (own.host_events, own.wasted_pullbacks)
        events.append(got.host_events)
    assert isinstance(chosen, bj.Binomial) and events[-1] > 0, chosen
