"""Rematerialization strategies: how much of the forward pass BPTT keeps.

``jax.grad`` of a ``lax.scan`` stores every step's residuals (the intermediate
values the backward pass needs), so its memory grows linearly in the sequence
length ``T`` with a large constant. A strategy trades that memory for
recomputation. Strategies are small immutable values passed to
``bpttjax.scan(..., remat=...)``; they never change forward values or the
gradient, only how it is computed.

Costs below are per sequence of ``T`` steps, in units of one step's carry
(``C``) or one step's residuals (``R``, usually several times ``C``) and of one
forward pass over the sequence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

__all__ = ["RematStrategy", "StoreAll", "EveryStep"]


class RematStrategy:
    """Base class of every rematerialization strategy.

    A strategy is a frozen dataclass; ``bpttjax.scan`` calls its private
    ``_scan`` method with the already validated arguments of ``lax.scan``.
    Subclass it only inside bpttjax: the hook is not public API.
    """

    def _scan(
        self,
        f: Callable,
        init: Any,
        xs: Any,
        length: int,
        reverse: bool,
        unroll: int | bool,
    ) -> tuple[Any, Any]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class StoreAll(RematStrategy):
    """Store every residual of every step: exactly ``jax.lax.scan``.

    Memory: ``T·R`` (all residuals). Recomputation: none. The fastest choice
    while it fits; the default of ``bpttjax.scan``.
    """

    def _scan(self, f, init, xs, length, reverse, unroll):
        return jax.lax.scan(f, init, xs, length=length, reverse=reverse, unroll=unroll)


@dataclasses.dataclass(frozen=True)
class EveryStep(RematStrategy):
    """Checkpoint every step: store only the carries, recompute each step.

    The step is wrapped in ``jax.checkpoint``; the backward pass recomputes one
    step at a time from its stored input carry.

    Args:
      policy: optional ``jax.checkpoint_policies`` value deciding which
        intermediates of a step are saved instead of recomputed, e.g.
        ``jax.checkpoint_policies.dots_saveable`` (keep matrix products) or
        ``save_only_these_names(...)`` with the names that ``bpttjax.cells``
        attach. ``None`` saves nothing inside a step.

    Memory: ``T·C`` (plus what ``policy`` saves). Recomputation: about one
    extra forward pass.

    Example:
      >>> carry, ys = bj.scan(step, h0, xs, remat=bj.EveryStep())
    """

    policy: Callable[..., Any] | None = None

    def __post_init__(self):
        if self.policy is not None and not callable(self.policy):
            raise TypeError(
                "EveryStep(policy=...) expects None or a jax.checkpoint_policies value "
                f"(a callable), got {type(self.policy).__name__}: {self.policy!r}"
            )

    def _scan(self, f, init, xs, length, reverse, unroll):
        # prevent_cse=False is safe inside a scan (the loop already blocks CSE)
        # and lets XLA fuse the recomputation with the backward step.
        step = jax.checkpoint(f, policy=self.policy, prevent_cse=False)
        return jax.lax.scan(step, init, xs, length=length, reverse=reverse, unroll=unroll)
