"""`appbench zoo train` never installs a ground-truth model that fails its own verification."""

from pathlib import Path

from click.testing import CliRunner

import appbench_plugins.zoo as zoo
from appbench.cli import _register_plugin_commands, cli


def test_an_unverified_ground_truth_model_is_not_installed(monkeypatch, tmp_path):
    name = sorted(n for n, recipe in zoo.RECIPES.items() if recipe.circuits)[0]
    # Were the refusal to fail, nothing committed would be overwritten.
    monkeypatch.setattr(zoo, "weights_folder", lambda model: tmp_path / "weights" / model)
    written = []
    monkeypatch.setattr(
        zoo, "write_ground_truth_reference", lambda *args: written.append(args) or tmp_path
    )
    if "zoo" not in cli.commands:
        _register_plugin_commands()
    result = CliRunner().invoke(cli, ["zoo", "train", name, "--steps", "1"], obj={})
    assert result.exit_code == 1, result.output
    assert f"{name} misses its ground-truth goals" in result.output
    assert "accuracy" in result.output
    assert "Traceback" not in result.output
    assert not written and not Path(tmp_path / "weights").exists()
