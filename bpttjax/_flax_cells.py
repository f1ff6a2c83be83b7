"""The Flax cells whose math the library knows, in one table for NNX and Linen.

``bj.nnx.RNN`` and ``bj.linen.RNN`` run such a cell through
:func:`bpttjax.cells.run` (the fused path) with its parameters rearranged
into the library's layout: kernels concatenated along the last axis in the
cell's gate order, differentiably, so that the gradients flow back to the
Flax parameters. Adding a cell to that fast path is one :class:`FlaxCell`
entry in :data:`KNOWN`, naming the registered library cell and, for each
Flax class that computes it, how its parameters map.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["KNOWN", "LINEN", "NNX", "FlaxCell"]

Layout = Callable[[Mapping], dict[str, jax.Array]]
"""The library's parameter dict from a Flax cell's (NNX: ``nnx.to_pure_dict`` of its
``nnx.Param`` state; Linen: ``variables["params"]``)."""


@dataclasses.dataclass(frozen=True)
class FlaxCell:
    """A registered library cell and the Flax classes that compute it.

    Attributes:
      name: the :data:`bpttjax.cells.CELLS` name (``"rnn"``, ``"gru"``, ``"lstm"``).
      nnx: NNX class -> its parameters in the library's layout.
      linen: Linen class -> the same, from its ``"params"`` collection.
    """

    name: str
    nnx: Mapping[type, Layout]
    linen: Mapping[type, Layout]


def _cat(p: Mapping, names: tuple[str, ...], leaf: str) -> jax.Array:
    return jnp.concatenate([p[n][leaf] for n in names], axis=-1)


def _dense(p: Mapping, bias_of: str = "dense_i") -> dict[str, Any]:
    """NNX's cells with two dense layers, ``dense_i`` and ``dense_h``."""
    return {"W_x": p["dense_i"]["kernel"], "W_h": p["dense_h"]["kernel"], "b": p[bias_of]["bias"]}


def _nnx_gru(p: Mapping) -> dict[str, jax.Array]:
    h = p["dense_h"]["kernel"]
    # nnx.GRUCell has no hidden bias of the candidate (linen's "hn" has one).
    b_hn = jnp.zeros(h.shape[:1], h.dtype)
    return {"W_x": p["dense_i"]["kernel"], "W_h": h, "b_x": p["dense_i"]["bias"], "b_hn": b_hn}


def _lstm(p: Mapping, i_names: tuple[str, ...]) -> dict[str, jax.Array]:
    h_names = ("hi", "hf", "hg", "ho")
    return {
        "W_x": _cat(p, i_names, "kernel"),
        "W_h": _cat(p, h_names, "kernel"),
        "b": _cat(p, h_names, "bias"),
    }


def _rnn(kernel_i: str, kernel_h: str) -> Layout:
    def layout(p: Mapping) -> dict[str, jax.Array]:
        return {
            "W_xh": p[kernel_i]["kernel"],
            "W_hh": p[kernel_h]["kernel"],
            "b_h": p[kernel_i]["bias"],
        }

    return layout


KNOWN: tuple[FlaxCell, ...] = (
    FlaxCell(
        "rnn",
        nnx={nnx.SimpleCell: _rnn("dense_i", "dense_h")},
        linen={nn.SimpleCell: _rnn("i", "h")},
    ),
    FlaxCell(
        "gru",
        nnx={nnx.GRUCell: _nnx_gru},
        linen={
            nn.GRUCell: lambda p: {
                "W_x": _cat(p, ("ir", "iz", "in"), "kernel"),
                "W_h": _cat(p, ("hr", "hz", "hn"), "kernel"),
                "b_x": _cat(p, ("ir", "iz", "in"), "bias"),
                "b_hn": p["hn"]["bias"],
            }
        },
    ),
    FlaxCell(
        "lstm",
        nnx={
            nnx.LSTMCell: lambda p: _lstm(p, ("ii", "if_", "ig", "io")),
            nnx.OptimizedLSTMCell: lambda p: _dense(p, bias_of="dense_h"),
        },
        # nn.LSTMCell and nn.OptimizedLSTMCell name their parameters alike.
        linen={
            nn.LSTMCell: lambda p: _lstm(p, ("ii", "if", "ig", "io")),
            nn.OptimizedLSTMCell: lambda p: _lstm(p, ("ii", "if", "ig", "io")),
        },
    ),
)

NNX: dict[type, tuple[str, Layout]] = {k: (c.name, f) for c in KNOWN for k, f in c.nnx.items()}
"""NNX cell class -> (library cell name, parameter layout)."""
LINEN: dict[type, tuple[str, Layout]] = {k: (c.name, f) for c in KNOWN for k, f in c.linen.items()}
"""Linen cell class -> (library cell name, parameter layout)."""
