"""Memory and time of the benchmark model's gradient under every method at one length.

What ``memory_vs_length.py`` and ``time_vs_memory.py`` share: their row type
(:class:`MemoryRow`, one method at one ``T``), when a point is timed
(:class:`Timing`) and :func:`measure_length`. Memory is XLA's plan for the
gradient compiled on abstract inputs (nothing is allocated, so a point that
would not fit still gets its numbers); points that :class:`Timing` allows get
real inputs, a warm-up call and interleaved timed rounds.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from collections.abc import Sequence

import jax
import jax.numpy as jnp

import bpttjax as bj

from . import _harness as h
from ._cli import Quiet
from ._methods import BY_NAME, method_order
from ._model import Problem
from ._table import Column, text_table

BASELINE = h.BASELINE


@dataclasses.dataclass
class MemoryRow:
    """One line of ``memory_vs_length.csv`` and ``time_vs_memory.csv``: a method at one T.

    Bytes are XLA's plan for the compiled gradient, per device; ``time_ratio``
    and ``memory_ratio`` are relative to the baseline (``lax.scan``) in the
    same run (NaN where there is none); ``status`` is ``ok``, ``oom`` or
    ``error``; ``devices`` is the number of devices the batch is sharded over
    (a later column: older files read as 1).
    """

    method: str
    T: int
    cell: str
    batch: int
    input: int
    hidden: int
    dtype: str
    backend: str
    device_kind: str
    jax_version: str
    temp_bytes: int | None = None
    argument_bytes: int | None = None
    output_bytes: int | None = None
    peak_bytes: int | None = None
    device_peak_bytes: int | None = None
    compile_s: float | None = None
    time_s: float | None = None
    time_ratio: float = math.nan
    memory_ratio: float = math.nan
    timed: bool = False
    status: str = "ok"
    note: str = ""
    devices: int = 1


def new_row(p: Problem, method: str) -> MemoryRow:
    """An empty row for ``method`` at ``p``, on this backend."""
    return MemoryRow(
        method, p.T, p.cell, p.batch, p.input, p.hidden, p.dtype,
        jax.default_backend(), jax.devices()[0].device_kind, jax.__version__,
        devices=p.devices,
    )  # fmt: skip


def matches(p: Problem, row: MemoryRow) -> bool:
    """Whether ``row`` was measured with ``p``'s sizes on this backend (any T)."""
    mine = (p.cell, p.batch, p.input, p.hidden, p.dtype, jax.default_backend(), p.devices)
    theirs = (row.cell, row.batch, row.input, row.hidden, row.dtype, row.backend, row.devices)
    return mine == theirs


@dataclasses.dataclass(frozen=True)
class Timing:
    """How points are timed: ``repeats`` interleaved rounds, when they may be.

    A point is timed unless ``no_time``, ``T > max_time_length`` or its
    predicted need (temp + argument + output bytes) exceeds ``memory_limit``.
    ``runs`` repeats the timed rounds that many times (fresh rounds, the
    same compiled programs); a row keeps the median run.
    """

    repeats: int = 5
    memory_limit: int = 2**62
    max_time_length: int = 3000
    no_time: bool = False
    runs: int = 1

    def skip_reason(self, T: int, need: int) -> str | None:
        """Why a point of length ``T`` needing ``need`` bytes is not timed (None: it is)."""
        if self.no_time:
            return "memory only (--no-time)"
        if T > self.max_time_length:
            return f"memory only (T > --max-time-length {self.max_time_length})"
        if need > self.memory_limit:
            return (
                f"not timed: predicted need {need / 1e9:.2f} GB exceeds the memory limit "
                f"{self.memory_limit / 1e9:.2f} GB"
            )
        return None

    def is_done(self, row: MemoryRow) -> bool:
        """An ``ok`` row is done unless it lacks a time that this timing would measure."""
        if row.status != "ok":
            return False
        return (
            row.timed or self.no_time or row.T > self.max_time_length or "memory limit" in row.note
        )


def default_memory_limit() -> int:
    """Half the device memory on GPU/TPU, else half of the host's available memory."""
    if jax.default_backend() != "cpu":
        try:
            stats = jax.devices()[0].memory_stats() or {}
        except (NotImplementedError, RuntimeError):
            stats = {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) // 2
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def _note(row: MemoryRow, text: str) -> None:
    row.note = f"{row.note}; {text}" if row.note else text


def _fail(row: MemoryRow, stage: str, err: BaseException) -> None:
    row.status = "oom" if h.is_oom(err) else "error"
    _note(row, h.describe(stage, err))


def _compile_point(method: h.Method, p: Problem, row: MemoryRow, timing: Timing):
    """Fill ``row``'s memory columns; the compiled point if it is to be timed."""
    try:
        point = h.compile_and_measure(method, p)
    except Exception as err:  # noqa: BLE001 - recorded in the row, the sweep goes on
        _fail(row, "compile failed", err)
        return None
    rep = point.report
    row.temp_bytes, row.argument_bytes = rep.temp_bytes, rep.argument_bytes
    row.output_bytes, row.peak_bytes = rep.output_bytes, rep.peak_bytes
    row.compile_s = round(point.compile_s, 4)
    reason = timing.skip_reason(p.T, rep.temp_bytes + rep.argument_bytes + rep.output_bytes)
    if reason:
        _note(row, reason)
        return None
    return point


def _time_points(p: Problem, points: dict, rows: dict, timing: Timing, bar) -> dict:
    """Warm up and time ``points`` interleaved, ``timing.runs`` times; fill their rows' times.

    Returns each method's median seconds per run (the runs' spread).
    """
    xs = jax.random.normal(jax.random.key(1), (p.T, p.batch, p.input), jnp.dtype(p.dtype))
    calls = {}
    for name, point in points.items():
        bar.set_postfix_str(f"T={p.T} warm up {name}")
        try:
            calls[name] = h.prepare_timing(point, xs, p.place)
        except Exception as err:  # noqa: BLE001
            _fail(rows[name], "warm-up failed", err)
    per_run: dict[str, list[float]] = {name: [] for name in calls}
    for run in range(timing.runs):
        of = f" run {run + 1}/{timing.runs}" if timing.runs > 1 else ""

        def on_round(r, of=of):
            bar.set_postfix_str(f"T={p.T} timing round {r + 1}/{timing.repeats}{of}")

        live = {n: c for n, c in calls.items() if rows[n].status == "ok"}
        for name, ts in h.time_rounds(live, timing.repeats, on_round).items():
            if isinstance(ts, BaseException):
                _fail(rows[name], "timed run failed", ts)
            else:
                per_run[name].append(statistics.median(ts))
    for name, medians in per_run.items():
        if rows[name].status == "ok" and medians:
            rows[name].time_s, rows[name].timed = statistics.median(medians), True
    peak = bj.memory.device_peak_bytes()
    for name in calls:
        rows[name].device_peak_bytes = peak
    return {n: ts for n, ts in per_run.items() if rows[n].timed}


def _set_ratios(rows: dict[str, MemoryRow], per_run: dict[str, list[float]]) -> dict:
    """Memory and time ratios to the baseline; returns each method's per-run time ratios."""
    base = rows[BASELINE]
    ratios = {}
    for row in rows.values():
        if row.status != "ok":
            continue
        if base.status == "ok" and base.temp_bytes > 0:
            row.memory_ratio = row.temp_bytes / base.temp_bytes
        else:
            _note(row, f"no memory ratio: the baseline {BASELINE} failed")
        if row.timed:
            if base.timed:
                if len(per_run[row.method]) == 1:
                    row.time_ratio = row.time_s / base.time_s
                else:  # one ratio per run, each against the same run's baseline
                    mine, theirs = per_run[row.method], per_run[BASELINE]
                    ratios[row.method] = [a / b for a, b in zip(mine, theirs, strict=True)]
                    row.time_ratio = statistics.median(ratios[row.method])
            else:
                _note(row, f"no time ratio: the baseline {BASELINE} was not timed")
    return ratios


def measure_length(
    problem: Problem, methods: Sequence[h.Method], timing: Timing, bar=None, spread=None
) -> list[MemoryRow]:
    """Measure every method at ``problem.T``; their rows, in the order of ``methods``.

    Memory is XLA's plan for the gradient compiled on abstract inputs. Points
    that :class:`Timing` allows get real inputs, a warm-up call and
    ``repeats`` interleaved rounds; the median over the baseline's is
    ``time_ratio``. With ``timing.runs > 1`` the rounds are repeated that many
    times, ``time_ratio`` is the median of the runs' ratios, and ``spread``
    (a dict, if given) receives each method's list of them. The baseline is
    compiled and timed as the reference even when it is not in ``methods``.
    A failure (out of memory or any error) is recorded in its row and the
    others go on.
    """
    bar = bar if bar is not None else Quiet()
    todo = [BY_NAME[BASELINE], *(m for m in methods if m.name != BASELINE)]
    rows, points = {}, {}
    for method in todo:
        bar.set_postfix_str(f"T={problem.T} compile {method.name}")
        rows[method.name] = new_row(problem, method.name)
        point = _compile_point(method, problem, rows[method.name], timing)
        if point is not None:
            points[method.name] = point
    per_run = _time_points(problem, points, rows, timing, bar) if points else {}
    ratios = _set_ratios(rows, per_run)
    if spread is not None:
        spread.update({m.name: ratios[m.name] for m in methods if m.name in ratios})
    jax.clear_caches()
    return [rows[m.name] for m in methods]


# ------------------------------------------------------------------ output ---


def order(rows: Sequence[MemoryRow]) -> list[str]:
    """The catalogue's method names, then the others of ``rows`` in their order."""
    return method_order(r.method for r in rows)


COLUMNS = (
    Column("T", 7, lambda r: str(r.T)),
    Column("method", 28, lambda r: r.method, left=True, gap="  "),
    Column("temp", 10, lambda r: h.mb(r.temp_bytes)),
    Column("vs scan", 9, lambda r: h.pct(r.memory_ratio)),
    Column("args", 10, lambda r: h.mb(r.argument_bytes)),
    Column("time", 10, lambda r: h.seconds(r.time_s)),
    Column("vs scan", 9, lambda r: h.times(r.time_ratio)),
    Column("compile", 9, lambda r: f"{r.compile_s:.2f}s"),
)


def memory_table(rows: Sequence[MemoryRow], lengths: Sequence[int], names=None) -> str:
    """One line per (length, method); ``names`` (default :func:`order`) sets the order."""
    names = list(dict.fromkeys(names)) if names is not None else order(rows)
    by_key = {(r.method, r.T): r for r in rows}
    chosen = [by_key[n, T] for T in lengths for n in names if (n, T) in by_key]
    return text_table(
        chosen,
        COLUMNS,
        key=2,
        status=lambda r: None if r.status == "ok" else r.status,
        note=lambda r: r.note,
    )


def format_point(row: MemoryRow | None) -> str:
    """``temp MB (memory ratio, time ratio)`` for the README table."""
    if row is None:
        return ""
    if row.status != "ok":
        return row.status
    timing = h.times(row.time_ratio) if row.timed else "not timed"
    return f"{h.mb(row.temp_bytes)} ({h.pct(row.memory_ratio)}, {timing})"
