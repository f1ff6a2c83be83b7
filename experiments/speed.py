"""Speed of a recurrent layer's gradient: bpttjax against lax.scan, Flax, Equinox and PyTorch.

For each cell (tanh RNN, GRU, LSTM) and each batch ``B`` and hidden size
``H`` of the grid, every method computes the gradient of ``mean(ys**2)`` with
respect to the layer's parameters, where ``ys: (T, B, H)`` are the outputs of
one recurrent layer run over ``xs: (T, B, D)`` from a zero carry (float32,
``T = 1,000``, ``D = 64`` by default). Methods:

* ``lax.scan``: ``jax.lax.scan(functools.partial(cell.step, params), carry, xs)``
  and ``jax.grad``; the baseline of every ratio.
* ``bj.StoreAll``, ``bj.Nested(2)``, ``bj.Binomial(log2 T)`` (``ceil(log2 T)``
  snapshots, 10 at ``T = 1,000``): the library's whole-sequence layer
  ``bj.cells.run``. Their ``batch_chunks`` is ``run``'s default, ``"auto"``
  (timed once per shape; the row's note says what it chose).
* ``bj.StoreAll (batch_chunks=1)`` and ``(batch_chunks=2)``: the same layer
  with the batch pinned to one chain, or run as two independent chains in
  each loop step.
* ``flax.nnx.RNN`` on Flax's cell (``OptimizedLSTMCell`` for the LSTM), the
  gradient taken with respect to its ``nnx.Param`` state (``nnx.split``/``merge``).
* ``equinox checkpointed``: ``equinox.internal.scan(kind="checkpointed")``
  with its default checkpoints (about ``sqrt(2T)``).
* ``PyTorch``: ``torch.nn.RNN(nonlinearity="tanh")``, ``GRU`` or ``LSTM``
  on the time-major ``(T, B, D)`` input: ``zero_grad``, forward,
  ``(y**2).mean().backward()``, with ``torch.set_num_threads(--threads)``.
* ``jax.experimental.rnn`` (cuDNN's LSTM; GPU backend and LSTM only), on the
  batch-first input it expects.

Every method gets the same parameters (PyTorch's, Flax's and cuDNN's are
copied from them) and, before it is timed, its gradient is mapped back to the
``bj.cells`` layout and compared with the baseline's: a method whose gradient
differs by more than ``--rtol`` (norm-relative, per parameter; 1e-4 on a CPU,
1e-2 on a GPU, where float32 matmuls may run as TF32) is recorded as ``wrong
gradient`` and not timed, so the benchmark never times a wrong answer.

The methods come from the one catalogue of ``experiments/_methods.py``;
``--methods`` takes any of them that runs a layer (``--help`` lists them).

Timing: each method is compiled and called twice to warm up; then in each of
``--repeats`` rounds every method of the point runs once, in an order that
rotates from round to round (machine noise hits all of them alike), each call
ended by ``jax.block_until_ready`` (``torch.cuda.synchronize`` for PyTorch on a
GPU). A row holds the median, the speed relative to ``lax.scan`` and to
PyTorch (``t_other / t_method``: above 1 is faster), the achieved GFLOP/s from
the analytic count ``3 x 2·T·B·(D + H)·k·H`` (``k = 1, 3, 4`` for rnn, gru,
lstm; backward counted as twice the forward) and that as a fraction of a
float32 GEMM of shape ``(T·B, H) @ (H, 4H)`` (rows capped at 32,768) for the
largest point, timed in the same run.

Rows go to ``<out>/speed.csv`` one point at a time; a re-run skips the points
whose rows are all there (``--fresh`` redoes them). The figure is
``<out>/speed.png``.

    python experiments/speed.py                                   # B=32, H=256; all cells
    python experiments/speed.py --batch 1,32,256 --hidden 128,256,1024 --backend gpu
    python experiments/speed.py --quick                           # seconds: a smoke test
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp

import bpttjax as bj

try:  # python -m experiments.speed, or experiments/ is importable
    from experiments import _cli, _harness, _methods, _table
except ImportError:  # python experiments/speed.py in a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from experiments import _cli, _harness, _methods, _table

from experiments._harness import BASELINE, Method
from experiments._model import Problem

# PyTorch shares the GPU: JAX takes memory as it needs it instead of 75% at start.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

CSV_NAME = "speed.csv"
PNG_NAME = "speed.png"
TORCH = "PyTorch"
# float32 matmuls may run as TF32 on a GPU (the frameworks' defaults), which
# makes two correct orders of the same sums differ by far more than on a CPU.
RTOL = {"cpu": 1e-4}
RTOL_ELSEWHERE = 1e-2
QUICK = {"length": 20, "batch": [2], "hidden": [8], "input": 4, "repeats": 2}
GEMM_MAX_ROWS = 32_768
WARMUP_CALLS = 2
METHODS = tuple(m for m in _methods.METHODS if m.has_layer)
"""The methods this study can run: every one of the catalogue that runs a layer."""
DEFAULT_METHODS = (
    BASELINE, "bj.StoreAll", "bj.StoreAll (batch_chunks=1)", "bj.StoreAll (batch_chunks=2)",
    "bj.Nested(2)", "bj.Binomial(log2 T)", "flax.nnx.RNN", "equinox checkpointed", TORCH,
    "jax.experimental.rnn",
)  # fmt: skip
"""What a run measures unless ``--methods`` says otherwise."""


def point(cell: str, T: int, batch: int, input_size: int, hidden: int) -> Problem:
    """One configuration: ``xs`` has shape ``(T, batch, input)``, float32."""
    return Problem(cell, T, batch, input_size, hidden, "float32")


def flops(p: Problem) -> float:
    """Forward and backward: ``3 x 2·T·B·(D + H)·k·H`` (the matmuls only)."""
    k = bj.cells.get(p.cell).gates
    return 3.0 * 2 * p.T * p.batch * (p.input + p.hidden) * k * p.hidden


def matches(p: Problem, row: SpeedRow) -> bool:
    """Whether ``row`` was measured at ``p`` on this backend."""
    mine = (p.cell, p.T, p.batch, p.input, p.hidden, jax.default_backend())
    return mine == (row.cell, row.T, row.batch, row.input, row.hidden, row.backend)


@dataclasses.dataclass
class SpeedRow:
    """One line of ``speed.csv``: one method at one point.

    ``time_ms`` is the median over ``repeats`` interleaved rounds, ``min_ms``
    the fastest; ``speed_vs_*`` is the other method's median over this one's
    (above 1: faster; NaN where the other was not timed); ``gflops`` is the
    analytic count over the median, ``peak_fraction`` that over
    ``gemm_gflops``; ``grad_rel_err`` is the largest norm-relative difference
    of a parameter's gradient from the baseline's; ``load_avg`` the host's
    1-minute load average when the point started (other processes' share of
    the CPU). ``status``: ``ok``, ``wrong gradient`` (not timed) or ``error``.
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
    speed_vs_scan: float = math.nan
    speed_vs_torch: float = math.nan
    gflops: float = math.nan
    peak_fraction: float = math.nan
    gemm_gflops: float = math.nan
    grad_rel_err: float = math.nan
    compile_s: float = math.nan
    threads: int = 0
    load_avg: float = math.nan
    backend: str = ""
    device_kind: str = ""
    jax_version: str = ""
    note: str = ""


# ---------------------------------------------------------------- methods ---


def parse_methods(text: str) -> list[Method]:
    """argparse type: method names (case, spaces, punctuation and ``bj.`` ignored), in order."""
    return _methods.parse_methods(text, METHODS, specs=False)


def for_cell(methods: Sequence[Method], cell: str) -> list[Method]:
    """The baseline, then those of ``methods`` that have ``cell``."""
    chosen = [m for m in methods if m.has_cell(cell)]
    return [METHODS[0], *(m for m in chosen if m.name != BASELINE)]


# ------------------------------------------------------------ measurement ---


def _note(row: SpeedRow, text: str) -> None:
    if text:
        row.note = f"{row.note}; {text}" if row.note else text


def _fail(row: SpeedRow, stage: str, err: BaseException) -> None:
    row.status = "error"
    _note(row, _harness.describe(stage, err))


def gemm_gflops(p: Problem, repeats: int) -> tuple[float, str]:
    """GFLOP/s of a float32 ``(T·B, H) @ (H, 4H)`` (rows capped), median of ``repeats``."""
    m = min(p.T * p.batch, GEMM_MAX_ROWS)
    k, n = p.hidden, 4 * p.hidden
    a, b = _harness.normal(2, (m, k)), _harness.normal(3, (k, n))
    matmul = jax.jit(jnp.matmul).lower(a, b).compile()
    for _ in range(WARMUP_CALLS):
        jax.block_until_ready(matmul(a, b))
    times = _harness.time_rounds({"gemm": lambda: jax.block_until_ready(matmul(a, b))}, repeats)
    return 2.0 * m * k * n / statistics.median(times["gemm"]) / 1e9, f"{m}x{k}x{n}"


@dataclasses.dataclass(frozen=True)
class Run:
    """What every row of a run shares."""

    repeats: int
    threads: int
    rtol: float
    gemm: float


def measure_point(p: Problem, methods: Sequence[Method], run: Run, bar=None) -> list[SpeedRow]:
    """Check and time every method at ``p``, interleaved; their rows, baseline first.

    A method whose preparation, warm-up or gradient check fails gets a row
    saying so and is not timed; the others go on.
    """
    bar = bar if bar is not None else _cli.Quiet()
    params, xs = _harness.bench_params(p), _harness.bench_inputs(p)
    backend, kind = jax.default_backend(), jax.devices()[0].device_kind
    load = _harness.load_average()
    rows, calls, want = {}, {}, None
    for m in methods:
        bar.set_postfix_str(f"{p.cell} B={p.batch} H={p.hidden}: prepare {m.name}")
        row = rows[m.name] = SpeedRow(
            p.cell, p.T, p.batch, p.input, p.hidden, m.name,
            threads=run.threads, load_avg=load, backend=backend, device_kind=kind,
            jax_version=jax.__version__, gemm_gflops=run.gemm,
        )  # fmt: skip
        try:
            prepared = _harness.prepare_layer(m, p, params, xs, run.threads)
            row.compile_s = prepared.compile_s
            _note(row, prepared.note)
            for _ in range(WARMUP_CALLS):
                grads = prepared.to_bj(prepared.call())
        except Exception as err:  # noqa: BLE001 - recorded in the row, the others go on
            _fail(row, "prepare or warm-up failed", err)
            continue
        if m.name == BASELINE:
            want, row.grad_rel_err = grads, 0.0
        elif want is None:
            _note(row, f"not checked: the baseline {BASELINE} failed")
        else:
            row.grad_rel_err = _harness.gradient_error(grads, want, prepared.skip)
            if not row.grad_rel_err <= run.rtol:
                row.status = "wrong gradient"
                _note(row, f"gradient differs from {BASELINE} by {row.grad_rel_err:.2g} "
                           f"(> --rtol {run.rtol:g}): not timed")  # fmt: skip
                continue
        calls[m.name] = prepared.call

    def on_round(r):
        bar.set_postfix_str(f"{p.cell} B={p.batch} H={p.hidden}: round {r + 1}/{run.repeats}")

    for name, times in _harness.time_rounds(calls, run.repeats, on_round).items():
        if isinstance(times, BaseException):
            _fail(rows[name], "timed run failed", times)
        else:
            rows[name].time_ms = 1e3 * statistics.median(times)
            rows[name].min_ms = 1e3 * min(times)
            rows[name].repeats = len(times)
    set_ratios(list(rows.values()), p)
    return list(rows.values())


def set_ratios(rows: Sequence[SpeedRow], p: Problem) -> None:
    """Speeds against the baseline and PyTorch, GFLOP/s and the fraction of the GEMM peak."""
    ref = {r.method: r.time_ms for r in rows if r.status == "ok"}
    for r in rows:
        if r.status != "ok" or math.isnan(r.time_ms):
            continue
        r.speed_vs_scan = ref.get(BASELINE, math.nan) / r.time_ms
        r.speed_vs_torch = ref.get(TORCH, math.nan) / r.time_ms
        r.gflops = flops(p) / (r.time_ms * 1e-3) / 1e9
        r.peak_fraction = r.gflops / r.gemm_gflops


# ---------------------------------------------------------------- output ---

COLUMNS = (
    _table.Column("cell", 5, lambda r: r.cell, left=True),
    _table.Column("B", 5, lambda r: str(r.batch)),
    _table.Column("H", 6, lambda r: str(r.hidden)),
    _table.Column("method", 29, lambda r: r.method, left=True, gap="  "),
    _table.Column("median", 11, lambda r: _harness.number(r.time_ms, ".1f") + " ms"),
    _table.Column("vs scan", 9, lambda r: _harness.times(r.speed_vs_scan)),
    _table.Column("vs torch", 10, lambda r: _harness.times(r.speed_vs_torch)),
    _table.Column("GFLOP/s", 9, lambda r: _harness.number(r.gflops, ".1f")),
    _table.Column("of peak", 9, lambda r: _harness.number(100 * r.peak_fraction, ".1f") + "%"),
)


def text_table(rows: Sequence[SpeedRow]) -> str:
    """One line per (cell, B, H, method); speeds above 1 are faster than the reference."""
    return _table.text_table(
        rows,
        COLUMNS,
        key=4,
        status=lambda r: None if r.status == "ok" else r.status,
        note=lambda r: r.note,
    )


def plot(rows: Sequence[SpeedRow], cells: Sequence[str], path: str, title: str) -> str:
    """One panel per cell; per configuration, a bar per method: its speed against the reference."""
    plt = _cli.pyplot()
    ok = [r for r in rows if r.status == "ok" and not math.isnan(r.time_ms)]
    against_torch = any(r.method == TORCH for r in ok)
    ref = TORCH if against_torch else BASELINE
    names = [m.name for m in METHODS if any(r.method == m.name for r in ok)]
    fig, axes = plt.subplots(1, len(cells), figsize=(5.5 * len(cells), 4.5), squeeze=False)
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}
    for ax, cell in zip(axes[0], cells, strict=True):
        mine = [r for r in ok if r.cell == cell]
        configs = sorted({(r.batch, r.hidden) for r in mine})
        width = 0.8 / max(1, len(names))
        for j, name in enumerate(names):
            xs, speeds = [], []
            for i, (b, h) in enumerate(configs):
                r = next((r for r in mine if (r.method, r.batch, r.hidden) == (name, b, h)), None)
                if r is None:
                    continue
                s = r.speed_vs_torch if against_torch else r.speed_vs_scan
                if not math.isnan(s):
                    xs.append(i + (j - (len(names) - 1) / 2) * width)
                    speeds.append(s)
            if xs:
                bars = ax.bar(xs, speeds, width, color=colors[name], label=name)
                ax.bar_label(bars, [f"{s:.2g}" for s in speeds], fontsize=6)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")  # 2x faster and 2x slower equally far from 1
        ax.set_xticks(range(len(configs)), [f"B={b}\nH={h}" for b, h in configs])
        ax.set(ylabel=f"speed relative to {ref} (higher is faster)")
        ax.set_title(cell)
        ax.grid(True, axis="y", alpha=0.3)
    legend = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    if legend:  # below the panels, where it hides no bar
        fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=min(4, len(legend)),
                   fontsize=8)  # fmt: skip
    fig.suptitle(title)
    return _cli.save_figure(fig, path, rect=(0, 0.14 if legend else 0, 1, 1))


# ------------------------------------------------------------------ main ---


def build_parser():
    p = _cli.parser(
        __doc__,
        quick="tiny sizes (T=20, B=2, H=8, 2 repeats): seconds, for tests",
        fresh="redo points already in the CSV",
        epilog="The full grid (--batch 1,32,256 --hidden 128,256,1024) is about 135 times "
        "the default's work: meant for a GPU.",
    )
    p.set_defaults(out=os.path.join("docs", "speed"))
    names = ", ".join(bj.cells.CELLS)
    p.add_argument(
        "--cells",
        type=_cli.comma_list(_cli.cell_name),
        default=list(_methods.PEERED),
        help=f"comma-separated cells among {names} (default {','.join(_methods.PEERED)})",
    )
    p.add_argument(
        "--batch",
        type=_cli.comma_list(_cli.positive_int),
        default=[32],
        help="comma-separated batch sizes B (default 32)",
    )
    p.add_argument(
        "--hidden",
        type=_cli.comma_list(_cli.positive_int),
        default=[256],
        help="comma-separated hidden sizes H (default 256)",
    )
    p.add_argument("--length", type=_cli.positive_int, default=1000, help="T (default 1000)")
    p.add_argument("--input", type=_cli.positive_int, default=64, help="D (default 64)")
    p.add_argument(
        "--repeats",
        type=_cli.int_at_least(1),
        default=7,
        help="timed rounds, the median is kept (default 7)",
    )
    p.add_argument(
        "--methods",
        type=parse_methods,
        default=[m for m in METHODS if m.name in DEFAULT_METHODS],
        help="comma-separated methods among: "
        + "; ".join(m.name for m in METHODS)
        + f" (case, spaces and punctuation ignored; default: {'; '.join(DEFAULT_METHODS)}); "
        f"{BASELINE} is always timed",
    )
    p.add_argument(
        "--threads",
        type=_cli.positive_int,
        default=None,
        help="PyTorch's CPU threads (default: the cores JAX uses, "
        f"{_harness.default_threads()} here); taskset limits both",
    )
    p.add_argument(
        "--rtol",
        type=_cli.positive_float,
        default=None,
        help="largest norm-relative difference of a gradient from the baseline's "
        f"(default {RTOL['cpu']:g} on cpu, {RTOL_ELSEWHERE:g} on gpu and tpu)",
    )
    return p


def main(argv=None) -> None:
    args = _cli.parse(build_parser(), argv, QUICK)
    cells = [c for c in bj.cells.CELLS if c in args.cells]
    threads = args.threads or _harness.default_threads()
    methods = _harness.available(args.methods, cells)
    os.makedirs(args.out, exist_ok=True)
    table = _table.Table(os.path.join(args.out, CSV_NAME), SpeedRow)
    grid = [
        point(c, args.length, b, args.input, h)
        for c in cells
        for b in args.batch
        for h in args.hidden
    ]
    wanted = {p: [m.name for m in for_cell(methods, p.cell)] for p in grid}
    old = table.read()
    done = set()
    if not args.fresh:
        for p, names in wanted.items():
            have = {r.method for r in old if matches(p, r) and r.status != "error"}
            if have >= set(names):
                done.add(p)
    todo = [p for p in grid if p not in done]
    print(
        f"{len(todo)} of {len(grid)} points to measure on {jax.default_backend()} "
        f"({jax.devices()[0].device_kind}); results in {table.path}",
        flush=True,
    )
    start = time.perf_counter()
    torch_threads = _torch_threads(methods)
    try:
        if todo:
            load = _harness.load_average()
            if load > 0.5:
                print(f"the load average is {load:.1f} on {os.cpu_count()} cores: other "
                      "processes share the CPU, so the timings will be noisy")  # fmt: skip
            largest = max(grid, key=flops)
            gemm, shape = gemm_gflops(largest, args.repeats)
            print(f"float32 GEMM {shape}: {gemm:.1f} GFLOP/s (the peak in 'of peak')", flush=True)
            rtol = args.rtol or RTOL.get(jax.default_backend(), RTOL_ELSEWHERE)
            run = Run(args.repeats, threads, rtol, gemm)
            with _cli.progress(total=len(todo), unit="point") as bar:
                for p in todo:
                    names = set(wanted[p])
                    table.drop(lambda r, p=p, names=names: matches(p, r) and r.method in names)
                    ms = [m for m in METHODS if m.name in names]
                    table.append(measure_point(p, ms, run, bar))
                    bar.update(1)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {table.path} keeps every point completed so far", file=sys.stderr)
        raise
    finally:
        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)
    order = {m.name: i for i, m in enumerate(METHODS)}
    rows = [r for r in table.read() if any(matches(p, r) for p in grid)]
    rows.sort(key=lambda r: (cells.index(r.cell), r.batch, r.hidden, order.get(r.method, 99)))
    title = (
        f"fwd+bwd of one layer, T={args.length}, D={args.input}, float32; "
        f"{jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}"
    )
    png = None
    if rows:
        png = plot(
            rows,
            [c for c in cells if any(r.cell == c for r in rows)],
            os.path.join(args.out, PNG_NAME),
            title,
        )
    print(f"\n{title}; speeds above 1× are faster than {BASELINE} / PyTorch")
    print(text_table(rows))
    print(
        f"\n{len(todo)} points measured in {time.perf_counter() - start:.0f} s; "
        f"wrote {table.path}, {png}"
    )


def _torch_threads(methods: Sequence[Method]) -> int | None:
    """PyTorch's thread count before the run, to restore after it (None: no PyTorch rows)."""
    if not any(m.needs == "torch" for m in methods):
        return None
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
