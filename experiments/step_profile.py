"""Where the time of one recurrent layer's gradient goes, part by part.

For each cell, at one point (default T = 1,000, B = 32, D = 64, H = 256,
float32), the parts of ``jax.grad`` of ``mean(ys**2)`` through
``bj.cells.run`` (``StoreAll``, the batch as one chain: ``batch_chunks=1``)
are timed separately, in interleaved rounds:

* ``recurrent products``: a ``lax.scan`` doing only ``h @ W_h`` each step,
  the one product no schedule can take out of the forward loop: its floor;
* ``backward products``: a ``lax.scan`` doing only ``dz @ W_hᵀ`` each step
  (``W_hᵀ`` made once, as ``run`` does), the backward loop's floor. It has
  the same flops as ``h @ W_h`` but contracts over ``kH`` into ``H``
  columns, which XLA's CPU product runs more slowly;
* ``forward``: ``bj.cells.run`` without a gradient;
* ``weight products``: the three products ``run`` does after its backward
  loop, ``(T·B, H)ᵀ(T·B, kH)``, ``(T·B, D)ᵀ(T·B, kH)`` and
  ``(T·B, kH)(kH, D)``, as plain matmuls of those shapes;
* ``fwd+bwd``: the whole gradient; ``backward loop`` is what remains of it
  after ``forward`` and ``weight products`` (it includes storing the
  residuals in the forward pass).

The rest of a step (gates, activations and their derivatives, the input
projection, storing and reading the residuals) is ``forward − recurrent
products`` and ``backward loop − backward products``. With PyTorch installed its
``nn.RNN``/``nn.GRU``/``nn.LSTM`` fwd+bwd is timed in the same rounds.

    python experiments/step_profile.py                 # rnn, gru, lstm at the headline point
    python experiments/step_profile.py --quick --out /tmp/profile
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys

import jax
import jax.numpy as jnp

try:  # python -m experiments.step_profile, or experiments/ is importable
    from experiments import _cli, _harness, _table
except ImportError:  # python experiments/step_profile.py in a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from experiments import _cli, _harness, _table

import bpttjax as bj

CSV_NAME = "step_profile.csv"
QUICK = {"length": 20, "batch": 2, "input": 3, "hidden": 4, "repeats": 2}
PARTS = (
    "recurrent products",
    "backward products",
    "forward",
    "weight products",
    "fwd+bwd",
    "backward loop",
    "PyTorch",
)


@dataclasses.dataclass
class ProfileRow:
    cell: str
    length: int
    batch: int
    input: int
    hidden: int
    part: str
    time_ms: float
    share: float
    """Of the fwd+bwd time (PyTorch: its time over bj's fwd+bwd)."""
    backend: str


def build_parser():
    p = _cli.parser(__doc__, quick="tiny sizes (smoke test)")
    p.add_argument("--cells", type=_cli.comma_list(str), default=list(bj.cells.CELLS))
    p.add_argument("--length", type=_cli.positive_int, default=1000)
    p.add_argument("--batch", type=_cli.positive_int, default=32)
    p.add_argument("--input", type=_cli.positive_int, default=64)
    p.add_argument("--hidden", type=_cli.positive_int, default=256)
    p.add_argument("--repeats", type=_cli.positive_int, default=7)
    return p


def calls(cell: str, T: int, B: int, D: int, H: int) -> dict:
    """The parts to time, each a function of no arguments that blocks until done."""
    c = bj.cells.get(cell)
    k = c.gates
    keys = jax.random.split(jax.random.key(0), 5)
    params = c.init(keys[0], D, H)
    carry = c.initial_carry(H, (B,))
    xs = jax.random.normal(keys[1], (T, B, D), jnp.float32)
    W_h = jax.random.normal(keys[2], (H, k * H), jnp.float32) * jnp.float32(H**-0.5)

    def recurrent(W, h):
        return jax.lax.scan(lambda h, _: (jnp.tanh((h @ W)[..., :H]), None), h, None, length=T)[0]

    def backward(W_t, dz):
        step = lambda dz, _: (jnp.tile(jnp.tanh(dz @ W_t), k), None)
        return jax.lax.scan(step, dz, None, length=T)[0]

    def loss(p, x):
        return jnp.mean(bj.cells.run(cell, p, carry, x, batch_chunks=1)[1] ** 2)

    def weight_products(h, z, x, W_x):
        return h.T @ z, x.T @ z, z @ W_x.T

    h_rows = jax.random.normal(keys[3], (T * B, H), jnp.float32)
    z_rows = jax.random.normal(keys[4], (T * B, k * H), jnp.float32)
    x_rows = xs.reshape(T * B, D)
    W_x = jnp.zeros((D, k * H), jnp.float32)
    jitted = {
        "recurrent products": (jax.jit(recurrent), (W_h, jax.tree.leaves(carry)[0])),
        "backward products": (
            jax.jit(backward),
            (jnp.array(W_h.T), jnp.zeros((B, k * H), jnp.float32)),
        ),
        "forward": (
            jax.jit(lambda p, x: bj.cells.run(cell, p, carry, x, batch_chunks=1)[1]),
            (params, xs),
        ),
        "weight products": (jax.jit(weight_products), (h_rows, z_rows, x_rows, W_x)),
        "fwd+bwd": (jax.jit(jax.grad(loss)), (params, xs)),
    }
    out = {}
    for name, (fn, args) in jitted.items():
        jax.block_until_ready(fn(*args))  # compile and warm up
        out[name] = functools.partial(lambda fn, args: jax.block_until_ready(fn(*args)), fn, args)
    torch_call = _torch_call(cell, T, B, D, H)
    if torch_call is not None:
        out["PyTorch"] = torch_call
    return out


def _torch_call(cell: str, T: int, B: int, D: int, H: int):
    try:
        import torch
    except ImportError:
        print("PyTorch not installed: its row is skipped (pip install torch to compare)")
        return None
    module = {"rnn": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}.get(cell)
    if module is None:
        return None
    layer, x = module(D, H), torch.randn(T, B, D)

    def call():
        layer.zero_grad()
        (layer(x)[0] ** 2).mean().backward()

    call()
    return call


def profile(cell: str, args, backend: str) -> list[ProfileRow]:
    T, B, D, H = args.length, args.batch, args.input, args.hidden
    parts = calls(cell, T, B, D, H)
    times = _harness.time_rounds(parts, args.repeats)
    ms = {}
    for name, ts in times.items():
        if isinstance(ts, BaseException):
            raise ts
        ms[name] = sorted(ts)[len(ts) // 2] * 1e3
    ms["backward loop"] = ms["fwd+bwd"] - ms["forward"] - ms["weight products"]
    total = ms["fwd+bwd"]
    return [
        ProfileRow(cell, T, B, D, H, name, ms[name], ms[name] / total, backend)
        for name in PARTS
        if name in ms
    ]


def main(argv=None) -> None:
    args = _cli.parse(build_parser(), argv, QUICK)
    for cell in args.cells:
        bj.cells.get(cell)  # a clear error for an unknown name, before any work
    os.makedirs(args.out, exist_ok=True)
    table = _table.Table(os.path.join(args.out, CSV_NAME), ProfileRow)
    backend = jax.default_backend()
    rows = []
    for cell in _cli.progress(args.cells, desc="cells"):
        new = profile(cell, args, backend)
        same = (cell, new[0].length, new[0].batch, new[0].hidden)
        table.drop(lambda r, same=same: (r.cell, r.length, r.batch, r.hidden) == same)
        table.append(new)
        rows += new
    print(f"\nT={args.length}, B={args.batch}, D={args.input}, H={args.hidden}, float32, {backend}")
    print(f"{'cell':6} {'part':20} {'ms':>9} {'of fwd+bwd':>11}")
    for r in rows:
        print(f"{r.cell:6} {r.part:20} {r.time_ms:9.1f} {r.share:10.0%}")
    print(f"wrote {table.path}")


if __name__ == "__main__":
    main()
