"""One harness for every benchmark: what a method is, and how it is compiled, run and timed.

A :class:`Method` is one way to compute a recurrent gradient: a scan that
runs any step (``lax.scan``, Equinox's checkpointed scan), a ``bj``
strategy (run by ``bj.scan``, or by ``bj.cells.run`` for a whole layer), or
a peer library with its own model (Flax NNX, PyTorch, cuDNN). The studies
take them from one catalogue (``_methods.METHODS``):

* ``memory_vs_length.py`` and ``time_vs_memory.py`` compile the benchmark
  model's gradient under each method (:meth:`Method.model`), read XLA's memory
  plan (:func:`compile_and_measure`) and time it (:func:`prepare_timing`);
* ``speed.py`` runs one recurrent layer under each method
  (:meth:`Method.layer`, or the peer's ``prepare``) and checks its gradient
  against the baseline's before timing it.

Both time with :func:`time_rounds`: every method of a point runs once per
round, in an order that rotates from round to round, each call ended by
``jax.block_until_ready``, so the slow drift of a shared machine hits all of
them alike.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import bpttjax as bj

from ._model import Problem, init_model, loss

BASELINE = "lax.scan"
"""The method every ratio is taken against: plain ``lax.scan`` + ``jax.grad``."""
FAMILIES = ("lax", "bj", "flax", "equinox", "torch", "cudnn")
"""The kinds of method: the baseline's, the library's, and each peer's."""

TORCH_MISSING = "PyTorch not installed: its rows are skipped (pip install torch to compare)"
ScanFn = Callable[..., Any]
"""``scan(f, init, xs) -> (carry, ys)``, as ``jax.lax.scan``."""


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
    """A way of computing a recurrent gradient; its name is the CSVs' ``method`` column.

    Exactly one of these says how it runs:

    * ``scan(problem)``: a scan function that runs any step;
    * ``remat(problem)``: a ``bj`` strategy, for ``bj.scan`` (the benchmark
      model) and ``bj.cells.run`` with ``run_options`` (a layer). With
      ``run_options`` it runs only as a layer;
    * a peer's own code: ``build(problem) -> (grad_fn, make_params)`` for
      the benchmark model and ``prepare(problem, params, xs, threads) ->
      Prepared`` for a layer (either may be None: not offered).

    ``family`` is one of :data:`FAMILIES`; ``needs`` a package it imports
    (checked before a sweep); ``cells`` the cells it has (None: every
    registered cell); ``gpu_only`` whether it runs only on a GPU;
    ``aliases`` other names ``--methods`` takes for it.
    """

    name: str
    family: str = "bj"
    needs: str | None = None
    cells: tuple[str, ...] | None = None
    gpu_only: bool = False
    scan: Callable[[Problem], ScanFn] | None = None
    remat: Callable[[Problem], bj.RematStrategy] | None = None
    run_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    build: Callable[[Problem], tuple[Callable, Callable]] | None = None
    prepare: Callable[..., Prepared] | None = None
    aliases: tuple[str, ...] = ()

    @property
    def has_model(self) -> bool:
        """Whether it computes the benchmark model (``memory_vs_length``, ``time_vs_memory``)."""
        return (
            self.build is not None
            or self.scan is not None
            or (self.remat is not None and not self.run_options)
        )

    @property
    def has_layer(self) -> bool:
        """Whether it runs one recurrent layer (``speed``)."""
        return self.prepare is not None or self.scan is not None or self.remat is not None

    def has_cell(self, cell: str) -> bool:
        return self.cells is None or cell in self.cells

    def model(self, p: Problem) -> tuple[Callable, Callable]:
        """``(grad_fn, make_params)`` of the benchmark model at ``p``.

        ``grad_fn(params, xs)`` is the gradient with respect to ``params``;
        ``make_params(key)`` creates them.
        """
        if self.build is not None:
            return self.build(p)
        if not self.has_model:
            raise ValueError(f"{self.name} does not run the benchmark model")
        if self.scan is not None:
            grad_fn = jax.grad(functools.partial(loss, cell=p.cell, scan=self.scan(p)))
        else:
            grad_fn = jax.grad(functools.partial(loss, cell=p.cell, remat=self.remat(p)))

        def make_params(key):
            return init_model(key, p.cell, p.input, p.hidden, jnp.dtype(p.dtype))

        return grad_fn, make_params

    def layer(self, p: Problem) -> Callable:
        """``run(params, carry, xs) -> (carry, ys)``: the cell ``p.cell`` over ``xs``.

        A ``bj`` strategy runs through ``bj.cells.run``, the library's
        whole-sequence layer; a scan runs the cell's step.
        """
        if self.remat is not None:
            strategy = self.remat(p)
            options = dict(self.run_options)

            def run(params, carry, xs):
                return bj.cells.run(p.cell, params, carry, xs, remat=strategy, **options)

            return run
        if self.scan is None:
            raise ValueError(f"{self.name} runs its own layer: use its prepare")
        scan, step = self.scan(p), bj.cells.get(p.cell).step
        return lambda params, carry, xs: scan(functools.partial(step, params), carry, xs)


# ---------------------------------------------------------- choosing methods ---


def norm(name: str) -> str:
    """A method name as ``--methods`` matches it: lower case, letters, digits and ``+`` only."""
    return re.sub(r"[^a-z0-9+]", "", name.lower())


def lookup(methods: Sequence[Method]) -> dict[str, Method]:
    """Every way ``--methods`` may name each of ``methods``: its name with or without
    ``bj.``, and its aliases, all as :func:`norm` writes them."""
    by = {}
    for m in methods:
        for name in (m.name, *m.aliases):
            by.setdefault(norm(name), m)
            if name.startswith("bj."):
                by.setdefault(norm(name[3:]), m)
    return by


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


def available(methods: Sequence[Method], cells: Sequence[str]) -> list[Method]:
    """The methods that can run here for some of ``cells``; each one skipped is said on stdout."""
    kept = []
    for m in methods:
        mine = [c for c in cells if m.has_cell(c)]
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


# ---------------------------------------------------- compile, measure, time ---


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` says that memory ran out (host or device)."""
    if not isinstance(err, jax.errors.JaxRuntimeError | MemoryError | RuntimeError):
        return False
    text = str(err).lower()
    return isinstance(err, MemoryError) or "resource_exhausted" in text or "out of memory" in text


def describe(stage: str, err: BaseException) -> str:
    """``stage: Error: message`` on one line, at most about 300 characters of message."""
    text = f"{type(err).__name__}: {' '.join(str(err).split())}"
    return f"{stage}: {text if len(text) <= 300 else text[:297] + '...'}"


@dataclasses.dataclass(frozen=True)
class Compiled:
    """A method built and compiled for one problem: its memory plan and how to run it."""

    grad_fn: Callable
    make_params: Callable
    report: bj.memory.MemoryReport
    compile_s: float


def compile_and_measure(method: Method, problem: Problem) -> Compiled:
    """Build ``method``'s benchmark model at ``problem``, compile it on abstract inputs,
    read XLA's memory plan.

    With ``problem.devices > 1`` the inputs are sharded (:meth:`Problem.place`)
    and the plan is per device.
    """
    grad_fn, make_params = method.model(problem)
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


def prepare_jax(make_loss, adapt=None, inputs=None, note="", skip=()) -> Callable[..., Prepared]:
    """``prepare`` for a JAX loss ``make_loss(problem) -> loss(theta, data)``.

    ``theta = adapt(params)`` (default: the ``bj.cells`` parameters
    themselves) is what the gradient is taken with respect to, and
    ``data = inputs(xs)`` what the loss reads (default ``xs``); both are made
    before timing. The gradient is mapped back to ``params`` by ``adapt``'s VJP.
    ``note`` (text, or a function of the problem) goes to the row; ``skip``
    names parameters the method does not have.
    """

    def prepare(problem: Problem, params: dict, xs, threads: int) -> Prepared:
        theta, pullback = jax.vjp(adapt or (lambda p: p), params)
        data = xs if inputs is None else inputs(xs)
        loss_fn = make_loss(problem)
        start = time.perf_counter()
        compiled = jax.jit(jax.grad(loss_fn)).lower(theta, data).compile()
        compile_s = time.perf_counter() - start
        return Prepared(
            lambda: jax.block_until_ready(compiled(theta, data)),
            lambda g: pullback(g)[0],
            compile_s,
            note(problem) if callable(note) else note,
            frozenset(skip),
        )

    return prepare


def mean_square(ys) -> jax.Array:
    """The layer benchmark's loss: ``mean(ys**2)``."""
    return jnp.mean(ys * ys)


def zero_carry(p: Problem, xs):
    """The cell's initial carry for the batch of ``xs``."""
    return bj.cells.get(p.cell).initial_carry(p.hidden, xs.shape[1:-1], xs.dtype)


def _chosen_chunks(p: Problem) -> str:
    """The note of a layer whose ``batch_chunks`` is ``"auto"``: what it chose
    (read from the cache the trace filled)."""
    xs = np.zeros((p.T, p.batch, p.input), np.float32)
    params = bj.cells.get(p.cell).init(jax.random.key(0), p.input, p.hidden)
    chunks = bj.cells.choose_batch_chunks(p.cell, params, zero_carry(p, xs), xs)
    return f"bj.cells.run, batch_chunks auto: {chunks}"


def prepare_layer(method: Method, p: Problem, params: dict, xs, threads: int) -> Prepared:
    """``method`` made ready at ``p``: a peer's own ``prepare``, else its layer's gradient
    of :func:`mean_square`, with ``params`` in the ``bj.cells`` layout."""
    if method.prepare is not None:
        return method.prepare(p, params, xs, threads)
    layer = method.layer(p)

    def make_loss(p):
        def loss_fn(params, xs):
            _, ys = layer(params, zero_carry(p, xs), xs)
            return mean_square(ys)

        return loss_fn

    note = ""
    if method.remat is not None:
        note = "bj.cells.run" if "batch_chunks" in method.run_options else _chosen_chunks
    return prepare_jax(make_loss, note=note)(p, params, xs, threads)


def bench_params(p: Problem) -> dict:
    """Parameters of the cell's shapes: kernels ``N(0, 1/fan_in)``, biases ``N(0, 0.1²)``.

    Made by NumPy (nothing for XLA to compile). Non-zero biases make the
    gradient check see a misplaced bias; ``b_hn`` stays 0, as Flax has none.
    """
    cell = bj.cells.get(p.cell)
    init = functools.partial(cell.init, input_size=p.input, hidden_size=p.hidden)
    shapes = jax.eval_shape(init, jax.random.key(0))
    rng = np.random.default_rng(0)
    params = {}
    for name, leaf in sorted(shapes.items()):
        x = rng.standard_normal(leaf.shape, np.float32)
        scale = 1 / math.sqrt(leaf.shape[0]) if len(leaf.shape) == 2 else 0.1 * (name != "b_hn")
        params[name] = jnp.asarray(np.float32(scale) * x, leaf.dtype)
    return params


def normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
    """Standard normal float32 numbers made by NumPy (nothing for XLA to compile)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def bench_inputs(p: Problem) -> jax.Array:
    """``xs: (T, B, D)``, standard normal."""
    return normal(1, (p.T, p.batch, p.input))


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


# ---------------------------------------------------------------- formatting ---


def mb(nbytes: float | None) -> str:
    """Bytes as MB (10^6), with two or three significant figures; ``–`` for none."""
    x = math.nan if nbytes is None else nbytes / 1e6
    if math.isnan(x):
        return "–"
    if x >= 1000:
        return f"{x:.0f} MB"
    return f"{x:.1f} MB" if x >= 1 else f"{x:.2g} MB"


def pct(ratio: float) -> str:
    """A ratio as a percentage; ``–`` for NaN."""
    if math.isnan(ratio):
        return "–"
    x = 100 * ratio
    return f"{x:.0f}%" if x >= 10 else f"{x:.1f}%" if x >= 0.1 else f"{x:.2f}%"


def times(ratio: float) -> str:
    """A ratio as ``1.23×``; ``–`` for NaN."""
    return "–" if math.isnan(ratio) else f"{ratio:.2f}×"


def seconds(t: float | None) -> str:
    """Seconds as ``s`` or ``ms``; ``–`` for none."""
    if t is None:
        return "–"
    return f"{t:.3f} s" if t >= 0.1 else f"{t * 1e3:.2f} ms"


def number(x: float, fmt: str) -> str:
    """``x`` in ``fmt``; ``–`` for NaN."""
    return "–" if math.isnan(x) else format(x, fmt)
