"""Smoke tests of experiments/memory_vs_length.py at tiny sizes (run in-process)."""

import csv
import math
import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))

import memory_vs_length as mvl  # noqa: E402

TINY = ["--batch", "2", "--input", "3", "--hidden", "4", "--repeats", "1"]


def read_csv(out):
    with open(os.path.join(out, mvl.CSV_NAME), newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sweep"))
    result = mvl.main([*TINY, "--lengths", "5,7", "--out", out])
    return out, result


def test_every_method_and_length_has_a_row(sweep):
    out, result = sweep
    rows = read_csv(out)
    assert result["new_points"] == len(mvl.METHOD_NAMES) * 2
    assert sorted((r["method"], int(r["T"])) for r in rows) == sorted(
        (m, T) for m in mvl.METHOD_NAMES for T in (5, 7)
    )
    for r in rows:
        assert r["status"] == "ok", r
        assert int(r["temp_bytes"]) > 0 and int(r["argument_bytes"]) > 0
        assert r["timed"] == "True" and float(r["time_s"]) > 0
        assert (r["cell"], r["batch"], r["dtype"]) == ("rnn", "2", "float32")
        assert r["jax_version"] == jax.__version__
    base = [r for r in rows if r["method"] == mvl.BASELINE]
    assert all(float(r["time_ratio"]) == 1.0 == float(r["memory_ratio"]) for r in base)
    assert os.path.getsize(os.path.join(out, mvl.PNG_NAME)) > 0


def test_rerun_skips_points_already_done(sweep):
    out, _ = sweep
    path = os.path.join(out, mvl.CSV_NAME)
    with open(path) as fh:
        before = fh.read()
    result = mvl.main([*TINY, "--lengths", "5,7", "--out", out])
    assert result["new_points"] == 0
    with open(path) as fh:
        assert fh.read() == before
    assert len(result["rows"]) == len(mvl.METHOD_NAMES) * 2


def test_table_lists_every_method(sweep, capsys):
    out, _ = sweep
    result = mvl.main([*TINY, "--out", out, "--table"])
    printed = capsys.readouterr().out
    assert printed.startswith("| method | T = 5 | T = 7 |")
    for name in mvl.METHOD_NAMES:
        assert f"| {name} |" in printed
    assert "×)" in result["table"] and "MB (" in result["table"]


def test_fresh_redoes_points_without_duplicates(tmp_path):
    argv = [*TINY, "--lengths", "5", "--methods", "lax.scan,bj.EveryStep", "--out", str(tmp_path)]
    assert mvl.main(argv)["new_points"] == 2
    assert mvl.main(argv)["new_points"] == 0
    assert mvl.main([*argv, "--fresh"])["new_points"] == 2
    assert len(read_csv(tmp_path)) == 2


def test_failures_are_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    real_compile, real_prepare = mvl.compile_and_measure, mvl.prepare_timing

    def compile_and_measure(method, problem):
        if method.name == "bj.Nested(3)":
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1TB")
        if method.name == "bj.Nested(2)":
            raise ValueError("something else broke")
        return real_compile(method, problem)

    def prepare_timing(point, xs):
        if point["method"] == "flax.nnx.RNN":
            raise MemoryError("simulated host out of memory")
        return real_prepare(point, xs)

    monkeypatch.setattr(mvl, "compile_and_measure", compile_and_measure)
    monkeypatch.setattr(mvl, "prepare_timing", prepare_timing)
    methods = "lax.scan,bj.EveryStep,bj.Nested(2),bj.Nested(3),flax.nnx.RNN"
    argv = [*TINY, "--lengths", "5", "--methods", methods, "--out", str(tmp_path)]
    assert mvl.main(argv)["new_points"] == 5
    rows = {r["method"]: r for r in read_csv(tmp_path)}
    assert rows["bj.Nested(3)"]["status"] == "oom"
    assert "RESOURCE_EXHAUSTED" in rows["bj.Nested(3)"]["note"]
    assert rows["bj.Nested(2)"]["status"] == "error"
    assert "something else broke" in rows["bj.Nested(2)"]["note"]
    # failed while warming up: memory is known, time is not
    assert rows["flax.nnx.RNN"]["status"] == "oom"
    assert int(rows["flax.nnx.RNN"]["temp_bytes"]) > 0
    for name in ("lax.scan", "bj.EveryStep"):
        assert rows[name]["status"] == "ok" and rows[name]["timed"] == "True"

    monkeypatch.undo()
    # only the failed points are redone, and they replace their old rows
    assert mvl.main(argv)["new_points"] == 3
    rows = read_csv(tmp_path)
    assert len(rows) == 5 and {r["status"] for r in rows} == {"ok"}


def test_memory_only_points(tmp_path):
    argv = [*TINY, "--lengths", "5,7", "--methods", "lax.scan"]
    mvl.main([*argv, "--out", str(tmp_path), "--memory-limit", "1"])
    mvl.main([*argv, "--out", str(tmp_path / "b"), "--max-time-length", "6"])
    by_T = {int(r["T"]): r for r in read_csv(tmp_path)}
    for r in by_T.values():
        assert r["timed"] == "False" and math.isnan(float(r["time_ratio"]))
        assert "memory limit" in r["note"]
    by_T = {int(r["T"]): r for r in read_csv(tmp_path / "b")}
    assert by_T[5]["timed"] == "True" and by_T[7]["timed"] == "False"
    assert "max-time-length" in by_T[7]["note"]


@pytest.mark.parametrize(
    "bad",
    [
        ["--lengths", "0"],
        ["--lengths", "10,x"],
        ["--cell", "foo"],
        ["--batch", "0"],
        ["--dtype", "int32"],
        ["--methods", "nope"],
        ["--memory-limit", "lots"],
        ["--repeats", "0"],
    ],
)
def test_bad_arguments_exit_with_an_error(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        mvl.main([*bad, "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert bad[0] in capsys.readouterr().err


def test_parsers():
    assert mvl.parse_bytes("8GiB") == 8 * 2**30
    assert mvl.parse_bytes("500MB") == 500 * 10**6
    assert mvl.parse_bytes("2G") == 2 * 2**30
    assert mvl.parse_bytes("1234") == 1234
    assert mvl.parse_lengths("300,100,100") == [100, 300]
    assert mvl.parse_methods("nested2, Lax.Scan") == ["lax.scan", "bj.Nested(2)"]


def test_equinox_missing_is_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "equinox", None)  # makes `import equinox` fail
    argv = [*TINY, "--lengths", "5", "--methods", "lax.scan,equinox checkpointed"]
    result = mvl.main([*argv, "--out", str(tmp_path), "--no-time"])
    assert "skipped equinox (not installed: pip install equinox)" in capsys.readouterr().out
    assert result["new_points"] == 1
    assert [r["method"] for r in read_csv(tmp_path)] == ["lax.scan"]
