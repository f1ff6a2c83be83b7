"""experiments/gradient_flow.py: the fitted decay rates are d2l's log ρ."""

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import gradient_flow  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gradient_flow")
    return out, gradient_flow.main(["--quick", "--out", str(out)])


def test_linear_rnn_decays_at_log_rho(quick_run):
    _, result = quick_run
    linear = [r for r in result["rows"] if r["rnn"] == "linear"]
    assert sorted(r["rho"] for r in linear) == sorted(gradient_flow.RHOS)
    for r in linear:
        assert abs(r["fitted_log_rate"] - np.log(r["rho"])) < 1e-9, r


def test_tanh_rnn_never_decays_slower_than_linear(quick_run):
    _, result = quick_run
    rate = {(r["rnn"], r["rho"]): r["fitted_log_rate"] for r in result["rows"]}
    for rho in gradient_flow.RHOS:
        # |tanh'| <= 1 only ever shrinks the product of Jacobians
        assert rate[("tanh", rho)] <= rate[("linear", rho)] + 1e-9


def test_power_iteration_aligns_with_leading_eigenvector(quick_run):
    _, result = quick_run
    cos = result["cosines"]
    assert cos[0] < 0.99
    assert cos[-1] > 1 - 1e-6


def test_files_written(quick_run):
    out, result = quick_run
    rows = list(csv.DictReader((out / "gradient_flow.csv").read_text().splitlines()))
    assert len(rows) == 2 * len(gradient_flow.RHOS)
    assert (out / "gradient_flow.png").stat().st_size > 10_000
    lines = (out / "power_iteration.csv").read_text().splitlines()
    assert len(lines) == len(result["cosines"]) + 1


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        gradient_flow.main(["--length", "1", "--out", str(tmp_path)])
