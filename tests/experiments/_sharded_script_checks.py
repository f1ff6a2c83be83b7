"""The scripts' ``--devices`` on 8 simulated CPU devices, run in a subprocess by
``test_sharded_scripts.py`` (JAX fixes the number of CPU devices when it starts).

    python tests/experiments/_sharded_script_checks.py

``memory_vs_length.py --devices N`` writes per-device rows and the devices
table and refuses what it cannot do; ``char_lm.py --devices 8`` trains the
single-device curve and resumes it. Prints ``ok`` or ``FAIL`` per check; the
exit status is 1 if any failed.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # experiments

from experiments import _cli  # noqa: E402 - before JAX starts: the device count

DEVICES = 8
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # simulated devices, even beside a GPU
_cli.request_cpu_devices(DEVICES)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments._sweep import MemoryRow  # noqa: E402
from experiments._table import Table  # noqa: E402

# as tests/conftest.py
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

CHECKS = []


def check(name: str):
    def add(fn):
        CHECKS.append((name, fn))
        return fn

    return add


# --- the benchmark's --devices ------------------------------------------------------------


@check("memory_vs_length.py --devices N: per-device rows, the devices table, errors")
def check_benchmark_devices():
    tiny = ["--batch", "8", "--input", "3", "--hidden", "4", "--lengths", "5", "--no-time"]
    tiny += ["--methods", "lax.scan,binomial:2"]
    with tempfile.TemporaryDirectory() as out:
        for n in (1, 8):
            _cli.run("memory_vs_length", [*tiny, "--devices", str(n), "--out", out])
        rows = Table(os.path.join(out, "memory_vs_length.csv"), MemoryRow).read()
        by = {(r.method, r.devices): r for r in rows}
        assert sorted(by) == [(m, n) for m in ("bj.Binomial(2)", "lax.scan") for n in (1, 8)]
        assert all(r.status == "ok" for r in rows), rows
        one, eight = by["lax.scan", 1], by["lax.scan", 8]
        assert eight.argument_bytes < one.argument_bytes and eight.temp_bytes < one.temp_bytes
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            _cli.run("memory_vs_length", [*tiny, "--out", out, "--table"])
        assert "| method | T | N = 1 | N = 8 |" in printed.getvalue(), printed.getvalue()
        # a batch the devices do not divide; more devices than JAX started with
        for n, says in (("3", "must be a multiple of --devices 3"), ("16", "JAX has 8 cpu")):
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    _cli.run("memory_vs_length", [*tiny, "--devices", n, "--out", out])
            except SystemExit as exit:
                assert says in f"{exit.code} {err.getvalue()}", (exit.code, err.getvalue())
            else:
                raise AssertionError(f"--devices {n} did not exit")


@check("char_lm.py --devices 8: the single-device curve, and a resumed run continues it")
def check_char_lm_devices():
    def curve(out: str, *extra: str) -> list[tuple[float, float]]:
        # the script as a user runs it: JAX's default (not the checks' strict) promotion
        with jax.numpy_dtype_promotion("standard"):
            _cli.run("char_lm", ["--quick", "--num-preds", "1", "--out", out, *extra])
        with open(os.path.join(out, "char_lm_gru.csv"), newline="") as fh:
            rows = list(csv.DictReader(fh))
        return [(float(r["train_perplexity"]), float(r["val_perplexity"])) for r in rows]

    with tempfile.TemporaryDirectory() as one, tempfile.TemporaryDirectory() as eight:
        want = curve(one)  # 60 steps, evaluated every 20, on one device
        curve(eight, "--devices", "8", "--steps", "40")  # stopped after 40 steps
        got = curve(eight, "--devices", "8")  # resumes from the checkpoint at 40
    assert len(got) == len(want) == 3, (got, want)
    # float32 rounding: the batch's mean is summed in another order across devices
    np.testing.assert_allclose(got, want, rtol=1e-5)
    print(f"    perplexities on 8 devices {got[-1]}, on one {want[-1]}")


def main() -> int:
    if jax.device_count() != DEVICES:
        print(f"FAIL setup: {jax.device_count()} devices, expected {DEVICES}")
        return 1
    failed = []
    for name, fn in CHECKS:
        t0 = time.perf_counter()
        try:
            fn()
        except Exception:  # noqa: BLE001 - reported, the others go on
            failed.append(name)
            print(f"FAIL  {name}  ({time.perf_counter() - t0:.1f} s)", flush=True)
            print("    " + traceback.format_exc(limit=3).replace("\n", "\n    "), flush=True)
            continue
        print(f"ok    {name}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    print(f"\n{len(CHECKS)} checks on {DEVICES} devices, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
