"""experiments/speed.py at tiny sizes: every timed method's gradient is checked against lax.scan."""

import functools
import importlib.util
import math
import sys

import jax
import pytest
import study

from experiments import _harness, _methods
from experiments._harness import BASELINE
from experiments._table import Table

speed = study.load("speed")


def run(*argv):
    study.run("speed", ["--quick", *map(str, argv)])


def rows(out):
    return Table(out / "speed.csv", speed.SpeedRow).read()


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


@pytest.fixture(scope="module")
def lstm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    run("--cells", "lstm", "--out", out)
    return out


def test_quick_run_times_every_available_method(lstm_run):
    expected = [
        m.name
        for m in speed.METHODS
        if m.name in speed.DEFAULT_METHODS
        and (m.needs is None or installed(m.needs))
        and (not m.gpu_only or jax.default_backend() == "gpu")
    ]
    got = {r.method: r for r in rows(lstm_run)}
    assert list(got) == expected
    for r in got.values():
        assert r.status == "ok", r
        assert (r.cell, r.T, r.batch, r.input, r.hidden) == ("lstm", 20, 2, 4, 8)
        assert r.grad_rel_err <= 1e-4  # the check passed before timing
        assert r.repeats == 2 and 0 < r.min_ms <= r.time_ms
        for value in (r.speed_vs_scan, r.gflops, r.peak_fraction, r.gemm_gflops):
            assert math.isfinite(value) and value > 0, r
        assert r.jax_version == jax.__version__ and r.threads >= 1
        if installed("torch"):
            assert math.isfinite(r.speed_vs_torch)
    assert got[BASELINE].speed_vs_scan == 1.0
    assert got[BASELINE].grad_rel_err == 0.0
    if installed("torch"):
        assert got[speed.TORCH].speed_vs_torch == 1.0
    assert "bj.cells.run" in got["bj.StoreAll"].note or "bj.scan" in got["bj.StoreAll"].note
    assert (lstm_run / "speed.png").stat().st_size > 0


def test_peers_of_the_other_cells_and_resume(tmp_path, capsys):
    """Flax's and PyTorch's parameter layouts for rnn and gru; a re-run measures nothing."""
    argv = ["--cells", "gru,rnn", "--methods", "nnx,torch", "--out", tmp_path]
    run(*argv)
    got = {(r.cell, r.method): r for r in rows(tmp_path)}
    peers = ["flax.nnx.RNN", *([speed.TORCH] if installed("torch") else [])]
    assert sorted(got) == sorted((c, m) for c in ("rnn", "gru") for m in [BASELINE, *peers])
    for r in got.values():
        assert r.status == "ok" and r.grad_rel_err <= 1e-4, r
    assert "no b_hn" in got["gru", "flax.nnx.RNN"].note
    before = (tmp_path / "speed.csv").read_bytes()
    capsys.readouterr()
    run(*argv)
    assert "0 of 2 points to measure" in capsys.readouterr().out
    assert (tmp_path / "speed.csv").read_bytes() == before


def _zero_gradient(point, params, xs, threads):
    zeros = {name: 0 * value for name, value in params.items()}
    return _harness.Prepared(lambda: zeros, lambda g: g)


def test_cudnn_packing_and_a_wrong_gradient_is_not_timed():
    """cuDNN's weights, checked through jax.experimental.rnn's reference on any backend."""
    point = speed.point("lstm", 20, 2, 4, 8)
    reference = functools.partial(_methods.cudnn_loss, reference=True)
    cudnn = _harness.prepare_jax(reference, _methods.cudnn_weights, _methods.batch_first)
    methods = [
        speed.METHODS[0],
        _harness.Method("cuDNN layout", "cudnn", prepare=cudnn),
        _harness.Method("zero gradient", prepare=_zero_gradient),
    ]
    base, packed, wrong = speed.measure_point(point, methods, speed.Run(2, 1, 1e-4, 1.0))
    assert base.status == packed.status == "ok"
    assert packed.grad_rel_err <= 1e-5 and math.isfinite(packed.speed_vs_scan)
    assert wrong.status == "wrong gradient" and math.isnan(wrong.time_ms)
    assert "differs from lax.scan by 1 (> --rtol 0.0001): not timed" in wrong.note


def test_missing_packages_are_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    run("--cells", "lstm", "--methods", "lax.scan,torch,cudnn", "--out", tmp_path)
    out = capsys.readouterr().out
    assert _harness.TORCH_MISSING in out
    if jax.default_backend() != "gpu":
        assert "jax.experimental.rnn needs the gpu backend" in out
    (base,) = rows(tmp_path)
    assert base.method == BASELINE and base.speed_vs_scan == 1.0
    assert math.isnan(base.speed_vs_torch)
    assert (tmp_path / "speed.png").stat().st_size > 0


@pytest.mark.parametrize(
    "bad",
    [
        ["--cells", "foo"],
        ["--batch", "0"],
        ["--hidden", "8,x"],
        ["--length", "0"],
        ["--repeats", "0"],
        ["--methods", "nope"],
        ["--threads", "0"],
        ["--rtol", "0"],
        ["--backend", "abc"],
    ],
)
def test_bad_arguments_exit_with_an_error(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run(*bad, "--out", tmp_path)
    assert exc.value.code == 2
    assert bad[0] in capsys.readouterr().err
