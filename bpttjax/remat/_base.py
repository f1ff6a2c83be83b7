"""The strategy protocol, the fused layer's protocol, and the registry of strategies.

A rematerialization strategy is a frozen dataclass deriving from
:class:`RematStrategy` that owns its schedule (:meth:`~RematStrategy.scan`),
its cost model (:meth:`~RematStrategy.cost`) and the instances worth
considering for a budget (:meth:`~RematStrategy.candidates`). Registered with
:func:`register`, it is picked up by ``bj.scan``, ``bj.memory.predict``,
``bj.Budget``, the scripts' ``--remat`` options and the shared test suite.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import re
import types
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from .. import _tree

if TYPE_CHECKING:
    from ..truncation import TruncationStrategy

_S = TypeVar("_S", bound="RematStrategy")

__all__ = [
    "STRATEGIES",
    "Cost",
    "Layer",
    "RematStrategy",
    "StepCosts",
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
      host_events: the times the gradient's control flow waits for the host.
        One event is one evaluation of the predicate of a ``while`` loop
        whose trip count XLA cannot prove (a loop of ``i`` iterations makes
        ``i + 1``: the predicate is tested once more to exit), or one
        execution of a conditional (``lax.cond``, ``lax.switch``). On XLA:GPU
        each one copies a predicate or branch index to the host and waits
        for the device, so they cost time however small the step; a loop
        with a known trip count (``lax.scan``, ``fori_loop`` with Python-int
        bounds) is queued without waiting. 0, the default, for a schedule
        made of such loops only; :func:`bpttjax.memory.control_flow` shows
        which loops and conditionals a compiled gradient has.
      wasted_pullbacks: step pullbacks run and thrown away, beyond the ``T``
        that every gradient needs: work a schedule does to avoid a host
        decision (``Binomial(static=True)`` pulls back at every action).
    """

    temp_bytes: int
    recomputed_steps: int
    host_events: int = 0
    wasted_pullbacks: int = 0


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
        _tree.register(cls)

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
        # cls takes the int, as its signature (read above) says; the base class's does not
        return cast(Callable[..., RematStrategy], cls)(value)

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
        """Predicted temp bytes, recomputed steps and host events for ``length`` steps."""

    def check(self, length: int) -> None:
        """Refuse a sequence of ``length`` steps this strategy cannot run, before any
        trace (``bpttjax.scan`` calls it once the length is known). Default: any."""
        del length

    @classmethod
    def candidates(
        cls, length: int, costs: StepCosts
    ) -> Iterable[RematStrategy] | tuple[Sequence[RematStrategy], ...]:
        """The instances of this class worth considering for ``length`` steps with ``costs``.

        :class:`~bpttjax.Budget` asks every registered class, predicts each
        candidate with its own :meth:`cost`, and runs the fastest whose
        prediction fits (by its time model, ``bj.budget.Timing``). Offer them
        from the most memory to the least, so that within a class less memory
        never means a faster schedule: ``Budget`` bisects what a class offers
        on the predicted memory and then on the predicted time, which lets a
        class offer a long lazy sequence (``Binomial`` offers one instance per
        snapshot count). A class with several such families returns a tuple
        of sequences, each bisected on its own (``Binomial``'s dynamic and
        static engines). The default offers none, for a strategy ``Budget``
        should not pick by itself.
        """
        del length, costs
        return ()

    def scan_layer(self, layer: Layer, init: Any) -> tuple[Any, Any]:
        """Run a whole-sequence layer (:func:`bpttjax.cells.run`) under this strategy.

        ``layer.block(carry, start, n)`` runs steps ``[start, start + n)`` as
        one block that keeps every residual and computes its weight gradients
        in bulk; ``layer.scan(strategy, init)`` runs the sequence step by step
        through :func:`bpttjax.scan`. The default is the latter, which keeps
        this strategy's memory bound; a strategy that stores whole blocks of
        steps can hand them to ``layer.block`` instead.
        """
        return layer.scan(self, init)


class Layer(Protocol):
    r"""A whole-sequence recurrent layer that a strategy can run: the fused path.

    :func:`bpttjax.cells.run` builds one (a cell with its parameters, inputs
    and options) and hands it to the strategy's
    :meth:`RematStrategy.scan_layer`. A strategy programs against this
    protocol only: it runs the steps it keeps every residual of as
    :meth:`block`\ s, which compute their weight gradients in bulk, and the
    rest through :meth:`scan`; a strategy that reverses one step at a time
    can call :meth:`step_back` per step and :meth:`bulk_grads` per group of
    steps instead. ``Budget`` also rebuilds it with abstract
    arrays (:meth:`replace`) to measure it, and caches what it measured by
    :attr:`key`.

    Attributes:
      params: the parameters, a pytree of arrays.
      xs: the time-major inputs, ``xs: (T, ...)``.
      length: the number of steps ``T``.
      reverse, unroll: as in :func:`bpttjax.scan`.
      truncation: ``None`` or a :class:`~bpttjax.TruncationStrategy`.
    """

    params: Any
    xs: Any
    length: int
    reverse: bool
    unroll: int | bool
    truncation: TruncationStrategy | None

    @property
    def key(self) -> Hashable:
        """What fixes the layer's program apart from its arrays (functions and options)."""
        ...

    def step(self, carry: Any, x: Any) -> tuple[Any, Any]:
        """One step with the layer's parameters: ``f(carry, x)`` for :func:`bpttjax.scan`."""
        ...

    def scan(self, remat: RematStrategy, init: Any) -> tuple[Any, Any]:
        """The whole sequence step by step under ``remat``, through :func:`bpttjax.scan`."""
        ...

    def block(self, carry: Any, start: Any, n: int) -> tuple[Any, Any]:
        """Steps ``[start, start + n)`` as one block keeping every residual (``start``
        may be traced, ``n`` is static)."""
        ...

    def step_back(self, carry: Any, t: Any, d_carry: Any, d_y: Any) -> tuple[Any, Any, Any]:
        """Step ``t`` (a position in ``xs``, may be traced) from ``carry``, forward, and
        back only as far as the cotangent of ``carry``, without the truncation's factor.

        Returns ``((new_carry, y), d_entering, row)``: ``row`` is what
        :meth:`bulk_grads` needs of this step for the weight and input
        gradients, which it leaves out; zero cotangents give a zero row.
        """
        ...

    def bulk_grads(self, carries: Any, ts: Any, rows: Any) -> tuple[Any, Any]:
        """``(d_params, d_xs_rows)`` for the steps at positions ``ts`` (``int32[n]``),
        from the carries they entered with and their :meth:`step_back` rows, all
        stacked on a leading axis of ``n``: a few products with ``n·batch`` rows."""
        ...

    def replace(self, **changes: Any) -> Layer:
        """A copy with some of ``params``, ``xs``, ``length``, ``truncation`` replaced."""
        ...


_REGISTRY: dict[str, type[RematStrategy]] = {}

STRATEGIES: Mapping[str, type[RematStrategy]] = types.MappingProxyType(_REGISTRY)
"""The registered strategy classes by name, in registration order (read-only).

``store_all``, ``every_step``, ``binomial``, ``nested`` and ``budget``, then
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
