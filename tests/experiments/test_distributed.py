"""Two processes with ``jax.distributed.initialize``: one data-parallel gradient.

``tests/_distributed_worker.py`` runs the character language model's loss on
2 local processes of 2 simulated CPU devices each (Gloo collectives), the
batch sharded over the 4 devices; its gradient must equal that of one
process on one device, to float32 rounding (the model is float32, and the
sum over the batch is taken in another order).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_distributed_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(*args) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    return subprocess.Popen(
        [sys.executable, WORKER, *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, what: str) -> None:
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"{what} did not finish in 300 s:\n{out}") from None
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{out}"


def test_two_processes_give_the_single_process_gradient(tmp_path):
    port = free_port()
    single, dist = tmp_path / "single.npz", tmp_path / "dist.npz"
    procs = [start("single", single)]
    procs += [start("dist", pid, 2, port, dist) for pid in range(2)]
    for proc, what in zip(procs, ("the single process", "process 0", "process 1"), strict=True):
        finish(proc, what)
    want, got = np.load(single), np.load(dist)
    assert sorted(got) == sorted(want) and len(want) == 6
    for name in want:
        a, b = got[name], want[name]
        err = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert err < 1e-5, f"{name}: relative error {err:.2g}"
        assert not np.array_equal(b, np.zeros_like(b)), name
