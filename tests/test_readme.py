"""The README's Usage example reproduces its Results table, run as a user runs it."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

# The table's rows at T = 1,000 and the strategies they name.
ROWS = {
    "bj.EveryStep": "bj.EveryStep()",
    "bj.Nested(2)": "bj.Nested(2)",
    "bj.Binomial(log2 T)": "bj.Binomial(10)",
}

MEASURE = """
import json, sys
import jax, jax.numpy as jnp
import bpttjax as bj
block, rows = sys.argv[1], json.loads(sys.argv[2])
scope = {}
exec(block, scope)  # the example as written, its gradient included
assert jax.tree.leaves(scope["grads"])[0].dtype == jnp.float32
out = {}
for name, remat in rows.items():
    ns = {}
    exec(block.replace("remat=bj.EveryStep()", f"remat={remat}").split("grads =")[0], ns)
    rep = bj.memory.measure(jax.grad(ns["loss"]), ns["params"], ns["xs"])
    out[name] = rep.temp_bytes
print(json.dumps(out))
"""


def usage_block() -> str:
    text = README.read_text()
    usage = text[text.index("## Usage") : text.index("## Results")]
    return re.search(r"```python\n(.*?)```", usage, re.S).group(1)


def table_mb(name: str) -> float:
    text = README.read_text()
    row = re.search(rf"^\| {re.escape(name)} \| ([0-9.]+) MB", text, re.M)
    return float(row.group(1))


@pytest.mark.slow
def test_usage_example_reproduces_the_table():
    """Run in a fresh process with JAX's defaults (float32), as a user would: the
    example's working memory under each strategy is the table's figure. The
    example used ``jnp.mean(hs**2)`` over all outputs and took 66.0 MB with
    ``Binomial(10)`` against the table's 0.82 MB."""
    block = usage_block()
    assert "remat=bj.EveryStep()" in block
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, block, json.dumps(ROWS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    for name in ROWS:
        want = table_mb(name) * 1e6
        assert abs(measured[name] - want) <= 0.03 * want, (name, measured[name], want)


QUICKSTART = [
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[experiments,peers]"'
    " && python experiments/memory_vs_length.py",
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]"'
    " && python -m pytest -q -n auto --dist worksteal",
]


def test_readme_is_a_front_page():
    """At most 6 KB: the pitch, the two Quickstart commands (the same on Getting
    started), a short example, the headline figure and table, links."""
    text = README.read_text()
    assert len(text.encode()) <= 6000
    started = (README.parent / "docs" / "getting_started.md").read_text()
    for command in QUICKSTART:
        assert f"```bash\n{command}\n```" in text
        assert f"```bash\n{command}\n```" in started
