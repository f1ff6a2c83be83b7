"""The figures the README and the docs pages state are those of the CSVs in docs/.

Each page names the command that wrote its CSV; this test reads the CSV and
checks the page's key numbers against it, to the digits the page shows. When
a study is re-run, its page must be updated with it. Nothing here runs JAX.
"""

import csv
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@functools.cache
def rows(path: str) -> dict[tuple[str, int, int], dict]:
    """``(method, T, devices) -> row`` of a result CSV under docs/."""
    with open(DOCS / path, newline="") as f:
        return {
            (r["method"], int(r["T"]), int(r.get("devices") or 1)): r for r in csv.DictReader(f)
        }


def row(path: str, method: str, T: int, devices: int = 1) -> dict:
    key = (method, T, devices)
    assert key in rows(path), f"{path} has no row {key}"
    return rows(path)[key]


def mb(r: dict) -> float:
    return int(r["temp_bytes"]) / 1e6


def close(shown: str, value: float) -> bool:
    """``shown`` is ``value`` rounded to the digits it has."""
    s = shown.replace(",", "")
    decimals = len(s.split(".")[1]) if "." in s else 0
    return abs(float(s) - value) <= 0.5 * 10**-decimals + 1e-9


def number(text: str) -> int:
    return int(text.replace(",", ""))


def table(page: str, header: str) -> tuple[list[str], list[list[str]]]:
    """The header cells and body rows of the first Markdown table whose header
    row starts with ``header``."""
    lines = (ROOT / page).read_text().splitlines()
    start = next(i for i, s in enumerate(lines) if s.startswith(header))
    cells = lambda s: [c.strip().strip("`") for c in s.strip().strip("|").split("|")]
    body = []
    for s in lines[start + 2 :]:
        if not s.startswith("|"):
            break
        body.append(cells(s))
    return cells(lines[start]), body


TRIPLE = re.compile(r"([\d.,]+) MB \(([\d.]+)%, ([\d.]+)×(?:, ([\d.]+)–([\d.]+))?\)")


def check_triple(cell: str, r: dict, where, spread: dict | None = None) -> None:
    """``"X MB (P%, R×)"``: temp, its share of plain BPTT's, the time ratio; with
    ``spread`` (a row of ``memory_vs_length_runs.csv``), ``"X MB (P%, R×, lo–hi)"``:
    the median ratio of several runs, then the least and the greatest."""
    m = TRIPLE.fullmatch(cell)
    assert m, (where, cell)
    assert close(m[1], mb(r)), (where, cell, mb(r))
    assert close(m[2], 100 * float(r["memory_ratio"])), (where, cell, r["memory_ratio"])
    assert close(m[3], float(r["time_ratio"])), (where, cell, r["time_ratio"])
    assert (m[4] is not None) == (spread is not None), (where, cell)
    if spread is not None:
        assert close(m[3], float(spread["time_ratio"])), (where, cell, spread)
        assert close(m[4], float(spread["time_ratio_min"])), (where, cell, spread)
        assert close(m[5], float(spread["time_ratio_max"])), (where, cell, spread)
        assert int(spread["runs"]) >= 3, (where, spread)


# Tables of "X MB (P%, R×)" per method and length, and the CSV they come from.
METHOD_TABLES = [
    ("README.md", "headline/memory_vs_length.csv"),
    ("docs/benchmark.md", "time_vs_memory.csv"),
    ("docs/experiments/time_vs_memory.md", "time_vs_memory.csv"),
]


@pytest.mark.parametrize("page, source", METHOD_TABLES)
def test_method_tables(page, source):
    head, body = table(page, "| method | T = ")
    lengths = [number(re.search(r"T = ([\d,]+)", h)[1]) for h in head[1:]]
    runs = source.replace(".csv", "_runs.csv")
    for cells in body:
        for T, cell in zip(lengths, cells[1:], strict=True):
            spread = row(runs, cells[0], T) if (DOCS / runs).exists() else None
            check_triple(cell, row(source, cells[0], T), (page, cells[0], T), spread)
    assert len(body) >= 7


def test_budget_sweep_table():
    page = "docs/experiments/time_vs_memory.md"
    head, body = table(page, "| budget | T = ")
    T = number(re.search(r"T = ([\d,]+)", head[1])[1])
    for budget, cell in body:
        check_triple(cell, row("time_vs_memory.csv", f"bj.Budget({budget} of plain)", T), budget)
    assert len(body) >= 5


def test_per_device_table():
    page, source = "docs/experiments/memory_vs_length.md", "devices/memory_vs_length.csv"
    head, body = table(page, "| method | T | N = 1 |")
    devices = [int(h.split("=")[1]) for h in head[2:]]
    for method, T, *cells in body:
        one = mb(row(source, method, number(T)))
        for n, cell in zip(devices, cells, strict=True):
            m = re.fullmatch(r"([\d.,]+) MB(?: \((\d+)%\))?", cell)
            assert m, (method, T, cell)
            here = mb(row(source, method, number(T), n))
            assert close(m[1], here), (method, T, n, cell, here)
            if m[2]:
                assert close(m[2], 100 * here / one), (method, T, n, cell)
    assert len(body) >= 10


def test_gru_and_lstm_table():
    page = "docs/experiments/memory_vs_length.md"
    head, body = table(page, "| T | GRU: ")
    names = {"Equinox": "equinox checkpointed"}
    for T, *cells in body:
        for h, cell in zip(head[1:], cells, strict=True):
            cell_name, method = h.split(": ")
            source = f"{cell_name.lower()}/memory_vs_length.csv"
            r = row(source, names.get(method, f"bj.{method}"), number(T))
            m = re.fullmatch(r"([\d.,]+) MB(?:, ([\d.]+)×)?", cell)
            assert m, (T, h, cell)
            assert close(m[1], mb(r)), (T, h, cell, mb(r))
            if m[2]:
                assert close(m[2], float(r["time_ratio"])), (T, h, cell, r["time_ratio"])
    assert len(body) >= 5


# Figures in prose: (page, the sentence with {} for the figures, then for each
# figure its CSV, method, T and what it is: "MB", "s" (median time) or "x" (ratio).
MVL, TVM = "memory_vs_length.csv", "time_vs_memory.csv"
BIN, EQX = "bj.Binomial(log2 T)", "equinox checkpointed"
PROSE = [
    (
        "docs/index.md",
        "`Binomial(log2 T)` plans {} MB at\nT = 1,000 and {} MB at T = 100,000",
        [(MVL, BIN, 1000, "MB"), (MVL, BIN, 100_000, "MB")],
    ),
    (
        "docs/benchmark.md",
        "(0.95 against 1.0 MB) at 0.69× its time ({} against {} s)",
        [(TVM, BIN, 10_000, "s"), (TVM, "equinox, log2 T checkpoints", 10_000, "s")],
    ),
    (
        "docs/experiments/time_vs_memory.md",
        "in {} s against Equinox's\n{} s",
        [(TVM, BIN, 10_000, "s"), (TVM, "equinox, log2 T checkpoints", 10_000, "s")],
    ),
    (
        "docs/experiments/time_vs_memory.md",
        "took {} s against Equinox's {} s",
        [(TVM, "bj.Budget(eqx memory)", 10_000, "s"), (TVM, EQX, 10_000, "s")],
    ),
    (
        "docs/experiments/memory_vs_length.md",
        "{} vs {} MB at {}× vs {}× plain's time (T = 100)",
        [
            (MVL, "bj.Budget(eqx memory)", 100, "MB"),
            (MVL, EQX, 100, "MB"),
            (MVL, "bj.Budget(eqx memory)", 100, "x"),
            (MVL, EQX, 100, "x"),
        ],
    ),
    (
        "docs/experiments/memory_vs_length.md",
        "{} vs {} MB at {}× vs {}×\n(T = 1,000)",
        [
            (MVL, "bj.Budget(eqx memory)", 1000, "MB"),
            (MVL, EQX, 1000, "MB"),
            (MVL, "bj.Budget(eqx memory)", 1000, "x"),
            (MVL, EQX, 1000, "x"),
        ],
    ),
    (
        "docs/experiments/memory_vs_length.md",
        "`Binomial(log2 T)` (17 snapshots) plans {} MB",
        [(MVL, BIN, 100_000, "MB")],
    ),
]


def value(source: str, method: str, T: int, kind: str) -> float:
    r = row(source, method, T)
    return mb(r) if kind == "MB" else float(r["time_s" if kind == "s" else "time_ratio"])


@pytest.mark.parametrize(
    "page, sentence, figures", PROSE, ids=[f"{p[0]}:{i}" for i, p in enumerate(PROSE)]
)
def test_figures_in_prose(page, sentence, figures):
    text = (ROOT / page).read_text()
    words = (re.escape(word) for word in sentence.split())
    pattern = r"\s+".join(words).replace(r"\{\}", r"([\d.,]+)")
    m = re.search(pattern, text)
    assert m, f"{page} no longer says: {sentence!r}"
    for shown, (source, method, T, kind) in zip(m.groups(), figures, strict=True):
        assert close(shown, value(source, method, T, kind)), (page, method, T, kind, shown)
