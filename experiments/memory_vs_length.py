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

Methods: plain ``lax.scan`` + ``jax.grad`` (the baseline), ``lax.scan`` with a
``jax.checkpoint``-ed step, ``bj.scan`` with ``StoreAll``, ``EveryStep``,
``Nested(2|3|4)``, ``Binomial(ceil(log2 T))``, ``Binomial`` with as many
snapshots as Equinox's default has checkpoints, and ``Budget`` set to the
working memory Equinox's default needs at that ``T``; ``flax.nnx.RNN`` on the
matching NNX cell (same sizes, read-out and loss) and, if installed, Equinox's
checkpointed scan (``equinox.internal.scan(..., kind="checkpointed")``) at its
default number of checkpoints (about ``sqrt(2T)``) and at ``ceil(log2 T)``.

Rows go to ``<out>/memory_vs_length.csv`` as soon as every method at one ``T``
is done, so an interrupted run leaves a valid CSV; a re-run skips the points
already there with status ``ok`` (``--fresh`` redoes them). The plot is
``<out>/memory_vs_length.png``; ``--table`` prints the README table.

    python experiments/memory_vs_length.py                   # default sweep
    python experiments/memory_vs_length.py --cell lstm --lengths 1000,10000
    python experiments/memory_vs_length.py --table           # README table
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import bpttjax as bj

try:  # run from the repository root as a package, or as a script
    from experiments import common
except ImportError:
    import common

BASELINE = "lax.scan"
CSV_NAME = "memory_vs_length.csv"
PNG_NAME = "memory_vs_length.png"
DEFAULT_LENGTHS = (100, 300, 1000, 3000, 10000, 30000, 100000)
DEFAULT_MAX_TIME_LENGTH = 3000
README_LENGTHS = (1000, 10000)
FIELDS = (
    "method",
    "T",
    "cell",
    "batch",
    "input",
    "hidden",
    "dtype",
    "backend",
    "device_kind",
    "jax_version",
    "temp_bytes",
    "argument_bytes",
    "output_bytes",
    "peak_bytes",
    "device_peak_bytes",
    "compile_s",
    "time_s",
    "time_ratio",
    "memory_ratio",
    "timed",
    "status",
    "note",
)
# The columns that make two rows the same point.
CONFIG_FIELDS = ("cell", "batch", "input", "hidden", "dtype", "backend")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One point's sizes: ``xs`` has shape ``(T, batch, input)``."""

    cell: str
    T: int
    batch: int
    input: int
    hidden: int
    dtype: str


@dataclasses.dataclass(frozen=True)
class Method:
    """A way of computing the gradient.

    ``build(problem) -> (grad_fn, make_params)``: ``grad_fn(params, xs)`` is
    the gradient with respect to ``params``; ``make_params(key)`` creates them.
    """

    name: str
    build: Callable[[Problem], tuple[Callable, Callable]]
    needs: str | None = None  # an optional package, checked before the sweep


# --------------------------------------------------------------------------- methods


def _checkpointed_lax_scan(f, init, xs):
    return jax.lax.scan(jax.checkpoint(f), init, xs)


def _equinox_scan(f, init, xs, checkpoints=None):
    import equinox.internal as eqxi

    return eqxi.scan(f, init, xs, kind="checkpointed", checkpoints=checkpoints)


def log2_snapshots(T: int) -> int:
    """``ceil(log2 T)``: the classic logarithmic number of checkpoints."""
    return max(1, math.ceil(math.log2(T))) if T > 1 else 1


def equinox_default_checkpoints(T: int) -> int:
    """The number of checkpoints Equinox's checkpointed scan uses by default, about ``sqrt(2T)``."""
    return 1 if T <= 1 else math.floor(-1.5 + math.sqrt(2 * T + 0.25)) + 1


def _per_length(make_method: Callable[[int], Callable[[Problem], tuple]]):
    """A method whose configuration depends on ``T`` (e.g. ``Binomial(ceil(log2 T))``)."""

    def build(p: Problem):
        return make_method(p.T)(p)

    return build


def _budget_of_equinox(p: Problem):
    """``bj.Budget`` set to the working memory of Equinox's default at this point."""
    grad_fn, make_params = _common_method(scan=_equinox_scan)(p)
    params = jax.eval_shape(make_params, jax.random.key(0))
    xs = jax.ShapeDtypeStruct((p.T, p.batch, p.input), jnp.dtype(p.dtype))
    budget = bj.memory.measure(grad_fn, params, xs).temp_bytes
    return _common_method(remat=bj.Budget(budget))(p)


def _common_method(*, scan=None, remat=None):
    def build(p: Problem):
        grad_fn = jax.grad(functools.partial(common.loss, cell=p.cell, scan=scan, remat=remat))

        def make_params(key):
            return common.init_model(key, p.cell, p.input, p.hidden, jnp.dtype(p.dtype))

        return grad_fn, make_params

    return build


def _build_nnx(p: Problem):
    """``flax.nnx.RNN`` on the NNX cell matching ``p.cell``, same read-out and loss.

    The read-out is applied to the stacked outputs after the scan, as a Flax
    user would write it; the parameters are the model's ``nnx.Param`` state,
    so ``jax.grad`` differentiates with respect to all of them.
    """
    from flax import nnx

    cells = {"rnn": nnx.SimpleCell, "gru": nnx.GRUCell, "lstm": nnx.OptimizedLSTMCell}
    dtype = jnp.dtype(p.dtype)

    class Model(nnx.Module):
        def __init__(self, key):
            k_cell, k_out = jax.random.split(key)
            cell = cells[p.cell](
                p.input, p.hidden, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(k_cell)
            )
            self.rnn = nnx.RNN(cell, time_major=True, rngs=False)
            w_out = jax.random.normal(k_out, (p.hidden, p.input), dtype) / p.hidden**0.5
            self.w_out = nnx.Param(w_out)

        def __call__(self, xs):
            h0 = jnp.zeros((*xs.shape[1:-1], p.hidden), dtype)
            carry = (h0, h0) if p.cell == "lstm" else h0  # Flax's LSTM carry is (c, h)
            hs = self.rnn(xs, initial_carry=carry)
            err = hs @ self.w_out[...] - xs
            return jnp.mean(err * err)

    graphdef, _, rest = nnx.split(Model(jax.random.key(0)), nnx.Param, ...)

    def loss(params, xs):
        return nnx.merge(graphdef, params, rest)(xs)

    def make_params(key):
        return nnx.split(Model(key), nnx.Param, ...)[1]

    return jax.grad(loss), make_params


METHODS = (
    Method(BASELINE, _common_method(scan=jax.lax.scan)),
    Method("lax.scan+checkpoint", _common_method(scan=_checkpointed_lax_scan)),
    Method("bj.StoreAll", _common_method(remat=bj.StoreAll())),
    Method("bj.EveryStep", _common_method(remat=bj.EveryStep())),
    Method("bj.Nested(2)", _common_method(remat=bj.Nested(2))),
    Method("bj.Nested(3)", _common_method(remat=bj.Nested(3))),
    Method("bj.Nested(4)", _common_method(remat=bj.Nested(4))),
    Method(
        "bj.Binomial(log2 T)",
        _per_length(lambda T: _common_method(remat=bj.Binomial(log2_snapshots(T)))),
    ),
    Method(
        "bj.Binomial(eqx count)",
        _per_length(lambda T: _common_method(remat=bj.Binomial(equinox_default_checkpoints(T)))),
    ),
    Method("bj.Budget(eqx memory)", _budget_of_equinox, needs="equinox"),
    Method("flax.nnx.RNN", _build_nnx),
    Method("equinox checkpointed", _common_method(scan=_equinox_scan), needs="equinox"),
    Method(
        "equinox, log2 T checkpoints",
        _per_length(
            lambda T: _common_method(
                scan=functools.partial(_equinox_scan, checkpoints=log2_snapshots(T))
            )
        ),
        needs="equinox",
    ),
)
METHOD_NAMES = tuple(m.name for m in METHODS)


# --------------------------------------------------------------------------- arguments


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9+]", "", name.lower())


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expects comma-separated positive ints, got {text!r}"
        ) from None
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"expects positive ints, got {text!r}")
    return sorted(set(lengths))


def parse_methods(text: str) -> list[str]:
    """Method names, matched ignoring case, spaces, punctuation and ``bj.`` (``nested2``)."""
    by_norm = {_norm(n): n for n in METHOD_NAMES}
    by_norm.update({_norm(n[3:]): n for n in METHOD_NAMES if n.startswith("bj.")})
    chosen = []
    for part in (s.strip() for s in text.split(",")):
        if not part:
            continue
        if _norm(part) not in by_norm:
            raise argparse.ArgumentTypeError(
                f"unknown method {part!r}; choose from {', '.join(METHOD_NAMES)}"
            )
        chosen.append(by_norm[_norm(part)])
    if not chosen:
        raise argparse.ArgumentTypeError("expects at least one method")
    return [n for n in METHOD_NAMES if n in chosen]


_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_UNITS.update({f"{u}ib": v for u, v in _UNITS.items() if u not in ("", "b")})
_UNITS.update({"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12})


def parse_bytes(text: str) -> int:
    """``"8GiB"``, ``"500MB"``, ``"2G"`` (binary) or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"expects bytes as a number with an optional unit (e.g. 8GiB, 500MB), got {text!r}"
        )
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expects a positive size, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Sizes default to DESIGN.md's reference: tanh RNN, B=32, D=64, H=256, float32.",
    )
    parser.add_argument(
        "--lengths",
        type=parse_lengths,
        default=None,
        help="comma-separated sequence lengths T "
        f"(default {','.join(map(str, DEFAULT_LENGTHS))}; with --table: those in the CSV)",
    )
    parser.add_argument("--cell", choices=common.CELLS, default="rnn")
    parser.add_argument("--batch", type=common.positive_int, default=32)
    parser.add_argument("--input", type=common.positive_int, default=64)
    parser.add_argument("--hidden", type=common.positive_int, default=256)
    parser.add_argument("--dtype", default="float32", help="a floating dtype")
    parser.add_argument(
        "--methods",
        type=parse_methods,
        default=list(METHOD_NAMES),
        help="comma-separated subset (default: all) of: " + ", ".join(METHOD_NAMES),
    )
    parser.add_argument(
        "--repeats",
        type=common.positive_int,
        default=5,
        help="timed rounds (default 5, as DESIGN.md)",
    )
    parser.add_argument(
        "--memory-limit",
        type=parse_bytes,
        default=None,
        help="time only points whose predicted need (temp + argument + output) fits; "
        "default: half the free host memory (GPU/TPU: half the device memory)",
    )
    parser.add_argument(
        "--max-time-length",
        type=common.non_negative_int,
        default=DEFAULT_MAX_TIME_LENGTH,
        help=f"measure only memory for T above this (default {DEFAULT_MAX_TIME_LENGTH})",
    )
    parser.add_argument("--out", default="results", help="folder for the CSV and plot (results)")
    parser.add_argument("--fresh", action="store_true", help="redo points already in the CSV")
    parser.add_argument(
        "--table", action="store_true", help="print the README table from the CSV and exit"
    )
    parser.add_argument(
        "--backend", choices=("cpu", "gpu", "tpu"), default=None, help="default: JAX's default"
    )
    parser.add_argument("--no-time", action="store_true", help="measure memory only")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        dtype = jnp.dtype(args.dtype)
    except TypeError:
        parser.error(f"--dtype expects a floating dtype such as float32, got {args.dtype!r}")
    if not jnp.issubdtype(dtype, jnp.floating):
        parser.error(f"--dtype expects a floating dtype such as float32, got {args.dtype!r}")
    args.dtype = dtype.name
    if args.backend is not None:
        _select_backend(parser, args.backend)
    if args.dtype == "float64" and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
    return args


def _select_backend(parser: argparse.ArgumentParser, backend: str) -> None:
    """Point JAX at ``backend``; only possible before JAX has started a backend."""
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", backend)
    try:
        actual = jax.default_backend()
    except RuntimeError as err:
        parser.error(f"--backend {backend}: JAX cannot start it ({err})")
    if actual != backend:
        parser.error(
            f"--backend {backend}: JAX is running on {actual!r} (the backend was already "
            "started in this process, or this JAX has no such backend)"
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


# --------------------------------------------------------------------------- measuring


def is_oom(err: BaseException) -> bool:
    if not isinstance(err, jax.errors.JaxRuntimeError | MemoryError | RuntimeError):
        return False
    text = str(err).lower()
    return isinstance(err, MemoryError) or "resource_exhausted" in text or "out of memory" in text


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    text = f"{type(err).__name__}: {text}"
    return text if len(text) <= 300 else text[:297] + "..."


def compile_and_measure(method: Method, problem: Problem) -> dict:
    """Build ``method`` for ``problem``, compile on abstract inputs, read XLA's memory plan.

    Returns a dict with the method's name, the built ``grad_fn`` and ``make_params`` (for timing
    later, so the compiled program is reused from JAX's cache), the
    ``MemoryReport`` and the seconds taken by lowering and compiling.
    """
    grad_fn, make_params = method.build(problem)
    params = jax.eval_shape(make_params, jax.random.key(0))
    xs = jax.ShapeDtypeStruct((problem.T, problem.batch, problem.input), jnp.dtype(problem.dtype))
    start = time.perf_counter()
    report = bj.memory.measure(grad_fn, params, xs)
    seconds = time.perf_counter() - start
    return {
        "method": method.name,
        "grad_fn": grad_fn,
        "make_params": make_params,
        "report": report,
        "compile_s": seconds,
    }


def prepare_timing(point: dict, xs: jax.Array) -> Callable[[], Any]:
    """Real parameters, the compiled gradient and one warm-up call; returns a timed thunk."""
    params = point["make_params"](jax.random.key(0))
    compiled = jax.jit(point["grad_fn"]).lower(params, xs).compile()
    jax.block_until_ready(compiled(params, xs))

    def call():
        return jax.block_until_ready(compiled(params, xs))

    return call


def time_rounds(calls: dict[str, Callable[[], Any]], repeats: int, on_round=None) -> dict:
    """Seconds of each call over ``repeats`` rounds, every call once per round.

    The order rotates from round to round so no method always runs first.
    A call that raises drops out; its exception is returned in its place.
    """
    times: dict[str, Any] = {name: [] for name in calls}
    for r in range(repeats):
        if on_round is not None:
            on_round(r)
        names = [n for n in calls if isinstance(times[n], list)]
        if not names:
            break
        k = r % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            try:
                calls[name]()
            except Exception as err:  # noqa: BLE001 - recorded in the row
                times[name] = err
                continue
            times[name].append(time.perf_counter() - start)
    return times


# --------------------------------------------------------------------------- CSV


def _key(row: dict) -> tuple:
    return (row["method"], int(row["T"]), *(str(row[f]) for f in CONFIG_FIELDS))


def read_rows(path: str) -> list[dict]:
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != FIELDS:
            raise SystemExit(
                f"{path} has columns {reader.fieldnames}, expected {list(FIELDS)}; "
                "move it away or pass another --out"
            )
        # a line cut short by a crash has missing fields; drop it
        return [row for row in reader if None not in row.values()]


def write_rows(path: str, rows: list[dict], mode: str = "a") -> None:
    new = mode == "w" or not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, mode, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({f: _cell(row.get(f)) for f in FIELDS})
        fh.flush()
        os.fsync(fh.fileno())


def drop_rows(path: str, keys: set) -> None:
    """Rewrite the CSV without the rows whose point is about to be redone (atomically)."""
    rows = read_rows(path)
    kept = [r for r in rows if _key(r) not in keys]
    if len(kept) != len(rows):
        tmp = path + ".tmp"
        write_rows(tmp, kept, mode="w")
        os.replace(tmp, path)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


def _num(value: Any) -> float:
    """A CSV or in-memory value as a float; missing is NaN."""
    if value is None or value == "":
        return math.nan
    return float(value)


def _truthy(value: Any) -> bool:
    return value is True or str(value).lower() == "true"


# --------------------------------------------------------------------------- the sweep


def _config(args) -> dict:
    return {
        "cell": args.cell,
        "batch": args.batch,
        "input": args.input,
        "hidden": args.hidden,
        "dtype": args.dtype,
        "backend": jax.default_backend(),
    }


def _wants_time(args, T: int) -> bool:
    return not args.no_time and T <= args.max_time_length


def _is_done(row: dict, args) -> bool:
    """An ``ok`` point is done unless it lacks a time that this run would measure."""
    if row["status"] != "ok":
        return False
    return (
        _truthy(row["timed"])
        or not _wants_time(args, int(row["T"]))
        or "memory limit" in (row["note"] or "")
    )


def run_length(
    T: int, names: list[str], args, config: dict, limit: int, bar=None, methods=None
) -> list[dict]:
    """Measure every method in ``names`` at length ``T``; return their rows.

    The baseline runs too (as the reference for the ratios) even when it is
    not in ``names``; its row is returned only if it is. ``methods`` maps
    names to :class:`Method` (default: :data:`METHODS`).
    """
    methods = methods or {m.name: m for m in METHODS}
    problem = Problem(args.cell, T, args.batch, args.input, args.hidden, args.dtype)
    device = jax.devices()[0]
    rows: dict[str, dict] = {}
    points: dict[str, dict] = {}
    for name in [BASELINE] + [n for n in names if n != BASELINE]:
        if bar is not None:
            bar.set_postfix_str(f"T={T} compile {name}")
        row = {
            "method": name,
            "T": T,
            **config,
            "device_kind": device.device_kind,
            "jax_version": jax.__version__,
            "timed": False,
            "status": "ok",
            "time_ratio": math.nan,
            "memory_ratio": math.nan,
        }
        notes: list[str] = []
        row["notes"] = notes
        rows[name] = row
        try:
            point = compile_and_measure(methods[name], problem)
        except Exception as err:  # noqa: BLE001 - recorded in the row, the sweep goes on
            row["status"] = "oom" if is_oom(err) else "error"
            notes.append(f"compile failed: {_short(err)}")
            continue
        rep = point["report"]
        row.update(
            temp_bytes=rep.temp_bytes,
            argument_bytes=rep.argument_bytes,
            output_bytes=rep.output_bytes,
            peak_bytes=rep.peak_bytes,
            compile_s=round(point["compile_s"], 4),
        )
        need = rep.temp_bytes + rep.argument_bytes + rep.output_bytes
        if not _wants_time(args, T):
            notes.append(
                "memory only (--no-time)"
                if args.no_time
                else f"memory only (T > --max-time-length {args.max_time_length})"
            )
        elif need > limit:
            notes.append(
                f"not timed: predicted need {need / 1e9:.2f} GB exceeds the memory limit "
                f"{limit / 1e9:.2f} GB"
            )
        else:
            points[name] = point

    calls: dict[str, Callable] = {}
    if points:
        key = jax.random.key(1)
        xs = jax.random.normal(key, (T, args.batch, args.input), jnp.dtype(args.dtype))
        for name, point in points.items():
            if bar is not None:
                bar.set_postfix_str(f"T={T} warm up {name}")
            try:
                calls[name] = prepare_timing(point, xs)
            except Exception as err:  # noqa: BLE001
                rows[name]["status"] = "oom" if is_oom(err) else "error"
                rows[name]["notes"].append(f"warm-up failed: {_short(err)}")

        def on_round(r):
            if bar is not None:
                bar.set_postfix_str(f"T={T} timing round {r + 1}/{args.repeats}")

        times = time_rounds(calls, args.repeats, on_round)
        for name, ts in times.items():
            row = rows[name]
            if isinstance(ts, BaseException):
                row["status"] = "oom" if is_oom(ts) else "error"
                row["notes"].append(f"timed run failed: {_short(ts)}")
            else:
                row["time_s"] = statistics.median(ts)
                row["timed"] = True
        peak = bj.memory.device_peak_bytes()
        for name in calls:
            rows[name]["device_peak_bytes"] = peak
        del calls, xs

    base = rows[BASELINE]
    base_temp = _num(base.get("temp_bytes")) if base["status"] == "ok" else math.nan
    base_time = _num(base.get("time_s")) if base["timed"] else math.nan
    for row in rows.values():
        if row["status"] != "ok":
            continue
        if base_temp > 0:
            row["memory_ratio"] = row["temp_bytes"] / base_temp
        else:
            row["notes"].append(f"no memory ratio: the baseline {BASELINE} failed")
        if row["timed"]:
            if math.isnan(base_time):
                row["notes"].append(f"no time ratio: the baseline {BASELINE} was not timed")
            else:
                row["time_ratio"] = row["time_s"] / base_time
    out = []
    for name in names:
        row = rows[name]
        row["note"] = "; ".join(row.pop("notes"))
        out.append(row)
    jax.clear_caches()
    return out


def sweep(args, path: str) -> int:
    """Run every pending point; returns how many points were (re)measured."""
    config = _config(args)
    lengths = args.lengths or list(DEFAULT_LENGTHS)
    names = list(args.methods)
    for m in METHODS:
        if m.name in names and m.needs is not None:
            try:
                __import__(m.needs)
            except ImportError:
                print(f"skipped {m.needs} (not installed: pip install {m.needs})")
                names.remove(m.name)
    done = {_key(r) for r in read_rows(path) if _is_done(r, args) and not args.fresh}
    todo = {
        T: [n for n in names if _key({"method": n, "T": T, **config}) not in done] for T in lengths
    }
    todo = {T: ns for T, ns in todo.items() if ns}
    pending = {_key({"method": n, "T": T, **config}) for T, ns in todo.items() for n in ns}
    if pending:
        drop_rows(path, pending)
    limit = args.memory_limit or default_memory_limit()
    print(
        f"{len(pending)} points to measure ({len(lengths) * len(names) - len(pending)} already "
        f"in {path}); backend {config['backend']}, memory limit {limit / 2**30:.1f} GiB",
        flush=True,
    )
    if not pending:
        return 0
    from tqdm.auto import tqdm

    new = 0
    with tqdm(total=len(pending), unit="point", disable=None) as bar:
        for T, ns in todo.items():
            rows = run_length(T, ns, args, config, limit, bar)
            write_rows(path, rows)
            new += len(rows)
            bar.update(len(rows))
    return new


# --------------------------------------------------------------------------- reporting


def config_rows(path: str, args) -> list[dict]:
    config = {k: str(v) for k, v in _config(args).items()}
    return [r for r in read_rows(path) if all(r[k] == v for k, v in config.items())]


def _mb(nbytes: float) -> str:
    x = nbytes / 1e6
    if math.isnan(x):
        return "–"
    if x >= 1000:
        return f"{x:.0f} MB"
    return f"{x:.1f} MB" if x >= 1 else f"{x:.2g} MB"


def _pct(ratio: float) -> str:
    if math.isnan(ratio):
        return "–"
    x = 100 * ratio
    return f"{x:.0f}%" if x >= 10 else f"{x:.1f}%" if x >= 0.1 else f"{x:.2f}%"


def _times(ratio: float) -> str:
    return "–" if math.isnan(ratio) else f"{ratio:.2f}×"


def format_cell(row: dict | None) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return row["status"]
    temp, mem, tr = (_num(row[k]) for k in ("temp_bytes", "memory_ratio", "time_ratio"))
    timing = _times(tr) if _truthy(row["timed"]) else "not timed"
    return f"{_mb(temp)} ({_pct(mem)}, {timing})"


def markdown_table(rows: list[dict], lengths: list[int] | None = None) -> str:
    """Methods down, lengths across: ``temp MB (memory ratio, time ratio)``."""
    by_key = {(r["method"], int(r["T"])): r for r in rows}
    present = sorted({int(r["T"]) for r in rows})
    if lengths is None:
        lengths = [T for T in README_LENGTHS if T in present] or present
    methods = [n for n in METHOD_NAMES if any((n, T) in by_key for T in lengths)]
    lines = [
        "| method | " + " | ".join(f"T = {T:,}" for T in lengths) + " |",
        "| --- |" + " --- |" * len(lengths),
    ]
    for name in methods:
        cells = [format_cell(by_key.get((name, T))) for T in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _seconds(t: float) -> str:
    if math.isnan(t):
        return "–"
    return f"{t:.3f} s" if t >= 0.1 else f"{t * 1e3:.2f} ms"


def text_table(rows: list[dict], lengths: list[int], names=None) -> str:
    """One line per (length, method); ``names`` (default :data:`METHOD_NAMES`) sets the order."""
    names = list(dict.fromkeys(names)) if names is not None else METHOD_NAMES
    by_key = {(r["method"], int(r["T"])): r for r in rows}
    header = (
        f"{'T':>7}  {'method':<28}{'temp':>10}{'vs scan':>9}{'args':>10}"
        f"{'time':>10}{'vs scan':>9}{'compile':>9}  note"
    )
    lines = [header, "-" * len(header)]
    for T in lengths:
        for name in names:
            row = by_key.get((name, T))
            if row is None:
                continue
            if row["status"] != "ok":
                lines.append(f"{T:>7}  {name:<28}{row['status']:>10}  {row['note']}")
                continue
            t = _num(row["time_s"])
            lines.append(
                f"{T:>7}  {name:<28}{_mb(_num(row['temp_bytes'])):>10}"
                f"{_pct(_num(row['memory_ratio'])):>9}{_mb(_num(row['argument_bytes'])):>10}"
                f"{_seconds(t):>10}"
                f"{_times(_num(row['time_ratio'])):>9}{_num(row['compile_s']):>8.2f}s"
                f"  {row['note']}"
            )
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name in METHOD_NAMES:
        mine = sorted((int(r["T"]), r) for r in ok if r["method"] == name)
        if not mine:
            continue
        Ts = [T for T, _ in mine]
        # the library's methods solid, plain lax.scan dashed-dotted, peers dotted
        style = {"b": "o-", "l": "s-.", "f": "^:", "e": "v:"}[name[0]]
        left.plot(Ts, [_num(r["temp_bytes"]) for _, r in mine], style, ms=3, label=name)
        timed = [(T, _num(r["time_ratio"])) for T, r in mine]
        timed = [(T, x) for T, x in timed if not math.isnan(x)]
        if timed:
            right.plot(*zip(*timed, strict=True), style, ms=3, label=name)
    floor = {}
    for r in ok:
        floor.setdefault(int(r["T"]), _num(r["argument_bytes"]))
    if floor:
        Ts = sorted(floor)
        left.plot(Ts, [floor[T] for T in Ts], "k--", lw=1, label="arguments (input floor)")
    left.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="temp bytes (XLA)")
    left.set_title("working memory of the gradient")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)
    right.axhline(1.0, color="k", lw=0.8)
    right.set(xscale="log", xlabel="sequence length T", ylabel=f"time / time of {BASELINE}")
    right.set_title("time ratio (interleaved, median)")
    right.grid(True, which="both", alpha=0.3)
    if right.lines[1:]:
        right.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    """Run the sweep (or print the table); returns what it did.

    Returns:
      ``{"new_points": int, "rows": [...], "csv": path, "png": path or None,
      "table": markdown}``; ``rows`` are this configuration's rows from the
      CSV (as strings) for the requested lengths.
    """
    args = parse_args(argv)
    path = os.path.join(args.out, CSV_NAME)
    if args.table:
        if not os.path.exists(path):
            raise SystemExit(f"no results at {path}: run the sweep first")
        rows = config_rows(path, args)
        if args.lengths:
            rows = [r for r in rows if int(r["T"]) in args.lengths]
        if not rows:
            raise SystemExit(f"{path} has no rows for this configuration ({_config(args)})")
        table = markdown_table(rows, args.lengths)
        print(table)
        return {"new_points": 0, "rows": rows, "csv": path, "png": None, "table": table}

    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    try:
        new = sweep(args, path)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {path} keeps every length completed so far", file=sys.stderr)
        raise
    lengths = args.lengths or list(DEFAULT_LENGTHS)
    rows = [r for r in config_rows(path, args) if int(r["T"]) in lengths]
    png = os.path.join(args.out, PNG_NAME)
    title = (
        f"{args.cell}, B={args.batch}, D={args.input}, H={args.hidden}, {args.dtype}, "
        f"{jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}"
    )
    if rows:
        plot(rows, png, title)
    print(f"\n{title}; temp MB = 10^6 bytes; 'vs scan' is relative to {BASELINE}")
    print(text_table(rows, lengths))
    print(f"\n{new} points measured in {time.perf_counter() - start:.0f} s; wrote {path}, {png}")
    table = markdown_table(rows) if rows else ""
    return {"new_points": new, "rows": rows, "csv": path, "png": png, "table": table}


if __name__ == "__main__":
    main()
