"""experiments/gpu_check.py at tiny sizes: the control flow each strategy compiles to agrees
with the host events its cost states; --predict applies the time model."""

import math

import pytest
import study

import bpttjax as bj
from experiments._table import Table

gpu_check = study.load("gpu_check")
QUICK_METHODS = gpu_check.methods(sorted(gpu_check.QUICK["budgets"], reverse=True))


def run(*argv):
    study.run("gpu_check", ["--quick", *map(str, argv)])


def test_quick_run_measures_every_strategy(tmp_path):
    """One cell measured (each compile costs about a second on a shared CPU); the other
    cells take the same path, and the prediction below covers all three."""
    run("--cells", "lstm", "--out", tmp_path)
    rows = Table(tmp_path / gpu_check.CSV_NAME, gpu_check.GpuRow).read()
    assert [r.method for r in rows] == QUICK_METHODS
    by = {r.method: r for r in rows}
    for r in rows:
        assert r.status == "ok", r
        assert (r.cell, r.T, r.batch, r.input, r.hidden) == ("lstm", 24, 2, 4, 8)
        assert r.repeats == 2 and 0 < r.min_ms <= r.time_ms, r
        assert r.temp_bytes > 0 and r.while_loops >= 1, r
        assert r.host_events is not None, r  # a budget's choice was identified
        if r.host_events == 0:  # what the cost claims, the compiled program keeps
            assert r.unknown_trip_loops == 0 and r.conditionals == 0, r
    for name in ("bj.StoreAll", "bj.Nested(2)", "bj.Nested(3)"):
        assert by[name].host_events == 0
    for name in ("bj.Binomial(10, static)", "bj.Binomial(44, static)"):
        row = by[name]
        assert row.host_events == row.unknown_trip_loops == row.conditionals == 0, row
    dynamic = by["bj.Binomial(10)"]
    assert dynamic.host_events > 0 and dynamic.unknown_trip_loops > 0
    assert by["bj.StoreAll"].vs_store_all == 1.0 and by["bj.StoreAll"].memory_vs_plain == 1.0
    for name in QUICK_METHODS[len(gpu_check.FIXED) :]:
        assert by[name].chosen and by[name].temp_bytes <= by[name].budget_bytes, by[name]
    assert (tmp_path / gpu_check.PNG_NAME).stat().st_size > 0


def test_predict_applies_the_time_model_to_every_cell(tmp_path, capsys):
    run("--predict", "10,17,20", "--out", tmp_path)
    out = capsys.readouterr().out
    assert "predicted with 10 µs per step, 17 µs per pullback, 20 µs per host event" in out
    rows = Table(tmp_path / gpu_check.PREDICTED_CSV, gpu_check.GpuRow).read()
    assert [(r.cell, r.method) for r in rows] == [
        (c, m) for c in bj.cells.CELLS if c in ("rnn", "gru", "lstm") for m in QUICK_METHODS
    ]
    timing = bj.budget.Timing(10e-6, 17e-6, 20e-6)
    for r in rows:
        assert r.while_loops is None and math.isnan(r.time_ms), r  # nothing was run
        if r.status != "ok":
            assert r.status == "too small" and "Budget(" in r.note, r
            continue
        strategy = {name: s for name, s in gpu_check.FIXED}.get(r.method)
        if strategy is not None:
            assert r.host_events == strategy.cost(r.T, bj.memory.StepCosts(1, 1)).host_events
        cost = bj.remat.Cost(0, r.recomputed_steps, r.host_events, r.wasted_pullbacks)
        assert r.predicted_ms == pytest.approx(1e3 * timing.seconds(r.T, cost)), r
    by = {(r.cell, r.method): r for r in rows}
    assert by["rnn", "bj.StoreAll"].predicted_ms == pytest.approx(24 * 27e-3)
    assert by["rnn", "bj.Binomial(10)"].host_events > 0
    slow, fast = by["rnn", "bj.Binomial(10)"], by["rnn", "bj.Binomial(10, static)"]
    assert slow.predicted_ms > fast.predicted_ms  # the host events cost more than the waste


@pytest.mark.parametrize("text", ["10,17", "a,b,c", "10,17,-1", "10,17,20,1", ""])
def test_bad_predict_input_is_refused_by_name(text, capsys):
    with pytest.raises(SystemExit):
        run("--predict", text)
    err = capsys.readouterr().err
    assert "--predict" in err and "FORWARD_US,VJP_US,HOST_US" in err and repr(text) in err
