"""Broken third-party plugins, installed as real distributions: a ``.dist-info`` folder with
METADATA and entry_points.txt beside the plugin's module, on sys.path, found by
importlib.metadata exactly as pip-installed plugins are. Each broken plugin is skipped with one
warning naming its distribution; the built-ins, the other plugins and the CLI keep working."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from appbench import PluginError, PluginSkippedWarning
from appbench.cli import cli

GOOD = """
from appbench import Pruner, SearchSpace, hookimpl

class GoodPruner(Pruner):
    name = "good"
    summary = "Fixture: every head."

    def prune(self, ctx, params):
        return SearchSpace.dense(ctx.n_layers, ctx.n_heads)

@hookimpl
def appbench_register_pruners(register):
    register(GoodPruner)
"""

#: Imports every broken plugin starts with, and a well-formed pruner ("half") that a broken
#: plugin registers before it breaks: it must not survive its plugin being skipped.
PRELUDE = """
from pydantic import Field
from appbench import Params, Pruner, SearchSpace, hookimpl

class Half(Pruner):
    name = "half"
    summary = "Registered before the plugin breaks."
"""

#: kind -> (module body after PRELUDE, text the warning must contain)
BROKEN = {
    "import-error": (
        "import nowhere_to_be_found_xyz",
        "import failed (ModuleNotFoundError: No module named 'nowhere_to_be_found_xyz')",
    ),
    "hook-raises": (
        """
        @hookimpl
        def appbench_register_pruners(register):
            register(Half)
            raise RuntimeError("boom")
        """,
        "appbench_register_pruners raised RuntimeError: boom",
    ),
    "no-name": (
        """
        class NoName(Pruner):
            summary = "s"

        @hookimpl
        def appbench_register_pruners(register):
            register(Half)
            register(NoName)
        """,
        "NoName needs a non-empty string `name`",
    ),
    "params-not-pydantic": (
        """
        class BadParams(Pruner):
            name = "bad-params"
            summary = "s"
            Params = dict

        @hookimpl
        def appbench_register_pruners(register):
            register(Half)
            register(BadParams)
        """,
        "BadParams.Params must be a pydantic model",
    ),
    "undescribed-field": (
        """
        class Undescribed(Pruner):
            name = "undescribed"
            summary = "s"

            class Params(Params):
                k: int = 3

        @hookimpl
        def appbench_register_pruners(register):
            register(Half)
            register(Undescribed)
        """,
        "Undescribed.Params fields lack a description: ['k']",
    ),
    "not-a-subclass": (
        """
        class Stray:
            name = "stray"
            summary = "s"

        @hookimpl
        def appbench_register_pruners(register):
            register(Half)
            register(Stray)
        """,
        "is not a subclass of Pruner",
    ),
    "duplicate-of-builtin": (
        """
        class Imposter(Pruner):
            name = "magnitude"
            summary = "s"

        @hookimpl
        def appbench_register_pruners(register):
            register(Half)
            register(Imposter)
        """,
        "pruner 'magnitude' is registered twice: by plugin 'magnitude' (appbench ",
    ),
    "task-not-a-task": (
        """
        @hookimpl
        def appbench_register_pruners(register):
            register(Half)

        @hookimpl
        def appbench_register_tasks(register):
            register("ioi-but-a-string")
        """,
        "register() takes a Task instance, got 'ioi-but-a-string'",
    ),
    "loader-not-callable": (
        """
        @hookimpl
        def appbench_register_pruners(register):
            register(Half)

        @hookimpl
        def appbench_register_models(register):
            register("m", 42, "not a loader")
        """,
        "the loader of model 'm' is not callable",
    ),
    "hook-signature": (
        """
        @hookimpl
        def appbench_register_pruners(register, extra):
            register(Half)
        """,
        "invalid plugin (PluginValidationError: ",
    ),
    "unknown-hook": (
        """
        @hookimpl
        def appbench_register_prunerz(register):
            register(Half)
        """,
        "implements appbench_register_prunerz, which is not an appbench hook",
    ),
}


def write_dist(
    site: Path, dist: str, version: str, entry_points: dict[str, str], modules: dict[str, str]
) -> None:
    """A distribution as pip would install it: ``<name>-<version>.dist-info`` and its modules."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[appbench]\n{lines}")
    for module, source in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def site(tmp_path, monkeypatch, fresh_plugins):
    """A folder on sys.path to install fake distributions into; their modules are forgotten
    afterwards."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    before = set(sys.modules)
    yield folder
    for name in set(sys.modules) - before:
        if name.startswith("fake_"):
            del sys.modules[name]


def install_good_and_broken(site: Path, kind: str, entry_point: str = "broken") -> None:
    write_dist(site, "appbench-good", "1.2", {"good": "fake_good"}, {"fake_good": GOOD})
    body, _ = BROKEN[kind]
    source = PRELUDE + textwrap.dedent(body)
    write_dist(
        site, "appbench-broken", "0.1", {entry_point: "fake_broken"}, {"fake_broken": source}
    )


def plugin_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, PluginSkippedWarning)]


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_a_broken_plugin_is_skipped_with_one_warning_and_the_rest_works(site, fresh_plugins, kind):
    install_good_and_broken(site, kind)
    with pytest.warns(PluginSkippedWarning) as record:
        regs = fresh_plugins.get_registries()
    _, text = BROKEN[kind]
    messages = plugin_warnings(record)
    assert len(messages) == 1, messages
    assert messages[0].startswith("appbench: plugin 'broken' from appbench-broken 0.1 skipped: ")
    assert text in messages[0]
    assert "\n" not in messages[0]
    # Skipped whole: what it registered before it broke is gone too.
    assert "half" not in regs.pruners and "m" not in regs.models
    assert regs.pruners.entry("good").owner == "plugin 'good' (appbench-good 1.2)"
    assert regs.pruners.entry("magnitude").owner.startswith("plugin 'magnitude' (appbench ")
    assert "broken" not in {info.name for info in fresh_plugins.plugin_infos()}
    [skipped] = fresh_plugins.skipped_plugins()
    assert (skipped.name, skipped.dist, skipped.version) == ("broken", "appbench-broken", "0.1")
    assert text in skipped.error

    # Once per process: nothing more is said, and the CLI works.
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        listed = CliRunner().invoke(cli, ["list", "--json"], obj={})
        shown = CliRunner().invoke(cli, ["plugins", "--json"], obj={})
    assert plugin_warnings(again) == []
    assert listed.exit_code == 0, listed.output
    data = json.loads(listed.output)
    assert {"good", "magnitude", "cflap", "none"} <= {row["name"] for row in data["pruners"]}
    assert "ioi" in {row["name"] for row in data["tasks"]}
    assert shown.exit_code == 0, shown.output
    rows = {row["name"]: row for row in json.loads(shown.output)}
    assert rows["broken"]["status"] == "skipped" and text in rows["broken"]["error"]
    assert rows["good"]["status"] == "loaded" and rows["good"]["error"] is None


def test_an_entry_point_name_taken_by_a_builtin_is_skipped(site, fresh_plugins):
    write_dist(site, "appbench-clash", "3.0", {"magnitude": "fake_clash"}, {"fake_clash": GOOD})
    with pytest.warns(PluginSkippedWarning) as record:
        regs = fresh_plugins.get_registries()
    [message] = plugin_warnings(record)
    assert message.startswith("appbench: plugin 'magnitude' from appbench-clash 3.0 skipped: ")
    assert "the plugin name 'magnitude' is taken by plugin 'magnitude' (appbench " in message
    assert "good" not in regs.pruners and "magnitude" in regs.pruners


@pytest.mark.parametrize("order", ["aaa-first", "bbb-first"])
def test_a_duplicate_across_two_distributions_keeps_the_alphabetically_first(
    tmp_path, monkeypatch, fresh_plugins, order
):
    """The winner does not depend on where the distributions lie on sys.path."""
    sites = {name: tmp_path / name for name in ("aaa", "bbb")}
    for name, folder in sites.items():
        module = f"fake_dup_{name}"
        source = GOOD.replace('"good"', '"dup"').replace("every head", name)
        write_dist(folder, f"appbench-{name}", "1.0", {name: module}, {module: source})
    for name in ["bbb", "aaa"] if order == "aaa-first" else ["aaa", "bbb"]:
        monkeypatch.syspath_prepend(str(sites[name]))  # the last prepended is searched first
    try:
        with pytest.warns(PluginSkippedWarning) as record:
            regs = fresh_plugins.get_registries()
    finally:
        for name in ("fake_dup_aaa", "fake_dup_bbb"):
            sys.modules.pop(name, None)
    [message] = plugin_warnings(record)
    assert message == (
        "appbench: plugin 'bbb' from appbench-bbb 1.0 skipped: pruner 'dup' is registered "
        "twice: by plugin 'aaa' (appbench-aaa 1.0) and by plugin 'bbb' (appbench-bbb 1.0)"
    )
    assert regs.pruners.entry("dup").owner == "plugin 'aaa' (appbench-aaa 1.0)"
    assert regs.pruners.get("dup").summary == "Fixture: aaa."


def test_a_model_loader_that_raises_is_one_line_naming_the_distribution(
    site, fresh_plugins, tmp_path
):
    loader = """
    from appbench import hookimpl

    def load(device):
        raise RuntimeError("weights went missing")

    @hookimpl
    def appbench_register_models(register):
        register("thatmodel", load, "a model whose loader raises")
    """
    write_dist(site, "appbench-models", "0.3", {"models": "fake_models"}, {"fake_models": loader})
    runner = CliRunner()
    listed = runner.invoke(cli, ["list", "models"], obj={})
    assert listed.exit_code == 0 and "thatmodel" in listed.output, listed.output
    args = ["run", "--pruner", "none", "--discoverer", "actpatch", "--model", "thatmodel"]
    outcome = runner.invoke(cli, [*args, "--out", str(tmp_path / "out"), "--quiet"], obj={})
    lines = outcome.output.strip().splitlines()
    assert outcome.exit_code != 0 and len(lines) == 1, outcome.output
    assert lines[0] == (
        "Error: model 'thatmodel' from plugin 'models' (appbench-models 0.3) failed to load: "
        "RuntimeError: weights went missing (rerun with --debug for the traceback)"
    )
    assert "Traceback" not in outcome.output
    again = runner.invoke(cli, ["list", "pruners"], obj={})
    assert again.exit_code == 0 and "magnitude" in again.output


def test_a_command_hook_that_raises_withdraws_its_plugin(site, fresh_plugins):
    source = GOOD + textwrap.dedent(
        """
        @hookimpl
        def appbench_register_commands(cli):
            @cli.command("half-added")
            def half_added():
                pass
            raise RuntimeError("no commands today")
        """
    )
    write_dist(site, "appbench-cmd", "0.2", {"cmd": "fake_cmd"}, {"fake_cmd": source})
    assert "good" in fresh_plugins.get_registries().pruners
    group = click.Group()
    with pytest.warns(PluginSkippedWarning) as record:
        fresh_plugins.register_commands(group)
    [message] = plugin_warnings(record)
    assert message == (
        "appbench: plugin 'cmd' from appbench-cmd 0.2 skipped: appbench_register_commands "
        "raised RuntimeError: no commands today"
    )
    assert "half-added" not in group.commands and "zoo" in group.commands
    assert "good" not in fresh_plugins.get_registries().pruners
    assert [s.name for s in fresh_plugins.skipped_plugins()] == ["cmd"]


def test_register_plugin_by_hand_raises_and_registers_nothing(fresh_plugins):
    import types

    from appbench import Pruner, hookimpl

    class Imposter(Pruner):
        name = "magnitude"
        summary = "s"

    class Fine(Pruner):
        name = "fine-by-hand"
        summary = "s"

    module = types.ModuleType("by_hand")

    @hookimpl
    def appbench_register_pruners(register):
        register(Fine)
        register(Imposter)

    module.appbench_register_pruners = appbench_register_pruners
    with pytest.raises(PluginError, match="pruner 'magnitude' is registered twice"):
        fresh_plugins.register_plugin(module, "by-hand")
    assert "fine-by-hand" not in fresh_plugins.get_registries().pruners
    assert "by-hand" not in {info.name for info in fresh_plugins.plugin_infos()}


# APPBENCH_LOAD_PLUGINS


def install_planted(site: Path) -> None:
    """appbench-planted ships module fake_planted_mod under entry point 'planted'."""
    write_dist(site, "appbench-good", "1.2", {"good": "fake_good"}, {"fake_good": GOOD})
    source = GOOD.replace('"good"', '"planted-pruner"')
    write_dist(
        site,
        "appbench-planted",
        "0.9",
        {"planted": "fake_planted_mod"},
        {"fake_planted_mod": source},
    )


@pytest.mark.parametrize("spelling", ["appbench-planted", "appbench_planted", "Appbench.Planted"])
def test_load_plugins_takes_distribution_names_as_pip_spells_them(
    site, fresh_plugins, monkeypatch, spelling
):
    install_planted(site)
    monkeypatch.setenv("APPBENCH_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("APPBENCH_LOAD_PLUGINS", spelling)
    regs = fresh_plugins.get_registries()
    assert "planted-pruner" in regs.pruners and "magnitude" in regs.pruners
    assert "good" not in regs.pruners  # not asked for


@pytest.mark.parametrize(
    ("asked", "hint"),
    [
        (
            "fake_planted_mod",
            "'fake_planted_mod' is the module of distribution appbench-planted; "
            "APPBENCH_LOAD_PLUGINS takes distribution names.",
        ),
        (
            "planted",
            "'planted' is the entry point of distribution appbench-planted; "
            "APPBENCH_LOAD_PLUGINS takes distribution names.",
        ),
        ("appbench-plantd", "Did you mean 'appbench-planted'?"),
        ("appbench-god,zzzz", "For 'appbench-god', did you mean 'appbench-good'?"),
    ],
    ids=["module", "entry-point", "typo", "two-names"],
)
@pytest.mark.parametrize("autoload", [False, True], ids=["autoload-off", "autoload-on"])
def test_load_plugins_names_that_match_nothing_get_suggestions(
    site, fresh_plugins, monkeypatch, asked, hint, autoload
):
    install_planted(site)
    env = {"APPBENCH_LOAD_PLUGINS": asked}
    # With autoload on every plugin loads anyway; a misspelt name is still refused.
    env["APPBENCH_DISABLE_PLUGIN_AUTOLOAD"] = None if autoload else "1"
    outcome = CliRunner().invoke(cli, ["list"], obj={}, env=env)
    lines = outcome.output.strip().splitlines()
    assert outcome.exit_code == 2 and len(lines) == 1, outcome.output
    names = ", ".join(asked.split(","))
    assert lines[0].startswith(
        f"Error: APPBENCH_LOAD_PLUGINS names {names}: no installed distribution"
    )
    assert hint in lines[0]
    installed = lines[0].rsplit("Installed: ", 1)[1].rstrip(".").split(", ")
    assert {"appbench", "appbench-good", "appbench-planted"} <= set(installed)


def test_the_console_shows_a_skipped_plugin_as_one_stderr_line(site):
    """The real entry point, in a fresh process with the fake distributions on PYTHONPATH."""
    install_good_and_broken(site, "import-error")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("APPBENCH_DISABLE_PLUGIN_AUTOLOAD", None)
    out = subprocess.run(
        [sys.executable, "-m", "appbench.cli", "list", "pruners"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == [
        "appbench: plugin 'broken' from appbench-broken 0.1 skipped: import failed "
        "(ModuleNotFoundError: No module named 'nowhere_to_be_found_xyz')"
    ]
    assert "good" in out.stdout and "magnitude" in out.stdout
