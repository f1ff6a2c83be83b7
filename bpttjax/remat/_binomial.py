"""Binomial checkpointing: :class:`Binomial`, Griewank and Walther's revolve schedule."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence

import jax

from . import _revolve, _revolve_events, _revolve_table
from ._base import Cost, RematStrategy, register

__all__ = ["Binomial"]


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

    It runs on one engine (``bpttjax.remat._revolve``): a ``jax.custom_vjp`` whose
    forward pass keeps the snapshots in a fixed buffer and whose backward
    pass is one loop that restores, recomputes and reverses one step at a
    time, adding into one set of parameter-gradient accumulators. The
    schedule is computed inside the loop, so the compiled program does not
    grow with ``T``. The price is control flow that the data decide: loops
    without a known trip count and ``lax.cond``, which on a GPU wait for the
    host at every test; ``cost(...).host_events`` counts those waits, about
    two per step evaluation (``Nested`` makes none).

    Args:
      snapshots: ``s >= 1``, the carries stored (the first is ``init``).
      overlap: in the backward pass, recompute the next state while pulling
        back the current step, so that XLA may run the two side by side
        (default), or one after the other. It changes time only, never
        values, the schedule or the memory. Overlapping pays on a CPU when
        one step's matrix products are too small to keep every thread busy,
        and can cost a little when they are large. The static engine
        ignores it.
      static: run the same schedule as data (``bpttjax.remat._revolve_table``):
        the host lists revolve's actions while tracing (two bits each, cached
        per ``(T, s)``) and the device runs them in two loops of known trip
        count, with no ``cond``, so that a GPU never waits for the host
        (``cost(...).host_events`` is 0). Each action runs the step's VJP
        and keeps what it needs, so the backward pass's advances,
        ``recomputed_steps − (T − 1)``, each run a pullback that is thrown
        away (``Cost.wasted_pullbacks``); the memory is one carry more (a
        spare snapshot slot) plus the table. Under :func:`bpttjax.cells.run`
        each action runs a cheaper body instead: the step and the cotangent
        of its carry only, the weights' gradients being products over groups
        of reversals (``bpttjax.remat._revolve_table.table_layer``). Choose
        it on a GPU or TPU; on a CPU, where a host decision costs little,
        the default is faster.

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
    static: bool = False

    def __post_init__(self):
        for name in ("overlap", "static"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(
                    f"Binomial({name}=...) expects True or False, got "
                    f"{type(value).__name__}: {value!r}"
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
        extra += ", static=True" if self.static else ""
        return f"Binomial(snapshots={self.snapshots}{extra})"

    @classmethod
    def from_arg(cls, arg):
        """``binomial:N`` is ``Binomial(N)``, ``binomial:N:static`` ``Binomial(N, static=True)``."""
        head, colon, tail = ("" if arg is None else arg).rpartition(":")
        if not colon or tail.strip().lower() != "static":
            return super().from_arg(arg)
        plain = super().from_arg(head.strip())
        assert isinstance(plain, Binomial)
        return dataclasses.replace(plain, static=True)

    @classmethod
    def examples(cls):
        # Binomial(1) and s >= T are covered by test_binomial.py's counts and order
        return (cls(3), cls(3, static=True))

    @classmethod
    def candidates(cls, length, costs):
        # Revolve is optimal for each snapshot count, so every count is worth
        # considering: most snapshots (least recomputation) first. Two families:
        # the dynamic engine (host decisions, no wasted pullbacks) and the
        # static one (the reverse), which the time model tells apart.
        n = max(length - 1, 1)
        return (_SnapshotCounts(n), _SnapshotCounts(n, static=True))

    def recomputed_steps(self, length: int) -> int:
        """Step evaluations beyond plain BPTT's ``T``: the revolve optimum."""
        return _revolve.binomial_advances(length, self.snapshots)

    def cost(self, length, costs):
        # XLA reuses plain BPTT's fixed buffers for the step residuals and the
        # parameter accumulators, so the temp is the snapshots plus plain's
        # overhead, independent of T. On top: each snapshot's int32 position;
        # the state being advanced for the next step while the current one is
        # pulled back; the state being pulled back, kept live until its
        # cotangent exists (_revolve._live_until; XLA shares some of it with
        # other buffers, so this errs high); the engine's loop counters and
        # indices, small buffers that XLA aligns to 64 bytes.
        s, C = self.snapshots, costs.carry_bytes
        if self.static:
            # the static engine keeps at most T − 1 snapshots, plus a spare slot
            # that advances which store nothing write into, each with its int32
            # position; and the table of actions, a constant of the program that
            # the device holds but XLA's temp_size_in_bytes does not count
            table = _revolve_table.table_bytes(max(length, 1), s)
            s = _revolve_table.slots(length, s)
            temp = (s + 3) * C + 4 * (s + 1) + table
            temp += costs.overhead_bytes + _ENGINE_BYTES
            wasted = max(self.recomputed_steps(length) - (length - 1), 0)
            return Cost(temp, self.recomputed_steps(length), wasted_pullbacks=wasted)
        temp = (s + 2) * C + 4 * s + costs.overhead_bytes + _ENGINE_BYTES
        return Cost(temp, self.recomputed_steps(length), _revolve_events.host_events(length, s))

    def scan(self, f, init, xs, length, reverse, unroll):
        if length == 0:
            return jax.lax.scan(f, init, xs, length=0, reverse=reverse, unroll=unroll)
        if length > _revolve.MAX_LENGTH:
            raise ValueError(
                f"Binomial supports sequences of up to 2**30 steps, got length {length}"
            )
        if self.static:
            return _revolve_table.table_scan(f, init, xs, length, self.snapshots, reverse, unroll)
        return _revolve.binomial_scan(
            f, init, xs, length, self.snapshots, reverse, unroll, overlap=self.overlap
        )

    def scan_layer(self, layer, init):
        # The static engine reverses a bj.cells.run layer with its fused action
        # body (_revolve_table.table_layer); the dynamic one runs it step by step.
        if not self.static or layer.length == 0:
            return layer.scan(self, init)
        if layer.length > _revolve.MAX_LENGTH:
            raise ValueError(
                f"Binomial supports sequences of up to 2**30 steps, got length {layer.length}"
            )
        return _revolve_table.table_layer(layer, init, self.snapshots)


class _SnapshotCounts(Sequence):
    """``Binomial(n), Binomial(n - 1), ..., Binomial(1)``, made only when indexed."""

    def __init__(self, n: int, static: bool = False):
        self._n, self._static = n, static

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return Binomial(self._n - (i % self._n), static=self._static)
