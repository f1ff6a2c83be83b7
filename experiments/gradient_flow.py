"""Vanishing and exploding gradients through powers of W_hh (d2l 9.7).

For a linear RNN ``h_t = W_hx x_t + W_hh h_{t-1}`` the gradient of a loss on
the last state reaches ``h_t`` through ``(W_hhᵀ)^(T-t)`` (d2l eq. 9.7.15), so
with ``W_hh = ρ·Q`` (``Q`` orthogonal) its norm is exactly
``ρ^(T-t)·‖∂L/∂h_T‖``: it decays (ρ < 1) or grows (ρ > 1) geometrically, at
``log ρ`` per step. A tanh RNN multiplies in ``diag(1 - h_t²)`` as well, which
only shrinks it further. The script measures ``‖∂L_T/∂h_t‖`` against ``T - t``
for both, with ``bj.diagnostics.carry_grads`` (all steps in one backward pass),
fits the decay rate per step, and checks d2l's exercise that ``M^k x`` aligns
with the leading eigenvector of a symmetric ``M`` as ``k`` grows.

Writes ``gradient_flow.csv``, ``power_iteration.csv`` and
``gradient_flow.png`` under ``--out``.

    python experiments/gradient_flow.py            # T = 100, hidden 32
    python experiments/gradient_flow.py --quick    # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import csv
import os

import jax

jax.config.update("jax_enable_x64", True)  # rho**T spans 1e-30 .. 1e17

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bpttjax as bj  # noqa: E402

try:
    from experiments.common import parse_with_quick, progress, save_figure, write_csv
except ImportError:  # run as a script: experiments/ is on sys.path
    from common import parse_with_quick, progress, save_figure, write_csv

RHOS = (0.5, 0.9, 1.0, 1.1, 1.5)


def orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def grad_norms(kind: str, rho: float, T: int, hidden: int, seed: int = 0) -> np.ndarray:
    """‖∂L_T/∂h_t‖ for t = 0..T-1 (index t: the carry after step t)."""
    rng = np.random.default_rng(seed)
    w_hh = jnp.asarray(rho * orthogonal(rng, hidden))
    w_hx = jnp.asarray(rng.standard_normal((hidden, 4)) / 2.0)
    xs = jnp.asarray(rng.standard_normal((T, 4)))
    c = jnp.asarray(rng.standard_normal(hidden))
    act = (lambda z: z) if kind == "linear" else jnp.tanh

    def step(h, x):
        h = act(w_hx @ x + w_hh @ h)
        return h, None

    loss = lambda h_T, ys: c @ h_T
    _, grads = bj.diagnostics.carry_grads(step, jnp.zeros(hidden), xs, loss)
    return np.linalg.norm(np.asarray(grads), axis=-1)


def fit_rate(norms: np.ndarray) -> float:
    """Least-squares slope of log‖∂L/∂h_t‖ against the distance T-1-t."""
    distance = np.arange(len(norms))[::-1]
    ok = norms > 0
    slope, _ = np.polyfit(distance[ok], np.log(norms[ok]), 1)
    return float(slope)


def power_iteration_cosines(n: int, steps: int, seed: int = 0) -> np.ndarray:
    """|cos| between M^k x and the leading eigenvector of a symmetric M, k = 0..steps."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n))
    m = (a + a.T) / 2.0
    vals, vecs = np.linalg.eigh(m)
    lead = vecs[:, np.argmax(np.abs(vals))]
    v = rng.standard_normal(n)
    out = []
    for _ in range(steps + 1):
        out.append(abs(v @ lead) / np.linalg.norm(v))
        v = m @ v
        v /= np.linalg.norm(v)  # rescale only: the direction is M^k x
    return np.asarray(out)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--power-steps", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="T=40, hidden 8: seconds")
    parser.add_argument("--backend", choices=("cpu", "gpu", "tpu"), default=None)
    parser.add_argument("--out", default="results")
    args = parse_with_quick(parser, argv, {"length": 40, "hidden": 8, "power_steps": 30})
    for name in ("length", "hidden", "power_steps"):
        if getattr(args, name) < 2:
            parser.error(f"--{name.replace('_', '-')} must be >= 2, got {getattr(args, name)}")
    if args.backend:
        jax.config.update("jax_platforms", args.backend)

    rows, curves = [], {}
    jobs = [(kind, rho) for kind in ("linear", "tanh") for rho in RHOS]
    for kind, rho in progress(jobs, total=len(jobs), desc="gradient flow"):
        norms = grad_norms(kind, rho, args.length, args.hidden)
        curves[(kind, rho)] = norms
        rate = fit_rate(norms)
        rows.append(
            {
                "rnn": kind,
                "rho": rho,
                "T": args.length,
                "hidden": args.hidden,
                "fitted_log_rate": rate,
                "log_rho": float(np.log(rho)),
                "norm_at_T": float(norms[-1]),
                "norm_at_0": float(norms[0]),
            }
        )
    cosines = power_iteration_cosines(args.hidden, args.power_steps)

    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "gradient_flow.csv"), rows)
    with open(os.path.join(args.out, "power_iteration.csv"), "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["k", "abs_cosine_to_leading_eigenvector"])
        writer.writerows(enumerate(cosines.tolist()))
    png = plot(curves, cosines, args, os.path.join(args.out, "gradient_flow.png"))

    print(f"‖∂L_T/∂h_t‖ decay per step, T={args.length}, hidden={args.hidden} (float64)")
    print(f"{'rnn':<8}{'rho':>6}{'fitted':>12}{'log rho':>12}{'|dL/dh_0|':>12}")
    for r in rows:
        print(
            f"{r['rnn']:<8}{r['rho']:>6}{r['fitted_log_rate']:>12.6f}{r['log_rho']:>12.6f}"
            f"{r['norm_at_0']:>12.3e}"
        )
    print(
        f"power iteration: |cos| = {cosines[0]:.3f} at k=0, "
        f"{cosines[-1]:.6f} at k={len(cosines) - 1}"
    )
    print(f"wrote {args.out}/gradient_flow.csv, power_iteration.csv, {png}")
    return {"rows": rows, "cosines": cosines}


def plot(curves, cosines, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = dict(zip(RHOS, plt.cm.viridis(np.linspace(0, 0.9, len(RHOS))), strict=True))
    for (kind, rho), norms in curves.items():
        distance = np.arange(len(norms))[::-1]
        ax1.semilogy(
            distance,
            norms,
            "-" if kind == "linear" else "--",
            color=colors[rho],
            label=f"{kind}, ρ={rho}",
        )
    ax1.set_xlabel("T − t (steps back from the loss)")
    ax1.set_ylabel("‖∂L_T/∂h_t‖")
    ax1.set_title("gradient norm through powers of W_hh = ρ·Q")
    ax1.legend(fontsize=7, ncol=2)
    ax1.grid(True, which="both", alpha=0.3)
    ax2.plot(np.arange(len(cosines)), cosines, marker=".")
    ax2.set_xlabel("k")
    ax2.set_ylabel("|cos(M^k x, leading eigenvector)|")
    ax2.set_title("d2l exercise: M^k x aligns with the leading eigenvector")
    ax2.set_ylim(0, 1.05)
    ax2.grid(True, alpha=0.3)
    fig.suptitle(f"T={args.length}, hidden={args.hidden}, float64, {jax.default_backend()}")
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
