"""Check jax.grad through bj.scan against d2l's closed-form BPTT formulas.

For the linear RNN of d2l section 9.7 (h_t = W_hx x_t + W_hh h_{t-1},
o_t = W_qh h_t, squared loss averaged over time), compute the gradient with
every registered remat strategy of bpttjax (the examples of each in
``bj.remat.examples()``) in float64 and compare it with the NumPy recursion in
``bpttjax.reference``. An example that refuses a length (``Nested`` with
fixed level lengths, a ``Budget`` too small for it) is skipped there, saying
so. Prints a table and writes ``gradient_check.csv`` under ``--out``.

    python experiments/gradient_check.py --lengths 10,100,1000
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bpttjax as bj  # noqa: E402

try:  # python -m experiments.gradient_check, or experiments/ is importable
    from experiments import _cli, _table
except ImportError:  # python experiments/gradient_check.py in a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from experiments import _cli, _table

QUICK = {"lengths": [5, 17]}
TOLERANCE = 1e-10


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


def label(strategy: bj.RematStrategy) -> str:
    """``Nested(levels=3)``, ``EveryStep(dots_saveable)``: the class and its set fields.

    The first field is always shown, the others when not None and not at
    their default; a ``jax.checkpoint_policies`` value by its name.
    """
    if not dataclasses.is_dataclass(strategy):
        return repr(strategy)
    policies = {}
    for name, value in vars(jax.checkpoint_policies).items():
        policies.setdefault(id(value), name)  # the first of aliases: dots_saveable
    shown = []
    for i, field in enumerate(dataclasses.fields(strategy)):
        value = getattr(strategy, field.name)
        if value is None or (i > 0 and value == field.default):
            continue
        shown.append(policies.get(id(value)) or f"{field.name}={value!r}")
    return type(strategy).__name__ + (f"({', '.join(shown)})" if shown else "")


def linear_loss(remat, params, h0, xs, ys):
    def step(h, x):
        h = params["W_hx"] @ x + params["W_hh"] @ h
        return h, params["W_qh"] @ h

    _, os_ = bj.scan(step, h0, xs, remat=remat)
    return 0.5 * jnp.mean(jnp.sum((os_ - ys) ** 2, axis=-1))


def rel_err(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def make_problem(rng, hidden: int, input_size: int, output: int, radius: float) -> dict:
    q_mat, _ = np.linalg.qr(rng.standard_normal((hidden, hidden)))
    return {
        "W_hx": rng.standard_normal((hidden, input_size)) / np.sqrt(input_size),
        "W_hh": radius * q_mat,
        "W_qh": rng.standard_normal((output, hidden)) / np.sqrt(hidden),
    }


def check(T: int, remat, params, h0, xs, ys, ref) -> CheckRow:
    """Compile, run once, time a second run and compare with d2l's gradients."""
    grad = jax.jit(jax.grad(functools.partial(linear_loss, remat), argnums=(0, 1)))
    jparams = jax.tree.map(jnp.asarray, params)
    g_params, g_h0 = jax.block_until_ready(grad(jparams, h0, xs, ys))
    start = time.perf_counter()
    jax.block_until_ready(grad(jparams, h0, xs, ys))
    return CheckRow(
        T=T,
        strategy=label(remat),
        err_W_hx=rel_err(g_params["W_hx"], ref.dL_dW_hx),
        err_W_hh=rel_err(g_params["W_hh"], ref.dL_dW_hh),
        err_W_qh=rel_err(g_params["W_qh"], ref.dL_dW_qh),
        err_h0=rel_err(g_h0, ref.dL_dh0),
        seconds=time.perf_counter() - start,
        backend=jax.default_backend(),
        jax=jax.__version__,
        python=platform.python_version(),
    )


def sweep(lengths, hidden, input_size, output, radius) -> list[CheckRow]:
    rng = np.random.default_rng(0)
    params = make_problem(rng, hidden, input_size, output, radius)
    h0 = rng.standard_normal(hidden)
    rows = []
    for T in lengths:
        xs = rng.standard_normal((T, input_size))
        ys = rng.standard_normal((T, output))
        _, ref = bj.reference.linear_rnn_squared_loss(
            params["W_hx"], params["W_hh"], params["W_qh"], xs, ys, h0
        )
        for remat in bj.remat.examples():
            try:
                rows.append(check(T, remat, params, h0, xs, ys, ref))
            except ValueError as err:  # the example does not apply at this length
                print(f"skipped {label(remat)} at T={T}: {' '.join(str(err).split())}")
    return rows


def main(argv=None) -> None:
    p = _cli.parser(__doc__, quick="two short lengths (smoke test)")
    p.add_argument("--lengths", type=_cli.lengths, default=[10, 100, 1000])
    p.add_argument("--hidden", type=_cli.positive_int, default=32)
    p.add_argument("--input", type=_cli.positive_int, default=8)
    p.add_argument("--output", type=_cli.positive_int, default=4)
    p.add_argument("--radius", type=float, default=0.95, help="spectral radius of W_hh")
    args = _cli.parse(p, argv, QUICK)
    rows = sweep(args.lengths, args.hidden, args.input, args.output, args.radius)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gradient_check.csv")
    _table.Table(path, CheckRow).write(rows)

    print("Relative error of jax.grad through bj.scan vs d2l's formulas (float64)")
    w = max(26, *(len(r.strategy) + 2 for r in rows))
    print(f"{'T':>6}  {'strategy':<{w}}{'W_hx':>10}{'W_hh':>10}{'W_qh':>10}{'h0':>10}")
    for r in rows:
        print(
            f"{r.T:>6}  {r.strategy:<{w}}{r.err_W_hx:>10.1e}{r.err_W_hh:>10.1e}"
            f"{r.err_W_qh:>10.1e}{r.err_h0:>10.1e}"
        )
    worst = max(max(r.err_W_hx, r.err_W_hh, r.err_W_qh, r.err_h0) for r in rows)
    print(f"worst relative error: {worst:.2e}  (wrote {path})")
    if worst > TOLERANCE:
        raise SystemExit(f"gradient check FAILED: worst relative error {worst:.2e} > {TOLERANCE}")


if __name__ == "__main__":
    main()
