"""What the scripts share: typed results tables, options, the benchmark model, the harness."""

import argparse
import dataclasses
import functools
import math
import os

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CELLS

import bpttjax as bj
from experiments import _cli, _harness, _methods, _model, _sweep
from experiments._table import Table


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    n: int
    x: float
    maybe: int | None
    flag: bool
    either: int | float


ROWS = [
    Row("plain", 1, 0.1, None, True, 3),
    Row('comma, "quote"', -2, math.inf, 7, False, 0.5),
    Row("", 0, 1e-300, 0, True, math.inf),
]


def read_back(table):
    rows = table.read()
    assert all(isinstance(r, Row) for r in rows)
    return rows


def test_table_round_trips_typed_rows(tmp_path):
    table = Table(tmp_path / "t.csv", Row)
    assert table.read() == []
    table.append(ROWS[:1])
    table.append(ROWS[1:])
    assert read_back(table) == ROWS
    got = read_back(table)[1]
    assert type(got.n) is int and type(got.either) is float and type(got.flag) is bool
    assert type(read_back(table)[0].either) is int and read_back(table)[0].maybe is None
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0] == "name,n,x,maybe,flag,either"  # one header, the fields in order
    assert lines[1] == "plain,1,0.1,,True,3"
    nan = Table(tmp_path / "nan.csv", Row)
    nan.append([Row("a", 1, math.nan, 1, False, np.float64(2.5))])
    (row,) = nan.read()
    assert math.isnan(row.x) and row.either == 2.5
    assert "nan,1,False,2.5" in (tmp_path / "nan.csv").read_text()


def test_table_write_drop_and_cut_lines(tmp_path):
    path = tmp_path / "t.csv"
    table = Table(path, Row)
    table.write(ROWS)
    table.drop(lambda r: r.n < 0)
    assert read_back(table) == [ROWS[0], ROWS[2]]
    before = path.read_bytes()
    table.drop(lambda r: False)
    assert path.read_bytes() == before
    # a crash in the middle of a line: the line is dropped, and repaired before appending
    for cut in (b"half,3,0.", b"half,3,0.1,,Tr,1"):  # too few cells, or a cell cut short
        path.write_bytes(before + cut)
        assert read_back(table) == [ROWS[0], ROWS[2]]
    table.append(ROWS[1:2])
    assert read_back(table) == [ROWS[0], ROWS[2], ROWS[1]]
    table.write([])
    assert path.read_text().splitlines() == ["name,n,x,maybe,flag,either"]
    assert not os.path.exists(f"{path}.tmp")


def test_table_refuses_other_columns_and_rows(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("name,n\nplain,1\n")
    table = Table(path, Row)
    with pytest.raises(SystemExit, match="has columns"):
        table.read()
    with pytest.raises(SystemExit, match="has columns"):
        table.append(ROWS)
    assert path.read_text() == "name,n\nplain,1\n"
    with pytest.raises(TypeError, match="expected a Row"):
        Table(tmp_path / "u.csv", Row).append([("plain", 1)])
    with pytest.raises(TypeError, match="dataclass"):
        Table(tmp_path / "v.csv", dict)


def test_option_types():
    assert _cli.parse_bytes("8GiB") == 8 * 2**30
    assert _cli.parse_bytes("500MB") == 500 * 10**6
    assert _cli.parse_bytes("2GB") == 2 * 10**9  # the library's units: bj.budget.parse_bytes
    assert _cli.parse_bytes("1234") == 1234
    assert _cli.lengths("300,100,100") == [100, 300]
    assert _cli.comma_list(_cli.float_in(0, 1))("0.9, 0.5") == [0.5, 0.9]
    assert _cli.int_at_least(2)("2") == 2
    assert _cli.float_dtype("float64") == "float64"
    assert _cli.remat_spec(" nested:10x10 ") == "nested:10x10"
    bad = [
        (_cli.parse_bytes, "lots"),
        (_cli.parse_bytes, "0"),
        (_cli.parse_bytes, "2G"),  # a unit without B is refused, as by Budget("2G")
        (_cli.lengths, "10,x"),
        (_cli.lengths, "0"),
        (_cli.lengths, ","),
        (_cli.positive_int, "0"),
        (_cli.non_negative_int, "-1"),
        (_cli.int_at_least(2), "1"),
        (_cli.positive_float, "inf"),
        (_cli.float_in(0, 1), "1"),
        (_cli.float_in(0, 10, high_included=True), "10.5"),
        (_cli.float_dtype, "int32"),
        (_cli.remat_spec, "nested:x"),
    ]
    for parse, text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    assert _cli.float_in(0, 10, high_included=True)("10") == 10
    assert _cli.float_in(0, 1, low_included=True)("0") == 0
    with pytest.raises(argparse.ArgumentTypeError, match="every_step"):
        _cli.remat_spec("sometimes")  # the message lists the registered strategies
    with pytest.raises(argparse.ArgumentTypeError, match="KiB, MiB, GiB"):
        _cli.parse_bytes("2G")  # the message lists the units


def test_parser_quick_defaults_and_shared_options():
    p = _cli.parser("Title.\n\nMore.", quick="small", fresh="again")
    p.add_argument("--size", type=_cli.positive_int, default=100)
    p.add_argument("--ks", type=_cli.lengths, default="1,2")
    _cli.add_model_options(p, cell="gru")
    quick = {"size": 3, "ks": "5"}
    args = _cli.parse(p, [], quick)
    assert (args.size, args.ks, args.out, args.backend, args.fresh) == (
        100,
        [1, 2],
        "results",
        None,
        False,
    )
    assert (args.cell, args.batch, args.input, args.hidden) == ("gru", 32, 64, 256)
    assert (_cli.parse(p, ["--quick"], quick).size, _cli.parse(p, ["--quick"], quick).ks) == (
        3,
        [5],
    )
    assert _cli.parse(p, ["--quick", "--size", "7"], quick).size == 7
    assert p.description == "Title."
    for cell in CELLS:  # --cell takes every registered cell, and nothing else
        assert _cli.parse(p, ["--cell", cell]).cell == cell
    with pytest.raises(SystemExit):
        _cli.parse(p, ["--cell", "nope"])


def test_from_args():
    @dataclasses.dataclass
    class Config:
        size: int
        out: str

    args = argparse.Namespace(size=3, out="x", other=1)
    assert _cli.from_args(Config, args) == Config(3, "x")


def test_gpu_backend_names_the_gpu_platforms_this_jax_has():
    """``--backend gpu`` on a CUDA machine: JAX's ``gpu`` alone also tries ROCm, and fails."""
    assert _cli.platforms("gpu", {"cpu": 0, "tpu": 0, "cuda": 0}) == "cuda"
    assert _cli.platforms("gpu", ["cpu", "rocm"]) == "rocm"
    assert _cli.platforms("gpu", ["cuda", "rocm"]) == "cuda,rocm"
    assert _cli.platforms("gpu", ["cpu"]) == "gpu"  # JAX says what is missing
    assert _cli.platforms("cpu", ["cpu", "cuda"]) == "cpu"
    assert _cli.platforms("tpu", ["cpu"]) == "tpu"


def test_progress_without_tqdm(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    assert list(_cli.progress(range(3), total=3, desc="x")) == [0, 1, 2]
    with _cli.progress(total=3) as bar:
        bar.update(1)
        bar.set_postfix_str("anything")
        bar.set_postfix(val=1)


@pytest.mark.parametrize("cell", CELLS)
def test_benchmark_model_is_the_registered_cell(cell):
    """The model's step against the cell's own step and a written-out read-out loss."""
    spec = bj.cells.get(cell)
    params = _model.init_model(jax.random.key(0), cell, 3, 5, jnp.float64)
    xs = jnp.asarray(np.random.default_rng(0).standard_normal((4, 2, 3)))  # (T, B, D)
    carry = spec.initial_carry(5, (2,), jnp.float64)
    total = 0.0
    for x in xs:
        carry, h = spec.step(params["cell"], carry, x)
        total += np.mean((np.asarray(h) @ np.asarray(params["W_out"]) - np.asarray(x)) ** 2)
    np.testing.assert_allclose(_model.loss(params, xs, cell=cell), total / 4, rtol=1e-12)
    assert _model.carry_bytes(cell, 2, 5, jnp.float32) == 2 * 5 * 4 * spec.carry_arrays


MEMORY = tuple(m for m in _methods.METHODS if m.has_model)
"""memory_vs_length.py's methods: every one with the benchmark model."""


def test_methods_keep_their_names_and_read_the_registry():
    # the names are the CSVs' method column, which the docs quote
    assert tuple(m.name for m in MEMORY) == (
        "lax.scan", "lax.scan+checkpoint", "bj.StoreAll", "bj.EveryStep", "bj.Nested(2)",
        "bj.Nested(3)", "bj.Nested(4)", "bj.Binomial(log2 T)", "bj.Binomial(eqx count)",
        "bj.Budget(eqx memory)", "flax.nnx.RNN", "equinox checkpointed",
        "equinox, log2 T checkpoints",
    )  # fmt: skip
    assert [m.name for m in _methods.METHODS if not m.has_model] == [
        "bj.StoreAll (batch_chunks=1)", "bj.StoreAll (batch_chunks=2)", "PyTorch",
        "jax.experimental.rnn",
    ]  # fmt: skip
    assert all(m.has_layer for m in _methods.METHODS)
    text = "nested2, Lax.Scan, binomial:5, nested:10x10"
    names = [m.name for m in _methods.parse_methods(text, MEMORY)]
    assert names == ["lax.scan", "bj.Nested(2)", "bj.Binomial(5)", "bj.Nested(10x10)"]
    for text in ("nope", "nested:x", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            _methods.parse_methods(text, MEMORY)
    with pytest.raises(argparse.ArgumentTypeError, match="unknown method 'binomial:5'"):
        _methods.parse_methods("binomial:5", _methods.METHODS, specs=False)
    assert _methods.log2_snapshots(1000) == 10 and _methods.equinox_default_checkpoints(1000) == 44


def test_every_listed_method_can_be_chosen():
    """As --help writes it, in any case and spacing, alone or in a list: even
    ``equinox, log2 T checkpoints``, whose name holds the separator."""
    every = _methods.METHODS
    for m in every:
        for text in (m.name, m.name.upper().replace(" ", ""), f"lax.scan,{m.name}"):
            chosen = [c.name for c in _methods.parse_methods(text, every, specs=False)]
            assert chosen == list(dict.fromkeys(["lax.scan", m.name]))[-len(chosen) :], text
            assert m.name in chosen, text
    text = "equinox, log2 T checkpoints,equinox checkpointed, lax.scan"
    chosen = [m.name for m in _methods.parse_methods(text, every)]
    assert chosen == ["lax.scan", "equinox checkpointed", "equinox, log2 T checkpoints"]
    aliases = "torch, nnx, eqx, cudnn, binomial, chunks, one"
    assert [m.name for m in _methods.parse_methods(aliases, every)] == [
        "bj.StoreAll (batch_chunks=1)", "bj.StoreAll (batch_chunks=2)", "bj.Binomial(log2 T)",
        "flax.nnx.RNN", "equinox checkpointed", "PyTorch", "jax.experimental.rnn",
    ]  # fmt: skip


def test_a_cell_without_peers_has_no_peer_methods():
    """The peers' cells come from one table; every other method takes any registered cell."""
    for m in _methods.METHODS:
        if m.family in ("flax", "torch"):
            assert m.cells == tuple(_methods.PEER_CELLS)
        elif m.family != "cudnn":
            assert m.cells is None and all(m.has_cell(c) for c in CELLS)
    assert set(_methods.PEER_CELLS) <= set(CELLS)


@pytest.mark.parametrize("cell", CELLS)
def test_the_library_tests_model_is_this_one(cell):
    """tests/helpers.py keeps its own copy of the benchmark model (the library tests
    import nothing from experiments/): the same parameters and the same jaxpr of the
    gradient, so the same values and the same compiled memory."""
    params = _model.init_model(jax.random.key(0), cell, 3, 5, jnp.float64)
    helpers.assert_trees_equal(
        params, helpers.init_model(jax.random.key(0), cell, 3, 5, jnp.float64)
    )
    for remat in (None, bj.Binomial(2)):
        args = _model.abstract_inputs(cell, 50, 2, 3, 4, jnp.float32)
        assert args == helpers.abstract_inputs(cell, 50, 2, 3, 4, jnp.float32)
        mine = jax.make_jaxpr(jax.grad(functools.partial(_model.loss, cell=cell, remat=remat)))
        theirs = jax.make_jaxpr(
            jax.grad(functools.partial(helpers.model_loss, cell=cell, remat=remat))
        )
        assert str(mine(*args)) == str(theirs(*args))
    assert _model.carry_bytes(cell, 2, 5, jnp.float32) == helpers.carry_bytes(
        cell, 2, 5, jnp.float32
    )


TINY = dict(cell="rnn", T=5, batch=2, input=3, hidden=4, dtype="float32")


def failing(name, err):
    def build(problem):
        raise err

    return _harness.Method(name, build=build)


def fails_when_run(name, err):
    """Compiles (its parameters traced abstractly, once) but raises when they are made."""
    grad_fn, make_params = _methods.BY_NAME["bj.StoreAll"].model(_model.Problem(**TINY))
    calls = []

    def params(key):
        calls.append(key)
        if len(calls) > 1:
            raise err
        return make_params(key)

    return _harness.Method(name, build=lambda problem: (grad_fn, params))


def test_measure_length_records_failures_and_goes_on():
    methods = [
        _methods.BY_NAME["bj.EveryStep"],
        failing(
            "oom", jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1TB")
        ),
        failing("broken", ValueError("something else broke")),
        fails_when_run("warm-up", MemoryError("simulated host out of memory")),
    ]
    rows = _sweep.measure_length(_model.Problem(**TINY), methods, _sweep.Timing(repeats=2))
    by = {r.method: r for r in rows}
    assert list(by) == ["bj.EveryStep", "oom", "broken", "warm-up"]  # no baseline: not asked
    assert by["bj.EveryStep"].status == "ok" and by["bj.EveryStep"].timed
    assert by["bj.EveryStep"].time_s > 0 and by["bj.EveryStep"].memory_ratio > 0
    assert by["bj.EveryStep"].backend == jax.default_backend()
    assert by["oom"].status == "oom" and "compile failed" in by["oom"].note
    assert "RESOURCE_EXHAUSTED" in by["oom"].note and by["oom"].temp_bytes is None
    assert by["broken"].status == "error" and "something else broke" in by["broken"].note
    assert by["warm-up"].status == "oom" and "warm-up failed" in by["warm-up"].note
    assert by["warm-up"].temp_bytes > 0 and not by["warm-up"].timed  # memory known, time not


def test_measure_length_without_timing():
    problem = _model.Problem(**TINY)
    base = _methods.METHODS[0]
    for timing, note in (
        (_sweep.Timing(memory_limit=1), "exceeds the memory limit"),
        (_sweep.Timing(max_time_length=4), "memory only (T > --max-time-length 4)"),
        (_sweep.Timing(no_time=True), "memory only (--no-time)"),
    ):
        (row,) = _sweep.measure_length(problem, [base], timing)
        assert row.status == "ok" and not row.timed and math.isnan(row.time_ratio)
        assert row.memory_ratio == 1.0 and note in row.note and timing.is_done(row)
    assert not _sweep.Timing().is_done(row)  # a run that times it redoes it
    assert not _sweep.Timing(no_time=True).is_done(dataclasses.replace(row, status="oom"))


def test_time_rounds_rotates_and_drops_failures():
    order = []

    def call(name):
        def run():
            order.append(name)
            if name == "c" and len(order) > 3:
                raise RuntimeError("device lost")

        return run

    times = _harness.time_rounds({n: call(n) for n in "abc"}, repeats=3)
    assert order[:3] == ["a", "b", "c"] and order[3:6] == ["b", "c", "a"]
    assert len(times["a"]) == len(times["b"]) == 3
    assert isinstance(times["c"], RuntimeError)
    assert _harness.is_oom(MemoryError()) and not _harness.is_oom(ValueError("out of memory"))
