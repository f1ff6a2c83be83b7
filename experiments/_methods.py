"""The catalogue: every method a benchmark compares, ``bj`` strategies and peers alike.

:data:`METHODS` lists them in the order every table shows them. A study
takes the ones it can run (:attr:`Method.has_model` for the benchmark model,
:attr:`Method.has_layer` for one layer) and its own default subset by name;
``--methods`` (:func:`parse_methods`) takes names, aliases and any strategy
spec ``bj.remat.from_string`` reads.

The peers need to know how their cells lay out the parameters of a
registered cell: :data:`PEER_CELLS` says it once per cell, for Flax NNX and
PyTorch both. A cell without an entry simply has no peer rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import bpttjax as bj

from ._harness import (
    BASELINE,
    Method,
    Prepared,
    lookup,
    mean_square,
    norm,
    prepare_jax,
    zero_carry,
)
from ._model import Problem, init_model, loss


@dataclasses.dataclass(frozen=True)
class PeerCell:
    """How Flax NNX and PyTorch compute a registered cell.

    ``nnx``: Flax NNX's class (``nnx_fast`` where Flax has a faster one with
    the same math); ``nnx_params``: ``(module, parameter) -> bj name`` for its
    parameters. ``torch``: the ``torch.nn`` class (``torch_options`` for it);
    ``kernels``: the bj names of its input kernel, hidden kernel and input
    bias (torch's ``*_ih``, ``*_hh``, ``bias_ih``). ``torch_hidden_bias``:
    the bj name of the hidden bias PyTorch adds to the last third of
    ``bias_hh`` (GRU's ``b_hn``), which Flax NNX lacks.
    """

    nnx: str
    nnx_params: dict
    torch: str
    kernels: tuple[str, str, str]
    nnx_fast: str | None = None
    torch_options: dict = dataclasses.field(default_factory=dict)
    torch_hidden_bias: str | None = None


PEER_CELLS = {
    "rnn": PeerCell(
        "SimpleCell",
        {("dense_i", "kernel"): "W_xh", ("dense_i", "bias"): "b_h", ("dense_h", "kernel"): "W_hh"},
        "RNN",
        ("W_xh", "W_hh", "b_h"),
        torch_options={"nonlinearity": "tanh"},
    ),
    "gru": PeerCell(
        "GRUCell",
        {("dense_i", "kernel"): "W_x", ("dense_i", "bias"): "b_x", ("dense_h", "kernel"): "W_h"},
        "GRU",
        ("W_x", "W_h", "b_x"),
        torch_hidden_bias="b_hn",
    ),
    "lstm": PeerCell(
        "LSTMCell",
        {("dense_i", "kernel"): "W_x", ("dense_h", "kernel"): "W_h", ("dense_h", "bias"): "b"},
        "LSTM",
        ("W_x", "W_h", "b"),
        nnx_fast="OptimizedLSTMCell",
    ),
}
"""Each registered cell that Flax NNX and PyTorch also have."""
PEERED = tuple(PEER_CELLS)


def nnx_cell(cell: str, *, fastest: bool = False) -> type:
    """Flax NNX's cell class computing the registered cell ``cell``.

    ``fastest`` takes the faster class where Flax has one beside (the
    ``OptimizedLSTMCell`` lays its parameters out differently).

    Raises:
      ValueError: Flax has no such cell.
    """
    from flax import nnx

    if cell not in PEER_CELLS:
        raise ValueError(f"Flax NNX has no version of the cell {cell!r}; it has {list(PEERED)}")
    peer = PEER_CELLS[cell]
    return getattr(nnx, (fastest and peer.nnx_fast) or peer.nnx)


def log2_snapshots(T: int) -> int:
    """``ceil(log2 T)``: the classic logarithmic number of checkpoints."""
    return max(1, math.ceil(math.log2(T))) if T > 1 else 1


def equinox_default_checkpoints(T: int) -> int:
    """The number of checkpoints Equinox's checkpointed scan uses by default, about ``sqrt(2T)``."""
    return 1 if T <= 1 else math.floor(-1.5 + math.sqrt(2 * T + 0.25)) + 1


def checkpointed_lax_scan(f, init, xs):
    """``lax.scan`` of ``jax.checkpoint(f)``: every step recomputed in the backward pass."""
    return jax.lax.scan(jax.checkpoint(f), init, xs)


def equinox_scan(f, init, xs, checkpoints=None):
    """``equinox.internal.scan(kind="checkpointed")`` (default: about ``sqrt(2T)`` checkpoints)."""
    import equinox.internal as eqxi

    return eqxi.scan(f, init, xs, kind="checkpointed", checkpoints=checkpoints)


def _equinox_temp_bytes(p: Problem) -> int:
    """The working memory of Equinox's default checkpointed scan at ``p`` (compiled, not run).

    Per device when ``p`` shards the batch over several.
    """
    grad_fn = jax.grad(functools.partial(loss, cell=p.cell, scan=equinox_scan))
    params = jax.eval_shape(
        lambda: init_model(jax.random.key(0), p.cell, p.input, p.hidden, jnp.dtype(p.dtype))
    )
    xs = jax.ShapeDtypeStruct((p.T, p.batch, p.input), jnp.dtype(p.dtype))
    return bj.memory.measure(grad_fn, *p.place(params, xs)).temp_bytes


def strategy(name: str, arg=None, *, label: str | None = None, **kw) -> Method:
    """The registered strategy ``STRATEGIES[name](arg)``, named ``bj.Class(label or arg)``.

    ``arg`` may be a function of the :class:`Problem` (e.g. ``log2 T``
    snapshots); ``label`` then names it. ``kw`` go to :class:`Method`;
    ``run_options`` are added to the name: ``bj.StoreAll (batch_chunks=1)``.
    """
    cls = bj.remat.STRATEGIES[name]

    def remat(p: Problem):
        value = arg(p) if callable(arg) else arg
        return cls() if value is None else cls(value)

    shown = "" if arg is None else f"({label or arg})"
    options = ", ".join(f"{k}={v}" for k, v in kw.get("run_options", {}).items())
    shown += f" ({options})" if options else ""
    return Method(f"bj.{cls.__name__}{shown}", remat=remat, **kw)


def spec_method(spec: str) -> Method:
    """The method running ``bj.remat.from_string(spec)``, named ``bj.Class(argument)``."""
    chosen = bj.remat.from_string(spec)
    _, colon, arg = spec.partition(":")
    shown = f"({arg.strip()})" if colon else ""
    return Method(f"bj.{type(chosen).__name__}{shown}", remat=lambda p: chosen)


# ------------------------------------------------------------- Flax NNX ---


def _build_nnx(p: Problem):
    """``flax.nnx.RNN`` on Flax's version of ``p.cell``, with the benchmark's read-out and loss.

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


def _nnx_adapt(cell: str, template, params: dict):
    """The Flax parameter state ``template`` with the values of ``params`` (differentiable)."""
    names = PEER_CELLS[cell].nnx_params
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for path, _ in paths:
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        leaves.append(params[names[keys[-2:]]])
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _prepare_nnx(p: Problem, params: dict, xs, threads: int) -> Prepared:
    """``nnx.RNN`` on Flax's cell holding ``params`` (abstract module, bj's values)."""
    from flax import nnx

    cls = nnx_cell(p.cell, fastest=True)

    def build():
        cell = cls(p.input, p.hidden, dtype=jnp.float32, param_dtype=jnp.float32,
                   rngs=nnx.Rngs(0))  # fmt: skip
        return nnx.RNN(cell, time_major=True, rngs=False)

    graphdef, template, rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)

    def make_loss(p):
        def loss_fn(state, xs):
            rnn = nnx.merge(graphdef, state, rest)
            return mean_square(rnn(xs, initial_carry=zero_carry(p, xs)))

        return loss_fn

    adapt = functools.partial(_nnx_adapt, p.cell, template)
    bias = PEER_CELLS[p.cell].torch_hidden_bias
    skip = (bias,) if bias else ()
    note = f"flax.nnx.{cls.__name__} has no {bias} (0 here)" if bias else ""
    return prepare_jax(make_loss, adapt, note=note, skip=skip)(p, params, xs, threads)


# -------------------------------------------------------- PyTorch, cuDNN ---


def _prepare_torch(p: Problem, params: dict, xs, threads: int) -> Prepared:
    """``torch.nn.RNN``/``GRU``/``LSTM`` holding ``params``, on the time-major ``xs``."""
    import torch

    torch.set_num_threads(threads)
    device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    peer = PEER_CELLS[p.cell]
    module = getattr(torch.nn, peer.torch)(p.input, p.hidden, **peer.torch_options).to(device)
    w_x, w_h, b_x = (np.asarray(params[n]) for n in peer.kernels)
    b_h = np.zeros_like(b_x)
    if peer.torch_hidden_bias:  # the last third of bias_hh
        b_h[2 * p.hidden :] = np.asarray(params[peer.torch_hidden_bias])
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
        g = {n: q.grad.detach().cpu().numpy() for n, q in module.named_parameters()}
        n_x, n_h, n_b = peer.kernels
        out = {n_x: g["weight_ih_l0"].T, n_h: g["weight_hh_l0"].T, n_b: g["bias_ih_l0"]}
        if peer.torch_hidden_bias:
            out[peer.torch_hidden_bias] = g["bias_hh_l0"][2 * p.hidden :]
        return out

    return Prepared(call, to_bj, note=f"torch {torch.__version__}, {threads} threads, {device}")


def cudnn_weights(params: dict) -> jax.Array:
    """The LSTM's parameters as cuDNN's flat vector: ``W_ih, W_hh, b_ih, b_hh`` (``b_hh = 0``).

    ``jax.experimental.rnn`` packs PyTorch's layout, gates ``i, f, g, o`` as
    :func:`bpttjax.cells.lstm`; its kernels are ``(4H, D)``, transposed.
    """
    b = params["b"]
    return jnp.concatenate([params["W_x"].T.ravel(), params["W_h"].T.ravel(), b, jnp.zeros_like(b)])


def cudnn_loss(p: Problem, reference: bool = False):
    """``loss(weights, x)`` of ``jax.experimental.rnn.lstm`` on batch-first ``x: (B, T, D)``.

    ``reference`` runs the module's pure-JAX ``lstm_ref`` instead (any
    backend), on the same packed weights: how the packing is tested on a CPU.
    """
    from jax.experimental import rnn

    sizes = dict(input_size=p.input, hidden_size=p.hidden, num_layers=1)

    def loss_fn(weights, x):
        B, T = x.shape[:2]
        h0 = jnp.zeros((1, B, p.hidden), x.dtype)
        seq_lengths = jnp.full((B,), T, jnp.int32)
        if reference:
            unpacked = rnn.unpack_lstm_weights(weights, **sizes, bidirectional=False)
            ys, _, _ = rnn.lstm_ref(x, h0, h0, *unpacked, seq_lengths, **sizes,
                                    dropout=0.0, bidirectional=False)  # fmt: skip
        else:
            ys, _, _ = rnn.lstm(x, h0, h0, weights, seq_lengths, **sizes,
                                dropout=0.0, bidirectional=False)  # fmt: skip
        return mean_square(ys)

    return loss_fn


def batch_first(xs):
    """``(T, B, D) -> (B, T, D)``."""
    return jnp.swapaxes(xs, 0, 1)


_prepare_cudnn = prepare_jax(cudnn_loss, cudnn_weights, batch_first, note="cuDNN LSTM")


# ------------------------------------------------------------- catalogue ---

METHODS: tuple[Method, ...] = (
    Method(BASELINE, "lax", scan=lambda p: jax.lax.scan),
    Method("lax.scan+checkpoint", "lax", scan=lambda p: checkpointed_lax_scan),
    strategy("store_all"),
    strategy("store_all", run_options={"batch_chunks": 1}, aliases=("one",)),
    strategy("store_all", run_options={"batch_chunks": 2}, aliases=("chunks",)),
    strategy("every_step"),
    *(strategy("nested", levels) for levels in (2, 3, 4)),
    strategy("binomial", lambda p: log2_snapshots(p.T), label="log2 T", aliases=("binomial",)),
    strategy("binomial", lambda p: equinox_default_checkpoints(p.T), label="eqx count"),
    strategy("budget", _equinox_temp_bytes, label="eqx memory", needs="equinox"),
    Method(
        "flax.nnx.RNN",
        "flax",
        "flax",
        PEERED,
        build=_build_nnx,
        prepare=_prepare_nnx,
        aliases=("nnx",),
    ),  # fmt: skip
    Method(
        "equinox checkpointed", "equinox", "equinox", scan=lambda p: equinox_scan, aliases=("eqx",)
    ),  # fmt: skip
    Method(
        "equinox, log2 T checkpoints",
        "equinox",
        "equinox",
        scan=lambda p: functools.partial(equinox_scan, checkpoints=log2_snapshots(p.T)),
    ),
    Method("PyTorch", "torch", "torch", PEERED, prepare=_prepare_torch, aliases=("torch",)),
    Method(
        "jax.experimental.rnn",
        "cudnn",
        None,
        ("lstm",),
        gpu_only=True,
        prepare=_prepare_cudnn,
        aliases=("cudnn",),
    ),  # fmt: skip
)
"""Every method, in the order every table shows them; the first is the baseline."""


BY_NAME = {m.name: m for m in METHODS}


def method_order(names) -> list[str]:
    """The catalogue's names, then the other names of ``names`` in their order."""
    return list(dict.fromkeys([*(m.name for m in METHODS), *names]))


def family(name: str) -> str:
    """The :class:`Method` family of a method name (a registry spec's method is ``bj``)."""
    method = BY_NAME.get(name)
    return method.family if method else "bj"


def parse_methods(text: str, offered: Sequence[Method], specs: bool = True) -> list[Method]:
    """Methods named in ``text``, in ``offered``'s order, then strategy specs in theirs.

    Names are separated by commas and match ignoring case, spaces,
    punctuation and ``bj.`` (``nested2``), or by alias (``eqx``); a name that
    itself holds a comma (``equinox, log2 T checkpoints``) is matched whole.
    With ``specs``, anything else is read by ``bj.remat.from_string``
    (``binomial:14``).

    Raises:
      argparse.ArgumentTypeError: an unknown name, or none at all.
    """
    by_norm = lookup(offered)
    parts = [s.strip() for s in text.split(",")]
    named, extra, i = set(), {}, 0
    while i < len(parts):
        for j in range(len(parts), i, -1):  # the longest run of parts that names a method
            if norm(",".join(parts[i:j])) in by_norm:
                named.add(by_norm[norm(",".join(parts[i:j]))].name)
                i = j
                break
        else:
            part, i = parts[i], i + 1
            if not part:
                continue
            choices = ", ".join(m.name for m in offered)
            if not specs:
                raise argparse.ArgumentTypeError(f"unknown method {part!r}; choose from {choices}")
            try:
                method = spec_method(part)
            except ValueError as err:
                raise argparse.ArgumentTypeError(
                    f"unknown method {part!r}; choose from {choices}, or a strategy spec ({err})"
                ) from None
            extra.setdefault(method.name, method)
    if not named and not extra:
        raise argparse.ArgumentTypeError("expects at least one method")
    return [m for m in offered if m.name in named] + [
        m for m in extra.values() if m.name not in named
    ]
