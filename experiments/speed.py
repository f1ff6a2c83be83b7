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
  ``bj.cells.run`` (while that does not exist, ``bj.scan`` over the cell's
  step, which it wraps; the row's note says which ran).
  Their ``batch_chunks`` is ``run``'s default, ``"auto"`` (timed once per
  shape; the row's note says what it chose).
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

import argparse
import dataclasses
import functools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import bpttjax as bj

try:  # python -m experiments.speed, or experiments/ is importable
    from experiments import common
except ImportError:  # python experiments/speed.py
    import common

# PyTorch shares the GPU: JAX takes memory as it needs it instead of 75% at start.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

CSV_NAME = "speed.csv"
PNG_NAME = "speed.png"
BASELINE = common.BASELINE
TORCH = "PyTorch"
TORCH_MISSING = "PyTorch not installed: its rows are skipped (pip install torch to compare)"
# float32 matmuls may run as TF32 on a GPU (the frameworks' defaults), which
# makes two correct orders of the same sums differ by far more than on a CPU.
RTOL = {"cpu": 1e-4}
RTOL_ELSEWHERE = 1e-2
QUICK = {"length": 20, "batch": [2], "hidden": [8], "input": 4, "repeats": 2}
GEMM_MAX_ROWS = 32_768
WARMUP_CALLS = 2
PEER_CELLS = ("rnn", "gru", "lstm")
# Flax's cells and the bj layout: (module, parameter) -> bj name. Flax's GRU
# has no b_hn (bj.cells.gru's docstring), so it is compared with b_hn = 0.
NNX_NAMES = {
    "rnn": {
        ("dense_i", "kernel"): "W_xh",
        ("dense_i", "bias"): "b_h",
        ("dense_h", "kernel"): "W_hh",
    },
    "gru": {("dense_i", "kernel"): "W_x", ("dense_i", "bias"): "b_x", ("dense_h", "kernel"): "W_h"},
    "lstm": {("dense_i", "kernel"): "W_x", ("dense_h", "kernel"): "W_h", ("dense_h", "bias"): "b"},
}
# The input kernel, hidden kernel and input bias of each cell (torch's *_ih, *_hh).
KERNELS = {
    "rnn": ("W_xh", "W_hh", "b_h"),
    "gru": ("W_x", "W_h", "b_x"),
    "lstm": ("W_x", "W_h", "b"),
}


@dataclasses.dataclass(frozen=True)
class Point:
    """One configuration: ``xs`` has shape ``(T, batch, input)``, float32."""

    cell: str
    T: int
    batch: int
    input: int
    hidden: int

    @property
    def flops(self) -> float:
        """Forward and backward: ``3 x 2·T·B·(D + H)·k·H`` (the matmuls only)."""
        k = bj.cells.get(self.cell).gates
        return 3.0 * 2 * self.T * self.batch * (self.input + self.hidden) * k * self.hidden

    def matches(self, row: SpeedRow) -> bool:
        """Whether ``row`` was measured at this point on this backend."""
        mine = (self.cell, self.T, self.batch, self.input, self.hidden, jax.default_backend())
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


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A method made ready at one point: ``call()`` runs fwd+bwd once and returns its gradient.

    ``to_bj(gradient)`` maps that gradient to the ``bj.cells`` parameter
    layout; ``skip`` names the parameters the method does not have (not
    compared).
    """

    call: Callable[[], Any]
    to_bj: Callable[[Any], dict]
    compile_s: float = math.nan
    note: str = ""
    skip: frozenset = frozenset()


@dataclasses.dataclass(frozen=True)
class Method:
    """A way of computing the layer's gradient.

    ``prepare(point, params, xs, threads) -> Prepared``; ``needs`` is the
    package it imports, ``cells`` the cells it has (None: any), ``gpu_only``
    whether it runs only on the GPU backend.
    """

    name: str
    prepare: Callable[..., Prepared]
    needs: str | None = None
    cells: tuple[str, ...] | None = None
    gpu_only: bool = False


# ---------------------------------------------------------------- methods ---


def _mean_square(ys) -> jax.Array:
    return jnp.mean(ys * ys)


def _carry(point: Point, xs):
    return bj.cells.get(point.cell).initial_carry(point.hidden, xs.shape[1:-1], xs.dtype)


def jax_method(make_loss, adapt=None, inputs=None, note="", skip=()) -> Callable:
    """``prepare`` for a JAX loss ``make_loss(point) -> loss(theta, data)``.

    ``theta = adapt(params)`` (default: the ``bj.cells`` parameters
    themselves) is what the gradient is taken with respect to, and
    ``data = inputs(xs)`` what the loss reads (default ``xs``); both are made
    before timing. The gradient is mapped back to ``params`` by ``adapt``'s VJP.
    ``note`` (text, or a function of the point) goes to the row; ``skip`` names
    parameters the method does not have.
    """

    def prepare(point: Point, params: dict, xs, threads: int) -> Prepared:
        theta, pullback = jax.vjp(adapt or (lambda p: p), params)
        data = xs if inputs is None else inputs(xs)
        loss = make_loss(point)
        start = time.perf_counter()
        compiled = jax.jit(jax.grad(loss)).lower(theta, data).compile()
        compile_s = time.perf_counter() - start
        return Prepared(
            lambda: jax.block_until_ready(compiled(theta, data)),
            lambda g: pullback(g)[0],
            compile_s,
            note(point) if callable(note) else note,
            frozenset(skip),
        )

    return prepare


def _scan_loss(point: Point):
    step = bj.cells.get(point.cell).step

    def loss(params, xs):
        _, ys = jax.lax.scan(functools.partial(step, params), _carry(point, xs), xs)
        return _mean_square(ys)

    return loss


def layer(cell: str, params, carry, xs, remat, **options):
    """``bj.cells.run`` with ``options`` where the library has it, else ``bj.scan`` of the step."""
    if hasattr(bj.cells, "run"):
        return bj.cells.run(cell, params, carry, xs, remat=remat, **options)
    return bj.scan(functools.partial(bj.cells.get(cell).step, params), carry, xs, remat=remat)


def _layer_note(point: Point) -> str:
    return "bj.cells.run" if hasattr(bj.cells, "run") else "bj.scan (no bj.cells.run yet)"


def bj_method(name: str, remat: Callable[[Point], bj.RematStrategy], **options) -> Method:
    """The library's layer under the strategy ``remat(point)``, with ``run``'s ``options``."""

    def make_loss(point: Point):
        strategy = remat(point)

        def loss(params, xs):
            _, ys = layer(point.cell, params, _carry(point, xs), xs, strategy, **options)
            return _mean_square(ys)

        return loss

    note = _layer_note
    if "batch_chunks" not in options and hasattr(bj.cells, "choose_batch_chunks"):

        def note(point: Point) -> str:  # what "auto" chose, from the cache the trace filled
            xs = np.zeros((point.T, point.batch, point.input), np.float32)
            params = bj.cells.get(point.cell).init(jax.random.key(0), point.input, point.hidden)
            chunks = bj.cells.choose_batch_chunks(point.cell, params, _carry(point, xs), xs)
            return f"{_layer_note(point)}, batch_chunks auto: {chunks}"

    return Method(name, jax_method(make_loss, note=note))


def _nnx_parts(point: Point):
    """``(graphdef, params, rest)`` of ``nnx.RNN`` on Flax's version of ``point.cell``.

    Abstract (``nnx.eval_shape``): the parameters' values come from ``bj``'s.
    """
    from flax import nnx

    cls = common.nnx_cell(point.cell, fastest=True)

    def build():
        cell = cls(point.input, point.hidden, dtype=jnp.float32, param_dtype=jnp.float32,
                   rngs=nnx.Rngs(0))  # fmt: skip
        return nnx.RNN(cell, time_major=True, rngs=False)

    return nnx.split(nnx.eval_shape(build), nnx.Param, ...)


def _nnx_adapt(cell: str, template, params: dict):
    """The Flax parameter state ``template`` with the values of ``params`` (differentiable)."""
    names = NNX_NAMES[cell]
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for path, _ in paths:
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        leaves.append(params[names[keys[-2:]]])
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _nnx_prepare(point: Point, params: dict, xs, threads: int) -> Prepared:
    from flax import nnx

    graphdef, template, rest = _nnx_parts(point)

    def make_loss(point):
        def loss(state, xs):
            rnn = nnx.merge(graphdef, state, rest)
            return _mean_square(rnn(xs, initial_carry=_carry(point, xs)))

        return loss

    adapt = functools.partial(_nnx_adapt, point.cell, template)
    skip = ("b_hn",) if point.cell == "gru" else ()
    note = "flax.nnx.GRUCell has no b_hn (0 here)" if skip else ""
    return jax_method(make_loss, adapt, note=note, skip=skip)(point, params, xs, threads)


def _equinox_loss(point: Point):
    step = bj.cells.get(point.cell).step

    def loss(params, xs):
        _, ys = common._equinox_scan(functools.partial(step, params), _carry(point, xs), xs)
        return _mean_square(ys)

    return loss


def cudnn_weights(params: dict) -> jax.Array:
    """The LSTM's parameters as cuDNN's flat vector: ``W_ih, W_hh, b_ih, b_hh`` (``b_hh = 0``).

    ``jax.experimental.rnn`` packs PyTorch's layout, gates ``i, f, g, o`` as
    :func:`bpttjax.cells.lstm`; its kernels are ``(4H, D)``, transposed.
    """
    b = params["b"]
    return jnp.concatenate([params["W_x"].T.ravel(), params["W_h"].T.ravel(), b, jnp.zeros_like(b)])


def cudnn_loss(point: Point, reference: bool = False):
    """``loss(weights, x)`` of ``jax.experimental.rnn.lstm`` on batch-first ``x: (B, T, D)``.

    ``reference`` runs the module's pure-JAX ``lstm_ref`` instead (any
    backend), on the same packed weights: how the packing is tested on a CPU.
    """
    from jax.experimental import rnn

    sizes = dict(input_size=point.input, hidden_size=point.hidden, num_layers=1)

    def loss(weights, x):
        B, T = x.shape[:2]
        h0 = jnp.zeros((1, B, point.hidden), x.dtype)
        seq_lengths = jnp.full((B,), T, jnp.int32)
        if reference:
            unpacked = rnn.unpack_lstm_weights(weights, **sizes, bidirectional=False)
            ys, _, _ = rnn.lstm_ref(x, h0, h0, *unpacked, seq_lengths, **sizes,
                                    dropout=0.0, bidirectional=False)  # fmt: skip
        else:
            ys, _, _ = rnn.lstm(x, h0, h0, weights, seq_lengths, **sizes,
                                dropout=0.0, bidirectional=False)  # fmt: skip
        return _mean_square(ys)

    return loss


def _batch_first(xs):
    return jnp.swapaxes(xs, 0, 1)


def _torch_prepare(point: Point, params: dict, xs, threads: int) -> Prepared:
    import torch

    torch.set_num_threads(threads)
    device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    kind = {"rnn": "RNN", "gru": "GRU", "lstm": "LSTM"}[point.cell]
    extra = {"nonlinearity": "tanh"} if point.cell == "rnn" else {}
    module = getattr(torch.nn, kind)(point.input, point.hidden, **extra).to(device)
    w_x, w_h, b_x = (np.asarray(params[n]) for n in KERNELS[point.cell])
    b_h = np.zeros_like(b_x)
    if point.cell == "gru":  # torch's b_hn is the last third of bias_hh
        b_h[2 * point.hidden :] = np.asarray(params["b_hn"])
    with torch.no_grad():
        for name, value in (
            ("weight_ih_l0", w_x.T),
            ("weight_hh_l0", w_h.T),
            ("bias_ih_l0", b_x),
            ("bias_hh_l0", b_h),
        ):
            getattr(module, name).copy_(torch.tensor(value))
    x = torch.tensor(np.asarray(xs), device=device)  # (T, B, D): torch's default layout

    def call():
        module.zero_grad()
        y, _ = module(x)
        (y * y).mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return module

    def to_bj(module) -> dict:
        g = {n: p.grad.detach().cpu().numpy() for n, p in module.named_parameters()}
        n_x, n_h, n_b = KERNELS[point.cell]
        out = {n_x: g["weight_ih_l0"].T, n_h: g["weight_hh_l0"].T, n_b: g["bias_ih_l0"]}
        if point.cell == "gru":
            out["b_hn"] = g["bias_hh_l0"][2 * point.hidden :]
        return out

    return Prepared(call, to_bj, note=f"torch {torch.__version__}, {threads} threads, {device}")


def _cudnn_prepare(point: Point, params: dict, xs, threads: int) -> Prepared:
    prepare = jax_method(cudnn_loss, cudnn_weights, _batch_first, note="cuDNN LSTM")
    return prepare(point, params, xs, threads)


METHODS: tuple[Method, ...] = (
    Method(BASELINE, jax_method(_scan_loss)),
    bj_method("bj.StoreAll", lambda p: bj.StoreAll()),
    bj_method("bj.StoreAll (batch_chunks=1)", lambda p: bj.StoreAll(), batch_chunks=1),
    bj_method("bj.StoreAll (batch_chunks=2)", lambda p: bj.StoreAll(), batch_chunks=2),
    bj_method("bj.Nested(2)", lambda p: bj.Nested(2)),
    bj_method("bj.Binomial(log2 T)", lambda p: bj.Binomial(common.log2_snapshots(p.T))),
    Method("flax.nnx.RNN", _nnx_prepare, "flax", PEER_CELLS),
    Method("equinox checkpointed", jax_method(_equinox_loss), "equinox"),
    Method(TORCH, _torch_prepare, "torch", PEER_CELLS),
    Method("jax.experimental.rnn", _cudnn_prepare, None, ("lstm",), gpu_only=True),
)
"""Every method, in the table's order; the first is the baseline."""
METHOD_NAMES = tuple(m.name for m in METHODS)
_ALIASES = {"torch": TORCH, "nnx": "flax.nnx.RNN", "eqx": "equinox checkpointed",
            "cudnn": "jax.experimental.rnn", "binomial": "bj.Binomial(log2 T)",
            "chunks": "bj.StoreAll (batch_chunks=2)",
            "one": "bj.StoreAll (batch_chunks=1)"}  # fmt: skip


def _norm(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


def parse_methods(text: str) -> list[Method]:
    """argparse type: method names (case, spaces, punctuation and ``bj.`` ignored), in order."""
    by_norm = {_norm(n): n for n in METHOD_NAMES}
    by_norm.update({_norm(n[3:]): n for n in METHOD_NAMES if n.startswith("bj.")})
    by_norm.update({_norm(a): n for a, n in _ALIASES.items()})
    chosen = set()
    for part in (s.strip() for s in text.split(",")):
        if not part:
            continue
        if _norm(part) not in by_norm:
            raise argparse.ArgumentTypeError(
                f"unknown method {part!r}; choose from {', '.join(METHOD_NAMES)}"
            )
        chosen.add(by_norm[_norm(part)])
    if not chosen:
        raise argparse.ArgumentTypeError("expects at least one method")
    return [m for m in METHODS if m.name in chosen]


def cell_name(text: str) -> str:
    """argparse type: a registered cell (``bj.cells.CELLS``)."""
    if text not in bj.cells.CELLS:
        raise argparse.ArgumentTypeError(
            f"expects a cell in {', '.join(bj.cells.CELLS)}, got {text!r}"
        )
    return text


def available(methods: Sequence[Method], cells: Sequence[str]) -> list[Method]:
    """The methods that can run here for some of ``cells``; each one skipped is said on stdout."""
    kept = []
    for m in methods:
        mine = [c for c in cells if m.cells is None or c in m.cells]
        if not mine:
            continue
        if m.gpu_only and jax.default_backend() != "gpu":
            print(f"{m.name} needs the gpu backend (this is {jax.default_backend()}): skipped")
            continue
        if m.needs is not None:
            try:
                __import__(m.needs)
            except ImportError:
                missing = f"{m.needs} not installed: {m.name} is skipped (pip install {m.needs})"
                print(TORCH_MISSING if m.needs == "torch" else missing)
                continue
        if m.needs == "torch" and jax.default_backend() == "gpu":
            import torch

            if not torch.cuda.is_available():
                print("PyTorch has no CUDA here: its rows are skipped on the gpu backend")
                continue
        if len(mine) < len(cells):
            others = ", ".join(c for c in cells if c not in mine)
            print(f"{m.name} has no {others} cell: no rows for it")
        kept.append(m)
    return kept


def for_cell(methods: Sequence[Method], cell: str) -> list[Method]:
    """The baseline, then those of ``methods`` that have ``cell``."""
    chosen = [m for m in methods if m.cells is None or cell in m.cells]
    return [METHODS[0], *(m for m in chosen if m.name != BASELINE)]


def load_average() -> float:
    """The host's 1-minute load average (NaN where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return math.nan


def default_threads() -> int:
    """The CPU threads JAX's CPU backend uses: the cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ------------------------------------------------------------ measurement ---


def bench_params(point: Point) -> dict:
    """Parameters of the cell's shapes: kernels ``N(0, 1/fan_in)``, biases ``N(0, 0.1²)``.

    Made by NumPy (nothing for XLA to compile). Non-zero biases make the
    gradient check see a misplaced bias; ``b_hn`` stays 0, as Flax has none.
    """
    cell = bj.cells.get(point.cell)
    init = functools.partial(cell.init, input_size=point.input, hidden_size=point.hidden)
    shapes = jax.eval_shape(init, jax.random.key(0))
    rng = np.random.default_rng(0)
    params = {}
    for name, leaf in sorted(shapes.items()):
        x = rng.standard_normal(leaf.shape, np.float32)
        scale = 1 / math.sqrt(leaf.shape[0]) if len(leaf.shape) == 2 else 0.1 * (name != "b_hn")
        params[name] = jnp.asarray(np.float32(scale) * x, leaf.dtype)
    return params


def _normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
    """Standard normal float32 numbers made by NumPy (nothing for XLA to compile)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def bench_inputs(point: Point) -> jax.Array:
    """``xs: (T, B, D)``, standard normal."""
    return _normal(1, (point.T, point.batch, point.input))


def gradient_error(got: dict, want: dict, skip=frozenset()) -> float:
    """The largest ``‖got − want‖ / ‖want‖`` over the parameters of ``want`` not in ``skip``."""
    errs = []
    for name, ref in want.items():
        if name in skip:
            continue
        a = np.asarray(got[name], np.float64)
        b = np.asarray(ref, np.float64)
        errs.append(float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)))
    return max(errs, default=0.0)


def _note(row: SpeedRow, text: str) -> None:
    if text:
        row.note = f"{row.note}; {text}" if row.note else text


def _fail(row: SpeedRow, stage: str, err: BaseException) -> None:
    row.status = "error"
    text = f"{type(err).__name__}: {' '.join(str(err).split())}"
    _note(row, f"{stage}: {text if len(text) <= 300 else text[:297] + '...'}")


def gemm_gflops(point: Point, repeats: int) -> tuple[float, str]:
    """GFLOP/s of a float32 ``(T·B, H) @ (H, 4H)`` (rows capped), median of ``repeats``."""
    m = min(point.T * point.batch, GEMM_MAX_ROWS)
    k, n = point.hidden, 4 * point.hidden
    a, b = _normal(2, (m, k)), _normal(3, (k, n))
    matmul = jax.jit(jnp.matmul).lower(a, b).compile()
    for _ in range(WARMUP_CALLS):
        jax.block_until_ready(matmul(a, b))
    times = common.time_rounds({"gemm": lambda: jax.block_until_ready(matmul(a, b))}, repeats)
    return 2.0 * m * k * n / statistics.median(times["gemm"]) / 1e9, f"{m}x{k}x{n}"


@dataclasses.dataclass(frozen=True)
class Run:
    """What every row of a run shares."""

    repeats: int
    threads: int
    rtol: float
    gemm: float


def measure_point(point: Point, methods: Sequence[Method], run: Run, bar=None) -> list[SpeedRow]:
    """Check and time every method at ``point``, interleaved; their rows, baseline first.

    A method whose preparation, warm-up or gradient check fails gets a row
    saying so and is not timed; the others go on.
    """
    bar = bar if bar is not None else common._Quiet()
    params, xs = bench_params(point), bench_inputs(point)
    backend, kind = jax.default_backend(), jax.devices()[0].device_kind
    load = load_average()
    rows, calls, want = {}, {}, None
    for m in methods:
        bar.set_postfix_str(f"{point.cell} B={point.batch} H={point.hidden}: prepare {m.name}")
        row = rows[m.name] = SpeedRow(
            point.cell, point.T, point.batch, point.input, point.hidden, m.name,
            threads=run.threads, load_avg=load, backend=backend, device_kind=kind,
            jax_version=jax.__version__, gemm_gflops=run.gemm,
        )  # fmt: skip
        try:
            prepared = m.prepare(point, params, xs, run.threads)
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
            row.grad_rel_err = gradient_error(grads, want, prepared.skip)
            if not row.grad_rel_err <= run.rtol:
                row.status = "wrong gradient"
                _note(row, f"gradient differs from {BASELINE} by {row.grad_rel_err:.2g} "
                           f"(> --rtol {run.rtol:g}): not timed")  # fmt: skip
                continue
        calls[m.name] = prepared.call

    def on_round(r):
        bar.set_postfix_str(
            f"{point.cell} B={point.batch} H={point.hidden}: round {r + 1}/{run.repeats}"
        )

    for name, times in common.time_rounds(calls, run.repeats, on_round).items():
        if isinstance(times, BaseException):
            _fail(rows[name], "timed run failed", times)
        else:
            rows[name].time_ms = 1e3 * statistics.median(times)
            rows[name].min_ms = 1e3 * min(times)
            rows[name].repeats = len(times)
    set_ratios(list(rows.values()), point)
    return list(rows.values())


def set_ratios(rows: Sequence[SpeedRow], point: Point) -> None:
    """Speeds against the baseline and PyTorch, GFLOP/s and the fraction of the GEMM peak."""
    ref = {r.method: r.time_ms for r in rows if r.status == "ok"}
    for r in rows:
        if r.status != "ok" or math.isnan(r.time_ms):
            continue
        r.speed_vs_scan = ref.get(BASELINE, math.nan) / r.time_ms
        r.speed_vs_torch = ref.get(TORCH, math.nan) / r.time_ms
        r.gflops = point.flops / (r.time_ms * 1e-3) / 1e9
        r.peak_fraction = r.gflops / r.gemm_gflops


# ---------------------------------------------------------------- output ---


def _times(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.2f}×"


def _num(x: float, fmt: str) -> str:
    return "–" if math.isnan(x) else format(x, fmt)


def text_table(rows: Sequence[SpeedRow]) -> str:
    """One line per (cell, B, H, method); speeds above 1 are faster than the reference."""
    header = (
        f"{'cell':<5}{'B':>5}{'H':>6}  {'method':<29}{'median':>11}{'vs scan':>9}"
        f"{'vs torch':>10}{'GFLOP/s':>9}{'of peak':>9}  note"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        what = f"{r.cell:<5}{r.batch:>5}{r.hidden:>6}  {r.method:<29}"
        if r.status != "ok":
            lines.append(f"{what}{r.status:>11}  {r.note}")
            continue
        lines.append(
            f"{what}{_num(r.time_ms, '.1f') + ' ms':>11}{_times(r.speed_vs_scan):>9}"
            f"{_times(r.speed_vs_torch):>10}{_num(r.gflops, '.1f'):>9}"
            f"{_num(100 * r.peak_fraction, '.1f') + '%':>9}  {r.note}"
        )
    return "\n".join(lines)


def plot(rows: Sequence[SpeedRow], cells: Sequence[str], path: str, title: str) -> str:
    """One panel per cell; per configuration, a bar per method: its speed against the reference."""
    plt = common.pyplot()
    ok = [r for r in rows if r.status == "ok" and not math.isnan(r.time_ms)]
    against_torch = any(r.method == TORCH for r in ok)
    ref = TORCH if against_torch else BASELINE
    names = [n for n in METHOD_NAMES if any(r.method == n for r in ok)]
    fig, axes = plt.subplots(1, len(cells), figsize=(5.5 * len(cells), 4.5), squeeze=False)
    colors = {n: f"C{i}" for i, n in enumerate(METHOD_NAMES)}
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
    return common.save_figure(fig, path, rect=(0, 0.14 if legend else 0, 1, 1))


# ------------------------------------------------------------------ main ---


def build_parser():
    p = common.parser(
        __doc__,
        quick="tiny sizes (T=20, B=2, H=8, 2 repeats): seconds, for tests",
        fresh="redo points already in the CSV",
        epilog="The issue's full grid (--batch 1,32,256 --hidden 128,256,1024) is about 135 "
        "times the default's work: many hours on a 2-core CPU; meant for a GPU.",
    )
    p.set_defaults(out=os.path.join("docs", "speed"))
    names = ", ".join(bj.cells.CELLS)
    p.add_argument(
        "--cells",
        type=common.comma_list(cell_name),
        default=list(PEER_CELLS),
        help=f"comma-separated cells among {names} (default rnn,gru,lstm)",
    )
    p.add_argument(
        "--batch",
        type=common.comma_list(common.positive_int),
        default=[32],
        help="comma-separated batch sizes B (default 32)",
    )
    p.add_argument(
        "--hidden",
        type=common.comma_list(common.positive_int),
        default=[256],
        help="comma-separated hidden sizes H (default 256)",
    )
    p.add_argument("--length", type=common.positive_int, default=1000, help="T (default 1000)")
    p.add_argument("--input", type=common.positive_int, default=64, help="D (default 64)")
    p.add_argument(
        "--repeats",
        type=common.int_at_least(1),
        default=7,
        help="timed rounds, the median is kept (default 7)",
    )
    p.add_argument(
        "--methods",
        type=parse_methods,
        default=list(METHODS),
        help="comma-separated subset (default: all) of: "
        + ", ".join(METHOD_NAMES)
        + f"; {BASELINE} is always timed",
    )
    p.add_argument(
        "--threads",
        type=common.positive_int,
        default=None,
        help="PyTorch's CPU threads (default: the cores JAX uses, "
        f"{default_threads()} here); taskset limits both",
    )
    p.add_argument(
        "--rtol",
        type=common.positive_float,
        default=None,
        help="largest norm-relative difference of a gradient from the baseline's "
        f"(default {RTOL['cpu']:g} on cpu, {RTOL_ELSEWHERE:g} on gpu and tpu)",
    )
    return p


def main(argv=None) -> None:
    args = common.parse(build_parser(), argv, QUICK)
    cells = [c for c in bj.cells.CELLS if c in args.cells]
    threads = args.threads or default_threads()
    methods = available(args.methods, cells)
    os.makedirs(args.out, exist_ok=True)
    table = common.Table(os.path.join(args.out, CSV_NAME), SpeedRow)
    grid = [
        Point(c, args.length, b, args.input, h)
        for c in cells
        for b in args.batch
        for h in args.hidden
    ]
    wanted = {p: [m.name for m in for_cell(methods, p.cell)] for p in grid}
    old = table.read()
    done = set()
    if not args.fresh:
        for p, names in wanted.items():
            have = {r.method for r in old if p.matches(r) and r.status != "error"}
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
            load = load_average()
            if load > 0.5:
                print(f"the load average is {load:.1f} on {os.cpu_count()} cores: other "
                      "processes share the CPU, so the timings will be noisy")  # fmt: skip
            largest = max(grid, key=lambda p: p.flops)
            gemm, shape = gemm_gflops(largest, args.repeats)
            print(f"float32 GEMM {shape}: {gemm:.1f} GFLOP/s (the peak in 'of peak')", flush=True)
            rtol = args.rtol or RTOL.get(jax.default_backend(), RTOL_ELSEWHERE)
            run = Run(args.repeats, threads, rtol, gemm)
            with common.progress(total=len(todo), unit="point") as bar:
                for p in todo:
                    names = set(wanted[p])
                    table.drop(lambda r, p=p, names=names: p.matches(r) and r.method in names)
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
    order = {n: i for i, n in enumerate(METHOD_NAMES)}
    rows = [r for r in table.read() if any(p.matches(r) for p in grid)]
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
