"""Time against memory: every strategy and peer as a point, and a Budget sweep tracing the front.

For each sequence length ``T`` (default 1,000 and 10,000) every method of
``memory_vs_length.py`` is measured exactly as there (XLA's temp bytes;
interleaved, median time relative to plain ``lax.scan`` in the same run),
together with ``bj.Budget`` at a range of fractions of plain BPTT's working
memory. The figure puts working memory on the x axis (log) and the time ratio
on the y axis: a point to the lower left of another is better in both.

Rows go to ``<out>/time_vs_memory.csv`` one length at a time (a re-run skips
the lengths already there unless ``--fresh``); the figure is
``<out>/time_vs_memory.png``.

    python experiments/time_vs_memory.py                      # T = 1,000 and 10,000
    python experiments/time_vs_memory.py --quick              # small, for a smoke test
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import jax

try:  # python -m experiments.time_vs_memory, or experiments/ is importable
    from experiments import _cli, _harness, _methods, _model, _sweep, _table
    from experiments.memory_vs_length import METHODS
except ImportError:  # python experiments/time_vs_memory.py in a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from experiments import _cli, _harness, _methods, _model, _sweep, _table
    from experiments.memory_vs_length import METHODS

CSV_NAME = "time_vs_memory.csv"
PNG_NAME = "time_vs_memory.png"
# Not lower: at T = 10,000, 0.05% of plain's memory fits only Binomial(1) or
# Binomial(2), which recompute about T/2 to sqrt(2T) forward passes.
DEFAULT_FRACTIONS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
QUICK = {"lengths": [30, 60], "batch": 2, "input": 3, "hidden": 4, "repeats": 1}


def budget_method(fraction: float):
    """``bj.Budget`` at ``fraction`` of plain BPTT's measured working memory at each point."""

    def budget(p: _model.Problem) -> int:
        plain = _harness.compile_and_measure(_methods.BY_NAME[_sweep.BASELINE], p)
        return max(1, int(fraction * plain.report.temp_bytes))

    return _methods.strategy("budget", budget, label=f"{fraction:.2%} of plain")


def build_parser():
    p = _cli.parser(
        __doc__, quick="tiny sizes (smoke test)", fresh="redo lengths already in the CSV"
    )
    p.add_argument("--lengths", type=_cli.lengths, default=[1000, 10000])
    _cli.add_model_options(p)
    p.add_argument(
        "--fractions",
        type=_cli.comma_list(_cli.float_in(0, 10, high_included=True)),
        default=list(DEFAULT_FRACTIONS),
        help="Budget sweep, as fractions of plain BPTT's working memory",
    )
    p.add_argument("--repeats", type=_cli.positive_int, default=5)
    return p


def sweep(table, problem, lengths, methods, repeats, fresh) -> list[_sweep.MemoryRow]:
    """Measure every length not yet in the CSV; returns this configuration's rows."""
    timing = _sweep.Timing(repeats, _sweep.default_memory_limit(), max(lengths))
    done = set() if fresh else {r.T for r in table.read() if _sweep.matches(problem, r)}
    names = {m.name for m in methods}
    for T in _cli.progress(lengths, desc="lengths"):
        if T in done:
            continue
        table.drop(lambda r, T=T: _sweep.matches(problem, r) and r.T == T and r.method in names)
        table.append(_sweep.measure_length(dataclasses.replace(problem, T=T), methods, timing))
    return [r for r in table.read() if _sweep.matches(problem, r)]


def plot(rows, lengths, front: set[str], path: str, title: str) -> str:
    plt = _cli.pyplot()
    fig, axes = plt.subplots(1, len(lengths), figsize=(6.5 * len(lengths), 5), squeeze=False)
    for ax, T in zip(axes[0], lengths, strict=True):
        mine = [r for r in rows if r.T == T and r.status == "ok" and not math.isnan(r.time_ratio)]
        sweep = sorted((r.temp_bytes, r.time_ratio) for r in mine if r.method in front)
        if sweep:
            ax.plot(*zip(*sweep, strict=True), "-", color="0.6", lw=2, label="bj.Budget sweep")
        for r in mine:
            if r.method not in front:
                marker = "o" if _methods.family(r.method) == "bj" else "s"
                ax.plot([r.temp_bytes], [r.time_ratio], marker, ms=6, label=r.method)
        ax.set(xscale="log", xlabel="working memory (XLA temp bytes)", ylabel="time / lax.scan")
        ax.set_title(f"T = {T:,}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6.5, ncol=2)
    fig.suptitle(title)
    return _cli.save_figure(fig, path)


def main(argv=None) -> None:
    args = _cli.parse(build_parser(), argv, QUICK)
    os.makedirs(args.out, exist_ok=True)
    table = _table.Table(os.path.join(args.out, CSV_NAME), _sweep.MemoryRow)
    problem = _model.Problem(args.cell, 0, args.batch, args.input, args.hidden, "float32")
    fractions = [budget_method(f) for f in args.fractions]
    missing = _harness.missing_packages(METHODS)
    methods = [m for m in METHODS if m not in missing and m.has_cell(args.cell)] + fractions
    rows = sweep(table, problem, args.lengths, methods, args.repeats, args.fresh)
    title = (
        f"{args.cell}, B={args.batch}, D={args.input}, H={args.hidden}, float32, "
        f"{jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}"
    )
    lengths = [T for T in args.lengths if any(r.T == T for r in rows)]
    front = {m.name for m in fractions}
    png = plot(rows, lengths, front, os.path.join(args.out, PNG_NAME), title) if lengths else None
    print(f"{title}; temp MB = 10^6 bytes; times relative to {_sweep.BASELINE}")
    print(_sweep.memory_table(rows, lengths, [r.method for r in rows]))
    print(f"wrote {table.path}, {png}")


if __name__ == "__main__":
    main()
