"""One command for a GPU: every kind of schedule, timed, with the control flow it compiles to.

For each cell (rnn, GRU, LSTM), the gradient of ``mean(ys**2)`` over one
``bj.cells.run`` layer (``xs: (T, B, D)``, zero carry, float32; ``T = 1,000``,
``B = 32``, ``D = 64``, ``H = 256`` by default) under ``StoreAll``,
``Nested(2)``, ``Nested(3)`` (loops of known trip count), ``Binomial(10)``
(revolve decided by loop predicates: host events on XLA:GPU),
``Binomial(10, static=True)`` and ``Binomial(44, static=True)`` (the
schedule as data), and ``Budget`` at 5% and 1% (``--budgets``). A budget
holds the outputs and their cotangent (``2·(C + T·B·H)`` floats), most of
``StoreAll``'s memory for this loss, so the percentage is of what plain BPTT
needs beyond them: ``outputs + f·(plain − outputs)``, ``plain`` being
``StoreAll``'s memory in the same run. ``chosen`` is what the layer ran,
matched by memory and loops against ``Budget.plan`` of the step and the
fixed rows (the layer may run a fused ``Nested(2)`` instead).

A row holds the median of ``--repeats`` interleaved rounds (as ``speed.py``,
after two warm-up calls), XLA's working memory (``bj.memory.measure``),
``bj.memory.control_flow`` of the jitted gradient and the strategy's
``cost`` with the step's ``bj.memory.step_costs`` (host events, recomputed
steps, wasted pullbacks): 0 host events must mean no unknown-trip loop and
no conditional. ``--predict FORWARD_US,VJP_US,HOST_US`` times nothing:
``predicted_ms`` is ``bj.budget.Timing`` of those microseconds (per forward
step, step pullback, host event) applied to each cost, a budget's strategy
``Budget(bytes, timing=...).choose``; rows go to ``gpu_check_predicted.csv``.

Rows go to ``<out>/gpu_check.csv`` as they are measured (a killed run keeps
them; a re-run skips complete cells, ``--fresh`` redoes them); the figure,
time against memory per cell, is ``<out>/gpu_check.png``.

    python experiments/gpu_check.py --backend gpu --out docs/gpu_check   # the GPU run
    python experiments/gpu_check.py --predict 10,17,20 --out docs/gpu_check
    python experiments/gpu_check.py --quick                              # seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

import bpttjax as bj

try:  # python -m experiments.gpu_check, or experiments/ is importable
    from experiments import _cli, _harness, _table
except ImportError:  # python experiments/gpu_check.py in a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from experiments import _cli, _harness, _table

from experiments._harness import Method
from experiments._model import Problem

CSV_NAME, PREDICTED_CSV, PNG_NAME = "gpu_check.csv", "gpu_check_predicted.csv", "gpu_check.png"
# at tiny sizes the parameters' gradient accumulators are most of a schedule's memory
QUICK = {"length": 24, "batch": 2, "input": 4, "hidden": 8, "repeats": 2, "budgets": [90.0, 70.0]}
WARMUP_CALLS = 2
FIXED: tuple[tuple[str, bj.RematStrategy], ...] = (
    ("bj.StoreAll", bj.StoreAll()),
    ("bj.Nested(2)", bj.Nested(2)),
    ("bj.Nested(3)", bj.Nested(3)),
    ("bj.Binomial(10)", bj.Binomial(10)),
    ("bj.Binomial(10, static)", bj.Binomial(10, static=True)),
    ("bj.Binomial(44, static)", bj.Binomial(44, static=True)),
)
"""The strategies with a fixed schedule, in the table's order; the first is plain BPTT."""
BUDGETS = (5.0, 1.0)
"""The budgets, in percent of plain BPTT's memory beyond the outputs (``--budgets``)."""
PLAIN = FIXED[0][0]


@dataclasses.dataclass
class GpuRow:
    """One line of ``gpu_check.csv`` (or ``gpu_check_predicted.csv``): a strategy on a cell.

    ``time_ms``/``min_ms``: median and fastest of ``repeats`` interleaved rounds;
    ``vs_store_all``: ``StoreAll``'s time (or ``predicted_ms``) over this row's.
    ``temp_bytes``: XLA's working memory (predicted: the cost model's plus the
    outputs). ``chosen``: what a budget ran. ``while_loops``, ``unknown_trip_loops``,
    ``conditionals``: ``bj.memory.control_flow`` (empty when predicted);
    ``host_events``, ``recomputed_steps``, ``wasted_pullbacks``: the strategy's
    ``cost``. ``status``: ``ok``, ``pending`` (not yet timed), ``too small``, ``error``.
    """

    cell: str
    T: int
    batch: int
    input: int
    hidden: int
    method: str
    status: str = "ok"
    time_ms: float = math.nan
    min_ms: float = math.nan
    repeats: int = 0
    vs_store_all: float = math.nan
    predicted_ms: float = math.nan
    temp_bytes: int | None = None
    memory_vs_plain: float = math.nan
    budget_bytes: int | None = None
    chosen: str = ""
    while_loops: int | None = None
    unknown_trip_loops: int | None = None
    conditionals: int | None = None
    host_events: int | None = None
    recomputed_steps: int | None = None
    wasted_pullbacks: int | None = None
    compile_s: float = math.nan
    timing: str = ""
    backend: str = ""
    device_kind: str = ""
    jax_version: str = ""
    note: str = ""


def timing_us(text: str) -> bj.budget.Timing:
    """argparse type: ``FORWARD_US,VJP_US,HOST_US``, three numbers of microseconds >= 0."""
    what = "three numbers of microseconds FORWARD_US,VJP_US,HOST_US (e.g. 10,17,20)"
    parts = [s.strip() for s in text.split(",")]
    try:
        values = [float(s) for s in parts]
        if len(values) != 3:
            raise ValueError
        return bj.budget.Timing(*(v * 1e-6 for v in values))
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expects {what}, got {text!r}") from None


def layer_loss(p: Problem, strategy: bj.RematStrategy) -> Callable:
    """``loss(params, xs)``: ``mean(ys**2)`` of ``bj.cells.run`` under ``strategy``."""
    layer = Method(str(strategy), remat=lambda p: strategy).layer(p)

    def loss_fn(params, xs):
        _, ys = layer(params, _harness.zero_carry(p, xs), xs)
        return _harness.mean_square(ys)

    return loss_fn


def output_bytes(p: Problem, params, xs) -> int:
    """The layer's outputs (final carry and ``ys``) and their cotangent: what a budget holds
    whatever the schedule."""
    run = functools.partial(bj.cells.run, p.cell)
    outputs = jax.eval_shape(run, params, _harness.zero_carry(p, xs), xs)
    return 2 * bj.memory.tree_bytes(outputs)


def step_costs(p: Problem, params) -> bj.memory.StepCosts:
    """What plain BPTT of the cell's step stores per step, under a per-step loss (as
    ``Budget`` measures it)."""
    cell = bj.cells.get(p.cell)

    def build(T):
        def loss_fn(params, xs):
            def step(carry, x):
                carry, y = cell.step(params, carry, x)
                return carry, jnp.mean(y * y)

            h0 = _harness.zero_carry(p, xs)
            return jnp.sum(bj.scan(step, h0, xs, remat=bj.StoreAll())[1])

        xs = jax.ShapeDtypeStruct((T, p.batch, p.input), jnp.float32)
        return jax.grad(loss_fn), (params, xs)

    carry = jax.eval_shape(lambda: _harness.zero_carry(p, jnp.zeros((1, p.batch, p.input))))
    return bj.memory.step_costs(build, bj.memory.tree_bytes(carry))


def _row(p: Problem, method: str, **kw) -> GpuRow:
    kind = jax.devices()[0].device_kind
    return GpuRow(p.cell, p.T, p.batch, p.input, p.hidden, method, backend=jax.default_backend(),
                  device_kind=kind, jax_version=jax.__version__, **kw)  # fmt: skip


def _claims(row: GpuRow, strategy: bj.RematStrategy, p: Problem, costs) -> None:
    cost = strategy.cost(p.T, costs)
    row.host_events, row.recomputed_steps = cost.host_events, cost.recomputed_steps
    row.wasted_pullbacks = cost.wasted_pullbacks


def methods(budgets: Sequence[float]) -> list[str]:
    """Every row's method, in order: the fixed strategies, then a budget per percentage."""
    return [*(name for name, _ in FIXED), *(f"bj.Budget({b:g}%)" for b in budgets)]


def strategies(p: Problem, params, xs, plain: int, outputs: int, budgets, predict=None):
    """``(method, strategy, budget_bytes, plan, error)`` for every row of a cell, in order.

    ``budgets``: percentages of ``plain − outputs`` given on top of ``outputs``;
    ``plan`` is ``Budget.plan`` of the step over ``xs``, or with ``predict =
    (timing, costs)`` ``Budget(timing=timing).choose``; ``error`` a budget no
    strategy fits.
    """
    for name, strategy in FIXED:
        yield name, strategy, None, None, None
    for name, percent in zip(methods(budgets)[len(FIXED) :], budgets, strict=True):
        size = outputs + math.floor(percent / 100 * max(plain - outputs, 0))
        kw = {} if predict is None else {"timing": predict[0]}
        budget = bj.Budget(size, **kw)
        try:
            if predict is None:
                step = functools.partial(bj.cells.get(p.cell).step, params)
                plan = budget.plan(step, _harness.zero_carry(p, xs), xs)
            else:
                plan = budget.choose(p.T, predict[1], output_bytes=outputs)
            yield name, budget, size, plan, None
        except bj.budget.BudgetTooSmallError as err:
            yield name, budget, size, None, err


def _measure(row: GpuRow, grad_fn: Callable, params, xs, plain: int) -> bj.memory.MemoryReport:
    """Fill ``row``'s memory and control flow. Keep ``grad_fn`` (the same object) for timing:
    JAX then compiles it once for all three."""
    start = time.perf_counter()
    report = bj.memory.measure(grad_fn, params, xs)
    row.compile_s = time.perf_counter() - start
    row.temp_bytes, row.memory_vs_plain = report.temp_bytes, report.temp_bytes / plain
    cf = bj.memory.control_flow(grad_fn, params, xs)
    row.while_loops, row.unknown_trip_loops = cf.while_loops, cf.unknown_trip_loops
    row.conditionals = cf.conditionals
    return report


def _signature(row: GpuRow) -> tuple:
    return (row.temp_bytes, row.while_loops, row.unknown_trip_loops, row.conditionals)


def _identify(row: GpuRow, plan, p: Problem, params, xs, plain: int, rows: dict, costs) -> None:
    """Which strategy the layer ran under a budget, and its claims.

    ``bj.cells.run`` plans a budget as ``Budget.plan`` of the step does, but may
    run a fused ``StoreAll`` or ``Nested(2)`` instead, and does not say which. So
    the row's gradient is matched, by memory and loops, against the step's plan
    run through the layer and the fixed rows; ``chosen`` is empty where none matches.
    """
    mine, planned = _signature(row), plan.strategy
    probe = _row(p, str(planned))
    fixed = {name: strategy for name, strategy in FIXED if name in rows}
    if planned not in fixed.values():
        _measure(probe, jax.grad(layer_loss(p, planned)), params, xs, plain)
    same = [planned] if _signature(probe) == mine else []
    same += [s for name, s in fixed.items() if _signature(rows[name]) == mine]
    if same:
        row.chosen = str(same[0])
        _claims(row, same[0], p, costs)
    if not same or same[0] != planned:
        row.note = f"Budget.plan of the step: {planned}; the layer ran {row.chosen or 'another'}"


def measure_cell(p: Problem, repeats: int, budgets, table, bar) -> list[GpuRow]:
    """Compile, measure and time every strategy on ``p.cell``; each row is written when
    measured (``pending``), then again when the cell's interleaved rounds are done."""
    table.drop(lambda r: matches(p, r))  # a killed run's pending rows
    params, xs = _harness.bench_params(p), _harness.bench_inputs(p)
    costs = step_costs(p, params)
    plain_grad = jax.grad(layer_loss(p, FIXED[0][1]))
    plain = bj.memory.measure(plain_grad, params, xs).temp_bytes
    outputs = output_bytes(p, params, xs)
    rows, calls = {}, {}
    for name, strategy, budget_bytes, plan, error in strategies(
        p, params, xs, plain, outputs, budgets
    ):
        bar.set_postfix_str(f"{p.cell}: {name}")
        row = rows[name] = _row(p, name, budget_bytes=budget_bytes)
        try:
            if error is not None:
                row.status, row.note = "too small", " ".join(str(error).split())[:300]
                continue
            grad_fn = plain_grad if name == PLAIN else jax.grad(layer_loss(p, strategy))
            report = _measure(row, grad_fn, params, xs, plain)
            compiled = _harness.Compiled(grad_fn, lambda key: params, report, row.compile_s)
            calls[name] = _harness.prepare_timing(compiled, xs)  # and one warm-up call
            for _ in range(WARMUP_CALLS - 1):
                calls[name]()
            row.status = "pending"
            if plan is None:
                _claims(row, strategy, p, costs)
            else:
                _identify(row, plan, p, params, xs, plain, rows, costs)
        except Exception as err:  # noqa: BLE001 - recorded in the row, the others go on
            row.status, row.note = "error", _harness.describe("failed", err)
            calls.pop(name, None)
        finally:
            table.append([row])
            bar.update(1)

    def on_round(r):
        bar.set_postfix_str(f"{p.cell}: round {r + 1}/{repeats}")

    for name, times in _harness.time_rounds(calls, repeats, on_round).items():
        row = rows[name]
        if isinstance(times, BaseException):
            row.status, row.note = "error", _harness.describe("timed run failed", times)
        else:
            row.status, row.repeats = "ok", len(times)
            row.time_ms, row.min_ms = 1e3 * statistics.median(times), 1e3 * min(times)
    set_ratios(rows.values(), "time_ms")
    table.drop(lambda r: matches(p, r))
    table.append(list(rows.values()))
    jax.clear_caches()
    return list(rows.values())


def predict_cell(p: Problem, timing: bj.budget.Timing, budgets, table, bar) -> list[GpuRow]:
    """Every strategy's predicted time on ``p.cell`` from ``timing`` and its cost (nothing is
    run; ``StoreAll``'s gradient is compiled once for the budgets' reference)."""
    params = jax.eval_shape(lambda: _harness.bench_params(p))
    xs = jax.ShapeDtypeStruct((p.T, p.batch, p.input), jnp.float32)
    costs = step_costs(p, params)
    plain = bj.memory.measure(jax.grad(layer_loss(p, FIXED[0][1])), params, xs).temp_bytes
    outputs = output_bytes(p, params, xs)
    rows = []
    predict = (timing, costs)
    for name, strategy, budget_bytes, plan, error in strategies(
        p, params, xs, plain, outputs, budgets, predict
    ):
        bar.set_postfix_str(f"{p.cell}: {name}")
        row = _row(p, name, budget_bytes=budget_bytes, timing=str(timing))
        if error is not None:
            row.status, row.note = "too small", " ".join(str(error).split())[:300]
        else:
            if plan is not None:
                row.chosen, strategy = str(plan.strategy), plan.strategy
            cost = strategy.cost(p.T, costs)
            _claims(row, strategy, p, costs)
            row.predicted_ms = 1e3 * timing.seconds(p.T, cost)
            row.temp_bytes = cost.temp_bytes + outputs
            row.note = "predicted by the time model, not measured"
        rows.append(row)
        bar.update(1)
    set_ratios(rows, "predicted_ms")
    table.drop(lambda r: matches(p, r))
    table.append(rows)
    return rows


def set_ratios(rows, column: str) -> None:
    """``vs_store_all``: ``StoreAll``'s ``column`` over each row's (above 1: faster)."""
    rows = list(rows)
    base = next((getattr(r, column) for r in rows if r.method == PLAIN), math.nan)
    for r in rows:
        r.vs_store_all = base / getattr(r, column)


def matches(p: Problem, row: GpuRow) -> bool:
    """Whether ``row`` is of ``p``'s cell and sizes, on this backend."""
    mine = (p.cell, p.T, p.batch, p.input, p.hidden, jax.default_backend())
    return mine == (row.cell, row.T, row.batch, row.input, row.hidden, row.backend)


def _count(n: int | None) -> str:
    return "–" if n is None else f"{n:,}"


MEASURED = (
    _table.Column("cell", 5, lambda r: r.cell, left=True),
    _table.Column("method", 24, lambda r: r.method, left=True, gap="  "),
    _table.Column("median", 11, lambda r: _harness.number(r.time_ms, ".2f") + " ms"),
    _table.Column("vs StoreAll", 12, lambda r: _harness.times(r.vs_store_all)),
    _table.Column("temp", 10, lambda r: _harness.mb(r.temp_bytes)),
    _table.Column("vs plain", 9, lambda r: _harness.pct(r.memory_vs_plain)),
    _table.Column("loops", 6, lambda r: _count(r.while_loops)),
    _table.Column("unknown", 8, lambda r: _count(r.unknown_trip_loops)),
    _table.Column("conds", 6, lambda r: _count(r.conditionals)),
    _table.Column("host events", 12, lambda r: _count(r.host_events)),
    _table.Column("chosen", 26, lambda r: r.chosen, left=True, gap="  "),
)
PREDICTED = (
    *MEASURED[:2],
    _table.Column("predicted", 12, lambda r: _harness.number(r.predicted_ms, ".2f") + " ms"),
    MEASURED[3],
    _table.Column("model memory", 13, lambda r: _harness.mb(r.temp_bytes)),
    MEASURED[9],
    _table.Column("recomputed", 11, lambda r: _count(r.recomputed_steps)),
    _table.Column("wasted", 8, lambda r: _count(r.wasted_pullbacks)),
    MEASURED[10],
)


def text_table(rows: Sequence[GpuRow], predicted: bool = False) -> str:
    """One line per (cell, method); the columns of a measurement or of a prediction."""
    return _table.text_table(
        rows,
        PREDICTED if predicted else MEASURED,
        key=2,
        status=lambda r: None if r.status == "ok" else r.status,
        note=lambda r: r.note if r.status != "ok" or not predicted else "",
    )


def plot(rows: Sequence[GpuRow], cells: Sequence[str], names, path: str, title: str) -> str:
    """One panel per cell: each strategy's time (log scale) against its memory."""
    plt = _cli.pyplot()
    fig, axes = plt.subplots(1, len(cells), figsize=(5.2 * len(cells), 4.4), squeeze=False)
    for ax, cell in zip(axes[0], cells, strict=True):
        for i, name in enumerate(names):
            r = next((r for r in rows if (r.cell, r.method) == (cell, name)), None)
            t = math.nan if r is None or r.status != "ok" else r.time_ms
            if r is None or r.temp_bytes is None or math.isnan(t):
                continue
            ax.scatter(r.temp_bytes / 1e6, t, color=f"C{i}", label=name, zorder=3)
            ax.annotate(name.removeprefix("bj."), (r.temp_bytes / 1e6, t), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")  # fmt: skip
        ax.set_yscale("log")
        ax.set(xlabel="working memory (MB)", ylabel="median time (ms)")
        ax.set_title(cell)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=9)
    return _cli.save_figure(fig, path)


def build_parser():
    p = _cli.parser(
        __doc__ or "",
        quick="tiny sizes (T=24, B=2, D=4, H=8, 2 repeats): seconds, for tests",
        fresh="redo cells already in the CSV",
    )
    names = ", ".join(bj.cells.CELLS)
    p.add_argument(
        "--cells",
        type=_cli.comma_list(_cli.cell_name),
        default=["rnn", "gru", "lstm"],
        help=f"comma-separated cells among {names} (default rnn,gru,lstm)",
    )
    p.add_argument("--length", type=_cli.positive_int, default=1000, help="T (default 1000)")
    p.add_argument("--batch", type=_cli.positive_int, default=32, help="B (default 32)")
    p.add_argument("--input", type=_cli.positive_int, default=64, help="D (default 64)")
    p.add_argument("--hidden", type=_cli.positive_int, default=256, help="H (default 256)")
    p.add_argument("--repeats", type=_cli.positive_int, default=5, help="timed rounds (default 5)")
    p.add_argument(
        "--budgets",
        type=_cli.comma_list(_cli.float_in(0, 100, high_included=True)),
        default=list(BUDGETS),
        help="comma-separated percentages of plain BPTT's memory beyond the outputs, one "
        "Budget row each (default 5,1)",
    )
    p.add_argument(
        "--predict",
        type=timing_us,
        default=None,
        metavar="FORWARD_US,VJP_US,HOST_US",
        help="time nothing: predict each gradient's time with bj.budget.Timing of these "
        "microseconds per forward step, step pullback and host event (e.g. 10,17,20)",
    )
    return p


def main(argv=None) -> None:
    args = _cli.parse(build_parser(), argv, QUICK)
    cells = [c for c in bj.cells.CELLS if c in args.cells]
    points = [
        Problem(c, args.length, args.batch, args.input, args.hidden, "float32") for c in cells
    ]
    os.makedirs(args.out, exist_ok=True)
    predicted = args.predict is not None
    table = _table.Table(os.path.join(args.out, PREDICTED_CSV if predicted else CSV_NAME), GpuRow)
    final = ("ok", "too small")
    complete = lambda p: {r.method for r in table.read() if matches(p, r) and r.status in final}
    budgets = sorted(args.budgets, reverse=True)
    names = methods(budgets)
    todo = [p for p in points if predicted or args.fresh or complete(p) < set(names)]
    device = f"{jax.default_backend()} ({jax.devices()[0].device_kind})"
    what = f"predicted with {args.predict}" if predicted else f"measured on {device}"
    print(f"{len(todo)} of {len(points)} cells to do, {what}; rows in {table.path}", flush=True)
    start = time.perf_counter()
    try:
        with _cli.progress(total=len(todo) * len(names), unit="strategy") as bar:
            for p in todo:
                if predicted:
                    predict_cell(p, args.predict, budgets, table, bar)
                else:
                    measure_cell(p, args.repeats, budgets, table, bar)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {table.path} keeps every row written so far", file=sys.stderr)
        raise
    order = {name: i for i, name in enumerate(names)}
    rows = [r for r in table.read() if any(matches(p, r) for p in points) and r.method in order]
    rows.sort(key=lambda r: (cells.index(r.cell), order[r.method]))
    sizes = f"T={args.length}, B={args.batch}, D={args.input}, H={args.hidden}, float32"
    title = f"gradient of one bj.cells.run layer, {sizes}; {what}, jax {jax.__version__}"
    png = None
    if rows and not predicted:
        png = plot(rows, cells, names, os.path.join(args.out, PNG_NAME), title)
    print(f"\n{title}\n{text_table(rows, predicted)}")
    written = ", ".join(x for x in (table.path, png) if x)
    print(f"\n{len(todo)} cells in {time.perf_counter() - start:.0f} s; wrote {written}")


if __name__ == "__main__":
    main()
