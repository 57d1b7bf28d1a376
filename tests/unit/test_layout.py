"""The architecture rules of DESIGN.md that a test can check."""

import ast
import inspect
from pathlib import Path

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
