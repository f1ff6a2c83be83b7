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

import argparse
import math
import os
import sys

import jax

import bpttjax as bj

try:  # run from the repository root as a package, or as a script
    from experiments import common
    from experiments import memory_vs_length as mvl
except ImportError:
    import common
    import memory_vs_length as mvl

CSV_NAME = "time_vs_memory.csv"
PNG_NAME = "time_vs_memory.png"
DEFAULT_FRACTIONS = (0.0005, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
QUICK = {"lengths": [30, 60], "batch": 2, "input": 3, "hidden": 4, "repeats": 1}


def budget_method(fraction: float) -> mvl.Method:
    """``bj.Budget`` at ``fraction`` of plain BPTT's measured working memory at each point."""

    def build(p: mvl.Problem):
        point = mvl.compile_and_measure(mvl.METHODS[0], p)
        budget = max(1, int(fraction * point["report"].temp_bytes))
        return mvl._common_method(remat=bj.Budget(budget))(p)

    return mvl.Method(f"bj.Budget({fraction:.2%} of plain)", build)


def parse_fractions(text: str) -> list[float]:
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects comma-separated numbers, got {text!r}") from None
    if not values or not all(0 < v <= 10 for v in values):
        raise argparse.ArgumentTypeError(f"expects fractions in (0, 10], got {text!r}")
    return sorted(set(values))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=mvl.parse_lengths, default=[1000, 10000])
    parser.add_argument("--cell", choices=common.CELLS, default="rnn")
    parser.add_argument("--batch", type=common.positive_int, default=32)
    parser.add_argument("--input", type=common.positive_int, default=64)
    parser.add_argument("--hidden", type=common.positive_int, default=256)
    parser.add_argument(
        "--fractions",
        type=parse_fractions,
        default=list(DEFAULT_FRACTIONS),
        help="Budget sweep, as fractions of plain BPTT's working memory",
    )
    parser.add_argument("--repeats", type=common.positive_int, default=5)
    parser.add_argument("--out", default="results")
    parser.add_argument("--fresh", action="store_true", help="redo lengths already in the CSV")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--backend", choices=("cpu", "gpu", "tpu"), default=None)
    return parser


def run(args) -> list[dict]:
    """Measure every pending length; returns this configuration's rows."""
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, CSV_NAME)
    args.dtype, args.no_time, args.max_time_length = "float32", False, max(args.lengths)
    config = mvl._config(args)
    sweep = [budget_method(f) for f in args.fractions]
    methods = {m.name: m for m in (*mvl.METHODS, *sweep)}
    names = [m.name for m in mvl.METHODS if m.needs is None or _importable(m.needs)]
    names += [m.name for m in sweep]
    rows = [r for r in mvl.read_rows(path) if all(r[k] == str(v) for k, v in config.items())]
    done = {int(r["T"]) for r in rows} if not args.fresh else set()
    limit = mvl.default_memory_limit()
    for T in common.progress(args.lengths, desc="lengths"):
        if T in done:
            continue
        mvl.drop_rows(path, {mvl._key({"method": n, "T": T, **config}) for n in names})
        new = mvl.run_length(T, names, args, config, limit, methods=methods)
        mvl.write_rows(path, new)
    return [r for r in mvl.read_rows(path) if all(r[k] == str(v) for k, v in config.items())]


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        print(f"skipped {name} (not installed: pip install {name})")
        return False
    return True


def plot(rows: list[dict], lengths: list[int], path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(lengths), figsize=(6.5 * len(lengths), 5), squeeze=False)
    for ax, T in zip(axes[0], lengths, strict=True):
        mine = [r for r in rows if int(r["T"]) == T and r["status"] == "ok"]
        mine = [r for r in mine if not math.isnan(mvl._num(r["time_ratio"]))]
        front = sorted(
            (mvl._num(r["temp_bytes"]), mvl._num(r["time_ratio"]))
            for r in mine
            if r["method"].startswith("bj.Budget(") and "of plain" in r["method"]
        )
        if front:
            ax.plot(*zip(*front, strict=True), "-", color="0.6", lw=2, label="bj.Budget sweep")
        for r in mine:
            if "of plain" in r["method"]:
                continue
            x, y = mvl._num(r["temp_bytes"]), mvl._num(r["time_ratio"])
            marker = "o" if r["method"].startswith("bj.") else "s"
            ax.plot([x], [y], marker, ms=6, label=r["method"])
        ax.set(xscale="log", xlabel="working memory (XLA temp bytes)", ylabel="time / lax.scan")
        ax.set_title(f"T = {T:,}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6.5, ncol=2)
    fig.suptitle(title)
    return common.save_figure(fig, path)


def main(argv=None) -> dict:
    parser = build_parser()
    args = common.parse_with_quick(parser, argv, QUICK)
    if args.backend is not None:
        mvl._select_backend(parser, args.backend)
    rows = run(args)
    title = (
        f"{args.cell}, B={args.batch}, D={args.input}, H={args.hidden}, float32, "
        f"{jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}"
    )
    lengths = [T for T in args.lengths if any(int(r["T"]) == T for r in rows)]
    png = plot(rows, lengths, os.path.join(args.out, PNG_NAME), title) if lengths else None
    print(f"{title}; temp MB = 10^6 bytes; times relative to {mvl.BASELINE}")
    print(mvl.text_table(rows, lengths, [r["method"] for r in rows]))
    print(f"wrote {os.path.join(args.out, CSV_NAME)}, {png}")
    return {"rows": rows, "png": png}


if __name__ == "__main__":
    sys.exit(main() and None)
