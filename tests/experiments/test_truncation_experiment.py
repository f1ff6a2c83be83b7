"""experiments/truncation.py: d2l's comparison of truncation strategies (quick run)."""

import jax
import numpy as np
import pytest
import study

from experiments._table import Table

pytestmark = pytest.mark.slow  # its module fixture runs the script

SCRIPT = study.load("truncation")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("truncation")
    # optax's Adam computes ``decay ** count`` (float ** int32), which the
    # suite's strict dtype promotion rejects; the experiment is optax's user.
    with jax.numpy_dtype_promotion("standard"):
        study.run("truncation", ["--quick", "--out", out])
    bias = Table(out / "gradient_bias.csv", SCRIPT.BiasRow).read()
    means = Table(out / "gradient_mean.csv", SCRIPT.MeanRow).read()
    training = Table(out / "training.csv", SCRIPT.TrainingRow).read()
    return out, bias, means, training


def test_regular_truncation_is_biased_and_exact_at_T(quick_run):
    _, bias, _, _ = quick_run
    by_k = {r.k_or_pi: r for r in bias if r.strategy.startswith("Truncate")}
    T = max(by_k)
    assert T == 30  # the quick run's length; Truncate(T) is full BPTT
    assert by_k[T].rel_error < 1e-6 and by_k[T].cosine > 1 - 1e-6
    shorter = [by_k[k].rel_error for k in sorted(by_k) if k < T]
    assert min(shorter) > 1e-3  # dropping long-range terms changes the gradient
    assert shorter[0] > shorter[-1]  # the shortest window is the most biased


def test_random_truncation_is_unbiased_but_noisy(quick_run):
    _, bias, means, _ = quick_run
    rows = [r for r in bias if r.strategy.startswith("RandomTruncate")]
    assert rows
    for r in rows:
        curve = [m.rel_error_of_mean for m in sorted(means, key=lambda m: m.n) if m.pi == r.k_or_pi]
        assert len(curve) == r.samples >= 20
        # single draws are off by a lot; their mean converges to the full gradient
        assert r.rel_error > 1e-3
        assert curve[-1] < 0.5 * r.rel_error
        assert curve[-1] == r.rel_error_of_mean and curve[-1] < curve[0]
        assert -1 <= r.cosine <= 1


def test_training_curves(quick_run):
    out, _, _, training = quick_run
    strategies = list(dict.fromkeys(r.strategy for r in training))
    assert strategies == ["full BPTT", "Truncate(5)", "RandomTruncate(0.9)"]
    assert len(training) == 3 * 2  # 40 steps, evaluated every 20
    for strategy in strategies:
        last = [r for r in training if r.strategy == strategy][-1]
        assert last.step == 40 and np.isfinite(last.val_perplexity) and last.val_perplexity < 27
    assert (out / "truncation.png").stat().st_size > 10_000


def test_plot_only_redraws_the_figure_from_the_csvs(quick_run, tmp_path):
    out = quick_run[0]
    before = {p.name: p.read_bytes() for p in out.glob("*.csv")}
    (out / "truncation.png").unlink()
    study.run("truncation", ["--quick", "--out", out, "--plot-only"])
    assert (out / "truncation.png").stat().st_size > 10_000
    assert {p.name: p.read_bytes() for p in out.glob("*.csv")} == before
    with pytest.raises(SystemExit, match="run the study first"):
        study.run("truncation", ["--quick", "--out", tmp_path, "--plot-only"])
    # each strategy keeps its colour in every panel
    colors = SCRIPT.pi_colors([0.9, 0.5, 0.9])
    assert colors == {0.5: "C1", 0.9: "C2"} and SCRIPT.TRUNCATE_COLOR not in colors.values()


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
        study.run("truncation", ["--quick", "--out", tmp_path, *argv])
