"""A gradient through a 1,000,000-step sequence on a laptop-sized machine.

The benchmark model of ``experiments/_model.py`` (tanh RNN by default, batch
32, input 64, hidden 256, float32, per-step loss) is run for ``--length``
steps. Its inputs are generated inside the step from ``fold_in(key, t)``, so
the 8 GB an explicit ``xs`` would take at T = 10^6 are not needed and the only
large memory is what BPTT itself keeps.

The script first compiles (without running) plain BPTT (``bj.StoreAll()``,
identical to ``lax.scan`` + ``jax.grad``) and the chosen strategy (``--remat``,
any spec ``bj.remat.from_string`` reads) and prints their planned temporary
memory next to the machine's memory; then it runs the chosen strategy's
gradient once and reports the time. Results go to
``<out>/million_steps.json``.

    python experiments/million_steps.py                    # T = 10^6, Nested(3)
    python experiments/million_steps.py --length 20000 --check
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

import bpttjax as bj

try:  # python -m experiments.million_steps, or experiments/ is importable
    from experiments import _cli, _harness, _model
except ImportError:  # python experiments/million_steps.py in a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from experiments import _cli, _harness, _model

QUICK = {"length": 37, "batch": 2, "input": 3, "hidden": 4}
GIB = 2.0**30


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
    step = _model.make_step(cell, params)
    hidden = params["W_out"].shape[0]
    dtype = params["W_out"].dtype

    def f(state, _):
        carry, t = state
        x = jax.random.normal(jax.random.fold_in(key, t), (batch, input_size), dtype)
        carry, loss_t = step(carry, x)
        return (carry, t + 1), loss_t

    h0 = bj.cells.get(cell).initial_carry(hidden, (batch,), dtype=dtype)
    init = (h0, jnp.zeros((), jnp.int32))
    _, losses = bj.scan(f, init, None, length=length, remat=remat)
    return jnp.mean(losses)


def report_memory(args, plain, ours, total) -> None:
    print(
        f"T = {args.length:,} steps, {args.cell}, B={args.batch}, D={args.input}, "
        f"H={args.hidden}, float32, {jax.default_backend()}"
    )
    if total:
        print(f"machine memory:                          {total / GIB:8.2f} GiB")
    print(
        f"plain BPTT (lax.scan + jax.grad) temp:   {plain.temp_bytes / GIB:8.2f} GiB (compiled, "
        "not run)"
    )
    print(
        f"{args.remat} temp:                       {ours.temp_bytes / GIB:8.4f} GiB "
        f"({ours.temp_bytes / 2**20:.1f} MiB)"
    )
    if total and plain.temp_bytes <= total and not args.check:
        print("note: plain BPTT would fit in this machine's memory at this length")


def global_norm(tree) -> float:
    return float(
        np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
    )


def max_rel_diff(a, b) -> float:
    return max(
        float(jnp.linalg.norm(x - y) / jnp.linalg.norm(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def main(argv=None) -> dict:
    p = _cli.parser(__doc__, quick="tiny sizes (smoke test)")
    p.add_argument("--length", type=_cli.positive_int, default=1_000_000)
    _cli.add_model_options(p)
    _cli.add_remat_option(p, "nested:3")
    p.add_argument(
        "--check",
        action="store_true",
        help="also run plain BPTT at this length and compare the gradients (short T only)",
    )
    args = _cli.parse(p, argv, QUICK)
    remat = bj.remat.from_string(args.remat)
    kw = dict(cell=args.cell, length=args.length, batch=args.batch, input_size=args.input)
    params = _model.init_model(jax.random.key(0), args.cell, args.input, args.hidden)
    key = jax.random.key(1)
    plain_grad = jax.grad(functools.partial(stream_loss, remat=bj.StoreAll(), **kw))
    grad = jax.grad(functools.partial(stream_loss, remat=remat, **kw))
    plain = bj.memory.measure(plain_grad, params, key)
    ours = bj.memory.measure(grad, params, key)
    total = machine_memory_bytes()
    report_memory(args, plain, ours, total)

    compiled = jax.jit(grad).lower(params, key).compile()
    out = []
    call = {"grad": lambda: out.append(jax.block_until_ready(compiled(params, key)))}
    seconds = _harness.time_rounds(call, repeats=1)["grad"]  # one call: T may be 10^6
    if isinstance(seconds, BaseException):
        raise seconds
    g, seconds = out[0], seconds[0]
    gnorm = global_norm(g)
    if not np.isfinite(gnorm):
        raise SystemExit(f"gradient is not finite (norm {gnorm})")
    print(f"gradient computed in {seconds:.1f} s; global gradient norm {gnorm:.6g}")

    result = {
        "length": args.length, "cell": args.cell, "batch": args.batch, "input": args.input,
        "hidden": args.hidden, "dtype": "float32", "remat": str(remat),
        "plain_temp_bytes": plain.temp_bytes, "remat_temp_bytes": ours.temp_bytes,
        "argument_bytes": ours.argument_bytes, "machine_memory_bytes": total,
        "seconds": seconds, "grad_norm": gnorm, "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind, "jax_version": jax.__version__,
        "python": platform.python_version(),
    }  # fmt: skip
    if args.check:
        err = max_rel_diff(g, jax.jit(plain_grad)(params, key))
        print(f"relative difference to plain BPTT's gradient: {err:.2e}")
        result["max_rel_diff_to_plain"] = err
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "million_steps.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
