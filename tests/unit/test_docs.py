"""The README documents the whole plugin API: every hook with its exact signature, every name
`appbench` and `appbench.testing` export, every key of task.yaml and of reference files; and the
example package uses nothing else (datasette's documentation tests are the model)."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import appbench
from appbench import hookspecs, testing
from appbench.tasks import ReferenceCircuit, ReferenceFile, TaskSpec

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
EXAMPLE = ROOT / "examples" / "appbench-example"


def _section(title: str) -> str:
    start = README.index(f"\n{title}\n")
    following = re.search(r"\n## ", README[start + 1 :])
    return README[start : start + 1 + following.start()] if following else README[start:]


PLUGIN_GUIDE = _section("## Writing a plugin")


def _signature(name: str) -> str:
    function = getattr(hookspecs, name)
    params = ", ".join(
        f"{p.name}: {p.annotation}" for p in inspect.signature(function).parameters.values()
    )
    return f"{name}({params}) -> {inspect.signature(function).return_annotation}"


HOOKS = sorted(
    n for n, _ in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("appbench_")
)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_with_its_exact_signature(hook):
    assert f"`{_signature(hook)}`" in PLUGIN_GUIDE


def test_the_signatures_are_read_from_the_specs_themselves():
    assert _signature("appbench_register_pruners") == (
        "appbench_register_pruners(register: Callable[[type], None]) -> None"
    )
    assert len(HOOKS) == 6


@pytest.mark.parametrize("name", appbench.__all__)
def test_every_exported_name_is_documented(name):
    assert f"`{name}`" in PLUGIN_GUIDE, f"appbench.{name} is exported but not in 'Writing a plugin'"


@pytest.mark.parametrize("name", testing.__all__)
def test_every_testing_helper_is_documented(name):
    assert f"`{name}" in PLUGIN_GUIDE, f"appbench.testing.{name} is not in 'Writing a plugin'"


@pytest.mark.parametrize(
    "key",
    sorted(set(ReferenceFile.model_fields) | set(ReferenceCircuit.model_fields)),
)
def test_every_reference_file_key_is_documented(key):
    schema = _section("### Reference circuit files")
    assert f"`{key}`" in schema


@pytest.mark.parametrize("key", sorted(TaskSpec.model_fields))
def test_every_task_yaml_key_is_documented(key):
    assert f"`{key}`" in _section("### Tasks")


def test_every_contract_check_is_documented():
    guide = _section("### Testing a plugin")
    for checks in (
        testing.PRUNER_CHECKS,
        testing.DISCOVERER_CHECKS,
        testing.TASK_CHECKS,
        testing.MODEL_CHECKS,
    ):
        for check in checks:
            assert f"`{check.name}`" in guide, check.name


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


def _offenders(files: list[Path]) -> list[str]:
    allowed = {"appbench": appbench.__all__, "appbench.testing": testing.__all__}
    offenders = []
    for path in files:
        for module, names in _imports(path):
            if module in allowed:
                offenders += [
                    f"{path.name}: {module}.{n}" for n in names if n not in allowed[module]
                ]
            elif module.startswith(("appbench.", "appbench_plugins", "appbench_tasks")):
                offenders.append(f"{path.name}: {module}")
    return offenders


def test_the_example_package_imports_only_exported_names():
    files = sorted(EXAMPLE.rglob("*.py"))
    assert len(files) >= 6
    assert _offenders(files) == []


def test_the_import_check_catches_private_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from appbench.runner import run\nfrom appbench import Pruner, results\n"
        "from appbench.testing import _contexts\nimport appbench_plugins.flap\n"
    )
    assert _offenders([bad]) == [
        "bad.py: appbench.runner",
        "bad.py: appbench.results",
        "bad.py: appbench.testing._contexts",
        "bad.py: appbench_plugins.flap",
    ]


def test_the_readme_walks_through_the_example_package():
    for piece in ("examples/appbench-example/", "[project.entry-points.appbench]", "package-data"):
        assert piece in PLUGIN_GUIDE
    for name in ("zdiff", "greedy-ablation", "polarity", "example-polarity"):
        assert name in PLUGIN_GUIDE
