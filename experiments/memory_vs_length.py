"""Memory and time of BPTT versus sequence length, side by side with the alternatives.

For each sequence length ``T`` and each method, the gradient of the benchmark
model of ``experiments/common.py`` (a recurrent cell, a linear read-out and a
per-step squared error averaged over time) with respect to every parameter is
compiled and measured as DESIGN.md's "How memory and time are measured"
prescribes:

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
  the slow drift of a shared machine out of the ratio.

Methods (``common.METHODS``): plain ``lax.scan`` + ``jax.grad`` (the
baseline), ``lax.scan`` with a ``jax.checkpoint``-ed step, ``bj.scan`` with
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
``<out>/memory_vs_length.png``; ``--table`` prints the README table.

    python experiments/memory_vs_length.py                   # default sweep
    python experiments/memory_vs_length.py --cell lstm --lengths 1000,10000
    python experiments/memory_vs_length.py --table           # README table
    for n in 1 2 4 8; do                                     # per-device memory
      python experiments/memory_vs_length.py --devices $n --no-time --lengths 1000,10000
    done
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

import jax

try:  # python -m experiments.memory_vs_length, or experiments/ is importable
    from experiments import common
except ImportError:  # python experiments/memory_vs_length.py
    import common

CSV_NAME = "memory_vs_length.csv"
PNG_NAME = "memory_vs_length.png"
DEFAULT_LENGTHS = (100, 300, 1000, 3000, 10000, 30000, 100000)
DEFAULT_MAX_TIME_LENGTH = 3000
README_LENGTHS = (1000, 10000)
QUICK = {"lengths": [30, 60], "batch": 2, "input": 3, "hidden": 4, "repeats": 1}
STYLES = {"bj": "o-", "lax": "s-.", "flax": "^:", "equinox": "v:"}


def build_parser():
    p = common.parser(
        __doc__,
        quick="tiny sizes (smoke test)",
        fresh="redo points already in the CSV",
        epilog="Sizes default to DESIGN.md's reference: tanh RNN, B=32, D=64, H=256, float32.",
    )
    p.add_argument(
        "--lengths",
        type=common.lengths,
        default=None,
        help="comma-separated sequence lengths T "
        f"(default {','.join(map(str, DEFAULT_LENGTHS))}; with --table: those in the CSV)",
    )
    common.add_model_options(p)
    p.add_argument("--dtype", type=common.float_dtype, default="float32", help="a floating dtype")
    p.add_argument(
        "--methods",
        type=common.parse_methods,
        default=list(common.METHODS),
        help="comma-separated subset (default: all) of: " + ", ".join(common.METHOD_NAMES)
        + "; or strategy specs such as binomial:14",
    )  # fmt: skip
    p.add_argument(
        "--repeats",
        type=common.positive_int,
        default=5,
        help="timed rounds (default 5, as DESIGN.md)",
    )
    p.add_argument(
        "--memory-limit",
        type=common.parse_bytes,
        default=None,
        help="time only points whose predicted need (temp + argument + output) fits; "
        "default: half the free host memory (GPU/TPU: half the device memory)",
    )
    p.add_argument(
        "--max-time-length",
        type=common.non_negative_int,
        default=DEFAULT_MAX_TIME_LENGTH,
        help=f"measure only memory for T above this (default {DEFAULT_MAX_TIME_LENGTH})",
    )
    common.add_devices_option(p)
    p.add_argument("--table", action="store_true", help="print the README table and exit")
    p.add_argument("--no-time", action="store_true", help="measure memory only")
    return p


def sweep(table, problem, lengths, methods, timing, fresh) -> int:
    """Measure every pending point, one length at a time; returns how many were measured."""
    missing = common.missing_packages(methods)
    methods = [m for m in methods if m not in missing]
    mine = [r for r in table.read() if problem.matches(r)]
    done = set() if fresh else {(r.method, r.T) for r in mine if timing.is_done(r)}
    todo = {T: [m for m in methods if (m.name, T) not in done] for T in lengths}
    todo = {T: ms for T, ms in todo.items() if ms}
    pending = {(m.name, T) for T, ms in todo.items() for m in ms}
    table.drop(lambda r: problem.matches(r) and (r.method, r.T) in pending)
    print(
        f"{len(pending)} points to measure ({len(lengths) * len(methods) - len(pending)} already "
        f"in {table.path}); backend {jax.default_backend()}, memory limit "
        f"{timing.memory_limit / 2**30:.1f} GiB",
        flush=True,
    )
    if not pending:
        return 0
    with common.progress(total=len(pending), unit="point") as bar:
        for T, ms in todo.items():
            rows = common.measure_length(dataclasses.replace(problem, T=T), ms, timing, bar)
            table.append(rows)
            bar.update(len(rows))
    return len(pending)


def markdown_table(rows, lengths=None) -> str:
    """Methods down, lengths across: ``temp MB (memory ratio, time ratio)``."""
    by_key = {(r.method, r.T): r for r in rows}
    present = sorted({r.T for r in rows})
    if lengths is None:
        lengths = [T for T in README_LENGTHS if T in present] or present
    names = [n for n in common.method_order(rows) if any((n, T) in by_key for T in lengths)]
    lines = [
        "| method | " + " | ".join(f"T = {T:,}" for T in lengths) + " |",
        "| --- |" + " --- |" * len(lengths),
    ]
    for name in names:
        cells = [common.format_point(by_key.get((name, T))) for T in lengths]
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
    names = [n for n in common.method_order(rows) if any(k[0] == n for k in by_key)]
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
                    cells.append(common._mb(r.temp_bytes))
                else:
                    share = r.temp_bytes / one.temp_bytes
                    cells.append(f"{common._mb(r.temp_bytes)} ({share:.0%})")
            lines.append(f"| {name} | {T:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, path: str, title: str) -> None:
    plt = common.pyplot()
    ok = [r for r in rows if r.status == "ok"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name in common.method_order(ok):
        mine = sorted(((r.T, r) for r in ok if r.method == name), key=lambda tr: tr[0])
        if not mine:
            continue
        Ts = [T for T, _ in mine]
        style = STYLES[common.family(name)]
        left.plot(Ts, [r.temp_bytes for _, r in mine], style, ms=3, label=name)
        timed = [(T, r.time_ratio) for T, r in mine if not math.isnan(r.time_ratio)]
        if timed:
            right.plot(*zip(*timed, strict=True), style, ms=3, label=name)
    floor = {}
    for r in ok:
        floor.setdefault(r.T, r.argument_bytes)
    if floor:
        Ts = sorted(floor)
        left.plot(Ts, [floor[T] for T in Ts], "k--", lw=1, label="arguments (input floor)")
    left.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="temp bytes (XLA)")
    left.set_title("working memory of the gradient")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)
    right.axhline(1.0, color="k", lw=0.8)
    right.set(xscale="log", xlabel="sequence length T", ylabel=f"time / time of {common.BASELINE}")
    right.set_title("time ratio (interleaved, median)")
    right.grid(True, which="both", alpha=0.3)
    if right.lines[1:]:
        right.legend(fontsize=7)
    fig.suptitle(title)
    common.save_figure(fig, path, dpi=120)


def print_table(table, problem, lengths) -> None:
    """``--table``: the README table of this configuration's rows."""
    if not os.path.exists(table.path):
        raise SystemExit(f"no results at {table.path}: run the sweep first")
    every = table.read()
    rows = [r for r in every if problem.matches(r) and (not lengths or r.T in lengths)]
    if not rows:
        raise SystemExit(f"{table.path} has no rows for this configuration ({problem})")
    print(markdown_table(rows, lengths))
    # the same configuration at every device count
    same = [
        r
        for r in every
        if dataclasses.replace(problem, devices=r.devices).matches(r)
        and (not lengths or r.T in lengths)
    ]
    if len({r.devices for r in same}) > 1:
        print("\nPer-device temp (share of the one-device temp):\n")
        print(devices_table(same, lengths))


def main(argv=None) -> None:
    args = common.parse(build_parser(), argv, QUICK)
    if args.dtype == "float64" and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
    problem = common.Problem(
        args.cell, 0, args.batch, args.input, args.hidden, args.dtype, args.devices
    )
    if args.batch % args.devices:
        raise SystemExit(f"--batch {args.batch} must be a multiple of --devices {args.devices}")
    table = common.Table(os.path.join(args.out, CSV_NAME), common.MemoryRow)
    if args.table:
        return print_table(table, problem, args.lengths)
    lengths = args.lengths or list(DEFAULT_LENGTHS)
    limit = args.memory_limit or common.default_memory_limit()
    timing = common.Timing(args.repeats, limit, args.max_time_length, args.no_time)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    try:
        new = sweep(table, problem, lengths, args.methods, timing, args.fresh)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {table.path} keeps every length completed so far", file=sys.stderr)
        raise
    rows = [r for r in table.read() if problem.matches(r) and r.T in lengths]
    png = os.path.join(args.out, PNG_NAME)
    on = f", batch sharded over {args.devices} devices (per device)" if args.devices > 1 else ""
    title = (
        f"{args.cell}, B={args.batch}, D={args.input}, H={args.hidden}, {args.dtype}{on}, "
        f"{jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}"
    )
    if rows:
        plot(rows, png, title)
    print(f"\n{title}; temp MB = 10^6 bytes; 'vs scan' is relative to {common.BASELINE}")
    print(common.text_table(rows, lengths))
    print(
        f"\n{new} points measured in {time.perf_counter() - start:.0f} s; wrote {table.path}, {png}"
    )


if __name__ == "__main__":
    main()
