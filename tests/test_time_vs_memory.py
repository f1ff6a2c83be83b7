"""Smoke test of experiments/time_vs_memory.py at tiny sizes (run in-process)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))

import memory_vs_length as mvl  # noqa: E402
import time_vs_memory as tvm  # noqa: E402


def test_quick_run_writes_points_and_the_budget_sweep(tmp_path):
    argv = ["--quick", "--lengths", "40", "--fractions", "0.0001,0.5,2", "--out", str(tmp_path)]
    result = tvm.main(argv)
    rows = {r["method"]: r for r in result["rows"]}
    for name in mvl.METHOD_NAMES:
        assert rows[name]["status"] == "ok", rows[name]
    plain = int(rows[mvl.BASELINE]["temp_bytes"])
    tiny, half, double = (rows[f"bj.Budget({f:.2%} of plain)"] for f in (0.0001, 0.5, 2))
    assert tiny["status"] == "error" and "would work" in tiny["note"]
    for row, fraction in ((half, 0.5), (double, 2)):
        assert row["status"] == "ok" and row["timed"] == "True"
        assert int(row["temp_bytes"]) <= fraction * plain
    assert os.path.getsize(result["png"]) > 0
    # a re-run skips the length already measured
    assert tvm.main(argv)["rows"] == result["rows"]
