"""The character language model (experiments/tasks/) and experiments/char_lm.py."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import study
from helpers import CELLS

import bpttjax as bj
from experiments._table import Table
from experiments.tasks import char_lm as task
from experiments.tasks import corpus


@pytest.fixture(autouse=True)
def standard_promotion():
    # optax's Adam computes ``decay ** count`` (float ** int32), which the
    # suite's strict dtype promotion rejects; the experiment is optax's user.
    with jax.numpy_dtype_promotion("standard"):
        yield


@pytest.fixture(scope="module")
def text():
    return corpus.load_text(None, max_chars=60_000)


def test_default_corpus_is_deterministic_english_text():
    a = corpus.stdlib_docstrings()
    b = corpus.stdlib_docstrings()
    assert a == b
    clean = corpus.preprocess(a)
    assert len(clean) > 200_000
    assert re.fullmatch("[a-z ]+", clean)
    words = clean.split()
    # real English prose: the commonest words are English function words
    common_words = {w for w, _ in zip(*np.unique(words, return_counts=True), strict=True)}
    assert {"the", "of", "and", "is", "to"} <= common_words
    assert words.count("the") / len(words) > 0.02


def test_preprocess_is_d2l():
    assert (
        corpus.preprocess("The Time-Machine, by H. G. Wells!\n") == "the time machine by h g wells"
    )


def test_vocab_round_trip(text):
    vocab = corpus.Vocab.build(text)
    assert len(vocab) == 27  # 26 letters and the space
    assert vocab.decode(vocab.encode(text[:500])) == text[:500]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        vocab.encode("abc!")


@pytest.mark.parametrize("partition", corpus.PARTITIONS)
def test_minibatches(partition):
    # token i at position i: every row shows where in the text it was cut
    tokens = np.arange(3001, dtype=np.int32)
    kw = dict(batch=4, num_steps=7, partition=partition, seed=3)
    per_epoch = corpus.steps_per_epoch(len(tokens), 4, 7)
    assert per_epoch == (3001 - 7) // 28
    batches = [corpus.minibatch(tokens, i, **kw) for i in range(2 * per_epoch)]
    for X, Y, _ in batches:
        assert X.shape == Y.shape == (4, 7)
        np.testing.assert_array_equal(Y, X + 1)  # the next character
        np.testing.assert_array_equal(np.diff(X, axis=1), 1)  # contiguous text
    # deterministic: a pure function of the step (what makes resuming exact)
    np.testing.assert_array_equal(corpus.minibatch(tokens, 5, **kw)[0], batches[5][0])
    resets = [r for _, _, r in batches]
    for epoch in range(2):
        ep = batches[epoch * per_epoch : (epoch + 1) * per_epoch]
        starts = np.concatenate([X[:, 0] for X, _, _ in ep])
        offset = starts.min() % 7
        assert 0 <= offset < 7
        if partition == "sequential":
            assert resets[epoch * per_epoch] and not any(
                resets[epoch * per_epoch + 1 :][: per_epoch - 1]
            )
            for (_, Y0, _), (X1, _, _) in zip(ep[:-1], ep[1:], strict=True):
                np.testing.assert_array_equal(X1[:, 0], Y0[:, -1])  # rows continue
        else:
            assert all(resets)
            assert len(set(starts.tolist())) == len(starts)  # no subsequence twice an epoch
            assert np.all(starts % 7 == offset)  # non-overlapping windows of the epoch
            assert not np.all(np.diff(starts) > 0)  # shuffled


def test_minibatch_too_short():
    with pytest.raises(ValueError, match="too short"):
        corpus.minibatch(
            np.zeros(50, np.int32), 0, batch=4, num_steps=20, partition="random", seed=0
        )


@pytest.mark.parametrize("cell", CELLS)
def test_loss_is_mean_cross_entropy(cell):
    """Against a Python loop over the registered cell's steps and a log-softmax written out."""
    model = task.CharModel(cell, vocab=11, hidden=6)
    params = model.init(jax.random.key(1))
    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.integers(11, size=(3, 9)), jnp.int32)
    Y = jnp.asarray(rng.integers(11, size=(3, 9)), jnp.int32)
    carry = model.initial_carry(3)
    nll, final = model.loss(params, carry, X, Y)
    step = bj.cells.get(cell).step
    total = 0.0
    for t in range(9):
        carry, h = step(params["cell"], carry, jnp.eye(11, dtype=jnp.float32)[X[:, t]])
        z = np.asarray(h @ params["W_out"], np.float64) + np.asarray(params["b_out"])
        logp = (
            z
            - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
            - z.max(1, keepdims=True)
        )
        total += -logp[np.arange(3), np.asarray(Y[:, t])].mean()
    np.testing.assert_allclose(float(nll), total / 9, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(carry), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_truncation_and_remat_in_the_model():
    model = task.CharModel("gru", vocab=9, hidden=5)
    params = model.init(jax.random.key(0))
    rng = np.random.default_rng(1)
    X, Y = (jnp.asarray(rng.integers(9, size=(2, 12)), jnp.int32) for _ in range(2))
    carry = model.initial_carry(2)

    def grad(spec, remat="store_all"):
        tr = task.truncation_from_spec(spec, jax.random.key(4))
        remat = bj.remat.from_string(remat)
        loss = lambda p: model.loss(p, carry, X, Y, truncation=tr, remat=remat)
        return np.concatenate(
            [np.ravel(g) for g in jax.tree.leaves(jax.grad(lambda p: loss(p)[0])(params))]
        )

    full = grad("full")
    np.testing.assert_allclose(grad("truncate:12"), full, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad("full", "nested:2"), full, rtol=1e-5, atol=1e-7)
    assert np.linalg.norm(grad("truncate:2") - full) > 1e-3 * np.linalg.norm(full)
    with pytest.raises(ValueError, match="truncation must be"):
        task.truncation_from_spec("sometimes")
    with pytest.raises(ValueError, match="bad truncation"):
        task.truncation_from_spec("random:1.5")


def _small(**kw):
    return task.CharConfig(hidden=16, batch=8, num_steps=10, max_chars=30_000, **kw)


def test_config_reads_the_registries():
    assert _small(cell="lstm", remat="binomial:3").remat == "binomial:3"
    with pytest.raises(ValueError, match="registered cells"):
        _small(cell="transformer")
    with pytest.raises(ValueError, match="registered"):
        _small(remat="nested3x")


def test_training_learns_and_resumes_exactly(tmp_path, text):
    text = text[:30_000]
    cfg = _small(partition="sequential", truncation="random:0.8")
    kw = dict(name="m", eval_every=10, text=text)
    straight = task.train_char_lm(cfg, steps=40, out=str(tmp_path / "a"), **kw)
    task.train_char_lm(cfg, steps=20, out=str(tmp_path / "b"), **kw)
    resumed = task.train_char_lm(cfg, steps=40, out=str(tmp_path / "b"), **kw)
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(a, b)
    rows = Table(tmp_path / "b" / "m.csv", task.EvalRow).read()
    assert [r.step for r in rows] == [10, 20, 30, 40]
    assert rows == resumed.rows and [r.step for r in straight.rows] == [10, 20, 30, 40]
    ppl = [r.val_perplexity for r in straight.rows]
    assert ppl[-1] < 0.85 * 27  # below the uniform model's perplexity, the vocabulary size
    assert ppl[-1] < ppl[0]
    # another configuration must not silently overwrite or reuse the checkpoint
    with pytest.raises(ValueError, match="another configuration"):
        task.train_char_lm(
            dataclasses.replace(cfg, lr=1e-2),
            steps=40,
            out=str(tmp_path / "b"),
            name="m",
            text=text,
        )
    # nor one made from another text (the default corpus varies by Python version)
    with pytest.raises(ValueError, match="another configuration or text"):
        task.train_char_lm(cfg, steps=40, out=str(tmp_path / "b"), name="m", text=text[::-1])


def test_predict(tmp_path, text):
    run = task.train_char_lm(_small(), steps=1, out=str(tmp_path), name="p", text=text[:30_000])
    args = (run.model, run.params, run.vocab, "The Time", 25)
    greedy = task.predict_text(*args)
    assert greedy.startswith("the time") and len(greedy) == len("the time") + 25
    assert greedy == task.predict_text(*args)
    sampled = [task.predict_text(*args, temperature=1.0, seed=s) for s in range(4)]
    assert len(set(sampled)) > 1
    assert set("".join(sampled)) <= set(run.vocab.chars)


@pytest.mark.parametrize(
    ("extra", "name"),
    [
        ([], "char_lm_gru"),
        (
            ["--impl", "nnx", "--cell", "lstm", "--partition", "sequential"],
            "char_lm_lstm_nnx_sequential",
        ),
        (["--impl", "nnx-rnn", "--remat", "nested:2", "--steps", "40"], "char_lm_gru_nnx_rnn"),
    ],
    ids=["gru", "lstm-nnx-sequential", "gru-nnx-rnn"],
)
def test_quick_run_writes_files(tmp_path, extra, name):
    study.run("char_lm", ["--quick", "--out", tmp_path, *extra])
    for suffix in (".csv", ".ckpt", ".png", "_sample.txt"):
        assert (tmp_path / f"{name}{suffix}").stat().st_size > 0
    rows = Table(tmp_path / f"{name}.csv", task.EvalRow).read()
    steps = 40 if "--steps" in extra else 60  # --quick: 60 steps, evaluated every 20
    assert [r.step for r in rows] == list(range(20, steps + 1, 20))
    assert rows[-1].val_perplexity < 0.85 * 27


def test_nnx_rnn_impl_is_the_nnx_model():
    """bj.nnx.RNN over the sequence: the loss and final carry of the per-step scan (LSTM:
    Flax's carry order (c, h) goes in and comes out; its gradients are test_flax_rnn's)."""
    X, Y = (
        jnp.asarray(np.random.default_rng(s).integers(7, size=(2, 6)), jnp.int32) for s in (0, 1)
    )
    models = [task.CharModel("lstm", vocab=7, hidden=5, impl=i) for i in ("nnx", "nnx-rnn")]
    params = models[0].init(jax.random.key(0))
    carry = (jnp.full((2, 5), 0.3, jnp.float32), jnp.full((2, 5), -0.2, jnp.float32))
    results = jax.jit(lambda p: [m.loss(p, carry, X, Y) for m in models])(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), *results)


@pytest.mark.parametrize(
    "argv",
    [
        ["--corpus", "/no/such/file"],
        ["--truncation", "sometimes"],
        ["--remat", "sometimes"],
        ["--cell", "transformer"],
        ["--steps", "0"],
        ["--temperature", "-1"],
        ["--max-chars", "500"],
    ],
)
def test_bad_arguments(tmp_path, argv):
    with pytest.raises(SystemExit):
        study.run("char_lm", ["--quick", "--out", tmp_path, *argv])


def test_corpus_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 ".encode("latin-1") * 500)
    with pytest.raises(SystemExit):
        study.run("char_lm", ["--quick", "--corpus", path, "--out", tmp_path])
    with pytest.raises(ValueError, match="not UTF-8"):
        corpus.load_text(str(path))
