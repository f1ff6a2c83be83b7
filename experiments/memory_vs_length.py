"""Memory and time of BPTT versus sequence length, side by side with the alternatives.

For each sequence length ``T`` and each method, the gradient of the benchmark
model of ``experiments/_model.py`` (a recurrent cell, a linear read-out and a
per-step squared error averaged over time) with respect to every parameter is
compiled and measured (``docs/experiments/memory_vs_length.md`` says more):

* **Memory** is what XLA plans for the compiled gradient, read with
  ``bj.memory.measure`` on ``jax.ShapeDtypeStruct`` inputs, so nothing is
  allocated and a point that would not fit still gets its numbers:
  ``temp_bytes`` (working memory: the stored residuals and the backward pass's
  buffers), ``argument_bytes`` (the inputs, the floor no method goes under),
  ``output_bytes``, XLA's planned peak where the backend reports one, and on
  GPU/TPU the device's ``peak_bytes_in_use`` after the timed runs (a
  process-wide peak, so it never goes down within a run).
* **Time** is measured only when the predicted need (temp + argument + output)
  fits under ``--memory-limit`` and ``T <= --max-time-length``: real inputs,
  compile, one warm-up call, then ``--repeats`` rounds in which every method
  at this ``T`` (plain ``lax.scan`` included) runs once, in a rotating order,
  each call ended by ``jax.block_until_ready``. The median per method divided
  by the median of plain ``lax.scan`` is ``time_ratio``: interleaving keeps
  the slow drift of a shared machine out of the ratio. ``--runs N`` repeats
  the timed rounds N times; ``time_ratio`` is then the median of the N runs'
  ratios, and ``<out>/memory_vs_length_runs.csv`` keeps their median, least
  and greatest (a headline's spread).

Methods (those of ``_methods.METHODS`` that run the benchmark model): plain
``lax.scan`` + ``jax.grad`` (the baseline), ``lax.scan`` with a
``jax.checkpoint``-ed step, ``bj.scan`` with
``StoreAll``, ``EveryStep``, ``Nested(2|3|4)``, ``Binomial(ceil(log2 T))``,
``Binomial`` with as many snapshots as Equinox's default has checkpoints, and
``Budget`` set to the working memory Equinox's default needs at that ``T``;
``flax.nnx.RNN`` on the matching NNX cell (same sizes, read-out and loss) and,
if installed, Equinox's checkpointed scan (``equinox.internal.scan(...,
kind="checkpointed")``) at its default number of checkpoints (about
``sqrt(2T)``) and at ``ceil(log2 T)``. ``--methods`` also takes any strategy
the registry reads (``binomial:14``).

**Several devices.** ``--devices N`` shards the batch over a 1-D mesh of the
first ``N`` devices (``jax.jit`` with a ``NamedSharding`` on the batch axis of
``xs``, parameters replicated; ``--batch`` stays the global batch and must be
a multiple of ``N``), and every byte count is then per device: XLA's memory
plan of a partitioned program is the program one device runs. On CPU the
script asks XLA for ``N`` simulated devices by setting
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX starts its
backend (when run as a command; a process that has already started JAX with
fewer devices exits saying so). Simulated devices share the host's cores, so
their times mean little: use ``--no-time``. ``--table`` adds a per-device
table when the CSV holds several device counts.

Rows go to ``<out>/memory_vs_length.csv`` as soon as every method at one ``T``
is done, so an interrupted run leaves a valid CSV; a re-run skips the points
already there with status ``ok`` (``--fresh`` redoes them). The plot is
``<out>/memory_vs_length.png`` (``--plot-only`` redraws it from the CSV);
``--table`` prints the README table.

    python experiments/memory_vs_length.py                   # default sweep
    python experiments/memory_vs_length.py --cell lstm --lengths 1000,10000
    python experiments/memory_vs_length.py --table           # README table
    python experiments/memory_vs_length.py --lengths 10000 --max-time-length 10000 \
        --methods "lax.scan,bj.Binomial(log2 T)" --runs 5    # a headline with its spread
    for n in 1 2 4 8; do                                     # per-device memory
      python experiments/memory_vs_length.py --devices $n --no-time --lengths 1000,10000
    done
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import sys
import time

import jax

try:  # python -m experiments.memory_vs_length, or experiments/ is importable
    from experiments import _cli, _harness, _methods, _model, _sweep, _table
except ImportError:  # python experiments/memory_vs_length.py in a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from experiments import _cli, _harness, _methods, _model, _sweep, _table

CSV_NAME = "memory_vs_length.csv"
RUNS_CSV_NAME = "memory_vs_length_runs.csv"
PNG_NAME = "memory_vs_length.png"
DEFAULT_LENGTHS = (100, 300, 1000, 3000, 10000, 30000, 100000)
DEFAULT_MAX_TIME_LENGTH = 3000
README_LENGTHS = (1000, 10000)
QUICK = {"lengths": [30, 60], "batch": 2, "input": 3, "hidden": 4, "repeats": 1}
METHODS = tuple(m for m in _methods.METHODS if m.has_model)
"""The methods of this study: every one of the catalogue that runs the benchmark model."""
LINES = {"bj": "-", "lax": "--", "flax": ":", "equinox": "-."}
MARKERS = "osD^v<>phX*P"


@dataclasses.dataclass(frozen=True)
class RunsRow:
    """One line of ``memory_vs_length_runs.csv``: a method's time ratio over ``runs`` runs.

    Each run is ``repeats`` interleaved rounds of every method at this ``T``;
    a run's ratio is the method's median over the baseline's in that run.
    """

    method: str
    T: int
    cell: str
    batch: int
    input: int
    hidden: int
    dtype: str
    backend: str
    devices: int
    runs: int
    repeats: int
    time_ratio: float
    time_ratio_min: float
    time_ratio_max: float


def parse_methods(text: str) -> list:
    """argparse type: this study's methods by name (:func:`_methods.parse_methods`) or spec."""
    return _methods.parse_methods(text, METHODS)


def build_parser():
    p = _cli.parser(
        __doc__,
        quick="tiny sizes (smoke test)",
        fresh="redo points already in the CSV",
        epilog="Sizes default to the reference point of docs/experiments/memory_vs_length.md: "
        "tanh RNN, B=32, D=64, H=256, float32.",
    )
    p.add_argument(
        "--lengths",
        type=_cli.lengths,
        default=None,
        help="comma-separated sequence lengths T "
        f"(default {','.join(map(str, DEFAULT_LENGTHS))}; with --table: those in the CSV)",
    )
    _cli.add_model_options(p)
    p.add_argument("--dtype", type=_cli.float_dtype, default="float32", help="a floating dtype")
    p.add_argument(
        "--methods",
        type=parse_methods,
        default=list(METHODS),
        help="comma-separated subset (default: all) of: " + "; ".join(m.name for m in METHODS)
        + " (case, spaces and punctuation ignored); or strategy specs such as binomial:14",
    )  # fmt: skip
    p.add_argument(
        "--repeats",
        type=_cli.positive_int,
        default=5,
        help="timed rounds per run, the median is kept (default 5)",
    )
    p.add_argument(
        "--runs",
        type=_cli.positive_int,
        default=1,
        help="repeat the timed rounds N times; time_ratio is the median of the runs' ratios, "
        f"and their spread goes to <out>/{RUNS_CSV_NAME} (default 1)",
    )
    p.add_argument(
        "--memory-limit",
        type=_cli.parse_bytes,
        default=None,
        help="time only points whose predicted need (temp + argument + output) fits; "
        f"{_cli.BYTES_HELP}; default: half the free host memory (GPU/TPU: half the device memory)",
    )
    p.add_argument(
        "--max-time-length",
        type=_cli.non_negative_int,
        default=DEFAULT_MAX_TIME_LENGTH,
        help=f"measure only memory for T above this (default {DEFAULT_MAX_TIME_LENGTH})",
    )
    _cli.add_devices_option(p)
    p.add_argument("--table", action="store_true", help="print the README table and exit")
    p.add_argument(
        "--plot-only", action="store_true", help="redraw the figure from the CSV and exit"
    )
    p.add_argument("--no-time", action="store_true", help="measure memory only")
    return p


def sweep(table, problem, lengths, methods, timing, fresh, runs_table=None) -> int:
    """Measure every pending point, one length at a time; returns how many were measured."""
    missing = _harness.missing_packages(methods)
    methods = [m for m in methods if m not in missing and m.has_cell(problem.cell)]
    mine = [r for r in table.read() if _sweep.matches(problem, r)]
    done = set() if fresh else {(r.method, r.T) for r in mine if timing.is_done(r)}
    todo = {T: [m for m in methods if (m.name, T) not in done] for T in lengths}
    todo = {T: ms for T, ms in todo.items() if ms}
    pending = {(m.name, T) for T, ms in todo.items() for m in ms}
    table.drop(lambda r: _sweep.matches(problem, r) and (r.method, r.T) in pending)
    print(
        f"{len(pending)} points to measure ({len(lengths) * len(methods) - len(pending)} already "
        f"in {table.path}); backend {jax.default_backend()}, memory limit "
        f"{timing.memory_limit / 2**30:.1f} GiB",
        flush=True,
    )
    if not pending:
        return 0
    with _cli.progress(total=len(pending), unit="point") as bar:
        for T, ms in todo.items():
            point = dataclasses.replace(problem, T=T)
            spread = {}
            rows = _sweep.measure_length(point, ms, timing, bar, spread)
            table.append(rows)
            if runs_table is not None and spread:
                runs_table.append(runs_rows(point, spread, timing))
            bar.update(len(rows))
    return len(pending)


def runs_rows(p: _model.Problem, spread: dict, timing) -> list[RunsRow]:
    """The spread of each method's time ratio over ``timing.runs`` runs at ``p``."""
    return [
        RunsRow(
            name,
            p.T,
            p.cell,
            p.batch,
            p.input,
            p.hidden,
            p.dtype,
            jax.default_backend(),
            p.devices,
            len(ratios),
            timing.repeats,
            statistics.median(ratios),
            min(ratios),
            max(ratios),
        )  # fmt: skip
        for name, ratios in spread.items()
    ]


def markdown_table(rows, lengths=None) -> str:
    """Methods down, lengths across: ``temp MB (memory ratio, time ratio)``."""
    by_key = {(r.method, r.T): r for r in rows}
    present = sorted({r.T for r in rows})
    if lengths is None:
        lengths = [T for T in README_LENGTHS if T in present] or present
    names = [n for n in _sweep.order(rows) if any((n, T) in by_key for T in lengths)]
    lines = [
        "| method | " + " | ".join(f"T = {T:,}" for T in lengths) + " |",
        "| --- |" + " --- |" * len(lengths),
    ]
    for name in names:
        cells = [_sweep.format_point(by_key.get((name, T))) for T in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def devices_table(rows, lengths=None) -> str:
    """Per-device temp at each device count: ``temp MB (share of the one-device temp)``.

    Methods and lengths down, device counts across; ``rows`` hold one
    configuration at several device counts (all of them when ``lengths`` is None).
    """
    by_key = {(r.method, r.T, r.devices): r for r in rows if r.status == "ok"}
    counts = sorted({r.devices for r in rows})
    present = sorted({r.T for r in rows})
    lengths = [T for T in (lengths or present) if T in present]
    names = [n for n in _sweep.order(rows) if any(k[0] == n for k in by_key)]
    lines = [
        "| method | T | " + " | ".join(f"N = {n}" for n in counts) + " |",
        "| --- | --- |" + " --- |" * len(counts),
    ]
    for T in lengths:
        for name in names:
            one = by_key.get((name, T, 1))
            cells = []
            for n in counts:
                r = by_key.get((name, T, n))
                if r is None:
                    cells.append("")
                elif one is None or n == 1 or not one.temp_bytes:
                    cells.append(_harness.mb(r.temp_bytes))
                else:
                    share = r.temp_bytes / one.temp_bytes
                    cells.append(f"{_harness.mb(r.temp_bytes)} ({share:.0%})")
            lines.append(f"| {name} | {T:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


COLORS = (
    *(f"C{i}" for i in range(10)),
    "#393b79", "#8c6d31", "#843c39", "#7b4173", "#637939", "#3182bd",
)  # fmt: skip
"""Distinct hues: matplotlib's ten, then darker ones."""


def style(name: str, index: int) -> dict:
    """Each method its own colour and marker (hollow), and its family's line style.

    The baselines (``lax``) are drawn wide, pale and underneath: where a ``bj``
    strategy has the same values (``StoreAll`` and plain ``lax.scan``) its line
    runs inside theirs and both stay visible.
    """
    wide = _methods.family(name) == "lax"
    return dict(
        color=COLORS[index % len(COLORS)],
        marker=MARKERS[index % len(MARKERS)],
        ls=LINES.get(_methods.family(name), "-"),
        ms=9 if wide else 5,
        mfc="none",
        lw=4 if wide else 1.3,
        alpha=0.45 if wide else 1.0,
        zorder=1 if wide else 2,
        label=name,
    )


def plot(rows, path: str, title: str) -> None:
    """Temp bytes (left) and time ratio (right) against T, one legend under both panels."""
    plt = _cli.pyplot()
    ok = [r for r in rows if r.status == "ok"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.6))
    names = _sweep.order(ok)
    for i, name in enumerate(names):
        mine = sorted(((r.T, r) for r in ok if r.method == name), key=lambda tr: tr[0])
        if not mine:
            continue
        Ts = [T for T, _ in mine]
        left.plot(Ts, [r.temp_bytes for _, r in mine], **style(name, i))
        timed = [(T, r.time_ratio) for T, r in mine if not math.isnan(r.time_ratio)]
        if timed:
            right.plot(*zip(*timed, strict=True), **style(name, i))
    floor = {}
    for r in ok:
        floor.setdefault(r.T, r.argument_bytes)
    if floor:
        Ts = sorted(floor)
        left.plot(Ts, [floor[T] for T in Ts], "k--", lw=1, label="arguments (input floor)")
    left.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="temp bytes (XLA)")
    left.set_title("working memory of the gradient")
    left.grid(True, which="both", alpha=0.3)
    right.axhline(1.0, color="k", lw=0.8)
    right.set(xscale="log", xlabel="sequence length T", ylabel=f"time / time of {_sweep.BASELINE}")
    right.set_title("time ratio (interleaved, median)")
    right.grid(True, which="both", alpha=0.3)
    handles, labels = left.get_legend_handles_labels()
    rows_of_legend = math.ceil(len(labels) / 4)
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(title)
    _cli.save_figure(fig, path, dpi=120, rect=(0, 0.035 * rows_of_legend + 0.02, 1, 1))


def title_of(rows, devices: int) -> str:
    """The figure's title: the configuration and where its rows were measured."""
    r = rows[0]
    on = f", batch sharded over {devices} devices (per device)" if devices > 1 else ""
    return (
        f"{r.cell}, B={r.batch}, D={r.input}, H={r.hidden}, {r.dtype}{on}, "
        f"{r.backend} ({r.device_kind}), jax {r.jax_version}"
    )


def print_table(table, problem, lengths) -> None:
    """``--table``: the README table of this configuration's rows."""
    if not os.path.exists(table.path):
        raise SystemExit(f"no results at {table.path}: run the sweep first")
    every = table.read()
    rows = [r for r in every if _sweep.matches(problem, r) and (not lengths or r.T in lengths)]
    if not rows:
        raise SystemExit(f"{table.path} has no rows for this configuration ({problem})")
    print(markdown_table(rows, lengths))
    # the same configuration at every device count
    same = [
        r
        for r in every
        if _sweep.matches(dataclasses.replace(problem, devices=r.devices), r)
        and (not lengths or r.T in lengths)
    ]
    if len({r.devices for r in same}) > 1:
        print("\nPer-device temp (share of the one-device temp):\n")
        print(devices_table(same, lengths))


def plot_only(table, problem, lengths, png) -> None:
    """``--plot-only``: the figure of this configuration's rows in the CSV."""
    rows = [r for r in table.read() if _sweep.matches(problem, r)]
    rows = [r for r in rows if r.T in lengths] if lengths else rows
    if not rows:
        raise SystemExit(f"{table.path} has no rows for this configuration ({problem})")
    plot(rows, png, title_of(rows, problem.devices))
    print(f"wrote {png} from {len(rows)} rows of {table.path}")


def main(argv=None) -> None:
    args = _cli.parse(build_parser(), argv, QUICK)
    if args.dtype == "float64" and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
    problem = _model.Problem(
        args.cell, 0, args.batch, args.input, args.hidden, args.dtype, args.devices
    )
    if args.batch % args.devices:
        raise SystemExit(f"--batch {args.batch} must be a multiple of --devices {args.devices}")
    table = _table.Table(os.path.join(args.out, CSV_NAME), _sweep.MemoryRow)
    png = os.path.join(args.out, PNG_NAME)
    if args.table:
        return print_table(table, problem, args.lengths)
    if args.plot_only:
        return plot_only(table, problem, args.lengths, png)
    lengths = args.lengths or list(DEFAULT_LENGTHS)
    limit = args.memory_limit or _sweep.default_memory_limit()
    timing = _sweep.Timing(args.repeats, limit, args.max_time_length, args.no_time, args.runs)
    runs_table = (
        _table.Table(os.path.join(args.out, RUNS_CSV_NAME), RunsRow) if args.runs > 1 else None
    )
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    try:
        new = sweep(table, problem, lengths, args.methods, timing, args.fresh, runs_table)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {table.path} keeps every length completed so far", file=sys.stderr)
        raise
    rows = [r for r in table.read() if _sweep.matches(problem, r) and r.T in lengths]
    title = title_of(rows, args.devices) if rows else ""
    if rows:
        plot(rows, png, title)
    print(f"\n{title}; temp MB = 10^6 bytes; 'vs scan' is relative to {_sweep.BASELINE}")
    print(_sweep.memory_table(rows, lengths))
    if runs_table is not None:
        print(f"\ntime ratio over {args.runs} runs: median (least – greatest)")
        for r in runs_table.read():
            if _sweep.matches(problem, r) and r.T in lengths:
                print(
                    f"{r.T:>7}  {r.method:<28}{r.time_ratio:8.2f}×  "
                    f"({r.time_ratio_min:.2f} – {r.time_ratio_max:.2f})"
                )
    print(
        f"\n{new} points measured in {time.perf_counter() - start:.0f} s; wrote {table.path}, {png}"
    )


if __name__ == "__main__":
    main()
