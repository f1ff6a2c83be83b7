"""A cell's step reversed in two halves: the carry's cotangent per step, the weights' in bulk.

The pieces of the whole-sequence path (:mod:`._fused`) that a strategy
reversing one step at a time can use too. ``jax.vjp`` of a step computes,
besides the cotangent of the carry it entered with (the only recurrent
part), the gradients of the kernels and of the input, two products each
with ``batch`` rows. :func:`step_back` computes only the first;
:func:`bulk_grads` computes the others afterwards for many steps at once,
from what ``step_back`` returned for each (a *row*), as a few products with
``steps·batch`` rows. ``Binomial(s, static=True)`` reverses a
:func:`bpttjax.cells.run` layer this way (``bpttjax.remat._revolve_table``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ._registry import Split

__all__ = ["bulk_grads", "flat", "mix_transpose", "products", "step_back"]


def flat(tree: Any) -> Any:
    """Every leaf as a matrix ``(rows, last axis)``: the steps and batch dimensions merged."""
    return jax.tree.map(lambda a: jnp.reshape(a, (-1, a.shape[-1])), tree)


def _zeros_like_rows(tree: Any, width: int) -> jax.Array:
    """Zeros ``(*rows, width)`` broadcast from ``tree``'s first leaf, so that they have
    its sharding (an explicit mesh) and its varying axes (``shard_map``)."""
    ref = jax.tree.leaves(tree)[0]
    return jnp.broadcast_to(jnp.zeros_like(ref[..., :1]), (*ref.shape[:-1], width))


def mix_transpose(mix: Callable, dz: Any, x_width: int, h_width: int) -> tuple:
    """``(d xw, d hw)`` from ``d z``: the transpose of the linear ``mix``, taken as
    its VJP at zeros made from ``dz`` itself."""
    _, mix_vjp = jax.vjp(mix, _zeros_like_rows(dz, x_width), _zeros_like_rows(dz, h_width))
    return mix_vjp(dz)


def products(sp: Split, params: Any, x: Any, carry: Any, dz: Any) -> tuple[Any, Any]:
    """The gradients of ``params`` and ``x`` of ``sum(dz * mix(project(params, x),
    hidden(params, carry)))``, for ``x``, ``carry`` and ``dz`` stacked over steps."""
    if sp.bulk_vjp is not None:
        return sp.bulk_vjp(params, x, carry, dz)
    x_width = jax.eval_shape(sp.project, params, x).shape[-1]
    h_width = jax.eval_shape(sp.hidden, params, carry).shape[-1]
    d_xw, d_hw = mix_transpose(sp.mix, dz, x_width, h_width)
    _, hidden_vjp = jax.vjp(lambda p: sp.hidden(p, carry), params)
    (d_params,) = hidden_vjp(d_hw)
    _, project_vjp = jax.vjp(sp.project, params, x)
    d_params_x, d_x = project_vjp(d_xw)
    return jax.tree.map(jnp.add, d_params, d_params_x), d_x


def step_back(
    sp: Split, params: Any, carry: Any, x: jax.Array, d_carry: Any, d_y: jax.Array
) -> tuple[tuple[Any, jax.Array], Any, Any]:
    """One step from ``carry``, and the cotangent of ``carry`` only.

    Returns ``((new_carry, y), d_entering, row)``: the step's outputs, the
    cotangent of the carry it entered with, given those of its outputs
    (``d_carry``, ``d_y``), and ``row = (dz, d_elem_params)``, which
    :func:`bulk_grads` turns into the gradients of the parameters and of
    ``x``. Zero cotangents give a zero row. Per step it runs the forward
    products and one product with the recurrent kernel (``dz @ W_hᵀ``);
    the kernels' gradients wait for :func:`bulk_grads`.
    """
    pe = sp.elem_args(params)
    xw, hw = sp.project(params, x), sp.hidden(params, carry)
    z = sp.mix(xw, hw)
    if sp.output_vjp is None:
        (new_carry, y), elem_vjp = jax.vjp(sp.elem, pe, carry, z)
        d_pe, d_direct, dz = elem_vjp((d_carry, d_y))
    else:
        new_carry, y = sp.elem(pe, carry, z)
        d_pe, d_direct, dz = sp.output_vjp(pe, carry, y, (d_carry, d_y))
    _, d_hw = mix_transpose(sp.mix, dz, xw.shape[-1], hw.shape[-1])
    _, hidden_vjp = jax.vjp(lambda c: sp.hidden(params, c), carry)
    (d_hidden,) = hidden_vjp(d_hw)
    return (new_carry, y), jax.tree.map(jnp.add, d_direct, d_hidden), (dz, d_pe)


def bulk_grads(sp: Split, params: Any, xs: jax.Array, carries: Any, rows: Any) -> tuple[Any, Any]:
    """The gradients of the parameters and of the inputs for steps stacked on a leading axis.

    Args:
      sp, params: the cell's :class:`Split` and parameters.
      xs: the steps' inputs ``(n, ..., D)``; ``carries`` the carries they
        entered with, ``rows`` what :func:`step_back` returned for each
        (zero rows contribute nothing).

    Returns:
      ``(d_params, d_xs)``, ``d_xs`` shaped as ``xs``.
    """
    dz, d_pe = rows
    matrices = flat if jax.device_count() == 1 else (lambda tree: tree)
    d_params, d_xs = products(sp, params, matrices(xs), matrices(carries), matrices(dz))
    d_params = sp.add_elem_grads(d_params, jax.tree.map(lambda a: jnp.sum(a, axis=0), d_pe))
    return d_params, jnp.reshape(d_xs, xs.shape)
