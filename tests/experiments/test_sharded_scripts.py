"""The scripts beyond one device: ``--devices`` and the simulated CPU devices it asks for.

``_sharded_script_checks.py`` runs the scripts on 8 simulated CPU devices in a
subprocess (JAX fixes the number of CPU devices when its backend starts, and
the rest of the suite runs on one).
"""

import dataclasses
import os

import jax
import pytest
import study
from helpers import run_on_cpu_devices

from experiments import _cli
from experiments._sweep import MemoryRow
from experiments._table import Table

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


@pytest.mark.slow
def test_scripts_on_8_devices():
    out = run_on_cpu_devices(os.path.join(HERE, "_sharded_script_checks.py"), path=ROOT)
    assert "2 checks on 8 devices, 0 failed" in out and "FAIL " not in out


def test_request_cpu_devices_sets_xla_flags(monkeypatch):
    from jax._src import xla_bridge

    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    monkeypatch.setattr(os, "environ", {})  # a copy: the real XLA_FLAGS stay as they are
    flag = "--xla_force_host_platform_device_count"
    for before, after in (
        (None, f"{flag}=4"),
        ("--xla_dump_to=x", f"--xla_dump_to=x {flag}=4"),
        (f"{flag}=2 --xla_dump_to=x", f"{flag}=4 --xla_dump_to=x"),
        (f"{flag}=16", f"{flag}=16"),
    ):
        os.environ.clear()
        if before is not None:
            os.environ["XLA_FLAGS"] = before
        assert _cli.request_cpu_devices(4)
        assert os.environ["XLA_FLAGS"] == after


def test_devices_beyond_a_started_backend_exit_with_an_error(tmp_path, monkeypatch, capsys):
    have = jax.device_count()  # the backend has started
    monkeypatch.setattr(os, "environ", dict(os.environ))
    n = have + 1
    with pytest.raises(SystemExit) as exc:
        study.run("memory_vs_length", ["--devices", n, "--lengths", "5", "--out", tmp_path])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--devices {n}: JAX has {have} {jax.default_backend()} device(s)" in err
    assert f"XLA_FLAGS=--xla_force_host_platform_device_count={n}" in err
    assert not os.path.exists(tmp_path / "memory_vs_length.csv")


def test_memory_rows_written_before_the_devices_column(tmp_path):
    path = tmp_path / "memory_vs_length.csv"
    fields = [f.name for f in dataclasses.fields(MemoryRow)]
    assert fields[-1] == "devices"
    old = "lax.scan,5,rnn,2,3,4,float32,cpu,cpu,0.10.2,1,2,3,,,0.1,,nan,1.0,False,ok,"
    path.write_text(",".join(fields[:-1]) + "\n" + old + "\n")
    table = Table(path, MemoryRow)
    (row,) = table.read()
    assert (row.method, row.temp_bytes, row.devices) == ("lax.scan", 1, 1)
    table.append([dataclasses.replace(row, devices=8)])
    lines = path.read_text().splitlines()
    assert lines == [",".join(fields), old + ",1", old + ",8"]
    assert [r.devices for r in table.read()] == [1, 8]
