"""Every Python block of the README and the docs pages runs, unchanged, as a user runs it.

A page's blocks run in order in one namespace (a later block may use what an
earlier one defined), with JAX's defaults rather than this suite's strict
settings: float32, standard dtype promotion, rank promotion allowed. Warnings
are still errors. A page that needs several devices runs in a subprocess with
that many simulated CPU devices. Blocks that are not meant to run (shell
commands, output, sketches that need a cluster) are fenced as ``bash`` or
``text``, never as ``python``.
"""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md"] + sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md") if "_ext" not in p.parts
)

# Pages whose blocks need several devices: run in a subprocess with this many.
DEVICES = {"docs/devices.md": 8}

# Blocks that take more than a few seconds on a 2-core CPU (compiling long scans).
SLOW = {
    "README.md[0]",
    "docs/devices.md[0]",
    "docs/devices.md[1]",
    "docs/devices.md[2]",
    "docs/devices.md[3]",
    "docs/flax.md[0]",
    "docs/flax.md[3]",
    "docs/getting_started.md[1]",
    "docs/layers.md[0]",
    "docs/strategies.md[2]",
    "docs/strategies.md[3]",
    "docs/truncation.md[0]",
}

_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+.-]*)")


def fenced_blocks(text: str) -> list[tuple[str, str, int]]:
    """``(language, code, line)`` of every fenced block, indented ones (tabs) dedented."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = _OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, start = m["indent"], m["fence"], i
        body, i = [], i + 1
        while i < len(lines) and lines[i].strip() != fence:
            line = lines[i]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            i += 1
        out.append((m["lang"].lower(), "\n".join(body) + "\n", start + 1))
        i += 1
    return out


def python_blocks(page: str) -> list[tuple[str, int]]:
    return [
        (code, line)
        for lang, code, line in fenced_blocks((ROOT / page).read_text())
        if lang == "python"
    ]


CASES = [
    pytest.param(
        page, n, id=f"{page}[{n}]", marks=[pytest.mark.slow] if f"{page}[{n}]" in SLOW else []
    )
    for page in PAGES
    for n in range(len(python_blocks(page)))
]


def test_python_blocks_are_fenced_as_python():
    """No other spelling of Python hides a block from the tests below."""
    for page in PAGES:
        for lang, code, line in fenced_blocks((ROOT / page).read_text()):
            assert lang not in {"py", "python3", "pycon", "ipython", "pyi"}, (page, line)
            if lang in {"", "text"}:
                assert "import bpttjax" not in code, (page, line, "fence it as python")


@contextlib.contextmanager
def users_defaults():
    """JAX as a user has it: no float64, standard promotion (this suite is strict)."""
    with (
        jax.enable_x64(False),
        jax.numpy_dtype_promotion("standard"),
        jax.numpy_rank_promotion("allow"),
    ):
        yield


class Page:
    """A page's namespace, and how far its blocks have run in this process."""

    def __init__(self, page: str):
        self.page, self.blocks = page, python_blocks(page)
        self.namespace: dict = {"__name__": "__docs__"}
        self.printed: list[str] = []
        self.failed: str | None = None

    def run_to(self, n: int) -> str:
        """Run blocks up to ``n`` (those not run yet); return what block ``n`` printed."""
        while len(self.printed) <= n:
            if self.failed:
                pytest.fail(f"an earlier block of {self.page} failed: {self.failed}")
            k = len(self.printed)
            code, line = self.blocks[k]
            out = io.StringIO()
            try:
                with users_defaults(), contextlib.redirect_stdout(out):
                    exec(compile(code, f"{self.page}:{line}", "exec"), self.namespace)
            except BaseException:
                self.failed = f"block {k} (line {line})"
                raise
            self.printed.append(out.getvalue())
        return self.printed[n]


_PAGES: dict[str, Page] = {}

# Run in a subprocess: every block of the page in order, one JSON line per block.
_RUNNER = """
import io, json, sys, contextlib, traceback
blocks = json.loads(sys.stdin.read())
import jax
jax.config.update("jax_disable_most_optimizations", True)
namespace = {"__name__": "__docs__"}
for code, line in blocks:
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"{sys.argv[1]}:{line}", "exec"), namespace)
    except BaseException:
        print(json.dumps({"error": traceback.format_exc()}))
        break
    print(json.dumps({"printed": out.getvalue()}))
"""

_SUBPROCESS: dict[str, list[dict]] = {}


def run_in_subprocess(page: str, devices: int) -> list[dict]:
    if page not in _SUBPROCESS:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
        env.update(
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
            PYTHONWARNINGS="error",
        )
        run = subprocess.run(
            [sys.executable, "-c", _RUNNER, page],
            input=json.dumps(python_blocks(page)),
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=600,
            check=False,
        )
        results = [json.loads(s) for s in run.stdout.splitlines() if s.startswith("{")]
        assert results, run.stderr[-3000:]
        _SUBPROCESS[page] = results
    return _SUBPROCESS[page]


def run_block(page: str, n: int) -> str:
    """Run block ``n`` of ``page`` after the blocks before it; return what it printed."""
    if page in DEVICES:
        results = run_in_subprocess(page, DEVICES[page])
        assert n < len(results), f"an earlier block of {page} failed:\n{results[-1]['error']}"
        assert "error" not in results[n], results[n]["error"]
        return results[n]["printed"]
    if page not in _PAGES:
        _PAGES[page] = Page(page)
    return _PAGES[page].run_to(n)


@pytest.mark.parametrize("page, n", CASES)
def test_block_runs(page, n):
    run_block(page, n)


def expected_output(page: str, n: int) -> str | None:
    """The ``text`` block that follows python block ``n`` on ``page``, if the page
    introduces it as what that block prints ("prints" just before it)."""
    text = (ROOT / page).read_text()
    blocks = fenced_blocks(text)
    py = [k for k, (lang, _, _) in enumerate(blocks) if lang == "python"][n]
    if py + 1 < len(blocks) and blocks[py + 1][0] == "text":
        lines = text.splitlines()
        before = "\n".join(lines[blocks[py][2] : blocks[py + 1][2] - 1])
        if "prints" in before:
            return blocks[py + 1][1]
    return None


PRINTING = [case for case in CASES if expected_output(*case.values) is not None]


@pytest.mark.parametrize("page, n", PRINTING)
def test_printed_output_is_the_pages(page, n):
    """Where a page shows what a block prints, the block prints exactly that today."""
    assert run_block(page, n).strip() == expected_output(page, n).strip()


def test_every_page_with_python_is_collected():
    assert len(CASES) >= 20
    assert PRINTING, "strategies.md shows what Budget's plan prints"


def _private_defaults(obj) -> list[str]:
    """Defaults spelled as a private name (``remat=_STORE_ALL``) in ``obj``'s source:
    the API reference shows the source's text, which a user cannot write."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
    except (OSError, TypeError):
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if node.name.startswith("_") and node.name != "__init__":
                continue
            args = node.args
            for default in [*args.defaults, *(d for d in args.kw_defaults if d is not None)]:
                if isinstance(default, ast.Name) and default.id.startswith("_"):
                    found.append(f"{obj.__qualname__}.{node.name}: {default.id}")
        elif isinstance(node, ast.AnnAssign) and isinstance(node.value, ast.Name):
            if node.value.id.startswith("_") and not ast.unparse(node.target).startswith("_"):
                found.append(f"{obj.__qualname__}.{ast.unparse(node.target)}: {node.value.id}")
    return found


def test_api_reference_shows_no_private_defaults():
    """Every public function and class of the documented namespaces writes its
    defaults as a user would (``remat=StoreAll()``), since mkdocstrings shows them
    as written."""
    import inspect

    import bpttjax as bj

    modules = [bj, bj.cells, bj.remat, bj.memory, bj.budget, bj.truncation]
    modules += [bj.diagnostics, bj.reference, bj.nnx, bj.linen]
    found = set()
    for module in modules:
        for name, obj in vars(module).items():
            if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)):
                if (getattr(obj, "__module__", "") or "").startswith("bpttjax"):
                    found.update(_private_defaults(obj))
    assert not found, sorted(found)
