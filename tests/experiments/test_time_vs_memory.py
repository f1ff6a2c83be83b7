"""experiments/time_vs_memory.py at tiny sizes, through its command line."""

import pytest
import study

from experiments._harness import BASELINE
from experiments._methods import METHODS
from experiments._sweep import MemoryRow
from experiments._table import Table

pytestmark = pytest.mark.slow  # its module fixture runs the script

NAMES = tuple(m.name for m in METHODS if m.has_model)


def test_quick_run_writes_points_and_the_budget_sweep(tmp_path):
    argv = ["--quick", "--lengths", "40", "--fractions", "0.0001,0.5,2", "--out", tmp_path]
    study.run("time_vs_memory", argv)
    table = Table(tmp_path / "time_vs_memory.csv", MemoryRow)
    rows = {r.method: r for r in table.read()}
    for name in NAMES:
        assert rows[name].status == "ok", rows[name]
    plain = rows[BASELINE].temp_bytes
    tiny, half, double = (rows[f"bj.Budget({f:.2%} of plain)"] for f in (0.0001, 0.5, 2))
    assert tiny.status == "error" and "would work" in tiny.note
    for row, fraction in ((half, 0.5), (double, 2)):
        assert row.status == "ok" and row.timed
        assert row.temp_bytes <= fraction * plain
    assert (tmp_path / "time_vs_memory.png").stat().st_size > 0
    # a re-run skips the length already measured
    before = (tmp_path / "time_vs_memory.csv").read_bytes()
    study.run("time_vs_memory", argv)
    assert (tmp_path / "time_vs_memory.csv").read_bytes() == before
