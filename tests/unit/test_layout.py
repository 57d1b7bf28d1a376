"""The architecture rules of DESIGN.md that a test can check."""

import ast
import graphlib
import inspect
from pathlib import Path

import pytest

import appbench
from appbench import hookspecs

ROOT = Path(__file__).resolve().parents[2]


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


def test_plugins_and_tasks_import_only_the_public_api():
    offenders = []
    for folder in ("plugins", "tasks"):
        for path in (ROOT / folder).rglob("*.py"):
            for module, names in _imports(path):
                if module.startswith("appbench."):
                    offenders.append(f"{path.relative_to(ROOT)}: from {module}")
                elif module == "appbench":
                    missing = [n for n in names if n not in appbench.__all__]
                    if missing:
                        offenders.append(
                            f"{path.relative_to(ROOT)}: {missing} not in appbench.__all__"
                        )
    assert not offenders, offenders


def test_every_hook_is_documented_in_its_spec_and_the_readme():
    readme = (ROOT / "README.md").read_text()
    hooks = [
        name
        for name, _ in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("appbench_")
    ]
    assert len(hooks) == 6
    for name in hooks:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert "Args:" in doc, f"{name} lacks an Args section"
        assert name in readme, f"{name} is not documented in README.md"


def test_every_plugin_module_opens_with_its_technique():
    for path in (ROOT / "plugins" / "appbench_plugins").glob("*.py"):
        if path.name == "__init__.py":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc) > 80, (
            f"{path.name} needs a module docstring explaining its technique"
        )


def import_graph(folder: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports, anywhere in its body (inside functions
    and ``TYPE_CHECKING`` blocks too: DESIGN.md allows no upward import at all)."""
    modules = {}
    for path in folder.rglob("*.py"):
        parts = (package, *path.relative_to(folder).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for module, names in _imports(path):
            submodules = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
            # `from pkg import submodule` imports the submodule (and runs pkg's __init__, which
            # the submodule's own import runs anyway); `from pkg import name` imports pkg.
            targets = submodules or [module]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def import_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph``, or [] when there is none."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as cycle:
        return list(cycle.args[1])
    return []


def test_appbench_has_no_import_cycle():
    graph = import_graph(ROOT / "appbench", "appbench")
    assert {"appbench.engine.patching", "appbench.runner", "appbench"} <= set(graph)
    assert "appbench.engine.patching" in graph["appbench.runner"]
    assert import_cycle(graph) == [], " -> ".join(import_cycle(graph))


@pytest.mark.parametrize(
    "files",
    [
        # a lazy import inside a function closes the cycle
        {"a.py": "from pkg.b import x", "b.py": "def f():\n    from pkg import a"},
        # a TYPE_CHECKING import through a subpackage
        {
            "a.py": "from pkg.sub.c import y",
            "sub/__init__.py": "",
            "sub/c.py": "if TYPE_CHECKING:\n    import pkg.a",
        },
    ],
)
def test_the_cycle_check_finds_planted_cycles(tmp_path, files):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    assert len(import_cycle(import_graph(tmp_path, "pkg"))) >= 3  # a -> b -> a
