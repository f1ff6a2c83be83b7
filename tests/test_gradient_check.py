"""experiments/gradient_check.py: every registered strategy against d2l's formulas."""

import pytest

import bpttjax as bj
from experiments import common


def test_every_registered_strategy_matches_d2l(tmp_path, capsys):
    common.run("gradient_check", ["--lengths", "7", "--out", tmp_path])
    rows = common.Table(tmp_path / "gradient_check.csv", common.CheckRow).read()
    checked = {r.strategy.split("(")[0] for r in rows}
    assert checked == {cls.__name__ for cls in bj.remat.STRATEGIES.values()}
    assert len(rows) == len(bj.remat.examples())
    for r in rows:
        assert r.T == 7 and max(r.err_W_hx, r.err_W_hh, r.err_W_qh, r.err_h0) < 1e-10, r
    assert "worst relative error" in capsys.readouterr().out


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        common.run("gradient_check", ["--lengths", "0", "--out", tmp_path])
