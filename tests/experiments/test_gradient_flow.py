"""experiments/gradient_flow.py: the fitted decay rates are d2l's log ρ."""

import numpy as np
import pytest
import study

from experiments._table import Table

SCRIPT = study.load("gradient_flow")

RHOS = (0.5, 0.9, 1.0, 1.1, 1.5)  # the script's


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gradient_flow")
    study.run("gradient_flow", ["--quick", "--out", out])
    rows = Table(out / "gradient_flow.csv", SCRIPT.FlowRow).read()
    powers = Table(out / "power_iteration.csv", SCRIPT.PowerRow).read()
    return out, rows, [p.abs_cosine_to_leading_eigenvector for p in powers]


def test_linear_rnn_decays_at_log_rho(quick_run):
    _, rows, _ = quick_run
    linear = [r for r in rows if r.rnn == "linear"]
    assert sorted(r.rho for r in linear) == sorted(RHOS)
    for r in linear:
        assert abs(r.fitted_log_rate - np.log(r.rho)) < 1e-9, r


def test_tanh_rnn_never_decays_slower_than_linear(quick_run):
    _, rows, _ = quick_run
    rate = {(r.rnn, r.rho): r.fitted_log_rate for r in rows}
    for rho in RHOS:
        # |tanh'| <= 1 only ever shrinks the product of Jacobians
        assert rate[("tanh", rho)] <= rate[("linear", rho)] + 1e-9


def test_power_iteration_aligns_with_leading_eigenvector(quick_run):
    _, _, cos = quick_run
    assert cos[0] < 0.99
    assert cos[-1] > 1 - 1e-6


def test_files_written(quick_run):
    out, rows, cos = quick_run
    assert len(rows) == 2 * len(RHOS)
    assert {(r.T, r.hidden) for r in rows} == {(40, 8)}  # --quick
    assert (out / "gradient_flow.png").stat().st_size > 10_000
    assert len(cos) == 30 + 1  # k = 0 .. --power-steps


@pytest.mark.parametrize("argv", [["--length", "1"], ["--power-steps", "x"]])
def test_bad_arguments(tmp_path, argv):
    with pytest.raises(SystemExit):
        study.run("gradient_flow", [*argv, "--out", tmp_path])
