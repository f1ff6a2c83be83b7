"""The revolve engine's host decisions, counted in Python: ``Binomial``'s ``host_events``.

:mod:`._revolve` decides its schedule on the device, in loops whose trip
counts XLA cannot prove and in ``lax.cond``; on a GPU each test of such a
predicate is a copy to the host and a wait. :func:`host_events` counts them
for one gradient without running it, so that the cost model (and ``Budget``)
can weigh them.
"""

from __future__ import annotations

import functools
import math

from ._revolve import binomial_advances, split, sweeps

__all__ = ["host_events"]


@functools.lru_cache(maxsize=4096)
def host_events(length: int, snapshots: int) -> int:
    """Host-decided events of one gradient through the revolve engine (a static length).

    One event is one evaluation of the predicate of a ``while`` loop whose
    trip count XLA cannot prove (``i + 1`` for a loop of ``i`` iterations),
    or one execution of a ``lax.cond``: on XLA:GPU, a copy to the host and a
    wait. The engine's two known-trip loops (forward, and the backward outer
    loop) make none. With ``A`` = :func:`binomial_advances` the count is
    ``2·A + 3 + I + S − c``:

    * the backward pass's ``A − (T − 1)`` advances (the forward pass makes the
      other ``T − 1``) are each one iteration and one ``cond`` in
      ``restore_and_advance``; each of its ``T`` calls adds its first ``cond``
      and its loop's exit test;
    * the engine's first-sweep loop runs ``I`` iterations, ``I + 1`` tests;
    * the engine's split search finds each split with ``r + 1`` tests
      (``β(k, r − 1) < n <= β(k, r)``; one with ``k = 1``), once per range of
      two or more steps in the schedule's recursion: ``S`` in all, less
      ``c = 1`` where the first sweep's slots run out before its last split.

    A sequence of one or two steps has a schedule XLA can compute while
    compiling, and may lose some of these loops and conditionals; the figure
    is then an upper bound. From three steps on every one stays in the
    program (``tests/test_control_flow.py`` counts the executions and reads
    the program). Cost: integer work over the recursion's distinct ranges,
    never a loop over the steps; memoized per ``(length, snapshots)``.
    """
    if length < 1:
        return 0
    first, n, k = 0, length, snapshots  # the first sweep's iterations, its range left
    while n >= 2 and k >= 2:
        if run := _one_step_splits(n, k):
            first, n, k = first + run, n - run, k - run
        else:
            first, n, k = first + 1, n - split(n, k), k - 1
    c = int(n >= 2)  # its slots ran out with steps left
    advances = binomial_advances(length, snapshots)
    return 2 * advances + 3 + first + _split_tests(length, snapshots) - c


def _split_tests(length: int, snapshots: int) -> int:
    """``S``: the loop tests of every split in the recursion, where ``(n, k)`` splits
    at ``m`` into ``(m, k)`` and ``(n − m, k − 1)``. Bottom-up over an explicit stack
    (the recursion is as deep as ``s`` or ``√T``), by chains of left parts at one ``k``."""
    memo: dict[tuple[int, int], int] = {}
    parts: dict[tuple[int, int], tuple[int, list[tuple[int, int]]]] = {}
    stack = [(length, snapshots)]
    while stack:
        key = stack[-1]
        if key not in parts:
            parts[key] = _parts(*key)
        tests, rest = parts[key]
        missing = [r for r in rest if r not in memo]
        if missing:
            stack.extend(missing)
            continue
        memo[key] = tests + sum(memo[r] for r in rest)
        stack.pop()
    return memo[(length, snapshots)]


def _parts(n: int, k: int) -> tuple[int, list[tuple[int, int]]]:
    """The split tests of ``(n, k)`` and of its left parts at ``k``, and the ranges left."""
    if n < 2 or k == 1:
        return max(n - 1, 0), []  # one test per split of the n − 1 one-slot ranges
    if run := _one_step_splits(n, k):  # (n − i, k − i), each split after one step
        return run * (2 if n - k <= 1 else 3), [(n - run, k - run)]
    lefts = [n]
    while lefts[-1] >= 2:
        lefts.append(split(lefts[-1], k))
    tests = sum(sweeps(a, k) + 1 for a in lefts[:-1])
    return tests, [(a - m, k - 1) for a, m in zip(lefts[:-1], lefts[1:], strict=True)]


def _one_step_splits(n: int, k: int) -> int:
    """How many ranges ``(n − i, k − i)`` in a row, from ``i = 0``, with ``>= 2`` steps and
    ``>= 2`` slots, split after one step: with ``d = n − k``, every such one when
    ``d <= 1`` (``r = 1``), those with ``k(k − 1)/2 >= d − 1`` when ``d >= 2`` (``r = 2``).
    A closed form, so that ``Binomial(s)`` with ``s`` near ``T`` makes no loop over ``T``."""
    d = n - k
    if d <= 1:
        lowest = max(2, 2 - d)
    else:
        twice = 2 * (d - 1)
        lowest = max(2, (1 + math.isqrt(4 * twice + 1)) // 2)
        while lowest * (lowest - 1) < twice:
            lowest += 1
        while lowest > 2 and (lowest - 1) * (lowest - 2) >= twice:
            lowest -= 1
    return max(0, k - lowest + 1)
