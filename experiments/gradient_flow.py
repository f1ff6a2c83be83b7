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

import dataclasses
import os
import sys

import jax

jax.config.update("jax_enable_x64", True)  # rho**T spans 1e-30 .. 1e17

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bpttjax as bj  # noqa: E402

try:  # python -m experiments.gradient_flow, or experiments/ is importable
    from experiments import _cli, _table
except ImportError:  # python experiments/gradient_flow.py in a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from experiments import _cli, _table

RHOS = (0.5, 0.9, 1.0, 1.1, 1.5)
KINDS = ("linear", "tanh")
QUICK = {"length": 40, "hidden": 8, "power_steps": 30}


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
    act = {"linear": lambda z: z, "tanh": jnp.tanh}[kind]

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


def measure(T: int, hidden: int) -> tuple[list[FlowRow], dict]:
    rows, curves = [], {}
    jobs = [(kind, rho) for kind in KINDS for rho in RHOS]
    for kind, rho in _cli.progress(jobs, total=len(jobs), desc="gradient flow"):
        norms = curves[(kind, rho)] = grad_norms(kind, rho, T, hidden)
        rows.append(
            FlowRow(
                rnn=kind,
                rho=rho,
                T=T,
                hidden=hidden,
                fitted_log_rate=fit_rate(norms),
                log_rho=float(np.log(rho)),
                norm_at_T=float(norms[-1]),
                norm_at_0=float(norms[0]),
            )  # fmt: skip
        )
    return rows, curves


def plot(curves, cosines, T: int, hidden: int, path: str) -> str:
    plt = _cli.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = dict(zip(RHOS, plt.cm.viridis(np.linspace(0, 0.9, len(RHOS))), strict=True))
    for (kind, rho), norms in curves.items():
        distance = np.arange(len(norms))[::-1]
        style = "-" if kind == "linear" else "--"
        ax1.semilogy(distance, norms, style, color=colors[rho], label=f"{kind}, ρ={rho}")
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
    fig.suptitle(f"T={T}, hidden={hidden}, float64, {jax.default_backend()}")
    return _cli.save_figure(fig, path)


def main(argv=None) -> None:
    p = _cli.parser(__doc__, quick="T=40, hidden 8: seconds")
    p.add_argument("--length", type=_cli.int_at_least(2), default=100)
    p.add_argument("--hidden", type=_cli.int_at_least(2), default=32)
    p.add_argument("--power-steps", type=_cli.int_at_least(2), default=400)
    args = _cli.parse(p, argv, QUICK)
    rows, curves = measure(args.length, args.hidden)
    cosines = power_iteration_cosines(args.hidden, args.power_steps)

    os.makedirs(args.out, exist_ok=True)
    _table.Table(os.path.join(args.out, "gradient_flow.csv"), FlowRow).write(rows)
    powers = [PowerRow(k, c) for k, c in enumerate(cosines.tolist())]
    _table.Table(os.path.join(args.out, "power_iteration.csv"), PowerRow).write(powers)
    png = plot(
        curves, cosines, args.length, args.hidden, os.path.join(args.out, "gradient_flow.png")
    )

    print(f"‖∂L_T/∂h_t‖ decay per step, T={args.length}, hidden={args.hidden} (float64)")
    print(f"{'rnn':<8}{'rho':>6}{'fitted':>12}{'log rho':>12}{'|dL/dh_0|':>12}")
    for r in rows:
        print(
            f"{r.rnn:<8}{r.rho:>6}{r.fitted_log_rate:>12.6f}{r.log_rho:>12.6f}{r.norm_at_0:>12.3e}"
        )
    print(
        f"power iteration: |cos| = {cosines[0]:.3f} at k=0, "
        f"{cosines[-1]:.6f} at k={len(cosines) - 1}"
    )
    print(f"wrote {args.out}/gradient_flow.csv, power_iteration.csv, {png}")


if __name__ == "__main__":
    main()
