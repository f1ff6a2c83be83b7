"""experiments/step_profile.py: a quick run writes every part for every cell."""

from __future__ import annotations

import csv
import math

import study

PARTS = {
    "recurrent products",
    "backward products",
    "forward",
    "weight products",
    "fwd+bwd",
    "backward loop",
}


def read(path):
    with open(path / "step_profile.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_quick_run_writes_every_part(tmp_path):
    study.run("step_profile", ["--quick", "--cells", "rnn,lstm", "--out", tmp_path])
    rows = read(tmp_path)
    for cell in ("rnn", "lstm"):
        parts = {r["part"]: float(r["time_ms"]) for r in rows if r["cell"] == cell}
        assert PARTS <= set(parts)
        assert parts["fwd+bwd"] > 0
        # the backward loop is what the other parts leave of fwd+bwd
        rest = parts["fwd+bwd"] - parts["forward"] - parts["weight products"]
        assert math.isclose(parts["backward loop"], rest, rel_tol=1e-6)
    # a second run replaces the rows of the same point instead of adding to them
    study.run("step_profile", ["--quick", "--cells", "rnn", "--out", tmp_path])
    again = read(tmp_path)
    assert len(again) == len(rows)
