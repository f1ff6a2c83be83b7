"""experiments/truncation.py: d2l's comparison of truncation strategies (quick run)."""

import csv
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import truncation  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("truncation")
    # optax's Adam computes ``decay ** count`` (float ** int32), which the
    # suite's strict dtype promotion rejects; the experiment is optax's user.
    with jax.numpy_dtype_promotion("standard"):
        return out, truncation.main(["--quick", "--out", str(out)])


def test_regular_truncation_is_biased_and_exact_at_T(quick_run):
    _, result = quick_run
    rows = [r for r in result["bias"] if r["strategy"].startswith("Truncate")]
    by_k = {r["k_or_pi"]: r for r in rows}
    T = max(by_k)
    assert T == 30  # the quick run's length; Truncate(T) is full BPTT
    assert by_k[T]["rel_error"] < 1e-6 and by_k[T]["cosine"] > 1 - 1e-6
    shorter = [by_k[k]["rel_error"] for k in sorted(by_k) if k < T]
    assert min(shorter) > 1e-3  # dropping long-range terms changes the gradient
    assert shorter[0] > shorter[-1]  # the shortest window is the most biased


def test_random_truncation_is_unbiased_but_noisy(quick_run):
    _, result = quick_run
    rows = [r for r in result["bias"] if r["strategy"].startswith("RandomTruncate")]
    assert rows
    for r in rows:
        curve = result["mean_curves"][r["k_or_pi"]]
        assert len(curve) == r["samples"] >= 20
        # single draws are off by a lot; their mean converges to the full gradient
        assert r["rel_error"] > 1e-3
        assert curve[-1] < 0.5 * r["rel_error"]
        assert curve[-1] < curve[0]
        assert -1 <= r["cosine"] <= 1


def test_training_curves(quick_run):
    out, result = quick_run
    assert [s["strategy"] for s in result["summary"]] == [
        "full BPTT",
        "Truncate(5)",
        "RandomTruncate(0.9)",
    ]
    for s in result["summary"]:
        assert np.isfinite(s["val_perplexity"]) and s["val_perplexity"] < 27
    rows = list(csv.DictReader((out / "training.csv").read_text().splitlines()))
    assert len(rows) == 3 * 2  # 40 steps, evaluated every 20
    for name in ("gradient_bias.csv", "gradient_mean.csv"):
        assert len((out / name).read_text().splitlines()) > 3
    assert (out / "truncation.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "argv",
    [
        ["--probs", "0.5,1.5"],
        ["--ks", "0,3"],
        ["--ks", "a"],
        ["--length", "1"],
        ["--train-prob", "0"],
    ],
)
def test_bad_arguments(tmp_path, argv):
    with pytest.raises(SystemExit):
        truncation.main(["--quick", "--out", str(tmp_path), *argv])
