"""What the experiment scripts share, and the one module their tests import.

Each script in ``experiments/`` is one study written over this module:

* **Command lines.** :func:`parser` adds ``--out``, ``--backend`` and, where
  asked, ``--quick`` and ``--fresh``; :func:`parse` applies the ``--quick``
  defaults and starts the backend. ``--cell`` takes the names in
  ``bj.cells.CELLS`` and ``--remat`` any spec ``bj.remat.from_string`` reads.
* **Results.** :class:`Table` is a CSV of typed rows (one dataclass per
  file), appended as rows are measured and read back into the same
  dataclass, so a killed run keeps its rows and a re-run can skip them.
  :func:`progress` draws a bar on a terminal; :func:`save_figure` writes one.
* **The benchmark model** (:func:`init_model`, :func:`loss`) and the memory and
  time measurements of ``memory_vs_length.py`` and ``time_vs_memory.py``
  (:data:`METHODS`, :func:`measure_length`).
* **The character language model** of ``char_lm.py`` and ``truncation.py``
  (:class:`CharModel`, :func:`minibatch`, :func:`train_char_lm`).
* **The adding problem** of ``long_range.py`` (:func:`adding_batch`,
  :func:`adding_params`, :func:`adding_mse`).

:func:`run` runs a script in this process exactly as its command line would,
which is how the tests drive them.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import functools
import hashlib
import json
import math
import numbers
import os
import re
import runpy
import statistics
import sys
import sysconfig
import time
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bpttjax as bj

R = TypeVar("R")
HERE = os.path.dirname(os.path.abspath(__file__))

# ------------------------------------------------------------------ scripts ---


def run(script: str, argv: Sequence[str] = ()) -> None:
    """Run ``experiments/<script>.py`` in this process with the command line ``argv``.

    The same as ``python -m experiments.<script> *argv``, without a new
    interpreter: JAX's compilation caches are shared. ``SystemExit`` (a bad
    option) propagates.
    """
    saved = sys.argv
    sys.argv = [os.path.join(HERE, f"{script}.py"), *map(str, argv)]
    try:
        if __package__:
            runpy.run_module(f"{__package__}.{script}", run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        sys.argv = saved


# ------------------------------------------------------------ command lines ---

BACKENDS = ("cpu", "gpu", "tpu")


def parser(
    doc: str, *, quick: str | None = None, fresh: str | None = None, **kwargs: Any
) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` described by ``doc``'s first paragraph, with the shared options.

    Every script takes ``--out`` (default ``results``) and ``--backend``;
    ``quick`` and ``fresh`` are the help texts of ``--quick`` and ``--fresh``,
    which are added only when given. ``kwargs`` go to ``ArgumentParser``.
    """
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], **kwargs)
    p.add_argument("--out", default="results", help="folder for the results")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="default: JAX's default")
    if quick:
        p.add_argument("--quick", action="store_true", help=quick)
    if fresh:
        p.add_argument("--fresh", action="store_true", help=fresh)
    return p


def parse(
    p: argparse.ArgumentParser, argv: Sequence[str] | None = None, quick: Mapping | None = None
) -> argparse.Namespace:
    """Parse ``argv``; with ``--quick``, ``quick`` replaces the defaults; start ``--backend``.

    Options given explicitly still win over the quick values. A parser with
    ``--devices`` (:func:`add_devices_option`) asks for that many devices
    before the backend starts, and exits if JAX has fewer.
    """
    if quick is not None and p.parse_known_args(argv)[0].quick:
        p.set_defaults(**quick)
    args = p.parse_args(argv)
    devices = getattr(args, "devices", 1)
    if devices > 1:
        request_cpu_devices(devices)
    if args.backend is not None:
        select_backend(p, args.backend)
    if devices > 1 and jax.device_count() < devices:
        p.error(
            f"--devices {devices}: JAX has {jax.device_count()} {jax.default_backend()} "
            f"device(s). On CPU the script asks XLA for {devices} simulated devices, which "
            "works only before JAX starts: run it as a command, or set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}"
        )
    return args


_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def add_devices_option(p: argparse.ArgumentParser) -> None:
    """``--devices N``: shard the batch over a 1-D mesh of ``N`` devices (:class:`Problem`)."""
    p.add_argument(
        "--devices",
        type=positive_int,
        default=1,
        help="shard the batch over a 1-D mesh of N devices and report memory per device "
        "(default 1); on CPU, N simulated devices are asked of XLA before JAX starts",
    )


def request_cpu_devices(n: int) -> bool:
    """Ask XLA for at least ``n`` CPU devices, if JAX has not started a backend yet.

    Sets ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS`` (raising
    a smaller count already there), which XLA reads when the CPU backend
    starts; GPU and TPU backends are not affected. Returns False when the
    backend had already started (then the flag would have no effect).
    """
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    match = _DEVICE_FLAG.search(flags)
    wanted = f"--xla_force_host_platform_device_count={n}"
    if match is None:
        flags = f"{flags} {wanted}".strip()
    elif int(match.group(1)) < n:
        flags = flags.replace(match.group(0), wanted)
    os.environ["XLA_FLAGS"] = flags
    return True


def platforms(backend: str, known) -> str:
    """The ``jax_platforms`` value that starts ``backend`` among the ``known`` platforms.

    ``"gpu"`` is no platform of its own: JAX then tries both ``cuda`` and ``rocm``
    and fails on the one it lacks. It becomes the GPU platforms this JAX has.
    """
    if backend != "gpu":
        return backend
    return ",".join(n for n in ("cuda", "rocm") if n in known) or backend


def select_backend(p: argparse.ArgumentParser, backend: str) -> None:
    """Point JAX at ``backend``; only possible before JAX has started a backend."""
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        names = platforms(backend, xla_bridge._backend_factories)
        if names == "gpu":
            p.error("--backend gpu: this JAX has no GPU platform (pip install jax[cuda13])")
        jax.config.update("jax_platforms", names)
    try:
        actual = jax.default_backend()
    except RuntimeError as err:
        p.error(f"--backend {backend}: JAX cannot start it ({err})")
    if actual != backend:
        p.error(
            f"--backend {backend}: JAX is running on {actual!r} (the backend was already "
            "started in this process, or this JAX has no such backend)"
        )


def from_args(cls: type[R], args: argparse.Namespace) -> R:
    """The dataclass ``cls`` with every field taken from the option of the same name."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def add_cell_option(p: argparse.ArgumentParser, default: str) -> None:
    """``--cell``: a name in ``bj.cells.CELLS``."""
    p.add_argument("--cell", choices=tuple(bj.cells.CELLS), default=default)


def add_remat_option(p: argparse.ArgumentParser, default: str) -> None:
    """``--remat``: any spec ``bj.remat.from_string`` reads, kept as text (``nested:3``)."""
    names = ", ".join(bj.remat.STRATEGIES)
    p.add_argument(
        "--remat", type=remat_spec, default=default, help=f"{names}, with ':arg' (e.g. nested:3)"
    )


def add_model_options(p: argparse.ArgumentParser, cell: str = "rnn") -> None:
    """``--cell`` (a registered cell), ``--batch``, ``--input``, ``--hidden`` (32, 64, 256)."""
    add_cell_option(p, cell)
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--input", type=positive_int, default=64)
    p.add_argument("--hidden", type=positive_int, default=256)


def _type_error(what: str, text: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"expects {what}, got {text!r}")


def int_at_least(low: int, what: str | None = None) -> Callable[[str], int]:
    """argparse type: an int >= ``low`` (``what`` describes it in errors)."""
    what = what or f"an int >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise _type_error(what, text) from None
        if value < low:
            raise _type_error(what, text)
        return value

    return parse


positive_int = int_at_least(1, "a positive int")
"""argparse type: an int >= 1 (``1_000_000`` is accepted, as by ``int``)."""
non_negative_int = int_at_least(0, "a non-negative int")
"""argparse type: an int >= 0."""


def float_in(
    low: float, high: float, *, low_included: bool = False, high_included: bool = False
) -> Callable[[str], float]:
    """argparse type: a float between ``low`` and ``high`` (excluded unless ``*_included``)."""
    bounds = f"{'[' if low_included else '('}{low:g}, {high:g}{']' if high_included else ')'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise _type_error(f"a number in {bounds}", text) from None
        above = low < value or (low_included and value == low)
        below = value < high or (high_included and value == high)
        if not (above and below):
            raise _type_error(f"a number in {bounds}", text)
        return value

    return parse


positive_float = float_in(0.0, math.inf)
"""argparse type: a finite float > 0 (learning rates, clipping norms)."""


def comma_list(item: Callable[[str], Any]) -> Callable[[str], list]:
    """argparse type: comma-separated values of type ``item``, sorted, without repeats."""

    def parse(text: str) -> list:
        parts = [s.strip() for s in text.split(",") if s.strip()]
        if not parts:
            raise _type_error("comma-separated values", text)
        return sorted({item(s) for s in parts})

    return parse


lengths = comma_list(positive_int)
"""argparse type: comma-separated positive ints (sequence lengths), sorted."""


def parse_bytes(text: str) -> int:
    """argparse type: ``"8GiB"``, ``"500MB"``, ``"2G"`` (a bare K/M/G/T is binary) or bytes."""
    binary = re.fullmatch(r"(.*[0-9.])\s*([kmgtKMGT])\s*", text)
    try:
        return bj.budget.parse_bytes(f"{binary[1]}{binary[2]}iB" if binary else text)
    except ValueError:
        what = "bytes as a number with an optional unit (e.g. 8GiB, 500MB)"
        raise _type_error(what, text) from None


def float_dtype(text: str) -> str:
    """argparse type: the name of a floating dtype (``float32``)."""
    try:
        dtype = jnp.dtype(text)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise _type_error("a floating dtype such as float32", text)
    return dtype.name


def remat_spec(text: str) -> str:
    """argparse type: a strategy spec ``bj.remat.from_string`` reads (``nested:3``)."""
    try:
        bj.remat.from_string(text)
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text.strip()


# ------------------------------------------------------ progress and figures ---


class _Quiet:
    """What :func:`progress` returns without tqdm: iterable, a context, every method a no-op."""

    def __init__(self, iterable: Iterable | None = None):
        self._iterable = iterable

    def __iter__(self):
        return iter(self._iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def progress(iterable: Iterable | None = None, *, total=None, desc=None, initial=0, unit="it"):
    """A tqdm bar when stderr is a terminal, else a silent stand-in with the same methods.

    Iterate it, or drive it with ``update``, ``set_postfix_str`` and
    ``close`` (or ``with``). tqdm comes with the ``experiments`` extra; the
    scripts run without it.
    """
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Quiet(iterable)
    return tqdm(
        iterable,
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=not sys.stderr.isatty(),
    )


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (figures go to files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, dpi: int = 110, rect: tuple | None = None) -> str:
    """Lay out (inside ``rect`` if given), write and close a matplotlib figure; returns ``path``."""
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


# ------------------------------------------------------------ results tables ---


def _options(hint: Any) -> tuple:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _from_text(text: str, hint: Any) -> Any:
    """A CSV cell as the field type ``hint``: int, float, bool, str, unions, None as ''."""
    options = _options(hint)
    if text == "" and type(None) in options:
        return None
    for kind in options:
        if kind is bool:
            if text in ("True", "False"):
                return text == "True"
        elif kind is not type(None):
            try:
                return kind(text)
            except ValueError:
                pass
    raise ValueError(f"{text!r} is not a {hint}")


def _to_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))  # round-trips exactly; nan and inf as 'nan', 'inf'
    return str(value)


class Table(Generic[R]):
    """A CSV file of typed rows: the columns are the fields of the dataclass ``row``.

    :meth:`append` writes rows as they are measured (flushed and fsynced, so a
    killed run keeps every row it wrote); :meth:`read` returns them as
    ``row`` instances, each cell converted to its field's type (``int``,
    ``float``, ``bool``, ``str``, unions of these; ``None`` is an empty cell).
    A line cut short by a crash is dropped. A file written before fields
    with defaults were added at the end of ``row`` is read with those
    defaults, and gets the new columns when it is next written. A file with
    other columns is never touched: the script exits saying so.

    Example:
      >>> table = Table("results/gradient_flow.csv", FlowRow)
      >>> table.append([row]); rows = table.read()
    """

    def __init__(self, path: str | os.PathLike, row: type[R]):
        if not (isinstance(row, type) and dataclasses.is_dataclass(row)):
            raise TypeError(f"Table(row=...) expects a dataclass type, got {row!r}")
        self.path, self.row = os.fspath(path), row
        hints = typing.get_type_hints(row)
        self.fields = tuple(f.name for f in dataclasses.fields(row))
        self._hints = [hints[name] for name in self.fields]

    def _exists(self) -> bool:
        return os.path.exists(self.path) and os.path.getsize(self.path) > 0

    def _check_columns(self, columns: Sequence[str] | None) -> int:
        """How many of the fields the file holds: all, or a prefix with defaults for the rest."""
        columns = tuple(columns or ())
        n = len(columns)
        defaults = {
            f.name
            for f in dataclasses.fields(self.row)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        }
        if n and columns == self.fields[:n] and defaults.issuperset(self.fields[n:]):
            return n
        raise SystemExit(
            f"{self.path} has columns {list(columns)}, expected {list(self.fields)}; "
            "move it away or pass another --out"
        )

    def read(self) -> list[R]:
        """Every complete row in the file (none if there is no file)."""
        if not self._exists():
            return []
        with open(self.path, newline="") as fh:
            reader = csv.reader(fh)
            n = self._check_columns(next(reader, None))
            lines = [line for line in reader if len(line) == n]
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(self._parse(line))
            except ValueError as err:
                if i < len(lines) - 1:  # only the last line can be cut by a crash
                    what = f"{line} is not a {self.row.__name__} ({err})"
                    raise SystemExit(f"{self.path}: {what}") from None
        return rows

    def _parse(self, line: list[str]) -> R:
        return self.row(*(_from_text(t, h) for t, h in zip(line, self._hints, strict=False)))

    def _lines(self, rows: Iterable[R]) -> list[list[str]]:
        out = []
        for r in rows:
            if not isinstance(r, self.row):
                raise TypeError(f"{self.path}: expected a {self.row.__name__}, got {r!r}")
            out.append([_to_text(getattr(r, f)) for f in self.fields])
        return out

    def append(self, rows: Iterable[R]) -> None:
        """Add ``rows`` at the end (with the header if the file is new or empty)."""
        lines = self._lines(rows)
        if self._exists():
            with open(self.path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                complete = fh.read() == b"\n"
            if not complete:  # a line cut by a crash: drop it before appending
                self.write(self.read())
            with open(self.path, newline="") as fh:
                n = self._check_columns(next(csv.reader(fh), None))
            if n < len(self.fields):  # an older file: add the new columns
                self.write(self.read())
        else:
            lines.insert(0, list(self.fields))
        self._write(self.path, "a", lines)

    def write(self, rows: Iterable[R]) -> None:
        """Replace the file with ``rows`` (atomically: a crash leaves the old or the new)."""
        tmp = self.path + ".tmp"
        self._write(tmp, "w", [list(self.fields), *self._lines(rows)])
        os.replace(tmp, self.path)

    def drop(self, where: Callable[[R], bool]) -> None:
        """Remove the rows for which ``where(row)`` is true (rewrites only if there are any)."""
        rows = self.read()
        kept = [r for r in rows if not where(r)]
        if len(kept) != len(rows):
            self.write(kept)

    @staticmethod
    def _write(path: str, mode: str, lines: list[list[str]]) -> None:
        with open(path, mode, newline="") as fh:
            csv.writer(fh).writerows(lines)
            fh.flush()
            os.fsync(fh.fileno())


@dataclasses.dataclass
class MemoryRow:
    """One line of ``memory_vs_length.csv`` and ``time_vs_memory.csv``: a method at one T.

    Bytes are XLA's plan for the compiled gradient, per device; ``time_ratio``
    and ``memory_ratio`` are relative to :data:`BASELINE` in the same run (NaN
    where there is none); ``status`` is ``ok``, ``oom`` or ``error``;
    ``devices`` is the number of devices the batch is sharded over (a later
    column: older files read as 1).
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


@dataclasses.dataclass(frozen=True)
class CheckRow:
    """``gradient_check.csv``: relative errors against d2l's formulas, one strategy at one T."""

    T: int
    strategy: str
    err_W_hx: float
    err_W_hh: float
    err_W_qh: float
    err_h0: float
    seconds: float
    backend: str
    jax: str
    python: str


@dataclasses.dataclass(frozen=True)
class FlowRow:
    """``gradient_flow.csv``: the decay of ``‖∂L_T/∂h_t‖`` for one RNN and ``ρ``."""

    rnn: str
    rho: float
    T: int
    hidden: int
    fitted_log_rate: float
    log_rho: float
    norm_at_T: float
    norm_at_0: float


@dataclasses.dataclass(frozen=True)
class PowerRow:
    """``power_iteration.csv``: ``|cos(M^k x, leading eigenvector)|``."""

    k: int
    abs_cosine_to_leading_eigenvector: float


@dataclasses.dataclass(frozen=True)
class BiasRow:
    """``gradient_bias.csv``: one truncation's gradient against full BPTT's."""

    strategy: str
    k_or_pi: int | float
    mean_window: int | float
    samples: int
    rel_error: float
    cosine: float
    rel_error_of_mean: float
    rel_error_std: float


@dataclasses.dataclass(frozen=True)
class MeanRow:
    """``gradient_mean.csv``: error of the mean of ``n`` RandomTruncate(pi) gradients."""

    pi: float
    n: int
    rel_error_of_mean: float


@dataclasses.dataclass(frozen=True)
class EvalRow:
    """``<name>.csv`` of a character model's training run: one evaluation."""

    step: int
    train_perplexity: float
    val_perplexity: float
    seconds: float


@dataclasses.dataclass(frozen=True)
class TrainingRow:
    """``training.csv`` of ``truncation.py``: an :class:`EvalRow` and its strategy."""

    strategy: str
    step: int
    train_perplexity: float
    val_perplexity: float
    seconds: float


@dataclasses.dataclass(frozen=True)
class AddingRow:
    """``long_range.csv``: one evaluation of one method on the adding problem."""

    step: int
    method: str
    train_mse: float
    eval_mse: float
    wall_s: float


# ------------------------------------------------------ the benchmark model ---


def init_model(key, cell: str, input_size: int, hidden_size: int, dtype=jnp.float32) -> dict:
    """Parameters of the benchmark model: ``{"cell": ..., "W_out": (H, D)}``.

    ``cell`` names a registered cell (``bj.cells.CELLS``); its ``init`` makes
    the cell's parameters, the read-out is normal with variance ``1/H``.
    """
    k1, k2 = jax.random.split(key)
    params = bj.cells.get(cell).init(k1, input_size, hidden_size, dtype=dtype)
    w_out = jax.random.normal(k2, (hidden_size, input_size), dtype) / hidden_size**0.5
    return {"cell": params, "W_out": w_out}


def make_step(cell: str, params) -> Callable:
    """``f(carry, x) -> (carry, l_t)`` with ``l_t = mean((h_t W_out - x_t)^2)``."""
    cell_step = bj.cells.get(cell).step

    def step(carry, x):
        carry, h = cell_step(params["cell"], carry, x)
        err = h @ params["W_out"] - x
        return carry, jnp.mean(err * err)

    return step


def loss(params, xs, *, cell: str, remat=None, scan=None):
    """Mean per-step loss over ``xs: (T, B, D)``; ``scan`` defaults to ``bj.scan``."""
    hidden_size = params["W_out"].shape[0]
    h0 = bj.cells.get(cell).initial_carry(hidden_size, xs.shape[1:-1], dtype=xs.dtype)
    if scan is None:
        scan = functools.partial(bj.scan, remat=remat or bj.StoreAll())
    _, losses = scan(make_step(cell, params), h0, xs)
    return jnp.mean(losses)


def abstract_inputs(cell: str, T: int, batch: int, input_size: int, hidden_size: int, dtype):
    """ShapeDtypeStructs for (params, xs): compile without allocating."""
    params = jax.eval_shape(
        lambda: init_model(jax.random.key(0), cell, input_size, hidden_size, dtype)
    )
    return params, jax.ShapeDtypeStruct((T, batch, input_size), jnp.dtype(dtype))


def carry_bytes(cell: str, batch: int, hidden_size: int, dtype) -> int:
    """Bytes of one carry of ``cell`` for ``batch`` sequences."""
    carry = jax.eval_shape(lambda: bj.cells.get(cell).initial_carry(hidden_size, (batch,), dtype))
    return bj.memory.tree_bytes(carry)


def nnx_cell(cell: str, *, fastest: bool = False) -> type:
    """Flax NNX's cell class computing the registered cell ``cell``: the peer compared with.

    ``fastest`` takes ``OptimizedLSTMCell`` where Flax has it beside
    ``LSTMCell`` (the two lay out their parameters differently).

    Raises:
      ValueError: Flax has no such cell.
    """
    from flax import nnx

    lstm = nnx.OptimizedLSTMCell if fastest else nnx.LSTMCell
    classes = {"rnn": nnx.SimpleCell, "gru": nnx.GRUCell, "lstm": lstm}
    if cell not in classes:
        raise ValueError(f"Flax NNX has no version of the cell {cell!r}; it has {list(classes)}")
    return classes[cell]


# ----------------------------------------------- memory and time measurements ---

BASELINE = "lax.scan"
"""The method every ratio is taken against: plain ``lax.scan`` + ``jax.grad``."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """One point's sizes: ``xs`` has shape ``(T, batch, input)``.

    With ``devices = N > 1`` the batch is sharded over a 1-D mesh of the
    first ``N`` devices (``jax.jit`` with ``NamedSharding``, GSPMD) and the
    parameters are replicated; ``batch`` is the global batch.
    """

    cell: str
    T: int
    batch: int
    input: int
    hidden: int
    dtype: str
    devices: int = 1

    def row(self, method: str) -> MemoryRow:
        """An empty row for ``method`` at this point, on this backend."""
        return MemoryRow(
            method, self.T, self.cell, self.batch, self.input, self.hidden, self.dtype,
            jax.default_backend(), jax.devices()[0].device_kind, jax.__version__,
            devices=self.devices,
        )  # fmt: skip

    def matches(self, row: MemoryRow) -> bool:
        """Whether ``row`` was measured with these sizes on this backend (any T)."""
        mine = (self.cell, self.batch, self.input, self.hidden, self.dtype, jax.default_backend())
        theirs = (row.cell, row.batch, row.input, row.hidden, row.dtype, row.backend)
        return mine == theirs and self.devices == row.devices

    def place(self, params: Any, xs: Any) -> tuple[Any, Any]:
        """``(params, xs)`` as the devices hold them: ``xs`` batch-sharded, ``params`` replicated.

        Arrays are moved there; ``jax.ShapeDtypeStruct`` get the sharding
        (nothing is allocated). With one device, both are returned as they are.
        """
        if self.devices == 1:
            return params, xs
        if self.batch % self.devices:
            raise ValueError(
                f"the batch ({self.batch}) must be a multiple of the devices ({self.devices})"
            )
        devices = jax.devices()[: self.devices]
        if len(devices) < self.devices:
            raise ValueError(f"{self.devices} devices asked for, JAX has {len(devices)}")
        mesh = jax.sharding.Mesh(
            np.array(devices), ("batch",), axis_types=(jax.sharding.AxisType.Auto,)
        )
        spec = jax.sharding.PartitionSpec

        def put(tree, sharding):
            def one(a):
                if isinstance(a, jax.ShapeDtypeStruct):
                    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
                return jax.device_put(a, sharding)

            return jax.tree.map(one, tree)

        batch = jax.sharding.NamedSharding(mesh, spec(None, "batch"))
        return put(params, jax.sharding.NamedSharding(mesh, spec())), put(xs, batch)


@dataclasses.dataclass(frozen=True)
class Method:
    """A way of computing the gradient of the benchmark model.

    ``build(problem) -> (grad_fn, make_params)``: ``grad_fn(params, xs)`` is
    the gradient with respect to ``params``; ``make_params(key)`` creates
    them. ``family`` is ``bj``, ``lax``, ``flax`` or ``equinox`` (plot
    styles); ``needs`` an optional package, checked before a sweep.
    """

    name: str
    build: Callable[[Problem], tuple[Callable, Callable]]
    family: str = "bj"
    needs: str | None = None


def model_method(*, scan=None, remat=None) -> Callable[[Problem], tuple[Callable, Callable]]:
    """``build`` for the benchmark model under ``scan`` (default ``bj.scan`` with ``remat``)."""

    def build(p: Problem):
        grad_fn = jax.grad(functools.partial(loss, cell=p.cell, scan=scan, remat=remat))

        def make_params(key):
            return init_model(key, p.cell, p.input, p.hidden, jnp.dtype(p.dtype))

        return grad_fn, make_params

    return build


def strategy_method(name: str, arg: Any = None, *, label: str | None = None, **kw) -> Method:
    """``bj.scan`` with the registered strategy ``STRATEGIES[name](arg)``, named ``bj.Class(arg)``.

    ``arg`` may be a function of the :class:`Problem` (e.g. ``log2 T``
    snapshots); ``label`` then names it in the method's name.
    """
    cls = bj.remat.STRATEGIES[name]

    def build(p: Problem):
        value = arg(p) if callable(arg) else arg
        return model_method(remat=cls() if value is None else cls(value))(p)

    shown = "" if arg is None else f"({label or arg})"
    return Method(f"bj.{cls.__name__}{shown}", build, **kw)


def spec_method(spec: str) -> Method:
    """The method running ``bj.remat.from_string(spec)``, named ``bj.Class(argument)``."""
    strategy = bj.remat.from_string(spec)
    _, colon, arg = spec.partition(":")
    shown = f"({arg.strip()})" if colon else ""
    return Method(f"bj.{type(strategy).__name__}{shown}", model_method(remat=strategy))


def log2_snapshots(T: int) -> int:
    """``ceil(log2 T)``: the classic logarithmic number of checkpoints."""
    return max(1, math.ceil(math.log2(T))) if T > 1 else 1


def equinox_default_checkpoints(T: int) -> int:
    """The number of checkpoints Equinox's checkpointed scan uses by default, about ``sqrt(2T)``."""
    return 1 if T <= 1 else math.floor(-1.5 + math.sqrt(2 * T + 0.25)) + 1


def _checkpointed_lax_scan(f, init, xs):
    return jax.lax.scan(jax.checkpoint(f), init, xs)


def _equinox_scan(f, init, xs, checkpoints=None):
    import equinox.internal as eqxi

    return eqxi.scan(f, init, xs, kind="checkpointed", checkpoints=checkpoints)


def _equinox_log2(p: Problem):
    scan = functools.partial(_equinox_scan, checkpoints=log2_snapshots(p.T))
    return model_method(scan=scan)(p)


def _equinox_temp_bytes(p: Problem) -> int:
    """The working memory of Equinox's default checkpointed scan at ``p`` (compiled, not run).

    Per device when ``p`` shards the batch over several.
    """
    grad_fn, make_params = model_method(scan=_equinox_scan)(p)
    params = jax.eval_shape(make_params, jax.random.key(0))
    xs = jax.ShapeDtypeStruct((p.T, p.batch, p.input), jnp.dtype(p.dtype))
    return bj.memory.measure(grad_fn, *p.place(params, xs)).temp_bytes


def _build_nnx(p: Problem):
    """``flax.nnx.RNN`` on Flax's version of ``p.cell``, with the same read-out and loss.

    The read-out is applied to the stacked outputs after the scan, as a Flax
    user would write it; the parameters are the model's ``nnx.Param`` state.
    """
    from flax import nnx

    dtype = jnp.dtype(p.dtype)
    cell_class = nnx_cell(p.cell, fastest=True)

    class Model(nnx.Module):
        def __init__(self, key):
            k_cell, k_out = jax.random.split(key)
            cell = cell_class(
                p.input, p.hidden, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(k_cell)
            )
            self.rnn = nnx.RNN(cell, time_major=True, rngs=False)
            w_out = jax.random.normal(k_out, (p.hidden, p.input), dtype) / p.hidden**0.5
            self.w_out = nnx.Param(w_out)

        def __call__(self, xs):
            carry = bj.cells.get(p.cell).initial_carry(p.hidden, xs.shape[1:-1], dtype)
            err = self.rnn(xs, initial_carry=carry) @ self.w_out[...] - xs
            return jnp.mean(err * err)

    graphdef, _, rest = nnx.split(Model(jax.random.key(0)), nnx.Param, ...)

    def model_loss(params, xs):
        return nnx.merge(graphdef, params, rest)(xs)

    def make_params(key):
        return nnx.split(Model(key), nnx.Param, ...)[1]

    return jax.grad(model_loss), make_params


METHODS: tuple[Method, ...] = (
    Method(BASELINE, model_method(scan=jax.lax.scan), "lax"),
    Method("lax.scan+checkpoint", model_method(scan=_checkpointed_lax_scan), "lax"),
    strategy_method("store_all"),
    strategy_method("every_step"),
    *(strategy_method("nested", levels) for levels in (2, 3, 4)),
    strategy_method("binomial", lambda p: log2_snapshots(p.T), label="log2 T"),
    strategy_method("binomial", lambda p: equinox_default_checkpoints(p.T), label="eqx count"),
    strategy_method("budget", _equinox_temp_bytes, label="eqx memory", needs="equinox"),
    Method("flax.nnx.RNN", _build_nnx, "flax"),
    Method("equinox checkpointed", model_method(scan=_equinox_scan), "equinox", "equinox"),
    Method("equinox, log2 T checkpoints", _equinox_log2, "equinox", "equinox"),
)
"""The methods of ``memory_vs_length.py``, in its table's order."""
METHOD_NAMES = tuple(m.name for m in METHODS)
_BY_NAME = {m.name: m for m in METHODS}


def family(name: str) -> str:
    """The :class:`Method` family of a method name (a registry spec's method is ``bj``)."""
    method = _BY_NAME.get(name)
    return method.family if method else "bj"


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9+]", "", name.lower())


def parse_methods(text: str) -> list[Method]:
    """argparse type: methods by name, in :data:`METHODS` order, then registry specs.

    Names match ignoring case, spaces, punctuation and ``bj.`` (``nested2``);
    anything else is read by ``bj.remat.from_string`` (``binomial:14``).
    """
    by_norm = {_norm(n): n for n in METHOD_NAMES}
    by_norm.update({_norm(n[3:]): n for n in METHOD_NAMES if n.startswith("bj.")})
    named, extra = set(), {}
    for part in (s.strip() for s in text.split(",")):
        if _norm(part) in by_norm:
            named.add(by_norm[_norm(part)])
        elif part:
            try:
                method = spec_method(part)
            except ValueError as err:
                raise argparse.ArgumentTypeError(
                    f"unknown method {part!r}; choose from {', '.join(METHOD_NAMES)}, "
                    f"or a strategy spec ({err})"
                ) from None
            extra.setdefault(method.name, method)
    if not named and not extra:
        raise argparse.ArgumentTypeError("expects at least one method")
    return [m for m in METHODS if m.name in named] + [
        m for m in extra.values() if m.name not in named
    ]


def missing_packages(methods: Sequence[Method]) -> list[Method]:
    """The methods whose optional package is not installed (each said once on stdout)."""
    missing, said = [], set()
    for m in methods:
        if m.needs is None:
            continue
        try:
            __import__(m.needs)
        except ImportError:
            missing.append(m)
            if m.needs not in said:
                print(f"skipped {m.needs} (not installed: pip install {m.needs})")
                said.add(m.needs)
    return missing


@dataclasses.dataclass(frozen=True)
class Timing:
    """How points are timed: ``repeats`` interleaved rounds, when they may be.

    A point is timed unless ``no_time``, ``T > max_time_length`` or its
    predicted need (temp + argument + output bytes) exceeds ``memory_limit``.
    """

    repeats: int = 5
    memory_limit: int = 2**62
    max_time_length: int = 3000
    no_time: bool = False

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


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` says that memory ran out (host or device)."""
    if not isinstance(err, jax.errors.JaxRuntimeError | MemoryError | RuntimeError):
        return False
    text = str(err).lower()
    return isinstance(err, MemoryError) or "resource_exhausted" in text or "out of memory" in text


def _note(row: MemoryRow, text: str) -> None:
    row.note = f"{row.note}; {text}" if row.note else text


def _fail(row: MemoryRow, stage: str, err: BaseException) -> None:
    row.status = "oom" if is_oom(err) else "error"
    text = f"{type(err).__name__}: {' '.join(str(err).split())}"
    _note(row, f"{stage}: {text if len(text) <= 300 else text[:297] + '...'}")


@dataclasses.dataclass(frozen=True)
class Compiled:
    """A method built and compiled for one problem: its memory plan and how to run it."""

    grad_fn: Callable
    make_params: Callable
    report: bj.memory.MemoryReport
    compile_s: float


def compile_and_measure(method: Method, problem: Problem) -> Compiled:
    """Build ``method`` for ``problem``, compile on abstract inputs, read XLA's memory plan.

    With ``problem.devices > 1`` the inputs are sharded (:meth:`Problem.place`)
    and the plan is per device.
    """
    grad_fn, make_params = method.build(problem)
    params = jax.eval_shape(make_params, jax.random.key(0))
    xs = jax.ShapeDtypeStruct((problem.T, problem.batch, problem.input), jnp.dtype(problem.dtype))
    start = time.perf_counter()
    report = bj.memory.measure(grad_fn, *problem.place(params, xs))
    return Compiled(grad_fn, make_params, report, time.perf_counter() - start)


def prepare_timing(point: Compiled, xs: jax.Array, place=None) -> Callable[[], Any]:
    """Real parameters, the compiled gradient and one warm-up call; returns a timed thunk.

    ``place(params, xs)``, if given, puts both on the devices (:meth:`Problem.place`).
    """
    params = point.make_params(jax.random.key(0))
    if place is not None:
        params, xs = place(params, xs)
    compiled = jax.jit(point.grad_fn).lower(params, xs).compile()
    jax.block_until_ready(compiled(params, xs))
    return lambda: jax.block_until_ready(compiled(params, xs))


def time_rounds(calls: Mapping[str, Callable[[], Any]], repeats: int, on_round=None) -> dict:
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


def _compile_point(method: Method, p: Problem, row: MemoryRow, timing: Timing) -> Compiled | None:
    """Fill ``row``'s memory columns; the compiled point if it is to be timed."""
    try:
        point = compile_and_measure(method, p)
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


def _time_points(p: Problem, points: dict, rows: dict, repeats: int, bar) -> None:
    """Warm up and time ``points`` interleaved; fill their rows' time columns."""
    xs = jax.random.normal(jax.random.key(1), (p.T, p.batch, p.input), jnp.dtype(p.dtype))
    calls = {}
    for name, point in points.items():
        bar.set_postfix_str(f"T={p.T} warm up {name}")
        try:
            calls[name] = prepare_timing(point, xs, p.place)
        except Exception as err:  # noqa: BLE001
            _fail(rows[name], "warm-up failed", err)

    def on_round(r):
        bar.set_postfix_str(f"T={p.T} timing round {r + 1}/{repeats}")

    for name, ts in time_rounds(calls, repeats, on_round).items():
        if isinstance(ts, BaseException):
            _fail(rows[name], "timed run failed", ts)
        else:
            rows[name].time_s, rows[name].timed = statistics.median(ts), True
    peak = bj.memory.device_peak_bytes()
    for name in calls:
        rows[name].device_peak_bytes = peak


def _set_ratios(rows: dict[str, MemoryRow]) -> None:
    base = rows[BASELINE]
    for row in rows.values():
        if row.status != "ok":
            continue
        if base.status == "ok" and base.temp_bytes > 0:
            row.memory_ratio = row.temp_bytes / base.temp_bytes
        else:
            _note(row, f"no memory ratio: the baseline {BASELINE} failed")
        if row.timed:
            if base.timed:
                row.time_ratio = row.time_s / base.time_s
            else:
                _note(row, f"no time ratio: the baseline {BASELINE} was not timed")


def measure_length(
    problem: Problem, methods: Sequence[Method], timing: Timing, bar=None
) -> list[MemoryRow]:
    """Measure every method at ``problem.T``; their rows, in the order of ``methods``.

    Memory is XLA's plan for the gradient compiled on abstract inputs. Points
    that :class:`Timing` allows get real inputs, a warm-up call and
    ``repeats`` interleaved rounds; the median over the baseline's is
    ``time_ratio``. The baseline (:data:`BASELINE`) is compiled and timed as
    the reference even when it is not in ``methods``. A failure (out of
    memory or any error) is recorded in its row and the others go on.
    """
    bar = bar if bar is not None else _Quiet()
    todo = [_BY_NAME[BASELINE], *(m for m in methods if m.name != BASELINE)]
    rows, points = {}, {}
    for method in todo:
        bar.set_postfix_str(f"T={problem.T} compile {method.name}")
        rows[method.name] = problem.row(method.name)
        point = _compile_point(method, problem, rows[method.name], timing)
        if point is not None:
            points[method.name] = point
    if points:
        _time_points(problem, points, rows, timing.repeats, bar)
    _set_ratios(rows)
    jax.clear_caches()
    return [rows[m.name] for m in methods]


def _mb(nbytes: float | None) -> str:
    x = math.nan if nbytes is None else nbytes / 1e6
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


def _seconds(t: float | None) -> str:
    if t is None:
        return "–"
    return f"{t:.3f} s" if t >= 0.1 else f"{t * 1e3:.2f} ms"


def method_order(rows: Iterable[MemoryRow]) -> list[str]:
    """:data:`METHOD_NAMES`, then the other methods of ``rows`` in their order."""
    return list(dict.fromkeys([*METHOD_NAMES, *(r.method for r in rows)]))


def text_table(rows: Sequence[MemoryRow], lengths: Sequence[int], names=None) -> str:
    """One line per (length, method); ``names`` (default :func:`method_order`) sets the order."""
    names = list(dict.fromkeys(names)) if names is not None else method_order(rows)
    by_key = {(r.method, r.T): r for r in rows}
    header = (
        f"{'T':>7}  {'method':<28}{'temp':>10}{'vs scan':>9}{'args':>10}"
        f"{'time':>10}{'vs scan':>9}{'compile':>9}  note"
    )
    lines = [header, "-" * len(header)]
    for T in lengths:
        for name in names:
            r = by_key.get((name, T))
            if r is None:
                continue
            if r.status != "ok":
                lines.append(f"{T:>7}  {name:<28}{r.status:>10}  {r.note}")
                continue
            lines.append(
                f"{T:>7}  {name:<28}{_mb(r.temp_bytes):>10}{_pct(r.memory_ratio):>9}"
                f"{_mb(r.argument_bytes):>10}{_seconds(r.time_s):>10}{_times(r.time_ratio):>9}"
                f"{r.compile_s:>8.2f}s  {r.note}"
            )
    return "\n".join(lines)


def format_point(row: MemoryRow | None) -> str:
    """``temp MB (memory ratio, time ratio)`` for the README table."""
    if row is None:
        return ""
    if row.status != "ok":
        return row.status
    timing = _times(row.time_ratio) if row.timed else "not timed"
    return f"{_mb(row.temp_bytes)} ({_pct(row.memory_ratio)}, {timing})"


# ------------------------------------------------ the character language model ---

DTYPE = jnp.float32
PARTITIONS = ("random", "sequential")
IMPLS = ("bpttjax", "nnx", "nnx-rnn")
"""How ``CharModel`` runs its cell: the library's step, Flax NNX's cell stepped by
``bj.scan``, or Flax NNX's cell inside the drop-in ``bj.nnx.RNN`` module."""
VAL_FRACTION, VAL_MAX_CHARS = 0.05, 50_000


def stdlib_docstrings() -> str:
    """Docstrings of the standard library's top-level modules, deterministic.

    Files are read in sorted order and parsed with ``ast`` (nothing is
    imported); module, class and function docstrings are taken in ``ast.walk``
    order, without their interactive examples (lines starting ``>>>`` or
    ``...``).
    """
    root = sysconfig.get_paths()["stdlib"]
    texts = []
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        try:
            with open(os.path.join(root, name), encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue  # an unreadable file is skipped, the same way everywhere
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    lines = doc.splitlines()
                    texts.append(
                        "\n".join(s for s in lines if not s.lstrip().startswith((">>>", "...")))
                    )
    return "\n".join(texts)


def preprocess(text: str) -> str:
    """d2l's preprocessing: non-letters to one space, lower case."""
    return re.sub("[^A-Za-z]+", " ", text).lower().strip()


def load_text(path: str | None, max_chars: int = 0) -> str:
    """The preprocessed corpus from ``path`` (UTF-8) or the stdlib; at least 1000 characters."""
    if path is None:
        text = preprocess(stdlib_docstrings())
        source = "the standard library's docstrings"
    else:
        try:
            with open(path, encoding="utf-8") as fh:
                text = preprocess(fh.read())
        except UnicodeDecodeError as e:
            raise ValueError(f"--corpus {path!r} is not UTF-8 text: {e}") from None
        source = repr(path)
    if max_chars:
        text = text[:max_chars]
    if len(text) < 1000:
        raise ValueError(
            f"the corpus from {source} has {len(text)} characters after preprocessing "
            "(letters and spaces); at least 1000 are needed"
        )
    return text


@dataclasses.dataclass(frozen=True)
class Vocab:
    """The characters of a text, sorted; a token is a character's index."""

    chars: str

    @classmethod
    def build(cls, text: str) -> Vocab:
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.chars)}
        unknown = sorted(set(text) - set(index))
        if unknown:
            raise ValueError(f"characters not in the vocabulary {self.chars!r}: {unknown}")
        return np.fromiter((index[c] for c in text), dtype=np.int32, count=len(text))

    def decode(self, tokens) -> str:
        return "".join(self.chars[int(i)] for i in tokens)


def split_tokens(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation): the validation text is the corpus' tail."""
    n_val = min(int(len(tokens) * VAL_FRACTION), VAL_MAX_CHARS)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]


def steps_per_epoch(n_tokens: int, batch: int, num_steps: int) -> int:
    """Minibatches per epoch, either partitioning, at the largest start offset."""
    return max(0, n_tokens - num_steps) // (num_steps * batch)


def minibatch(
    tokens: np.ndarray, step: int, *, batch: int, num_steps: int, partition: str, seed: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(X, Y, reset)`` for training step ``step``; a pure function of its arguments.

    ``X, Y: (batch, num_steps)`` with ``Y`` the next characters. An epoch
    starts at a random offset in ``[0, num_steps)``. ``random``: the epoch's
    subsequences are shuffled. ``sequential``: row ``b`` of minibatch ``i``
    continues row ``b`` of minibatch ``i - 1``. ``reset`` is True when the
    carried state must start from zero (always for ``random``; at the start
    of each epoch for ``sequential``).
    """
    per_epoch = steps_per_epoch(len(tokens), batch, num_steps)
    if per_epoch == 0:
        raise ValueError(
            f"the training text ({len(tokens)} characters) is too short for one minibatch "
            f"of --batch {batch} x --num-steps {num_steps}"
        )
    epoch, i = divmod(step, per_epoch)
    rng = np.random.default_rng([seed, epoch])
    offset = int(rng.integers(num_steps))
    if partition == "random":
        n_sub = (len(tokens) - offset - 1) // num_steps
        starts = offset + num_steps * rng.permutation(n_sub)[i * batch : (i + 1) * batch]
        idx = starts[:, None] + np.arange(num_steps)[None, :]
        return tokens[idx], tokens[idx + 1], True
    if partition == "sequential":
        cols = (len(tokens) - offset - 1) // batch
        rows = offset + cols * np.arange(batch)
        idx = rows[:, None] + i * num_steps + np.arange(num_steps)[None, :]
        return tokens[idx], tokens[idx + 1], i == 0
    raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")


def truncation_from_spec(spec: str, key=None):
    """``full`` | ``truncate:K`` | ``random:P`` -> a truncation strategy (or None)."""
    kind, _, arg = spec.partition(":")
    try:
        if kind == "full" and not arg:
            return None
        if kind == "truncate":
            return bj.Truncate(int(arg))
        if kind == "random":
            return bj.RandomTruncate(jax.random.key(0) if key is None else key, float(arg))
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad truncation {spec!r}: {e}") from None
    raise ValueError(f"truncation must be 'full', 'truncate:K' or 'random:P', got {spec!r}")


@dataclasses.dataclass(frozen=True)
class CharModel:
    """A registered cell (or Flax NNX's version) and a linear read-out over ``vocab`` tokens.

    ``impl``: ``"bpttjax"`` steps the registered cell, ``"nnx"`` Flax NNX's cell
    (the same math) through :func:`bpttjax.cells.from_nnx`, both inside one
    ``bj.scan`` that also computes each step's loss; ``"nnx-rnn"`` runs Flax
    NNX's cell over the whole subsequence with ``bj.nnx.RNN`` (the read-out and
    the loss come after the loop). ``"nnx"`` and ``"nnx-rnn"`` share their
    parameters' layout, Flax's.
    """

    cell: str
    vocab: int
    hidden: int
    impl: str = "bpttjax"

    def init(self, key) -> dict:
        k1, k2 = jax.random.split(key)
        if self.impl == "bpttjax":
            cell = bj.cells.get(self.cell).init(k1, self.vocab, self.hidden, DTYPE)
        else:
            from flax import nnx

            cell = nnx.to_pure_dict(self._nnx(k1)[1])
        w_out = jax.random.normal(k2, (self.hidden, self.vocab), DTYPE) / math.sqrt(self.hidden)
        return {"cell": cell, "W_out": w_out, "b_out": jnp.zeros((self.vocab,), DTYPE)}

    def _nnx_module(self, key):
        from flax import nnx

        cls = nnx_cell(self.cell)
        return cls(self.vocab, self.hidden, rngs=nnx.Rngs(params=key), param_dtype=DTYPE)

    def _nnx(self, key):
        return bj.cells.from_nnx(self._nnx_module(key))

    def nnx_rnn(self, params, remat=None):
        """``bj.nnx.RNN`` over Flax's cell holding ``params["cell"]``."""
        from flax import nnx

        graphdef, state = nnx.split(self._nnx_module(jax.random.key(0)))  # a template
        nnx.replace_by_pure_dict(state, params["cell"])
        return bj.nnx.RNN(nnx.merge(graphdef, state), remat=remat or bj.StoreAll(), rngs=False)

    def initial_carry(self, batch: int):
        # Flax's cells carry the same arrays (all zeros), LSTM's in the order (c, h)
        return bj.cells.get(self.cell).initial_carry(self.hidden, (batch,), DTYPE)

    def cell_step(self, params) -> Callable:
        """``f(carry, x) -> (carry, h)`` with the cell's parameters in ``params``."""
        if self.impl == "bpttjax":
            return functools.partial(bj.cells.get(self.cell).step, params["cell"])
        from flax import nnx

        step, state = self._nnx(jax.random.key(0))  # a template; its values are replaced
        nnx.replace_by_pure_dict(state, params["cell"])
        return functools.partial(step, state)

    def logits(self, params, h):
        z = h @ params["W_out"]
        return z + jnp.broadcast_to(params["b_out"], z.shape)

    def loss(self, params, carry, X, Y, *, remat=None, truncation=None):
        """Mean cross-entropy over ``X, Y: (batch, T)`` and the final carry."""
        if self.impl == "nnx-rnn":
            rnn = self.nnx_rnn(params, remat)
            xs = jax.nn.one_hot(X, self.vocab, dtype=DTYPE)  # (batch, T, vocab)
            carry, hs = rnn(xs, initial_carry=carry, return_carry=True, truncation=truncation)
            nll = optax.softmax_cross_entropy_with_integer_labels(self.logits(params, hs), Y)
            return jnp.mean(nll), carry
        cell = self.cell_step(params)

        def step(carry, xy):
            x, y = xy
            carry, h = cell(carry, jax.nn.one_hot(x, self.vocab, dtype=DTYPE))
            nll = optax.softmax_cross_entropy_with_integer_labels(self.logits(params, h), y)
            return carry, jnp.mean(nll)

        carry, nll = bj.scan(
            step, carry, (X.T, Y.T), remat=remat or bj.StoreAll(), truncation=truncation
        )
        return jnp.mean(nll), carry


def perplexity(model: CharModel, params, tokens: np.ndarray, streams: int) -> float:
    """exp(mean cross-entropy) over ``tokens`` read as ``streams`` contiguous rows."""
    cols = (len(tokens) - 1) // streams
    X = tokens[: streams * cols].reshape(streams, cols)
    Y = tokens[1 : streams * cols + 1].reshape(streams, cols)
    nll, _ = _eval_loss(model, params, jnp.asarray(X), jnp.asarray(Y))
    return float(np.exp(float(nll)))


@functools.partial(jax.jit, static_argnums=0)
def _eval_loss(model, params, X, Y):
    return model.loss(params, model.initial_carry(X.shape[0]), X, Y)


def predict_text(
    model: CharModel, params, vocab: Vocab, prefix: str, num_preds: int, *, temperature=0.0, seed=0
) -> str:
    """Continue ``prefix`` by ``num_preds`` characters (greedy when temperature is 0)."""
    prefix = preprocess(prefix) or " "
    tokens = jnp.asarray(vocab.encode(prefix))
    out = _generate(model, params, tokens, num_preds, float(temperature), jax.random.key(seed))
    return prefix + vocab.decode(np.asarray(out))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _generate(model, params, tokens, num_preds, temperature, key):
    cell = model.cell_step(params)
    one_hot = lambda t: jax.nn.one_hot(t, model.vocab, dtype=DTYPE)
    carry, hs = jax.lax.scan(
        lambda c, t: cell(c, one_hot(t)), model.initial_carry(1), tokens[:, None]
    )

    def gen(state, key):
        carry, h = state
        logits = model.logits(params, h)[0]
        sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6))
        token = jnp.where(temperature > 0, sampled, jnp.argmax(logits)).astype(jnp.int32)
        return cell(carry, one_hot(token[None])), token

    _, out = jax.lax.scan(gen, (carry, hs[-1]), jax.random.split(key, num_preds))
    return out


@dataclasses.dataclass(frozen=True)
class CharConfig:
    """A character model's training run (the checkpoint records it; a change starts over)."""

    cell: str = "gru"
    impl: str = "bpttjax"
    hidden: int = 256
    batch: int = 32
    num_steps: int = 35
    lr: float = 3e-3
    clip: float = 1.0
    partition: str = "random"
    truncation: str = "full"
    remat: str = "store_all"
    seed: int = 0
    corpus: str | None = None
    max_chars: int = 0

    def __post_init__(self):
        bj.cells.get(self.cell)
        bj.remat.from_string(self.remat)
        truncation_from_spec(self.truncation)
        for name, allowed in (("impl", IMPLS), ("partition", PARTITIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.lr > 0 or not self.clip > 0:
            raise ValueError(f"lr and clip must be > 0, got lr={self.lr}, clip={self.clip}")


def make_char_train_step(model: CharModel, cfg: CharConfig) -> Callable:
    """``(train_step, optimizer)``: a jitted Adam step after ``clip_by_global_norm``.

    ``train_step(params, opt_state, carry, X, Y, step)`` uses ``cfg``'s remat
    and truncation (a fresh ξ sequence per step for ``random:P``).
    """
    optimizer = optax.chain(optax.clip_by_global_norm(cfg.clip), optax.adam(cfg.lr))
    remat = bj.remat.from_string(cfg.remat)
    truncation_key = jax.random.key(cfg.seed + 1)

    @jax.jit
    def train_step(params, opt_state, carry, X, Y, step):
        truncation = truncation_from_spec(cfg.truncation, jax.random.fold_in(truncation_key, step))
        (nll, carry), grads = jax.value_and_grad(model.loss, has_aux=True)(
            params, carry, X, Y, remat=remat, truncation=truncation
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, carry, nll

    return train_step, optimizer


@dataclasses.dataclass(frozen=True)
class CharRun:
    """What :func:`train_char_lm` returns: the model, its parameters, its vocabulary, its rows."""

    model: CharModel
    params: Any
    vocab: Vocab
    rows: list[EvalRow]


class _Checkpoint:
    """The training state in ``path`` (Flax msgpack), tagged with the run's ``meta``."""

    def __init__(self, path: str, meta: str):
        self.path, self.meta = path, meta

    def restore(self, state: dict) -> dict | None:
        from flax import serialization

        if not os.path.exists(self.path):
            return None
        with open(self.path, "rb") as fh:
            saved = serialization.msgpack_restore(fh.read())
        if saved.get("meta") != self.meta:
            raise ValueError(
                f"{self.path} was written by a run with another configuration or text; "
                "pass --fresh to start over or choose another --out"
            )
        return serialization.from_state_dict(state, saved["state"])

    def save(self, state: dict) -> None:
        from flax import serialization

        blob = serialization.msgpack_serialize(
            {"meta": self.meta, "state": serialization.to_state_dict(state)}
        )
        with open(self.path + ".tmp", "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(self.path + ".tmp", self.path)


def train_char_lm(
    cfg: CharConfig,
    *,
    steps: int,
    out: str,
    name: str,
    eval_every: int = 100,
    fresh: bool = False,
    text: str | None = None,
    devices: int = 1,
) -> CharRun:
    """Train (or resume) a character model for ``steps`` steps.

    Every ``eval_every`` steps the state is saved to ``out/name.ckpt``
    (atomically), then an :class:`EvalRow` is appended to ``out/name.csv``. An
    existing checkpoint with the same configuration and text is resumed unless
    ``fresh``; one with another configuration or text is an error (nothing is
    overwritten). ``devices > 1`` trains data-parallel: each minibatch and the
    carried state are sharded by rows over a mesh of the first ``devices``
    devices and the parameters and optimizer state are replicated (``jax.jit``
    sums the gradient across devices); the device count is not part of the
    configuration, so a run may resume on another count.
    """
    text = load_text(cfg.corpus, cfg.max_chars) if text is None else text
    vocab = Vocab.build(text)
    tokens = split_tokens(vocab.encode(text))
    model = CharModel(cfg.cell, len(vocab), cfg.hidden, cfg.impl)
    train_step, optimizer = make_char_train_step(model, cfg)
    params = model.init(jax.random.key(cfg.seed))
    state = {"params": params, "opt_state": optimizer.init(params), "step": 0}
    state["carry"] = model.initial_carry(cfg.batch)
    # the text's hash too: the default corpus differs between Python versions
    digest = hashlib.sha256(text.encode()).hexdigest()
    meta = json.dumps({**dataclasses.asdict(cfg), "text_sha256": digest}, sort_keys=True)
    os.makedirs(out, exist_ok=True)
    ckpt = _Checkpoint(os.path.join(out, f"{name}.ckpt"), meta)
    table = Table(os.path.join(out, f"{name}.csv"), EvalRow)
    restored = None if fresh else ckpt.restore(state)
    rows = [] if restored is None else [r for r in table.read() if r.step <= restored["step"]]
    table.write(rows)  # drops rows written after the checkpoint
    loop = _CharLoop(model, cfg, train_step, ckpt, table, tokens, name, _data_parallel(devices))
    params = loop.run(restored or state, steps, eval_every, rows)
    return CharRun(model, params, vocab, rows)


def _data_parallel(devices: int) -> tuple[Callable, Callable]:
    """``(by_rows, replicated)``: an array's rows spread over ``devices``, or a copy on each."""
    if devices == 1:
        return (lambda a: a), (lambda a: a)
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh(
        (devices,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:devices]
    )
    rows, copies = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    return (lambda a: jax.device_put(a, rows)), (lambda a: jax.device_put(a, copies))


@dataclasses.dataclass
class _CharLoop:
    model: CharModel
    cfg: CharConfig
    train_step: Callable
    ckpt: _Checkpoint
    table: Table
    tokens: tuple[np.ndarray, np.ndarray]
    name: str
    placement: tuple[Callable, Callable] = ((lambda a: a), (lambda a: a))

    def run(self, state: dict, steps: int, eval_every: int, rows: list[EvalRow]):
        """Train from ``state`` to ``steps``, appending to ``rows``; the final parameters."""
        cfg, model = self.cfg, self.model
        by_rows, replicated = self.placement
        params, opt_state = replicated(state["params"]), replicated(state["opt_state"])
        carry = by_rows(state["carry"])
        start = int(state["step"])
        elapsed0 = rows[-1].seconds if rows else 0.0
        t0, nlls = time.perf_counter(), []
        kw = dict(batch=cfg.batch, num_steps=cfg.num_steps, partition=cfg.partition, seed=cfg.seed)
        with progress(total=steps, initial=start, desc=self.name) as bar:
            for step in range(start, steps):
                X, Y, reset = minibatch(self.tokens[0], step, **kw)
                if reset:
                    carry = by_rows(model.initial_carry(cfg.batch))
                params, opt_state, carry, nll = self.train_step(
                    params, opt_state, carry, by_rows(jnp.asarray(X)), by_rows(jnp.asarray(Y)),
                    jnp.int32(step),
                )  # fmt: skip
                nlls.append(float(nll))
                if not math.isfinite(nlls[-1]):
                    raise FloatingPointError(f"{self.name}: loss is {nlls[-1]} at step {step}")
                bar.update(1)
                if (step + 1) % eval_every == 0 or step + 1 == steps:
                    seconds = elapsed0 + time.perf_counter() - t0
                    rows.append(self.evaluate(params, step + 1, nlls, seconds))
                    nlls = []
                    state = {"params": params, "opt_state": opt_state, "carry": carry}
                    self.ckpt.save({**state, "step": step + 1})
                    self.table.append(rows[-1:])
                    bar.set_postfix(val_ppl=f"{rows[-1].val_perplexity:.2f}")
        return params

    def evaluate(self, params, step: int, nlls: list[float], seconds: float) -> EvalRow:
        val = self.tokens[1]
        streams = min(self.cfg.batch, max(1, (len(val) - 1) // self.cfg.num_steps))
        train_ppl = math.exp(sum(nlls) / len(nlls))
        return EvalRow(step, train_ppl, perplexity(self.model, params, val, streams), seconds)


# --------------------------------------------------------- the adding problem ---

LSTM = bj.cells.get("lstm")
"""The adding problem's cell: its gates (input, forget) are what ``chrono`` initializes."""
ADDING_BASELINE_MSE = 1.0 / 6.0
"""MSE of predicting the constant 1 (the target's mean): ``Var(v1 + v2) = 2/12``."""
PLACEMENTS = ("gap", "hochreiter")
INITS = ("chrono", "forget1", "zero")


def marker_region(length: int, placement: str, min_gap: int) -> tuple[int, int]:
    """``(a, b)``: the first marker is drawn from ``[0, a)``, the second from ``[0, b)``."""
    if placement == "gap":
        return length - min_gap, length - min_gap
    if placement == "hochreiter":
        b = length // 2 - 1
        return min(10, b), b
    raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")


def marker_blind_floor(length: int, placement: str, min_gap: int) -> float:
    """The least expected MSE of a predictor that sees the values but not the markers.

    With ``p_t`` the probability that step ``t`` is marked, the best such
    predictor is ``E[target | values] = Σ p_t v_t``, and by the law of total
    variance its MSE is ``1/6 - Σ p_t² / 12``; ``(1 - 2/P)/6`` for ``gap``.
    """
    a, b = marker_region(length, placement, min_gap)
    t = np.arange(length)
    first = (t < a) / a  # P(first marker at t)
    p = first + (t < b) / (b - 1) * (1 - first)  # + P(second at t), second != first
    return float(ADDING_BASELINE_MSE - np.sum(p * p) / 12)


def adding_batch(key, batch: int, length: int, placement: str = "gap", min_gap: int = 0):
    """One batch of the adding problem.

    Returns ``(xs, target)``: ``xs`` of shape ``(T, batch, 2)`` (time first, as
    ``bj.scan`` wants it), channel 0 the values, channel 1 the markers; and
    ``target`` of shape ``(batch,)``, the sum of the two marked values. All
    float32; the two marker positions are distinct.
    """
    a, b = marker_region(length, placement, min_gap)
    if a < 1 or b < 2:
        raise ValueError(
            f"no room for two markers: T={length}, placement={placement!r}, min_gap={min_gap}"
        )
    k_v, k_i, k_j = jax.random.split(key, 3)
    values = jax.random.uniform(k_v, (batch, length), DTYPE)
    i = jax.random.randint(k_i, (batch,), 0, a, dtype=jnp.int32)
    j = jax.random.randint(k_j, (batch,), 0, b - 1, dtype=jnp.int32)
    j = j + (j >= i).astype(jnp.int32)  # uniform over [0, b) without i
    steps = jnp.arange(length, dtype=jnp.int32)[None, :]
    markers = ((steps == i[:, None]) | (steps == j[:, None])).astype(DTYPE)
    target = jnp.sum(values * markers, axis=1)
    xs = jnp.stack([values, markers], axis=-1).transpose(1, 0, 2)
    return xs, target


def adding_eval_batch(seed: int, batch: int, length: int, placement: str, min_gap: int):
    """The fixed held-out batch of ``long_range.py`` for ``seed``."""
    return adding_batch(jax.random.key(10_000 + seed), batch, length, placement, min_gap)


def adding_params(key, hidden: int, length: int, init: str = "chrono", marker_weights="random"):
    """An LSTM (``bj.cells.lstm``) on ``(value, marker)`` and a read-out of ``h_T`` biased to 1.

    ``init``: ``chrono`` (Tallec & Ollivier: forget biases ``log U[1, T-1]``,
    input biases their negative), ``forget1`` or ``zero``; ``marker_weights``
    ``zero`` starts the marker channel's input weights (row 1 of ``W_x``) at 0.
    """
    k_cell, k_out, k_chrono = jax.random.split(key, 3)
    cell = LSTM.init(k_cell, 2, hidden, dtype=DTYPE)
    if marker_weights == "zero":  # row 1 of W_x: the marker channel's input weights
        cell["W_x"] = cell["W_x"].at[1].set(jnp.zeros((4 * hidden,), DTYPE))
    elif marker_weights != "random":
        raise ValueError(f"marker_weights must be 'random' or 'zero', got {marker_weights!r}")
    b = cell["b"]
    if init == "chrono":
        # Tallec & Ollivier: b_f ~ log U[1, T_max - 1], b_i = -b_f, with T_max = T.
        u = jax.random.uniform(k_chrono, (hidden,), DTYPE, 1.0, float(length - 1))
        b_f = jnp.log(u)
        b = b.at[hidden : 2 * hidden].set(b_f).at[:hidden].set(-b_f)
    elif init == "forget1":
        b = b.at[hidden : 2 * hidden].set(jnp.ones((hidden,), DTYPE))
    elif init != "zero":
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    cell["b"] = b
    w_out = jax.random.normal(k_out, (hidden,), DTYPE) / math.sqrt(hidden)
    return {"cell": cell, "w_out": w_out, "b_out": jnp.ones((), DTYPE)}


def adding_predict(params, xs, truncate: int | None = None, remat=None):
    """The read-out of ``h_T``, shape ``(batch,)``; ``truncate=k`` cuts BPTT every k steps."""
    hidden = params["w_out"].shape[0]
    carry0 = LSTM.initial_carry(hidden, xs.shape[1:2], DTYPE)

    def step(carry, x):
        carry, _ = LSTM.step(params["cell"], carry, x)
        return carry, None

    (h_T, _), _ = bj.scan(
        step,
        carry0,
        xs,
        remat=remat or bj.Nested(levels=2),
        truncation=None if truncate is None else bj.Truncate(truncate),
    )
    return h_T @ params["w_out"] + params["b_out"]


def adding_mse(params, xs, target, truncate=None):
    """Mean squared error of :func:`adding_predict`."""
    err = adding_predict(params, xs, truncate) - target
    return jnp.mean(err * err)


def adding_train_step(optimizer, batch: int, length: int, placement: str, min_gap: int, truncate):
    """A jitted step on a fresh batch: ``(params, opt_state, key) -> (params, opt_state, loss)``."""

    @jax.jit
    def train_step(params, opt_state, key):
        xs, target = adding_batch(key, batch, length, placement, min_gap)
        loss, grads = jax.value_and_grad(adding_mse)(params, xs, target, truncate)
        # optax mixes Python floats with its int32 step count (Adam's bias
        # correction), which strict dtype promotion (the tests') rejects.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step
