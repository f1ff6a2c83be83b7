"""experiments/budget_promise.py at tiny sizes, through its command line."""

import csv

from experiments import budget_promise

LOSSES = ("readme", "per_step", "linear")


def read(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_quick_run_keeps_the_promise_and_resumes(tmp_path):
    argv = ["--quick", "--lengths", "40", "--fractions", "0.01,0.3,1.2", "--out", str(tmp_path)]
    budget_promise.main(argv)
    path = tmp_path / "budget_promise.csv"
    rows = read(path)
    assert {(r["T"], r["loss"]) for r in rows} == {("40", x) for x in LOSSES}
    assert len(rows) == 3 * 3
    for r in rows:
        if r["status"] == "ok":
            assert int(r["temp_bytes"]) <= int(r["budget_bytes"]), r
            assert float(r["ratio"]) <= 1, r
        else:
            assert r["status"] == "too_small", r
            assert int(r["least_bytes"]) > int(r["budget_bytes"]), r
    assert {r["status"] for r in rows} == {"ok", "too_small"}
    big = [r for r in rows if float(r["fraction"]) == 1.2 and r["loss"] != "linear"]
    assert big and all(r["strategy"] == "StoreAll()" for r in big), big
    before = path.read_bytes()
    budget_promise.main(argv)  # every point is there: nothing is measured again
    assert path.read_bytes() == before
