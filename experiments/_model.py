"""The benchmark model every memory and speed study measures, and the sizes of one point.

The model is a registered cell (``bj.cells``), a linear read-out back to the
input size and a per-step squared error averaged over time: the step returns
``(carry, l_t)`` with ``l_t = mean((h_t W_out - x_t)^2)``, so ``jax.grad`` of
the mean loss needs every step's residuals, as BPTT over any per-step loss does.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import bpttjax as bj


def init_model(key, cell: str, input_size: int, hidden_size: int, dtype=jnp.float32) -> dict:
    """Parameters of the benchmark model: ``{"cell": ..., "W_out": (H, D)}``.

    ``cell`` names a registered cell (``bj.cells.CELLS``); its ``init`` makes
    the cell's parameters, the read-out is normal with variance ``1/H``.
    """
    k1, k2 = jax.random.split(key)
    params = bj.cells.get(cell).init(k1, input_size, hidden_size, dtype=dtype)
    w_out = jax.random.normal(k2, (hidden_size, input_size), dtype) / hidden_size**0.5
    return {"cell": params, "W_out": w_out}


def make_step(cell: str, params) -> Callable:
    """``f(carry, x) -> (carry, l_t)`` with ``l_t = mean((h_t W_out - x_t)^2)``."""
    cell_step = bj.cells.get(cell).step

    def step(carry, x):
        carry, h = cell_step(params["cell"], carry, x)
        err = h @ params["W_out"] - x
        return carry, jnp.mean(err * err)

    return step


def loss(params, xs, *, cell: str, remat=None, scan=None):
    """Mean per-step loss over ``xs: (T, B, D)``; ``scan`` defaults to ``bj.scan``."""
    hidden_size = params["W_out"].shape[0]
    h0 = bj.cells.get(cell).initial_carry(hidden_size, xs.shape[1:-1], dtype=xs.dtype)
    if scan is None:
        scan = functools.partial(bj.scan, remat=remat or bj.StoreAll())
    _, losses = scan(make_step(cell, params), h0, xs)
    return jnp.mean(losses)


def abstract_inputs(cell: str, T: int, batch: int, input_size: int, hidden_size: int, dtype):
    """ShapeDtypeStructs for (params, xs): compile without allocating."""
    params = jax.eval_shape(
        lambda: init_model(jax.random.key(0), cell, input_size, hidden_size, dtype)
    )
    return params, jax.ShapeDtypeStruct((T, batch, input_size), jnp.dtype(dtype))


def carry_bytes(cell: str, batch: int, hidden_size: int, dtype) -> int:
    """Bytes of one carry of ``cell`` for ``batch`` sequences."""
    carry = jax.eval_shape(lambda: bj.cells.get(cell).initial_carry(hidden_size, (batch,), dtype))
    return bj.memory.tree_bytes(carry)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One point's sizes: ``xs`` has shape ``(T, batch, input)``.

    With ``devices = N > 1`` the batch is sharded over a 1-D mesh of the
    first ``N`` devices (``jax.jit`` with ``NamedSharding``, GSPMD) and the
    parameters are replicated; ``batch`` is the global batch.
    """

    cell: str
    T: int
    batch: int
    input: int
    hidden: int
    dtype: str
    devices: int = 1

    def place(self, params: Any, xs: Any) -> tuple[Any, Any]:
        """``(params, xs)`` as the devices hold them: ``xs`` batch-sharded, ``params`` replicated.

        Arrays are moved there; ``jax.ShapeDtypeStruct`` get the sharding
        (nothing is allocated). With one device, both are returned as they are.
        """
        if self.devices == 1:
            return params, xs
        if self.batch % self.devices:
            raise ValueError(
                f"the batch ({self.batch}) must be a multiple of the devices ({self.devices})"
            )
        devices = jax.devices()[: self.devices]
        if len(devices) < self.devices:
            raise ValueError(f"{self.devices} devices asked for, JAX has {len(devices)}")
        mesh = jax.sharding.Mesh(
            np.array(devices), ("batch",), axis_types=(jax.sharding.AxisType.Auto,)
        )
        spec = jax.sharding.PartitionSpec

        def put(tree, sharding):
            def one(a):
                if isinstance(a, jax.ShapeDtypeStruct):
                    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
                return jax.device_put(a, sharding)

            return jax.tree.map(one, tree)

        batch = jax.sharding.NamedSharding(mesh, spec(None, "batch"))
        return put(params, jax.sharding.NamedSharding(mesh, spec())), put(xs, batch)
