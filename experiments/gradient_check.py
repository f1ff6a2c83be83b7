"""Check jax.grad through bj.scan against d2l's closed-form BPTT formulas.

For the linear RNN of d2l section 9.7 (h_t = W_hx x_t + W_hh h_{t-1},
o_t = W_qh h_t, squared loss averaged over time), compute the gradient with
every remat strategy of bpttjax in float64 and compare it with the NumPy
recursion in ``bpttjax.reference``. Prints a table and writes
``gradient_check.csv`` under ``--out``.

    python experiments/gradient_check.py --lengths 10,100,1000
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bpttjax as bj  # noqa: E402

try:
    from experiments.common import write_csv
except ImportError:  # run as a script: experiments/ is on sys.path
    from common import write_csv

STRATEGIES = {
    "StoreAll": bj.StoreAll(),
    "EveryStep": bj.EveryStep(),
    "EveryStep(dots_saveable)": bj.EveryStep(jax.checkpoint_policies.dots_saveable),
}


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--lengths expects comma-separated positive ints, got {text!r}"
        ) from None
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"--lengths expects positive ints, got {text!r}")
    return lengths


def linear_loss(remat, params, h0, xs, ys):
    def step(h, x):
        h = params["W_hx"] @ x + params["W_hh"] @ h
        return h, params["W_qh"] @ h

    _, os_ = bj.scan(step, h0, xs, remat=remat)
    return 0.5 * jnp.mean(jnp.sum((os_ - ys) ** 2, axis=-1))


def rel_err(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=parse_lengths, default=[10, 100, 1000])
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--input", type=int, default=8)
    parser.add_argument("--output", type=int, default=4)
    parser.add_argument("--radius", type=float, default=0.95, help="spectral radius of W_hh")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    for name in ("hidden", "input", "output"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive int, got {getattr(args, name)}")

    rng = np.random.default_rng(0)
    q_mat, _ = np.linalg.qr(rng.standard_normal((args.hidden, args.hidden)))
    params = {
        "W_hx": rng.standard_normal((args.hidden, args.input)) / np.sqrt(args.input),
        "W_hh": args.radius * q_mat,
        "W_qh": rng.standard_normal((args.output, args.hidden)) / np.sqrt(args.hidden),
    }
    h0 = rng.standard_normal(args.hidden)
    rows = []
    for T in args.lengths:
        xs = rng.standard_normal((T, args.input))
        ys = rng.standard_normal((T, args.output))
        _, ref = bj.reference.linear_rnn_squared_loss(
            params["W_hx"], params["W_hh"], params["W_qh"], xs, ys, h0
        )
        for name, remat in STRATEGIES.items():
            grad = jax.jit(jax.grad(functools.partial(linear_loss, remat), argnums=(0, 1)))
            jparams = jax.tree.map(jnp.asarray, params)
            g_params, g_h0 = jax.block_until_ready(grad(jparams, h0, xs, ys))
            start = time.perf_counter()
            jax.block_until_ready(grad(jparams, h0, xs, ys))
            seconds = time.perf_counter() - start
            row = {
                "T": T,
                "strategy": name,
                "err_W_hx": rel_err(g_params["W_hx"], ref.dL_dW_hx),
                "err_W_hh": rel_err(g_params["W_hh"], ref.dL_dW_hh),
                "err_W_qh": rel_err(g_params["W_qh"], ref.dL_dW_qh),
                "err_h0": rel_err(g_h0, ref.dL_dh0),
                "seconds": seconds,
                "backend": jax.default_backend(),
                "jax": jax.__version__,
                "python": platform.python_version(),
            }
            rows.append(row)

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gradient_check.csv")
    write_csv(path, rows)

    print("Relative error of jax.grad through bj.scan vs d2l's formulas (float64)")
    print(f"{'T':>6}  {'strategy':<26}{'W_hx':>10}{'W_hh':>10}{'W_qh':>10}{'h0':>10}")
    for r in rows:
        print(
            f"{r['T']:>6}  {r['strategy']:<26}{r['err_W_hx']:>10.1e}{r['err_W_hh']:>10.1e}"
            f"{r['err_W_qh']:>10.1e}{r['err_h0']:>10.1e}"
        )
    worst = max(max(r[k] for k in r if k.startswith("err_")) for r in rows)
    print(f"worst relative error: {worst:.2e}  (wrote {path})")
    if worst > 1e-10:
        raise SystemExit(f"gradient check FAILED: worst relative error {worst:.2e} > 1e-10")
    return rows


if __name__ == "__main__":
    main()
