"""experiments/gradient_check.py: every registered strategy against d2l's formulas."""

import pytest
import study

import bpttjax as bj
from experiments._table import Table


def test_every_registered_strategy_matches_d2l(tmp_path, capsys):
    study.run("gradient_check", ["--lengths", "7", "--out", tmp_path])
    rows = Table(tmp_path / "gradient_check.csv", study.load("gradient_check").CheckRow).read()
    checked = {r.strategy.split("(")[0] for r in rows}
    assert checked == {cls.__name__ for cls in bj.remat.STRATEGIES.values()}
    assert len(rows) == len(bj.remat.examples())
    for r in rows:
        assert r.T == 7 and max(r.err_W_hx, r.err_W_hh, r.err_W_qh, r.err_h0) < 1e-10, r
    assert "worst relative error" in capsys.readouterr().out


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        study.run("gradient_check", ["--lengths", "0", "--out", tmp_path])
