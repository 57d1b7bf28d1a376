"""Plugin loading and registration through a fixture plugin, as a third party would do it."""

import json
import sys
import types

import pytest
from click.testing import CliRunner

from appbench import Head, PluginError, Pruner, SearchSpace, hookimpl
from appbench.cli import cli


class FirstLayerPruner(Pruner):
    name = "first-layer"
    summary = "Fixture pruner: keep the heads of layer 0."

    def prune(self, ctx, params):
        return SearchSpace(ctx.n_layers, ctx.n_heads, {Head(0, h) for h in range(ctx.n_heads)})


def make_plugin(*classes):
    module = types.ModuleType("fixture_plugin")

    @hookimpl
    def appbench_register_pruners(register):
        for cls in classes:
            register(cls)

    module.appbench_register_pruners = appbench_register_pruners
    return module


def test_builtins_are_loaded_through_entry_points(fresh_plugins):
    infos = {info.name: info for info in fresh_plugins.plugin_infos()}
    assert {"none", "magnitude", "actpatch", "zoo", "tasks"} <= set(infos)
    assert infos["actpatch"].dist == "appbench"
    regs = fresh_plugins.get_registries()
    assert "plugin 'magnitude' (appbench" in regs.pruners.entry("magnitude").owner


def test_fixture_plugin_appears_in_list_and_runs(fresh_plugins, tmp_path):
    fresh_plugins.register_plugin(make_plugin(FirstLayerPruner), "fixture")
    runner = CliRunner()
    listed = runner.invoke(cli, ["list", "pruners", "--json"], obj={})
    assert listed.exit_code == 0, listed.output
    names = [row["name"] for row in json.loads(listed.output)]
    assert "first-layer" in names and "magnitude" in names
    result = runner.invoke(
        cli,
        [
            "run",
            "--pruner",
            "first-layer",
            "--discoverer",
            "actpatch",
            "--out",
            str(tmp_path),
            "--n-search",
            "20",
            "--n-eval",
            "20",
            "--json",
            "--quiet",
        ],
        obj={},
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["search_space"]["heads"] == [f"a0.h{h}" for h in range(8)]
    assert set(data["circuit"]["heads"]) <= set(data["search_space"]["heads"])


def test_duplicate_plugin_name_names_both_owners(fresh_plugins):
    class Imposter(FirstLayerPruner):
        name = "magnitude"

    with pytest.raises(PluginError) as err:
        fresh_plugins.register_plugin(make_plugin(Imposter), "imposter")
    message = str(err.value)
    assert "plugin 'magnitude' (appbench" in message and "plugin 'imposter'" in message
    assert fresh_plugins.get_registries().pruners.entry("magnitude").obj is not Imposter


def test_autoload_switch_skips_third_party_entry_points(fresh_plugins, monkeypatch):
    monkeypatch.setenv("APPBENCH_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert fresh_plugins._wanted("appbench")
    assert not fresh_plugins._wanted("appbench-foo")
    monkeypatch.setenv("APPBENCH_LOAD_PLUGINS", "appbench-foo, appbench-bar")
    assert fresh_plugins._wanted("appbench-foo")
    assert not fresh_plugins._wanted("appbench-baz")


def test_help_does_not_import_torch():
    import subprocess

    code = (
        "import sys; from appbench.cli import main; sys.argv=['appbench','--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, 'transformer_lens' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False False"
