"""A gradient through a 1,000,000-step sequence on a laptop-sized machine.

The benchmark model of ``experiments/common.py`` (tanh RNN by default, batch
32, input 64, hidden 256, float32, per-step loss) is run for ``--length``
steps. Its inputs are generated inside the step from ``fold_in(key, t)``, so
the 8 GB an explicit ``xs`` would take at T = 10^6 are not needed and the only
large memory is what BPTT itself keeps.

The script first compiles (without running) plain BPTT (``bj.StoreAll()``,
identical to ``lax.scan`` + ``jax.grad``) and the chosen strategy and prints
their planned temporary memory next to the machine's memory; then it runs the
chosen strategy's gradient once and reports the time. Results go to
``<out>/million_steps.json``.

    python experiments/million_steps.py                    # T = 10^6, Nested(3)
    python experiments/million_steps.py --length 20000 --check
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

try:
    from experiments import common
except ImportError:  # run as a script: experiments/ is on sys.path
    import common

import bpttjax as bj

STRATEGIES = {
    "nested2": bj.Nested(levels=2),
    "nested3": bj.Nested(levels=3),
    "nested4": bj.Nested(levels=4),
    "everystep": bj.EveryStep(),
}


def machine_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def stream_loss(params, key, *, cell, length, batch, input_size, remat):
    """Mean per-step loss over ``length`` steps whose inputs are drawn on the fly."""
    step = common.make_step(cell, params)
    hidden = params["W_out"].shape[0]
    dtype = params["W_out"].dtype

    def f(state, _):
        carry, t = state
        x = jax.random.normal(jax.random.fold_in(key, t), (batch, input_size), dtype)
        carry, loss_t = step(carry, x)
        return (carry, t + 1), loss_t

    h0 = bj.cells.initial_carry(cell, hidden, (batch,), dtype=dtype)
    init = (h0, jnp.zeros((), jnp.int32))
    _, losses = bj.scan(f, init, None, length=length, remat=remat)
    return jnp.mean(losses)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=common.positive_int, default=1_000_000)
    parser.add_argument("--cell", choices=common.CELLS, default="rnn")
    parser.add_argument("--batch", type=common.positive_int, default=32)
    parser.add_argument("--input", type=common.positive_int, default=64)
    parser.add_argument("--hidden", type=common.positive_int, default=256)
    parser.add_argument("--remat", choices=sorted(STRATEGIES), default="nested3")
    parser.add_argument(
        "--check",
        action="store_true",
        help="also run plain BPTT at this length and compare the gradients (short T only)",
    )
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)

    remat = STRATEGIES[args.remat]
    kw = dict(cell=args.cell, length=args.length, batch=args.batch, input_size=args.input)
    params = common.init_model(jax.random.key(0), args.cell, args.input, args.hidden)
    key = jax.random.key(1)
    grad = {
        name: jax.grad(functools.partial(stream_loss, remat=r, **kw))
        for name, r in (("plain", bj.StoreAll()), (args.remat, remat))
    }
    plain = bj.memory.measure(grad["plain"], params, key)
    ours = bj.memory.measure(grad[args.remat], params, key)
    total = machine_memory_bytes()
    gib = 2.0**30
    print(
        f"T = {args.length:,} steps, {args.cell}, B={args.batch}, D={args.input}, "
        f"H={args.hidden}, float32, {jax.default_backend()}"
    )
    if total:
        print(f"machine memory:                          {total / gib:8.2f} GiB")
    print(
        f"plain BPTT (lax.scan + jax.grad) temp:   {plain.temp_bytes / gib:8.2f} GiB (compiled, "
        "not run)"
    )
    print(
        f"{args.remat} temp:                       {ours.temp_bytes / gib:8.4f} GiB "
        f"({ours.temp_bytes / 2**20:.1f} MiB)"
    )
    if total and plain.temp_bytes <= total and not args.check:
        print("note: plain BPTT would fit in this machine's memory at this length")

    compiled = jax.jit(grad[args.remat]).lower(params, key).compile()
    start = time.perf_counter()
    g = jax.block_until_ready(compiled(params, key))
    seconds = time.perf_counter() - start
    gnorm = float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(g))))
    if not np.isfinite(gnorm):
        raise SystemExit(f"gradient is not finite (norm {gnorm})")
    print(f"gradient computed in {seconds:.1f} s; global gradient norm {gnorm:.6g}")

    result = {
        "length": args.length,
        "cell": args.cell,
        "batch": args.batch,
        "input": args.input,
        "hidden": args.hidden,
        "dtype": "float32",
        "remat": str(remat),
        "plain_temp_bytes": plain.temp_bytes,
        "remat_temp_bytes": ours.temp_bytes,
        "argument_bytes": ours.argument_bytes,
        "machine_memory_bytes": total,
        "seconds": seconds,
        "grad_norm": gnorm,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "python": platform.python_version(),
    }
    if args.check:
        g_plain = jax.jit(grad["plain"])(params, key)
        err = max(
            float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
            for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_plain), strict=True)
        )
        print(f"relative difference to plain BPTT's gradient: {err:.2e}")
        result["max_rel_diff_to_plain"] = err
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "million_steps.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
