"""The adding problem (experiments/tasks/adding.py) and experiments/long_range.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import study

from experiments import _cli
from experiments._table import Table
from experiments.tasks import adding

pytestmark = pytest.mark.slow  # its module fixture runs the script

SCRIPT = study.load("long_range")

BASELINE = adding.ADDING_BASELINE_MSE


def curves(out):
    rows = Table(out / "long_range.csv", SCRIPT.AddingRow).read()
    by_method = {}
    for r in rows:
        by_method.setdefault(r.method, []).append(r)
    return rows, by_method


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("long_range")
    study.run("long_range", ["--quick", "--out", out])
    return out, *curves(out)


def test_full_bptt_learns_truncated_does_not(quick_run):
    _, _, by_method = quick_run
    full, trunc = by_method["full BPTT"], by_method["Truncate(5)"]
    # --quick: T=50, min gap 12, held-out batch of 500 for seed 0
    _, target = adding.adding_eval_batch(0, 500, 50, "gap", 12)
    constant = float(jnp.mean((target - 1.0) ** 2))  # predicting 1 on the held-out batch
    # seed 0, T=50, 500 steps: full BPTT ends at 0.012·(1/6), Truncate(5) never
    # below 0.95 of the constant prediction; seeds 1-5: full ends at 0.02-0.15·(1/6),
    # truncated never below 0.97 of the constant (its floor is (1 - 2/38)·(1/6))
    trunc_best = min(r.eval_mse for r in trunc)
    assert full[-1].eval_mse < 0.25 * BASELINE, full[-1]
    assert trunc_best > 0.85 * constant, (trunc_best, constant)
    assert trunc_best > 4 * full[-1].eval_mse, (full[-1], trunc_best)
    # both start from the same parameters, near the constant prediction
    assert full[0].eval_mse == trunc[0].eval_mse
    assert abs(full[0].eval_mse - constant) < 0.02


def test_truncated_model_never_sees_a_marker(key):
    """Row 1 of W_x (the marker's input weights) starts at 0 and stays 0 under Truncate(k)."""
    T, M, k = 12, 4, 3
    params0 = adding.adding_params(key, 4, T, "chrono", marker_weights="zero")
    optimizer = optax.adam(1e-2)
    step = adding.adding_train_step(optimizer, 8, T, "gap", M, k)
    params, state = params0, optimizer.init(params0)
    for i in range(3):
        params, state, _ = step(params, state, jax.random.key(i))
    W_x, W_x0 = np.asarray(params["cell"]["W_x"]), np.asarray(params0["cell"]["W_x"])
    assert (W_x[1] == 0).all()  # zero at init, zero gradient ever since
    assert (W_x[0] != W_x0[0]).any()  # while the values' input weights learn


def test_files_written(quick_run):
    out, rows, by_method = quick_run
    evals = 500 // 25 + 1  # --quick: 500 steps, evaluated every 25 steps and at 0
    assert len(rows) == 2 * evals
    assert [r.method for r in rows] == ["full BPTT"] * evals + ["Truncate(5)"] * evals
    for mine in by_method.values():
        assert [r.step for r in mine] == list(range(0, 501, 25))
        walls = [r.wall_s for r in mine]
        assert walls == sorted(walls)
        assert np.isnan(mine[0].train_mse)
        assert all(0 <= r.train_mse < 1 for r in mine[1:])
    assert (out / "long_range.png").stat().st_size > 10_000


def test_killed_run_keeps_its_rows(tmp_path, monkeypatch):
    def interrupted(iterable, **kwargs):
        for step in iterable:
            if step == 13:
                raise KeyboardInterrupt
            yield step

    monkeypatch.setattr(_cli, "progress", interrupted)
    argv = "--length 12 --steps 40 --eval-every 5 --hidden 4 --batch 4 --eval-batch 8"
    with pytest.raises(KeyboardInterrupt):
        study.run("long_range", [*argv.split(), "--out", tmp_path])
    rows, _ = curves(tmp_path)
    assert [(r.method, r.step) for r in rows] == [("full BPTT", s) for s in (0, 5, 10)]


def test_gap_batches(key):
    T, M, B = 40, 10, 10_000
    xs, target = adding.adding_batch(key, B, T, "gap", M)
    assert xs.shape == (T, B, 2) and target.shape == (B,)
    assert xs.dtype == target.dtype == jnp.float32
    values, markers = np.asarray(xs[..., 0]), np.asarray(xs[..., 1])
    assert set(np.unique(markers)) == {0.0, 1.0}
    assert (markers.sum(axis=0) == 2).all()  # exactly two, distinct
    assert (markers[T - M :] == 0).all()  # none in the last M steps
    per_step = markers.sum(axis=1)[: T - M] / (2 * B)
    assert np.allclose(per_step, 1 / (T - M), rtol=0.15)  # uniform over [0, T - M)
    assert ((values >= 0) & (values < 1)).all()
    np.testing.assert_allclose(target, (values * markers).sum(axis=0), rtol=1e-6)
    assert float(jnp.mean((target - 1.0) ** 2)) == pytest.approx(1 / 6, abs=0.005)


def test_hochreiter_batches(key):
    T, B = 40, 5_000
    xs, target = adding.adding_batch(key, B, T, "hochreiter")
    markers = np.asarray(xs[..., 1])
    assert (markers.sum(axis=0) == 2).all()
    assert (markers[:10].sum(axis=0) >= 1).all()  # a marker among the first ten steps
    assert (markers[T // 2 - 1 :] == 0).all()  # both among the first T/2 - 1
    assert float(jnp.mean((target - 1.0) ** 2)) == pytest.approx(1 / 6, abs=0.01)


@pytest.mark.parametrize("placement", adding.PLACEMENTS)
def test_marker_blind_floor(key, placement):
    T, M, B = 12, 4, 40_000
    floor = adding.marker_blind_floor(T, placement, M)
    assert floor < BASELINE - 0.02
    xs, target = adding.adding_batch(key, B, T, placement, M)
    markers = np.asarray(xs[..., 1])
    a, b = adding.marker_region(T, placement, M)
    t = np.arange(T)
    p = (t < a) / a + (t < b) / (b - 1) * (1 - (t < a) / a)
    np.testing.assert_allclose(markers.mean(axis=1), p, atol=0.01)  # P(step t is marked)
    # E[target | values] = sum_t p_t v_t attains the floor
    guess = np.asarray(xs[..., 0]).T @ p
    assert np.mean((guess - np.asarray(target)) ** 2) == pytest.approx(floor, abs=0.004)


_grad_params_and_inputs = jax.jit(jax.grad(adding.adding_mse, argnums=(0, 1)), static_argnums=3)


@pytest.mark.parametrize("init", adding.INITS)
def test_truncated_gradient_never_reaches_a_marker(key, init):
    T, M, k, H = 30, 10, 10, 8
    params = adding.adding_params(key, H, T, init)
    xs, target = adding.adding_batch(jax.random.key(1), 16, T, "gap", M)

    def grads(truncate):
        return _grad_params_and_inputs(params, xs, target, truncate)

    (g_full, dxs_full), (g_trunc, dxs_trunc) = grads(None), grads(k)
    marked = np.asarray(xs[..., 1]) == 1
    # Truncate(10) over 30 steps: the loss only reaches steps 20..29; markers are < 20
    assert (np.asarray(dxs_trunc)[: T - k] == 0).all()
    assert (np.asarray(dxs_full)[..., 0][marked] != 0).all()
    # row 1 of W_x: the marker channel's input weights
    assert (np.asarray(g_trunc["cell"]["W_x"][1]) == 0).all()
    assert (np.asarray(g_full["cell"]["W_x"][1]) != 0).any()
    # inside the last window the two gradients agree
    np.testing.assert_allclose(dxs_trunc[T - k :], dxs_full[T - k :], rtol=1e-5, atol=1e-9)


def test_chrono_init(key):
    T, H = 200, 64
    b = np.asarray(adding.adding_params(key, H, T, "chrono")["cell"]["b"])
    b_i, b_f, b_g, b_o = np.split(b, 4)
    assert (b_f >= 0).all() and (b_f <= np.log(T - 1) + 1e-6).all()
    np.testing.assert_array_equal(b_i, -b_f)
    assert (b_g == 0).all() and (b_o == 0).all()


@pytest.mark.parametrize(
    "argv",
    [
        ["--length", "1"],
        ["--length", "3"],
        ["--length", "20", "--truncate", "20"],
        ["--length", "20", "--min-gap", "19"],
        ["--length", "5", "--placement", "hochreiter"],
        ["--lr", "0"],
        ["--steps", "0"],
    ],
)
def test_bad_arguments(tmp_path, argv):
    with pytest.raises(SystemExit):
        study.run("long_range", [*argv, "--out", tmp_path])
