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

import abc
import dataclasses
import functools
import inspect
import math
import numbers
import re
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from . import _engine, _pytree

_S = TypeVar("_S", bound="RematStrategy")

__all__ = [
    "Binomial",
    "Cost",
    "EveryStep",
    "Nested",
    "RematStrategy",
    "STRATEGIES",
    "StepCosts",
    "StoreAll",
    "examples",
    "from_string",
    "register",
]


@dataclasses.dataclass(frozen=True)
class StepCosts:
    """What one step of a recurrence costs to keep, in bytes.

    Attributes:
      carry_bytes: one carry (``C``), e.g. ``B·H·4`` for a float32 tanh RNN.
      residual_bytes: what plain BPTT stores per step (``R``, several carries).
      overhead_bytes: what a scan's gradient needs regardless of ``T``
        (chiefly the parameters' gradient accumulators).

    :func:`bpttjax.memory.step_costs` measures them by compiling plain BPTT.
    """

    carry_bytes: int
    residual_bytes: int
    overhead_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class Cost:
    """A strategy's predicted cost for one gradient through ``T`` steps.

    Attributes:
      temp_bytes: predicted working memory (XLA's ``temp_size_in_bytes``).
      recomputed_steps: step evaluations beyond plain BPTT's ``T``.
    """

    temp_bytes: int
    recomputed_steps: int


class RematStrategy(abc.ABC):
    """Base class of the rematerialization strategies: the protocol to write one.

    A strategy is a frozen dataclass (so it hashes, compares by value, and can
    be a static argument of ``jax.jit``) with two methods:

    * :meth:`scan` runs ``lax.scan``'s contract so that ``jax.grad`` of it
      follows the strategy's schedule;
    * :meth:`cost` predicts its working memory and recomputation from the
      step's :class:`StepCosts`, so that ``bj.memory.predict`` and
      :class:`Budget` can compare strategies without compiling them.

    ``bpttjax.scan`` validates its arguments, then calls ``remat.scan``; a new
    strategy is one class, and nothing else in bpttjax needs to know it.
    Decorated with :func:`register`, it also gets a name that the experiment
    scripts' ``--remat`` options accept and joins the shared test suite
    through :meth:`examples`.

    Every subclass is a pytree (its array fields are leaves, the rest static),
    so a strategy can be an ordinary argument of a ``jax.jit``-ed function.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _pytree.register(cls)

    @classmethod
    def from_arg(cls, arg: str | None) -> RematStrategy:
        """The strategy named by the text after the colon in :func:`from_string`.

        The default takes no argument (``cls()``) or one int (``cls(int(arg))``),
        as far as ``cls``'s signature allows; override it for other arguments.

        Raises:
          ValueError: ``arg`` is missing where ``cls`` needs one, given where
            ``cls`` takes none, or not an int; the message shows the accepted form.
        """
        name = _registered_name(cls)
        try:
            params = list(inspect.signature(cls).parameters.values())
        except (TypeError, ValueError):  # no signature to read: try the call as it is
            params = None
        required = [
            p.name
            for p in params or ()
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        first = params[0].name if params else "value"
        if arg is None:
            if required:
                raise ValueError(
                    f"{cls.__name__} expects an int argument ({first}), e.g. '{name}:4'; got none"
                )
            return cls()
        if params == []:
            raise ValueError(f"{cls.__name__} takes no argument, got {arg!r}: write '{name}'")
        try:
            value = int(arg.replace("_", ""))
        except ValueError:
            raise ValueError(
                f"{cls.__name__} expects an int argument ({first}), e.g. '{name}:4', got {arg!r}"
            ) from None
        return cls(value)

    @classmethod
    def examples(cls) -> tuple[RematStrategy, ...]:
        """Small instances that the shared test suite runs (default: ``cls()``)."""
        return (cls(),)

    @abc.abstractmethod
    def scan(
        self,
        f: Callable,
        init: Any,
        xs: Any,
        length: int,
        reverse: bool,
        unroll: int | bool,
    ) -> tuple[Any, Any]:
        """``jax.lax.scan(f, init, xs, length, reverse, unroll)``, with this schedule.

        Arguments arrive validated: ``length >= 0`` agrees with ``xs``, and
        ``f`` keeps the carry's structure, shapes and dtypes.
        """

    @abc.abstractmethod
    def cost(self, length: int, costs: StepCosts) -> Cost:
        """Predicted temp bytes and recomputed steps for ``length`` steps."""

    def _check(self, length: int) -> None:
        """Refuse a sequence of ``length`` steps this strategy cannot run, before any
        trace (``bpttjax.scan`` calls it once the length is known). Default: any."""
        del length

    def scan_layer(self, layer: Any, init: Any) -> tuple[Any, Any]:
        """Run a whole-sequence layer (:func:`bpttjax.cells.run`) under this strategy.

        ``layer.block(carry, start, n)`` runs steps ``[start, start + n)`` as
        one block that keeps every residual and computes its weight gradients
        in bulk; ``layer.scan(strategy, init)`` runs the sequence step by step
        through :func:`bpttjax.scan`. The default is the latter, which keeps
        this strategy's memory bound; a strategy that stores whole blocks of
        steps can hand them to ``layer.block`` instead.
        """
        return layer.scan(self, init)


_REGISTRY: dict[str, type[RematStrategy]] = {}

STRATEGIES: Mapping[str, type[RematStrategy]] = types.MappingProxyType(_REGISTRY)
"""The registered strategy classes by name, in registration order (read-only).

``store_all``, ``every_step``, ``nested``, ``binomial`` and ``budget``, then
any added with :func:`register`. Scripts, tests and ``--remat`` options all
read this one mapping.
"""

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def register(name: str) -> Callable[[type[_S]], type[_S]]:
    """Class decorator: add a :class:`RematStrategy` subclass to :data:`STRATEGIES`.

    Args:
      name: lower-case identifier (``[a-z][a-z0-9_]*``), as written in
        :func:`from_string` and the scripts' ``--remat`` options.

    Raises:
      ValueError: ``name`` is malformed or taken by another class.
      TypeError: the decorated object is not a ``RematStrategy`` subclass.

    Example:
      >>> @bj.remat.register("every_other")
      ... @dataclasses.dataclass(frozen=True)
      ... class EveryOther(bj.RematStrategy): ...
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"register(name=...) expects a lower-case identifier such as 'binomial', got {name!r}"
        )

    def decorate(cls: type[_S]) -> type[_S]:
        if not (isinstance(cls, type) and issubclass(cls, RematStrategy)):
            raise TypeError(f"register({name!r}) decorates a RematStrategy subclass, got {cls!r}")
        taken = _REGISTRY.get(name)
        if taken is not None and taken.__qualname__ != cls.__qualname__:
            raise ValueError(
                f"register({name!r}): the name is taken by {taken.__qualname__}; "
                f"registered names: {sorted(_REGISTRY)}"
            )
        _REGISTRY[name] = cls
        return cls

    return decorate


def from_string(spec: str) -> RematStrategy:
    """The strategy a short text names: ``"name"`` or ``"name:argument"``.

    ``"store_all"``, ``"every_step"``, ``"every_step:dots_saveable"`` (any
    ``jax.checkpoint_policies`` name), ``"nested:3"``, ``"nested:10x10"``
    (level lengths), ``"binomial:14"``, ``"budget:64MB"``, and whatever
    :func:`register` added. This is what the experiment scripts' ``--remat``
    options accept.

    Raises:
      ValueError: unknown name (the message lists the registered ones) or a
        bad argument: a missing or extra one, a malformed int, a policy
        factory such as ``save_only_these_names`` (which needs names, given
        in Python); the message quotes ``spec`` and the accepted form.
      TypeError: ``spec`` is not a ``str``.
    """
    if not isinstance(spec, str):
        raise TypeError(
            f"from_string(spec=...) expects a str such as 'binomial:14', got "
            f"{type(spec).__name__}: {spec!r}"
        )
    name, colon, arg = spec.strip().partition(":")
    cls = _REGISTRY.get(name.strip().lower())
    if cls is None:
        raise ValueError(
            f"unknown remat strategy {name.strip()!r} in {spec!r}; registered: "
            f"{', '.join(_REGISTRY)} (write 'name' or 'name:argument')"
        )
    try:
        return cls.from_arg(arg.strip() if colon else None)
    except (ValueError, TypeError, OverflowError) as err:
        # a strategy's own checks speak of its constructor; say which text failed
        raise ValueError(f"remat spec {spec!r}: {err}") from err


def _registered_name(cls: type) -> str:
    """The name ``cls`` is registered under (the first), or its lower-cased class name."""
    return next((n for n, c in _REGISTRY.items() if c is cls), cls.__name__.lower())


def examples() -> tuple[RematStrategy, ...]:
    """Every registered strategy's :meth:`~RematStrategy.examples`, in registry order."""
    return tuple(e for cls in _REGISTRY.values() for e in cls.examples())


@register("store_all")
@dataclasses.dataclass(frozen=True)
class StoreAll(RematStrategy):
    """Store every residual of every step: exactly ``jax.lax.scan``.

    Memory: ``T·R`` (all residuals). Recomputation: none. The fastest choice
    while it fits; the default of ``bpttjax.scan``.
    """

    def scan(self, f, init, xs, length, reverse, unroll):
        return jax.lax.scan(f, init, xs, length=length, reverse=reverse, unroll=unroll)

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


def _balanced_lengths(length: int, levels: int) -> tuple[int, ...]:
    """Level lengths, outermost first, about ``length**(1/levels)`` each.

    Inner levels get ``b = ceil(length**(1/levels))`` (exact integer root, no
    float rounding surprises); the outermost gets just enough blocks to cover
    ``length``, so the product is ``>= length`` and never much larger.
    """
    b = max(1, round(length ** (1.0 / levels)))
    while b**levels < length:
        b += 1
    while b > 1 and (b - 1) ** levels >= length:
        b -= 1
    inner = b ** (levels - 1)
    return (-(-length // inner),) + (b,) * (levels - 1)


def _weighted_lengths(length: int, levels: int, ratio: float) -> tuple[int, ...]:
    """Level lengths minimizing ``(sum of outer lengths)·C + (inner length)·R``.

    With ``ratio = R/C`` (residual bytes per step over carry bytes), the
    minimum of ``l_1 + ... + l_{L-1} + ratio·l_L`` subject to ``prod(l) = T``
    has equal outer lengths ``a = (ratio·T)**(1/L)`` and an innermost length
    ``a/ratio``: a step costs ``ratio`` carries to keep, so the innermost
    block is made shorter.
    """
    if levels == 1 or length <= 1:
        return _balanced_lengths(length, levels)
    inner = (max(ratio, 1.0) * length) ** (1.0 / levels) / max(ratio, 1.0)
    inner = max(1, min(length, round(inner)))
    return _balanced_lengths(-(-length // inner), levels - 1) + (inner,)


def _residual_ratio(f: Callable, init: Any, xs: Any) -> float:
    """Residuals one step of ``f`` keeps for its backward pass, in carries.

    Traces ``jax.vjp`` of one step abstractly and counts the residuals that
    are per-step values (not closed-over constants, which ``lax.scan`` keeps
    once). It only steers the choice of level lengths.
    """
    x = (
        None
        if xs is None
        else jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), xs)
    )
    carry = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), init)
    carry_bytes = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(carry))
    if carry_bytes == 0:
        return 1.0
    try:
        closed = jax.make_jaxpr(lambda c, x: jax.tree.leaves(jax.vjp(f, c, x)[1]))(carry, x)
    except Exception:  # noqa: BLE001 - only a heuristic; the real trace reports errors
        return 1.0
    consts = {id(v) for v in closed.jaxpr.constvars}
    per_step = 0
    for v in closed.jaxpr.outvars:
        if id(v) in consts or isinstance(v, jex_core.Literal):
            continue
        per_step += math.prod(v.aval.shape) * v.aval.dtype.itemsize
    # XLA keeps about one carry more per step than the jaxpr lists (measured
    # for the tanh RNN, GRU and LSTM cells on CPU).
    return 1.0 + per_step / carry_bytes


def _index(xs: Any, i: jax.Array) -> Any:
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), xs)


def _nested_scan(f, carry, xs, start, n, lengths, reverse, unroll, leaf=None):
    """Run steps ``[start, start + n)`` of ``f`` with ``len(lengths)`` checkpointed levels.

    Steps read their input with a dynamic index into the full ``xs`` instead
    of scanning over a reshaped ``xs``: a reshape into chunks makes XLA copy
    each level's chunk of inputs into temporary memory. ``leaf(carry, start,
    n)``, if given, runs the innermost blocks instead of a scan of ``f``.
    """
    if leaf is not None and (len(lengths) == 1 or n == 1):
        return leaf(carry, start, n)
    if len(lengths) == 1 or n == 1:

        def body(c, i):
            return f(c, None if xs is None else _index(xs, start + i))

        steps = jnp.arange(n, dtype=jnp.int32)
        return jax.lax.scan(body, carry, steps, reverse=reverse, unroll=unroll)

    block = math.prod(lengths[1:])
    q, r = divmod(n, block)
    if q == 0:  # fewer steps than one block: descend a level
        return _nested_scan(f, carry, xs, start, n, lengths[1:], reverse, unroll, leaf)
    # Full blocks come first in processing order; the remainder is at the end
    # of the sequence going forward and at its start going backward.
    first = start + r if reverse else start

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def block_fn(c, i):
        return _nested_scan(f, c, xs, first + i * block, block, lengths[1:], reverse, unroll, leaf)

    blocks = jnp.arange(q, dtype=jnp.int32)
    carry, ys_full = jax.lax.scan(block_fn, carry, blocks, reverse=reverse)
    ys_rem = None
    if r:
        rem_start = start if reverse else start + q * block
        carry, ys_rem = _nested_scan(f, carry, xs, rem_start, r, lengths[1:], reverse, unroll, leaf)
    ys_full = jax.tree.map(lambda y: y.reshape((q * block,) + y.shape[2:]), ys_full)
    if ys_rem is None:
        return carry, ys_full
    parts = (ys_rem, ys_full) if reverse else (ys_full, ys_rem)
    return carry, jax.tree.map(lambda a, b: jnp.concatenate([a, b]), *parts)


@register("nested")
@dataclasses.dataclass(frozen=True)
class Nested(RematStrategy):
    """Nested checkpointing: ``levels`` scans inside each other, each checkpointed.

    The sequence is cut into blocks, blocks into sub-blocks, and so on; the
    outer levels store only the carry entering each (sub-)block and the
    backward pass recomputes one block at a time, storing the residuals of
    only the innermost sub-block being differentiated. ``levels=2`` is the
    classic √T scheme (Chen et al., 2016, "Training deep nets with sublinear
    memory cost", https://arxiv.org/abs/1604.06174).

    Args:
      levels: number of levels ``L >= 1``; the level lengths are then chosen
        from ``T`` at trace time, about ``T**(1/L)`` each, the innermost
        shortened by the step's residual-to-carry ratio (estimated by tracing
        the step's VJP once more, abstractly; pass ``lengths`` to skip that).
      lengths: explicit level lengths, outermost first (overrides
        ``levels``); their product must be at least ``T``.

    Any ``T`` works, including primes and ``T < L``: when ``T`` is not a
    multiple of the inner block size, the remaining steps run through the
    same scheme one level down; nothing is padded and no step is masked.

    Memory: about ``(L-1)·T**(1/L)`` carries plus ``T**(1/L)`` steps of
    residuals. Recomputation: about ``L-1`` extra forward passes.

    Example:
      >>> carry, ys = bj.scan(step, h0, xs, remat=bj.Nested(levels=3))
    """

    levels: int = 2
    lengths: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.lengths is not None:
            lengths = self.lengths
            if isinstance(lengths, numbers.Integral) or not isinstance(lengths, Sequence):
                raise TypeError(
                    f"Nested(lengths=...) expects a tuple of positive ints, got "
                    f"{type(lengths).__name__}: {lengths!r}"
                )
            if not lengths:
                raise ValueError(
                    "Nested(lengths=...) expects a non-empty tuple of positive ints, got ()"
                )
            for i, n in enumerate(lengths):
                if isinstance(n, bool) or not isinstance(n, numbers.Integral):
                    raise TypeError(
                        f"Nested(lengths=...) expects a tuple of positive ints, but lengths[{i}] "
                        f"is {type(n).__name__}: {n!r}"
                    )
                if n < 1:
                    raise ValueError(
                        "Nested(lengths=...) expects a non-empty tuple of positive ints, but "
                        f"lengths[{i}] is {n}"
                    )
            object.__setattr__(self, "lengths", tuple(int(n) for n in lengths))
            object.__setattr__(self, "levels", len(lengths))
        elif isinstance(self.levels, bool) or not isinstance(self.levels, numbers.Integral):
            raise TypeError(
                f"Nested(levels=...) expects a positive int, got "
                f"{type(self.levels).__name__}: {self.levels!r}"
            )
        elif self.levels < 1:
            raise ValueError(f"Nested(levels=...) expects levels >= 1, got levels={self.levels}")

    @classmethod
    def from_arg(cls, arg):
        if arg is not None and "x" in arg:
            try:
                lengths = tuple(int(n.replace("_", "")) for n in arg.split("x"))
            except ValueError:
                raise ValueError(
                    f"nested expects levels ('nested:3') or level lengths separated by 'x' "
                    f"('nested:10x10'), got {arg!r}"
                ) from None
            return cls(lengths=lengths)
        return super().from_arg(arg)

    @classmethod
    def examples(cls):
        return (cls(2), cls(3), cls(lengths=(12, 3, 2, 4)))

    def level_lengths(self, length: int, ratio: float = 1.0) -> tuple[int, ...]:
        """The level lengths, outermost first, used for a sequence of ``length`` steps.

        ``ratio`` is the residual bytes of one step over the carry's bytes
        (``bj.scan`` estimates it from the step); with ``levels=`` the
        innermost level is made shorter by that factor.
        """
        if self.lengths is not None:
            if math.prod(self.lengths) < length:
                raise ValueError(
                    f"Nested(lengths={self.lengths}) covers only {math.prod(self.lengths)} steps "
                    f"(the product of the lengths), but the sequence has length {length}"
                )
            return self.lengths
        return _weighted_lengths(length, self.levels, ratio)

    def _check(self, length: int) -> None:
        """Refuse, before the step is traced, ``lengths`` that do not cover ``length`` steps."""
        if self.lengths is not None:
            self.level_lengths(length)

    def cost(self, length, costs):
        C, R = costs.carry_bytes, costs.residual_bytes
        # bj.scan estimates R/C from the traced step; the measured ratio is
        # the best stand-in here, so the two schedules can differ slightly.
        lengths = self.level_lengths(length, R / C if C else 1.0)
        stored, loops, evaluations = _nested_peak(length, lengths, C, R)
        return Cost(stored + loops * costs.overhead_bytes, evaluations - length)

    def scan(self, f, init, xs, length, reverse, unroll):
        ratio = 1.0 if self.lengths is not None else _residual_ratio(f, init, xs)
        lengths = self.level_lengths(length, ratio)
        if length == 0:
            return jax.lax.scan(f, init, xs, length=0, reverse=reverse, unroll=unroll)
        return _nested_scan(f, init, xs, 0, length, lengths, reverse, unroll)

    def layer_lengths(self, layer: Any, init: Any) -> tuple[int, ...]:
        """The level lengths ``scan_layer`` uses for a ``bj.cells.run`` layer."""
        if self.lengths is not None:
            return self.level_lengths(layer.length)
        x0 = jax.tree.map(lambda a: a[:1], layer.xs)
        return self.level_lengths(layer.length, _residual_ratio(layer.step, init, x0))

    def scan_layer(self, layer, init):
        # The innermost blocks, whose residuals Nested keeps, run as whole blocks.
        lengths = self.layer_lengths(layer, init)
        return _nested_scan(
            None, init, None, 0, layer.length, lengths, layer.reverse, layer.unroll, layer.block
        )


def _nested_peak(n: int, lengths: tuple[int, ...], C: int, R: int) -> tuple[int, int, int]:
    """Peak stored bytes, live scan loops and step evaluations of ``_nested_scan``.

    Each live loop holds its own gradient accumulators, hence the loop count.
    Evaluations: a checkpointed block runs once forward and once more when
    its backward pass comes; the innermost level stores its residuals.
    """
    if len(lengths) == 1 or n <= 1:
        return n * R, 1, n
    block = math.prod(lengths[1:])
    q, r = divmod(n, block)
    if q == 0:
        return _nested_peak(n, lengths[1:], C, R)
    stored, loops, evals = _nested_peak(block, lengths[1:], C, R)
    evals = q * (block + evals)
    if r:
        # the remainder runs after the blocks and is differentiated first,
        # while the q block carries are still stored
        r_stored, r_loops, r_evals = _nested_peak(r, lengths[1:], C, R)
        stored, loops = max(stored, r_stored), max(loops, r_loops)
        evals += r_evals
    return q * C + stored, 1 + loops, evals


_ENGINE_BYTES = 2048


@register("binomial")
@dataclasses.dataclass(frozen=True, repr=False)
class Binomial(RematStrategy):
    """Griewank and Walther's binomial checkpointing ("revolve"): optimal for its memory.

    Stores at most ``snapshots`` carries, the first holding ``init``, and
    recomputes the fewest steps any schedule with that many stored carries
    can: with ``β(s, r) = C(s + r, s)`` and ``r`` the smallest integer with
    ``β(s, r) >= T``, the step is evaluated ``r·T − β(s + 1, r − 1) + T``
    times in all (the forward pass included), so each step about ``r + 1``
    times. ``r`` grows like ``log T`` for a fixed fraction of ``log T``
    snapshots; ``snapshots >= T − 1`` needs no recomputation beyond
    ``EveryStep``'s.

    It runs on one engine (``bpttjax._engine``): a ``jax.custom_vjp`` whose
    forward pass keeps the snapshots in a fixed buffer and whose backward
    pass is one loop that restores, recomputes and reverses one step at a
    time, adding into one set of parameter-gradient accumulators. The
    schedule is computed inside the loop, so the compiled program does not
    grow with ``T``.

    Args:
      snapshots: ``s >= 1``, the carries stored (the first is ``init``).
      overlap: in the backward pass, recompute the next state while pulling
        back the current step, so that XLA may run the two side by side
        (default), or one after the other. It changes time only, never
        values, the schedule or the memory. Overlapping pays on a CPU when
        one step's matrix products are too small to keep every thread busy,
        and can cost a little when they are large.

    Memory: ``s + 2`` carries (the snapshots, the state being advanced and
    the state being pulled back), one step's residuals (the last step's are
    kept from the forward pass, so it is not recomputed) and one set of
    parameter-gradient accumulators; ``T`` enters only through ``ys``.
    Recomputation: ``r·T − β(s + 1, r − 1)`` steps beyond plain BPTT, about
    ``r`` forward passes.

    Transformations: ``grad``, ``value_and_grad``, ``jit``, ``vmap`` (either
    side of ``grad``), ``jvp∘grad`` and ``linearize∘grad`` (Hessian-vector
    products) work. Forward-mode ``jax.jvp`` and ``jax.linearize`` of the
    scan itself and ``grad∘grad`` do not (``custom_vjp`` has no forward-mode
    rule, and the engine's loops have data-independent but dynamic trip
    counts); they raise a ``TypeError`` naming :class:`Nested`, which
    supports every transformation.

    References:
      A. Griewank and A. Walther, `Algorithm 799: revolve
      <https://doi.org/10.1145/347837.347846>`_, ACM TOMS 26(1), 2000.

    Example:
      >>> carry, ys = bj.scan(step, h0, xs, remat=bj.Binomial(snapshots=14))
    """

    snapshots: int
    overlap: bool = True

    def __post_init__(self):
        if not isinstance(self.overlap, bool):
            raise TypeError(
                "Binomial(overlap=...) expects True or False, got "
                f"{type(self.overlap).__name__}: {self.overlap!r}"
            )
        s = self.snapshots
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise TypeError(
                f"Binomial(snapshots=...) expects a positive int, got {type(s).__name__}: {s!r}"
            )
        if s < 1:
            raise ValueError(
                f"Binomial(snapshots=...) expects snapshots >= 1 (the first holds init), got {s}"
            )
        object.__setattr__(self, "snapshots", int(s))

    def __repr__(self):
        extra = "" if self.overlap else ", overlap=False"
        return f"Binomial(snapshots={self.snapshots}{extra})"

    @classmethod
    def examples(cls):
        # Binomial(1) and s >= T are covered by test_binomial.py's counts and order
        return (cls(3),)

    def recomputed_steps(self, length: int) -> int:
        """Step evaluations beyond plain BPTT's ``T``: the revolve optimum."""
        return _engine.binomial_advances(length, self.snapshots)

    def cost(self, length, costs):
        # Measured on CPU for the tanh RNN, GRU and LSTM cells at T = 100 to
        # 10,000: XLA reuses plain BPTT's fixed buffers for the step residuals
        # and the parameter accumulators, so the temp is the snapshots plus
        # plain's overhead (within 3%), independent of T.
        # The snapshots, each with its int32 position; the state being
        # advanced for the next step while the current one is pulled back;
        # the state being pulled back, kept live until its cotangent exists
        # (_engine._live_until: one carry for the GRU, half the LSTM's (h, c),
        # none for the tanh RNN, whose buffers XLA shares anyway); the
        # engine's loop counters and indices, small buffers that XLA aligns to
        # 64 bytes (about 2 KiB in all, seen at tiny sizes).
        s, C = self.snapshots, costs.carry_bytes
        temp = (s + 2) * C + 4 * s + costs.overhead_bytes + _ENGINE_BYTES
        return Cost(temp, self.recomputed_steps(length))

    def scan(self, f, init, xs, length, reverse, unroll):
        if length == 0:
            return jax.lax.scan(f, init, xs, length=0, reverse=reverse, unroll=unroll)
        if length > _engine.MAX_LENGTH:
            raise ValueError(
                f"Binomial supports sequences of up to 2**30 steps, got length {length}"
            )
        return _engine.binomial_scan(
            f, init, xs, length, self.snapshots, reverse, unroll, overlap=self.overlap
        )
