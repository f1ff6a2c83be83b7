"""The layout's rules, read from the source (docs/development.md, "Architecture").

* The imports between bpttjax's modules form no cycle: every arrow points down.
* No module uses another module's underscore names (functions, classes,
  constants); importing a private *module* of the package is how the
  facades work and is allowed.
* No function-local import of a bpttjax module: a local import hides an
  arrow that points up.
* The ground floor (``_checks``, ``_tree``, ``_trace``, ``cells/_steps``,
  ``cells/_registry``) imports nothing above it, and the cells' steps and
  registry import only JAX, NumPy and the standard library.
* No library module over 600 lines, no experiments module over 500.
"""

import ast
import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bpttjax"
GROUND = {
    "bpttjax._checks",
    "bpttjax._tree",
    "bpttjax._trace",
    "bpttjax.cells._steps",
    "bpttjax.cells._registry",
}
PURE_CELLS = {"bpttjax.cells._steps", "bpttjax.cells._registry"}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def resolve(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names."""
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    if not is_package(importer):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str):
    """``(target module, imported name or None, node, outside any function)`` for each import."""
    tree = ast.parse(MODULES[name].read_text())
    functions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
    local = {
        id(inner)
        for fn in ast.walk(tree)
        if isinstance(fn, functions)
        for inner in ast.walk(fn)
        if inner is not fn
    }
    top = {id(node) for node in ast.walk(tree) if id(node) not in local}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node, id(node) in top
        elif isinstance(node, ast.ImportFrom):
            source = resolve(name, node)
            for alias in node.names:
                yield source, alias.name, node, id(node) in top


def internal_edges(name: str):
    """The bpttjax modules ``name`` imports, with the names it takes from each."""
    for source, item, node, top in imports(name):
        if not source.startswith("bpttjax"):
            continue
        target = f"{source}.{item}" if item and f"{source}.{item}" in MODULES else source
        yield target, (None if target != source else item), node, top


def graph() -> dict[str, set[str]]:
    return {m: {t for t, *_ in internal_edges(m)} - {m} for m in MODULES}


def test_the_module_graph_has_no_cycle():
    edges, order, state = graph(), [], {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join([*path, m])
        state[m] = "open"
        for t in sorted(edges[m]):
            visit(t, [*path, m])
        state[m] = "done"
        order.append(m)

    for m in sorted(edges):
        visit(m, [])
    assert set(order) == set(MODULES)


def test_no_module_uses_another_modules_private_names():
    bad = []
    for m in MODULES:
        for target, item, node, _ in internal_edges(m):
            if item and item.startswith("_") and target != m:
                bad.append(f"{m}:{node.lineno} imports {item} from {target}")
        tree = ast.parse(MODULES[m].read_text())
        aliases = {}
        for target, item, node, _ in internal_edges(m):
            for alias in node.names:
                if item is None and alias.name.split(".")[-1] == target.split(".")[-1]:
                    aliases[alias.asname or alias.name] = target
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(f"{m}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_no_function_local_imports_of_the_package():
    local = [
        f"{m}:{node.lineno} imports {target} inside a function"
        for m in MODULES
        for target, _, node, top in internal_edges(m)
        if not top
    ]
    assert not local, "\n".join(local)


def test_the_ground_floor_imports_nothing_above_it():
    up = [
        f"{m} imports {t}" for m in GROUND for t in graph()[m] if t not in GROUND and t != "bpttjax"
    ]
    assert not up, "\n".join(up)


def test_the_cells_steps_import_only_jax():
    allowed = {"jax", "numpy", "__future__"}
    for m in PURE_CELLS:
        for source, _, node, _ in imports(m):
            root = source.split(".")[0]
            stdlib = root in sys.stdlib_module_names
            assert root in allowed or stdlib or source in PURE_CELLS, (m, node.lineno, source)


@pytest.mark.parametrize(
    ("folder", "limit"), [("bpttjax", 600), ("experiments", 500)], ids=["library", "experiments"]
)
def test_no_module_is_too_long(folder, limit):
    long = {
        str(p.relative_to(ROOT)): n
        for p in sorted((ROOT / folder).rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > limit
    }
    assert not long, long


def test_the_rules_catch_a_violation(tmp_path, monkeypatch):
    """The checks above can fail: a module importing a private name from another, and
    a cycle, are both reported."""
    mod = PACKAGE / "budget.py"
    source = ast.parse("from ._probe import _layer_key\nfrom . import budget\n")
    edges = [
        (resolve("bpttjax.budget", node), [a.name for a in node.names]) for node in source.body
    ]
    assert edges == [("bpttjax._probe", ["_layer_key"]), ("bpttjax", ["budget"])]
    assert importlib.util.find_spec("bpttjax.budget").origin == str(mod)
    fake = dict(MODULES)
    fake["bpttjax.fake"] = tmp_path / "fake.py"
    (tmp_path / "fake.py").write_text("from ._probe import _layer_key\nfrom . import fake2\n")
    fake["bpttjax.fake2"] = tmp_path / "fake2.py"
    (tmp_path / "fake2.py").write_text("from . import fake\n")
    monkeypatch.setattr(sys.modules[__name__], "MODULES", fake)
    with pytest.raises(AssertionError, match=r"imports _layer_key from bpttjax._probe"):
        test_no_module_uses_another_modules_private_names()
    with pytest.raises(AssertionError, match=r"import cycle: .*fake.*fake2.*fake"):
        test_the_module_graph_has_no_cycle()
