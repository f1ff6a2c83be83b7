"""The time model Budget is to choose by (issue 27): ``Timing`` and its measurement."""

import math

import jax
import jax.numpy as jnp
import pytest

import bpttjax as bj
from bpttjax import _timing


def test_seconds_by_hand():
    t = _timing.Timing(forward_s=10e-6, vjp_s=17e-6, host_event_s=20e-6)
    cost = bj.remat.Cost(temp_bytes=0, recomputed_steps=300, host_events=50, wasted_pullbacks=7)
    want = 10e-6 * (100 + 300) + 17e-6 * (100 + 7) + 20e-6 * 50
    assert math.isclose(t.seconds(100, cost), want, rel_tol=1e-12)
    # with GPU-like constants the static engine's wasted pullbacks cost less than the
    # dynamic engine's host decisions, at the same recomputation
    static = bj.Binomial(10, static=True).cost(1_000, bj.remat.StepCosts(0, 0))
    dynamic = bj.Binomial(10).cost(1_000, bj.remat.StepCosts(0, 0))
    assert t.seconds(1_000, static) < t.seconds(1_000, dynamic)
    assert "µs per host event" in str(t)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"forward_s": "1us"}, TypeError, r"Timing\(forward_s=\.\.\.\) expects seconds.*str"),
        ({"vjp_s": True}, TypeError, r"Timing\(vjp_s=\.\.\.\).*bool"),
        ({"host_event_s": -1e-6}, ValueError, r"Timing\(host_event_s=\.\.\.\).*>= 0"),
        ({"forward_s": math.nan}, ValueError, r"finite"),
    ],
)
def test_bad_constants_are_named(kwargs, error, match):
    args = {"forward_s": 1e-6, "vjp_s": 1e-6, "host_event_s": 1e-6, **kwargs}
    with pytest.raises(error, match=match):
        _timing.Timing(**args)


@pytest.mark.measured_timing
def test_measured_once_per_device():
    t = _timing.device_timing()
    assert t is _timing.device_timing()
    for value in (t.forward_s, t.vjp_s, t.host_event_s):
        assert math.isfinite(value) and value >= 0
    assert t.forward_s > 0  # a 32 x 256 tanh step is never free


@pytest.mark.measured_timing
def test_measured_while_a_gradient_is_traced():
    """``Budget`` plans while ``jax.grad`` traces the scan: the measurement must not
    join that trace (its inputs and calls are evaluated at once)."""
    _timing._measured.cache_clear()
    step = lambda h, x: (jnp.tanh(h * x), h)
    loss = lambda h0, xs: jnp.sum(bj.scan(step, h0, xs, remat=bj.Budget("1MB"))[1])
    g = jax.jit(jax.grad(loss))(jnp.ones(4), jnp.full((50, 4), 0.5))
    want = jax.grad(lambda h0, xs: jnp.sum(bj.scan(step, h0, xs)[1]))(
        jnp.ones(4), jnp.full((50, 4), 0.5)
    )
    assert jnp.allclose(g, want, rtol=1e-12)
    assert _timing._measured.cache_info().currsize == 1
