"""The character language model's text: the corpus, its vocabulary and d2l's minibatches.

With no file the corpus is the docstrings of the standard library's
top-level modules (:func:`stdlib_docstrings`: no download, the same text on
every machine with the same Python); :func:`preprocess` is d2l's (letters
and single spaces, lower case). :func:`minibatch` draws d2l's two
partitionings, ``random`` and ``sequential``, as a pure function of the step.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import sysconfig

import numpy as np

PARTITIONS = ("random", "sequential")
VAL_FRACTION, VAL_MAX_CHARS = 0.05, 50_000


def stdlib_docstrings() -> str:
    """Docstrings of the standard library's top-level modules, deterministic.

    Files are read in sorted order and parsed with ``ast`` (nothing is
    imported); module, class and function docstrings are taken in ``ast.walk``
    order, without their interactive examples (lines starting ``>>>`` or
    ``...``).
    """
    root = sysconfig.get_paths()["stdlib"]
    texts = []
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        try:
            with open(os.path.join(root, name), encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue  # an unreadable file is skipped, the same way everywhere
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    lines = doc.splitlines()
                    texts.append(
                        "\n".join(s for s in lines if not s.lstrip().startswith((">>>", "...")))
                    )
    return "\n".join(texts)


def preprocess(text: str) -> str:
    """d2l's preprocessing: non-letters to one space, lower case."""
    return re.sub("[^A-Za-z]+", " ", text).lower().strip()


def load_text(path: str | None, max_chars: int = 0) -> str:
    """The preprocessed corpus from ``path`` (UTF-8) or the stdlib; at least 1000 characters."""
    if path is None:
        text = preprocess(stdlib_docstrings())
        source = "the standard library's docstrings"
    else:
        try:
            with open(path, encoding="utf-8") as fh:
                text = preprocess(fh.read())
        except UnicodeDecodeError as e:
            raise ValueError(f"--corpus {path!r} is not UTF-8 text: {e}") from None
        source = repr(path)
    if max_chars:
        text = text[:max_chars]
    if len(text) < 1000:
        raise ValueError(
            f"the corpus from {source} has {len(text)} characters after preprocessing "
            "(letters and spaces); at least 1000 are needed"
        )
    return text


@dataclasses.dataclass(frozen=True)
class Vocab:
    """The characters of a text, sorted; a token is a character's index."""

    chars: str

    @classmethod
    def build(cls, text: str) -> Vocab:
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.chars)}
        unknown = sorted(set(text) - set(index))
        if unknown:
            raise ValueError(f"characters not in the vocabulary {self.chars!r}: {unknown}")
        return np.fromiter((index[c] for c in text), dtype=np.int32, count=len(text))

    def decode(self, tokens) -> str:
        return "".join(self.chars[int(i)] for i in tokens)


def split_tokens(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation): the validation text is the corpus' tail."""
    n_val = min(int(len(tokens) * VAL_FRACTION), VAL_MAX_CHARS)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]


def steps_per_epoch(n_tokens: int, batch: int, num_steps: int) -> int:
    """Minibatches per epoch, either partitioning, at the largest start offset."""
    return max(0, n_tokens - num_steps) // (num_steps * batch)


def minibatch(
    tokens: np.ndarray, step: int, *, batch: int, num_steps: int, partition: str, seed: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(X, Y, reset)`` for training step ``step``; a pure function of its arguments.

    ``X, Y: (batch, num_steps)`` with ``Y`` the next characters. An epoch
    starts at a random offset in ``[0, num_steps)``. ``random``: the epoch's
    subsequences are shuffled. ``sequential``: row ``b`` of minibatch ``i``
    continues row ``b`` of minibatch ``i - 1``. ``reset`` is True when the
    carried state must start from zero (always for ``random``; at the start
    of each epoch for ``sequential``).
    """
    per_epoch = steps_per_epoch(len(tokens), batch, num_steps)
    if per_epoch == 0:
        raise ValueError(
            f"the training text ({len(tokens)} characters) is too short for one minibatch "
            f"of --batch {batch} x --num-steps {num_steps}"
        )
    epoch, i = divmod(step, per_epoch)
    rng = np.random.default_rng([seed, epoch])
    offset = int(rng.integers(num_steps))
    if partition == "random":
        n_sub = (len(tokens) - offset - 1) // num_steps
        starts = offset + num_steps * rng.permutation(n_sub)[i * batch : (i + 1) * batch]
        idx = starts[:, None] + np.arange(num_steps)[None, :]
        return tokens[idx], tokens[idx + 1], True
    if partition == "sequential":
        cols = (len(tokens) - offset - 1) // batch
        rows = offset + cols * np.arange(batch)
        idx = rows[:, None] + i * num_steps + np.arange(num_steps)[None, :]
        return tokens[idx], tokens[idx + 1], i == 0
    raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
