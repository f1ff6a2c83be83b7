"""The strategies that need no schedule: :class:`StoreAll` and :class:`EveryStep`."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import jax

from ._base import Cost, RematStrategy, register

__all__ = ["EveryStep", "StoreAll"]


@register("store_all")
@dataclasses.dataclass(frozen=True)
class StoreAll(RematStrategy):
    """Store every residual of every step: exactly ``jax.lax.scan``.

    Memory: ``T·R`` (all residuals). Recomputation: none. The fastest choice
    while it fits; the default of ``bpttjax.scan``.
    """

    def scan(self, f, init, xs, length, reverse, unroll):
        return jax.lax.scan(f, init, xs, length=length, reverse=reverse, unroll=unroll)

    @classmethod
    def candidates(cls, length, costs):
        return (cls(),)

    def cost(self, length, costs):
        return Cost(length * costs.residual_bytes + costs.overhead_bytes, 0)

    def scan_layer(self, layer, init):
        return layer.block(init, 0, layer.length)


@register("every_step")
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
        if self.policy is not None and not _is_policy(self.policy):
            name = getattr(self.policy, "__name__", repr(self.policy))
            raise TypeError(
                f"EveryStep(policy=...) got {name}{_signature(self.policy)}, which makes a "
                "policy from its arguments and is not one itself (jax.checkpoint calls a "
                "policy as policy(prim, *avals, **params)). Call it: e.g. "
                f"bj.EveryStep(jax.checkpoint_policies."
                f"{_FACTORY_EXAMPLES.get(name, name + '(...)')})"
            )

    @classmethod
    def from_arg(cls, arg):
        if arg is None:
            return cls()
        policy = None if arg.startswith("_") else getattr(jax.checkpoint_policies, arg, None)
        if not callable(policy):
            raise ValueError(
                f"every_step expects the name of a jax.checkpoint_policies value such as "
                f"'dots_saveable', got {arg!r}; policies: {', '.join(_named_policies())}"
            )
        if not _is_policy(policy):
            names = (
                " (names given with jax.ad_checkpoint.checkpoint_name; bj.cells attaches "
                "'input_projection' and 'hidden_projection')"
                if "names" in _signature(policy)
                else ""
            )
            raise ValueError(
                f"jax.checkpoint_policies.{arg}{_signature(policy)} makes a policy from its "
                "arguments and is not one itself, and a spec cannot pass them. In Python, "
                f"call it: bj.EveryStep(jax.checkpoint_policies."
                f"{_FACTORY_EXAMPLES.get(arg, arg + '(...)')}){names}. Policies a spec can "
                f"name: {', '.join(_named_policies())}"
            )
        return cls(policy)

    @classmethod
    def examples(cls):
        return (cls(), cls(jax.checkpoint_policies.dots_saveable))

    @classmethod
    def candidates(cls, length, costs):
        # Only policy=None: what a policy saves is not in StepCosts, so
        # Budget measures its own policies (Budget(policies=...)) instead.
        return (cls(),)

    def cost(self, length, costs):
        # What a policy saves is not in StepCosts; this is the policy=None figure.
        temp = length * costs.carry_bytes + costs.residual_bytes + costs.overhead_bytes
        return Cost(temp, length)

    def scan(self, f, init, xs, length, reverse, unroll):
        # prevent_cse=False is safe inside a scan (the loop already blocks CSE)
        # and lets XLA fuse the recomputation with the backward step.
        step = jax.checkpoint(f, policy=self.policy, prevent_cse=False)
        return jax.lax.scan(step, init, xs, length=length, reverse=reverse, unroll=unroll)


_FACTORY_EXAMPLES = {
    "save_only_these_names": "save_only_these_names('hidden_projection')",
    "save_any_names_but_these": "save_any_names_but_these('input_projection')",
    "save_anything_except_these_names": "save_anything_except_these_names('input_projection')",
}


def _is_policy(fn: Callable) -> bool:
    """Whether ``fn`` is a checkpoint policy rather than a factory of them.

    ``jax.checkpoint`` calls a policy as ``policy(prim, *avals, **params)``,
    so a policy takes any keyword argument; the factories in
    ``jax.checkpoint_policies`` (``save_only_these_names(*names)``,
    ``save_from_both_policies(policy_1, policy_2)``, ...) take none.
    """
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin: nothing to tell by, take it as given
        return True
    return any(p.kind is p.VAR_KEYWORD for p in params)


def _named_policies() -> list[str]:
    """The names in ``jax.checkpoint_policies`` that are policies (not factories)."""
    names = (n for n in dir(jax.checkpoint_policies) if not n.startswith("_"))
    return [n for n in names if _is_policy(getattr(jax.checkpoint_policies, n))]


def _signature(fn: Callable) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(...)"
