"""experiments/memory_vs_length.py at tiny sizes, through its command line."""

import dataclasses
import math
import sys

import jax
import pytest
import study

from experiments._harness import BASELINE
from experiments._sweep import MemoryRow
from experiments._table import Table

pytestmark = pytest.mark.slow  # its module fixture runs the script

SCRIPT = study.load("memory_vs_length")
NAMES = tuple(m.name for m in SCRIPT.METHODS)
"""The methods of the study, and its CSV's method column."""

TINY = ["--batch", "2", "--input", "3", "--hidden", "4", "--repeats", "1"]


def run(*argv):
    study.run("memory_vs_length", [*TINY, *argv])


def rows(out):
    return Table(out / "memory_vs_length.csv", MemoryRow).read()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    run("--lengths", "5,7", "--out", out)
    return out


def test_every_method_and_length_has_a_row(sweep):
    got = rows(sweep)
    assert sorted((r.method, r.T) for r in got) == sorted((m, T) for m in NAMES for T in (5, 7))
    for r in got:
        assert r.status == "ok", r
        assert r.temp_bytes > 0 and r.argument_bytes > 0
        assert r.timed and r.time_s > 0
        assert (r.cell, r.batch, r.dtype) == ("rnn", 2, "float32")
        assert r.jax_version == jax.__version__
    base = [r for r in got if r.method == BASELINE]
    assert all(r.time_ratio == 1.0 == r.memory_ratio for r in base)
    assert (sweep / "memory_vs_length.png").stat().st_size > 0


def test_rerun_skips_points_already_done(sweep, capsys):
    before = (sweep / "memory_vs_length.csv").read_bytes()
    run("--lengths", "5,7", "--out", sweep)
    assert (sweep / "memory_vs_length.csv").read_bytes() == before
    out = capsys.readouterr().out
    assert "0 points to measure (26 already in" in out
    for name in NAMES:  # the printed table lists every point
        assert f"      5  {name:<28}" in out and f"      7  {name:<28}" in out


def test_table_lists_every_method(sweep, capsys):
    run("--out", sweep, "--table")
    printed = capsys.readouterr().out
    assert printed.startswith("| method | T = 5 | T = 7 |")
    for name in NAMES:
        assert f"| {name} |" in printed
    assert "×)" in printed and "MB (" in printed


def test_fresh_and_failed_points_are_redone_without_duplicates(tmp_path, capsys):
    argv = ["--lengths", "5", "--methods", "lax.scan,every_step:dots_saveable", "--out", tmp_path]
    for extra, measured in (([], 2), ([], 0), (["--fresh"], 2)):
        run(*argv, *extra)
        assert f"\n{measured} points measured in" in capsys.readouterr().out
    table = Table(tmp_path / "memory_vs_length.csv", MemoryRow)
    base, spec = table.read()
    assert (base.method, spec.method) == ("lax.scan", "bj.EveryStep(dots_saveable)")  # a spec
    assert spec.status == "ok" and spec.memory_ratio > 0
    # a point that failed is redone, and replaces its row
    table.write([base, dataclasses.replace(spec, status="oom", note="compile failed: OOM")])
    run(*argv)
    assert "1 points to measure (1 already in" in capsys.readouterr().out
    redone = table.read()
    assert [(r.method, r.status) for r in redone] == [(base.method, "ok"), (spec.method, "ok")]
    assert redone[0] == base


def test_memory_only_points(tmp_path):
    argv = ["--lengths", "5,7", "--methods", "lax.scan"]
    run(*argv, "--out", tmp_path, "--memory-limit", "1")
    run(*argv, "--out", tmp_path / "b", "--max-time-length", "6")
    for r in rows(tmp_path):
        assert not r.timed and math.isnan(r.time_ratio)
        assert "memory limit" in r.note
    by_T = {r.T: r for r in rows(tmp_path / "b")}
    assert by_T[5].timed and not by_T[7].timed
    assert "max-time-length" in by_T[7].note


@pytest.mark.parametrize(
    "bad",
    [
        ["--lengths", "0"],
        ["--lengths", "10,x"],
        ["--cell", "foo"],
        ["--batch", "0"],
        ["--dtype", "int32"],
        ["--methods", "nope"],
        ["--methods", "nested:x"],
        ["--memory-limit", "lots"],
        ["--memory-limit", "2G"],
        ["--runs", "0"],
        ["--repeats", "0"],
    ],
)
def test_bad_arguments_exit_with_an_error(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run(*bad, "--out", tmp_path)
    assert exc.value.code == 2
    assert bad[0] in capsys.readouterr().err


def test_equinox_missing_is_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "equinox", None)  # makes `import equinox` fail
    run(
        "--lengths",
        "5",
        "--methods",
        "lax.scan,equinox checkpointed",
        "--out",
        tmp_path,
        "--no-time",
    )
    assert "skipped equinox (not installed: pip install equinox)" in capsys.readouterr().out
    assert [r.method for r in rows(tmp_path)] == ["lax.scan"]


def test_plot_only_redraws_the_figure_from_the_csv(sweep, capsys):
    png, csv = sweep / "memory_vs_length.png", sweep / "memory_vs_length.csv"
    before = csv.read_bytes()
    png.unlink()
    run("--out", sweep, "--plot-only")
    assert png.stat().st_size > 0 and csv.read_bytes() == before
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no rows for this configuration"):
        run("--out", sweep, "--plot-only", "--cell", "gru")


def test_runs_give_the_median_ratio_and_its_spread(tmp_path, capsys):
    methods = "lax.scan,equinox, log2 T checkpoints"  # a name with a comma can be chosen
    run("--lengths", "5", "--methods", methods, "--runs", "3", "--out", tmp_path)
    by = {r.method: r for r in rows(tmp_path)}
    assert list(by) == ["lax.scan", "equinox, log2 T checkpoints"]
    runs = Table(tmp_path / "memory_vs_length_runs.csv", SCRIPT.RunsRow).read()
    assert [(r.method, r.T, r.runs, r.repeats) for r in runs] == [(name, 5, 3, 1) for name in by]
    for r in runs:
        assert r.time_ratio_min <= r.time_ratio == by[r.method].time_ratio <= r.time_ratio_max
    assert runs[0].time_ratio_min == runs[0].time_ratio_max == 1.0  # the baseline
    assert "time ratio over 3 runs" in capsys.readouterr().out
    # one run (the default) writes no spread
    run("--lengths", "5", "--methods", "lax.scan", "--out", tmp_path / "one")
    assert not (tmp_path / "one" / "memory_vs_length_runs.csv").exists()
