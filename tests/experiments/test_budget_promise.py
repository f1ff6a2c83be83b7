"""experiments/budget_promise.py at tiny sizes, through its command line."""

import csv

import helpers
import jax
import jax.numpy as jnp

import bpttjax as bj
from experiments import budget_promise

LOSSES = helpers.GRID_LOSSES


def read(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_quick_run_keeps_the_promise_and_resumes(tmp_path):
    argv = ["--quick", "--lengths", "40", "--fractions", "0.01,0.3,1.2", "--out", str(tmp_path)]
    budget_promise.main(argv)
    path = tmp_path / "budget_promise.csv"
    rows = read(path)
    assert {(r["T"], r["loss"]) for r in rows} == {("40", x) for x in LOSSES}
    assert len(rows) == 3 * 3
    for r in rows:
        if r["status"] == "ok":
            assert int(r["temp_bytes"]) <= int(r["budget_bytes"]), r
            assert float(r["ratio"]) <= 1, r
        else:
            assert r["status"] == "too_small", r
            assert int(r["least_bytes"]) > int(r["budget_bytes"]), r
    assert {r["status"] for r in rows} == {"ok", "too_small"}
    big = [r for r in rows if float(r["fraction"]) == 1.2 and r["loss"] != "linear"]
    assert big and all(r["strategy"] == "StoreAll()" for r in big), big
    before = path.read_bytes()
    budget_promise.main(argv)  # every point is there: nothing is measured again
    assert path.read_bytes() == before


def test_its_losses_are_the_library_tests():
    """tests/test_budget.py keeps its own copy of the grid's losses (the library tests
    import nothing from experiments/): the two give the same steps and the same memory."""
    assert budget_promise.LOSSES == helpers.GRID_LOSSES
    cell, T, B, D, H = "gru", 30, 2, 3, 4
    params = bj.cells.init_gru(jax.random.key(0), D, H, jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (T, B, D), jnp.float64)
    h0 = bj.cells.initial_carry(cell, H, (B,), dtype=jnp.float64)
    for loss in LOSSES:
        got = budget_promise.step_for(cell, params, loss)
        want = helpers.grid_step(cell, params, loss)
        helpers.assert_trees_equal(got(h0, xs[0]), want(h0, xs[0]))
        # the same jaxpr, so the same program and memory under every strategy
        assert str(jax.make_jaxpr(got)(h0, xs[0])) == str(jax.make_jaxpr(want)(h0, xs[0]))
    for remat in (bj.StoreAll(), bj.Binomial(3)):  # and the measuring itself, once
        assert budget_promise.grad_temp(cell, "readme", remat, params, xs, H) == (
            helpers.grid_temp(cell, "readme", remat, params, xs, H)
        )
