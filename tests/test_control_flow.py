"""bj.memory.control_flow: the loops and conditionals XLA leaves to the host.

On a GPU a loop without a known trip count, and every conditional, waits for
the host (docs/strategies.md). The schedules made of ``lax.scan`` loops
(StoreAll, EveryStep, Nested) must compile to neither, for ``bj.scan`` and
``bj.cells.run``, with truncation and ``reverse``; the dynamic revolve engine
(Binomial) has both today.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

import bpttjax as bj

T, B, D, H = 37, 2, 3, 4
ON_DEVICE = [
    bj.StoreAll(),
    bj.EveryStep(),
    bj.EveryStep(jax.checkpoint_policies.dots_saveable),
    bj.Nested(2),
    bj.Nested(3),
    bj.Nested(lengths=(5, 8)),
]


def scan_grad(remat, reverse=False, truncation=None):
    params = bj.cells.init_gru(jax.random.key(0), D, H, jnp.float64)
    xs = jnp.ones((T, B, D))
    h0 = bj.cells.initial_carry("gru", H, (B,), dtype=jnp.float64)

    def loss(params, h0, xs):
        step = functools.partial(bj.cells.gru, params)
        _, hs = bj.scan(step, h0, xs, remat=remat, reverse=reverse, truncation=truncation)
        return jnp.sum(hs**2)

    return bj.memory.control_flow(jax.grad(loss, argnums=(0, 1, 2)), params, h0, xs)


CASES = [(remat, False, None) for remat in ON_DEVICE] + [
    (bj.StoreAll(), True, bj.Truncate(5)),
    (bj.Nested(3), True, bj.Truncate(5)),
]


@pytest.mark.parametrize(("remat", "reverse", "truncation"), CASES, ids=repr)
def test_scan_schedules_keep_control_flow_on_the_device(remat, reverse, truncation):
    cf = scan_grad(remat, reverse, truncation)
    assert cf.on_device and cf.while_loops >= 1, (remat, cf)


@pytest.mark.parametrize("remat", [bj.StoreAll(), bj.Nested(2)], ids=repr)
def test_fused_layers_keep_control_flow_on_the_device(remat):
    params = bj.cells.init_lstm(jax.random.key(0), D, H, jnp.float64)
    xs = jnp.ones((T, B, D))
    h0 = bj.cells.initial_carry("lstm", H, (B,), dtype=jnp.float64)

    def loss(params, xs):
        _, hs = bj.cells.run("lstm", params, h0, xs, remat=remat, batch_chunks=1)
        return jnp.sum(hs**2)

    cf = bj.memory.control_flow(jax.grad(loss), params, xs)
    assert cf.on_device, (remat, cf)


def test_the_dynamic_revolve_engine_decides_on_the_host():
    cf = scan_grad(bj.Binomial(4))
    assert cf.unknown_trip_loops >= 1 and cf.conditionals >= 1 and not cf.on_device, cf


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
