"""pyproject.toml declares ranges; .ci/lowest-constraints.txt pins their lower bounds (what
.ci/lowest tests) and constraints.txt the versions we develop on. The three must agree."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def dependencies() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(line) for line in project["dependencies"]]
    return {canonicalize_name(r.name): r for r in requirements}


def pins(path: Path) -> dict[str, Version]:
    """``name==version`` lines of a constraints file, by normalised name."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        [spec] = requirement.specifier
        assert spec.operator == "==", f"{path.name}: {line} is not an exact pin"
        found[canonicalize_name(requirement.name)] = Version(spec.version)
    return found


def test_every_dependency_is_a_range_with_a_lower_bound():
    for name, requirement in dependencies().items():
        operators = {spec.operator for spec in requirement.specifier}
        assert ">=" in operators, f"{name} has no lower bound"
        assert "==" not in operators, f"{name} is pinned exactly; pin it in constraints.txt"
    assert str(dependencies()["transformer-lens"].specifier) in {"<4,>=3.6", ">=3.6,<4"}


def test_lowest_constraints_pin_exactly_the_lower_bounds():
    lowest = pins(ROOT / ".ci" / "lowest-constraints.txt")
    bounds = {
        name: Version(spec.version)
        for name, requirement in dependencies().items()
        for spec in requirement.specifier
        if spec.operator == ">="
    }
    assert lowest == bounds


def test_the_development_pins_lie_inside_the_ranges():
    pinned = pins(ROOT / "constraints.txt")
    for name, requirement in dependencies().items():
        assert name in pinned, f"constraints.txt does not pin {name}"
        assert requirement.specifier.contains(pinned[name]), (
            f"constraints.txt pins {name}=={pinned[name]}, outside {requirement.specifier}"
        )
    assert pinned["torch"] == Version("2.13.0")
    assert pinned["transformer-lens"] == Version("3.9.0")
