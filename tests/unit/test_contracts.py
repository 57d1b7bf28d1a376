"""The plugin contracts (`appbench.testing`, `appbench check-plugin`): every built-in passes, and
each check fails on a plugin built to break exactly what it checks."""

from __future__ import annotations

import json
import random

import pytest
from click.testing import CliRunner
from pydantic import ConfigDict, Field

from appbench import Circuit, Discoverer, Head, Params, PromptPair, Pruner, SearchSpace, TaskSpec
from appbench.cli import cli
from appbench.plugins import get_registries
from appbench.testing import (
    DISCOVERER_CHECKS,
    MODEL_CHECKS,
    PRUNER_CHECKS,
    TASK_CHECKS,
    DiscovererContract,
    ModelSubject,
    PluginSubject,
    PrunerContract,
    TaskContract,
    TaskSubject,
    ToyTask,
    planted_model,
    run_check,
)

SLOW_MODELS = {"smollm2-135m"}


def outcome(checks, name, subject, kind="plugin"):
    check = next(c for c in checks if c.name == name)
    return run_check(check, kind, "under-test", subject)


# ---------------------------------------------------------------- every built-in passes


@pytest.mark.parametrize("name", get_registries().pruners.names())
def test_every_builtin_pruner_passes(name):
    subject = PluginSubject(get_registries().pruners.get(name), {})
    failed = [
        o
        for o in (run_check(c, "pruner", name, subject) for c in PRUNER_CHECKS)
        if o.status != "pass"
    ]
    assert not failed, failed


@pytest.mark.parametrize("name", get_registries().discoverers.names())
def test_every_builtin_discoverer_passes(name):
    subject = PluginSubject(get_registries().discoverers.get(name), {})
    outcomes = [run_check(c, "discoverer", name, subject) for c in DISCOVERER_CHECKS]
    assert [o for o in outcomes if o.status != "pass"] == []


@pytest.mark.parametrize("name", get_registries().tasks.names())
def test_every_builtin_task_passes_on_its_default_model(name):
    from appbench.runner import default_model

    subject = TaskSubject(get_registries().tasks.get(name), default_model(name))
    outcomes = [run_check(c, "task", name, subject) for c in TASK_CHECKS]
    assert [o for o in outcomes if o.status != "pass"] == []


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if n in SLOW_MODELS else n
        for n in get_registries().models.names()
    ],
)
def test_every_builtin_model_passes(name):
    subject = ModelSubject(name, get_registries().models.get(name).loader)
    outcomes = [run_check(c, "model", name, subject) for c in MODEL_CHECKS]
    assert [o for o in outcomes if o.status != "pass"] == []


# ---------------------------------------------------------------- broken pruners and discoverers


class _Keep(Params):
    k: int = Field(default=2, gt=0, description="heads to keep")


class _Base(Pruner):
    name = "broken"
    summary = "A pruner built to break one contract."
    Params = _Keep

    def heads(self, ctx):
        return sorted(SearchSpace.dense(ctx.n_layers, ctx.n_heads).heads)[:1]

    def prune(self, ctx, params):
        return SearchSpace(ctx.n_layers, ctx.n_heads, frozenset(self.heads(ctx)))


class HookLeaver(_Base):
    def prune(self, ctx, params):
        ctx.model.blocks[0].attn.hook_z.add_hook(lambda z, hook: z)
        return super().prune(ctx, params)


class WeightMutator(_Base):
    def prune(self, ctx, params):
        import torch

        with torch.no_grad():
            ctx.model.blocks[0].attn.W_V.mul_(0.5)
        return super().prune(ctx, params)


class TrainModeLeaver(_Base):
    def prune(self, ctx, params):
        ctx.model.train()
        return super().prune(ctx, params)


class Unseeded(_Base):
    calls = 0  # state kept across runs instead of a choice derived from ctx.seed

    def heads(self, ctx):
        Unseeded.calls += 1
        every = sorted(SearchSpace.dense(ctx.n_layers, ctx.n_heads).heads)
        return every[Unseeded.calls % len(every) :][:1]


class EmptyPruner(_Base):
    def heads(self, ctx):
        return []


class WrongShape(_Base):
    def prune(self, ctx, params):
        return SearchSpace.dense(ctx.n_layers + 1, ctx.n_heads)


class LaxParams(Params):
    model_config = ConfigDict(extra="allow")
    k: int = Field(default=2, description="heads")


class Lax(_Base):
    Params = LaxParams


class InfParams(Params):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=True)
    threshold: float = Field(default=0.1, description="a threshold")


class InfAccepting(_Base):
    Params = InfParams


@pytest.mark.parametrize(
    ("cls", "check", "said"),
    [
        (HookLeaver, "model-untouched", "left hooks attached"),
        (WeightMutator, "model-untouched", "changed the model's weights"),
        (TrainModeLeaver, "model-untouched", "train/eval mode"),
        (Unseeded, "deterministic", "kept different heads"),
        (EmptyPruner, "search-space", "empty search space"),
        (WrongShape, "search-space", "space for a"),
        (Lax, "params", "unknown key"),
        (InfAccepting, "params", "threshold=inf"),
    ],
)
def test_each_pruner_check_fails_on_the_pruner_that_breaks_it(cls, check, said):
    found = outcome(PRUNER_CHECKS, check, PluginSubject(cls, {}))
    assert found.status == "fail"
    assert said in found.detail
    # ... and a sound pruner passes that same check.
    assert outcome(PRUNER_CHECKS, check, PluginSubject(_Base, {})).status == "pass"


def test_a_pruner_that_crashes_on_a_tiny_model_fails_that_check():
    class Crashes(_Base):
        def prune(self, ctx, params):
            if ctx.n_heads == 1:
                raise IndexError("index 1 is out of bounds")
            return super().prune(ctx, params)

    found = outcome(PRUNER_CHECKS, "tiny-model", PluginSubject(Crashes, {}))
    assert found.status == "fail" and "IndexError" in found.detail


class _Finder(Discoverer):
    name = "finder"
    summary = "A discoverer built to break one contract."
    Params = _Keep

    def discover(self, ctx, space, params):
        return Circuit(ctx.n_layers, ctx.n_heads, frozenset(sorted(space.heads)[: params.k]))


class Escapes(_Finder):
    def discover(self, ctx, space, params):
        return Circuit(ctx.n_layers, ctx.n_heads, frozenset({Head(0, 0), Head(0, 1)}))


class CrashesOnEmpty(_Finder):
    def discover(self, ctx, space, params):
        return Circuit(ctx.n_layers, ctx.n_heads, frozenset({min(space.heads)}))


class Flaky(_Finder):
    calls = 0  # state kept across runs instead of a choice derived from ctx.seed

    def discover(self, ctx, space, params):
        Flaky.calls += 1
        every = sorted(space.heads)
        return Circuit(ctx.n_layers, ctx.n_heads, frozenset({every[Flaky.calls % len(every)]}))


class DiscovererHookLeaver(_Finder):
    def discover(self, ctx, space, params):
        ctx.model.blocks[1].hook_resid_pre.add_hook(lambda x, hook: x)
        return super().discover(ctx, space, params)


@pytest.mark.parametrize(
    ("cls", "check", "said"),
    [
        (Escapes, "inside-space", "leaves the search space"),
        (CrashesOnEmpty, "small-spaces", "ValueError"),
        (Flaky, "deterministic", "different heads"),
        (DiscovererHookLeaver, "model-untouched", "left hooks attached"),
    ],
)
def test_each_discoverer_check_fails_on_the_discoverer_that_breaks_it(cls, check, said):
    found = outcome(DISCOVERER_CHECKS, check, PluginSubject(cls, {}))
    assert found.status == "fail"
    assert said in found.detail
    assert outcome(DISCOVERER_CHECKS, check, PluginSubject(_Finder, {})).status == "pass"


# ---------------------------------------------------------------- broken tasks and models


def _toy_spec(name):
    return TaskSpec(
        name=name, version="1", summary="s", citation="c", metric="m", n_search=6, n_eval=6, seed=0
    )


class Misaligned(ToyTask):
    def generate(self, tokenizer, n, seed):
        return [
            PromptPair(f"A {f}", f"B {f} x", (" yes",), (" no",), "t")
            for f in ["x", "y", "z", "x y", "y z", "z x", "x z", "y x", "z y", "x x", "y y", "z z"][
                :n
            ]
        ]


class LyingColumns(ToyTask):
    def metric(self, logits, data):
        return logits[:, 0] - logits[:, 1]  # reads columns that metric_columns does not name

    def metric_columns(self, data):
        from appbench import answer_columns

        return answer_columns(data)


class Backwards(ToyTask):
    def metric(self, logits, data):
        return -super().metric(logits, data)


class Restless(ToyTask):
    def generate(self, tokenizer, n, seed):
        return super().generate(tokenizer, n, random.randrange(10**6))


@pytest.fixture
def toy_model_registered(fresh_plugins):
    """The planted 2x2 model registered as 'planted-2x2', for task checks."""
    from appbench import hookimpl

    class Plugin:
        @staticmethod
        @hookimpl
        def appbench_register_models(register):
            register("planted-2x2", planted_model, "the planted 2x2 test model")

    fresh_plugins.register_plugin(Plugin, "toy-models")
    return "planted-2x2"


def test_the_toy_task_passes_every_task_check(toy_model_registered):
    subject = TaskSubject(ToyTask(), toy_model_registered)
    assert [run_check(c, "task", "toy", subject).status for c in TASK_CHECKS] == ["pass"] * len(
        TASK_CHECKS
    )


@pytest.mark.parametrize(
    ("task", "check", "said"),
    [
        (Misaligned(), "aligned", "different lengths"),
        (LyingColumns(), "metric", "metric_columns"),
        (Backwards(), "metric", "does not exceed"),
        (Restless(), "deterministic", "other prompts"),
    ],
)
def test_each_task_check_fails_on_the_task_that_breaks_it(toy_model_registered, task, check, said):
    found = outcome(TASK_CHECKS, check, TaskSubject(task, toy_model_registered))
    assert found.status == "fail"
    assert said in found.detail


def test_a_task_checked_against_a_model_that_cannot_load_is_skipped_not_passed():
    found = outcome(TASK_CHECKS, "aligned", TaskSubject(ToyTask(), "./no-such-model-folder"))
    assert found.status == "skip"


def test_model_checks_catch_a_chatty_loader_a_training_model_and_hooks():
    def chatty(device):
        print("Moving model to device:", device)
        return planted_model(device)

    def training(device):
        return planted_model(device).train()

    def hooked(device):
        model = planted_model(device)
        model.blocks[0].hook_resid_pre.add_hook(lambda x, hook: x)
        return model

    for loader, said in (
        (chatty, "printed on stdout"),
        (training, "training mode"),
        (hooked, "hooks"),
    ):
        found = outcome(MODEL_CHECKS, "loads", ModelSubject("m", loader))
        assert found.status == "fail" and said in found.detail, found
    assert outcome(MODEL_CHECKS, "loads", ModelSubject("m", planted_model)).status == "pass"


def test_a_loader_giving_other_weights_each_time_fails_determinism():
    def random_init(device):
        from appbench.testing import tiny_model

        return tiny_model(seed=random.randrange(10**6))

    found = outcome(MODEL_CHECKS, "deterministic", ModelSubject("m", random_init))
    assert found.status == "fail" and "other logits" in found.detail


# ---------------------------------------------------------------- the pytest contract classes


class TestMagnitudeMeetsThePrunerContract(PrunerContract):
    plugin = get_registries().pruners.get("magnitude")
    params = {"fraction": 0.5}  # noqa: RUF012


class TestActpatchMeetsTheDiscovererContract(DiscovererContract):
    plugin = get_registries().discoverers.get("actpatch")


class TestIoiMeetsTheTaskContract(TaskContract):
    task = get_registries().tasks.get("ioi")
    model = "zoo-gt-ioi"


def test_a_plugin_test_suite_subclassing_a_contract_reports_each_broken_check(pytester):
    pytester.makepyfile(
        test_mine="""
        from appbench import Params, Pruner, SearchSpace
        from appbench.testing import PrunerContract

        class Hooky(Pruner):
            name = "hooky"
            summary = "leaves a hook"
            Params = Params

            def prune(self, ctx, params):
                ctx.model.blocks[0].attn.hook_z.add_hook(lambda z, hook: z)
                return SearchSpace.dense(ctx.n_layers, ctx.n_heads)

        class TestHooky(PrunerContract):
            plugin = Hooky
        """
    )
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=len(PRUNER_CHECKS) - 1, failed=1)
    result.stdout.fnmatch_lines(["*model-untouched*left hooks attached*"])


# ---------------------------------------------------------------- the command


def test_check_plugin_command_prints_a_line_per_check_and_exits_0_for_builtins():
    result = CliRunner().invoke(cli, ["check-plugin", "magnitude", "eap"], obj={})
    assert result.exit_code == 0, result.output
    lines = [
        line for line in result.stdout.splitlines() if line.startswith(("PASS", "FAIL", "SKIP"))
    ]
    # eap is both a pruner and a discoverer: all three plugins' checks run.
    assert len(lines) == 2 * len(PRUNER_CHECKS) + len(DISCOVERER_CHECKS)
    assert all(line.startswith("PASS") for line in lines)
    assert any(line.startswith("PASS  discoverer eap: inside-space") for line in lines)


def test_check_plugin_exits_1_on_a_failing_plugin(fresh_plugins):
    from appbench import hookimpl

    class Plugin:
        @staticmethod
        @hookimpl
        def appbench_register_pruners(register):
            register(HookLeaver)

    fresh_plugins.register_plugin(Plugin, "broken-plugin")
    result = CliRunner().invoke(cli, ["check-plugin", "broken", "--json"], obj={})
    assert result.exit_code == 1
    outcomes = json.loads(result.stdout)
    failed = [o["check"] for o in outcomes if o["status"] == "fail"]
    assert failed == ["model-untouched"]


def test_check_plugin_unknown_name_is_one_line():
    result = CliRunner().invoke(cli, ["check-plugin", "cflp"], obj={})
    assert result.exit_code != 0
    assert "Did you mean 'cflap'?" in result.output


# ---------------------------------------------------------------- what a first plugin author hit


def test_a_model_whose_mask_buffers_were_zeroed_fails_the_causal_check():
    def zeroed_buffers(device):
        model = planted_model(device)
        for block in model.blocks:
            block.attn.IGNORE.zero_()  # what zeroing the whole state dict does
        return model

    found = outcome(MODEL_CHECKS, "causal", ModelSubject("m", zeroed_buffers))
    assert found.status == "fail" and "not causal" in found.detail
    assert outcome(MODEL_CHECKS, "causal", ModelSubject("m", planted_model)).status == "pass"


def test_a_task_yaml_default_model_is_what_run_and_check_plugin_use(fresh_plugins):
    from appbench import hookimpl
    from appbench.runner import default_model

    spec = _toy_spec("toy-with-model").model_copy(
        update={"default_model": "planted-2x2", "n_search": 12, "n_eval": 12}
    )

    class Plugin:
        @staticmethod
        @hookimpl
        def appbench_register_tasks(register):
            register(ToyTask(spec))

        @staticmethod
        @hookimpl
        def appbench_register_models(register):
            register("planted-2x2", planted_model, "the planted 2x2 test model")

    fresh_plugins.register_plugin(Plugin, "toy-plugin")
    assert default_model("toy-with-model") == "planted-2x2"
    assert default_model("ioi") == "zoo-gt-ioi"  # built-ins keep their ground-truth models
    result = CliRunner().invoke(cli, ["check-plugin", "toy-with-model"], obj={})
    assert result.exit_code == 0, result.output
    assert "under planted-2x2's tokenizer" in result.stdout


def test_model_context_takes_a_task_instance_too():
    from appbench.testing import model_context

    ctx = model_context("zoo-gt-ioi", get_registries().tasks.get("ioi"), n_search=4, n_eval=4)
    assert len(ctx.search) == 4 and ctx.task.name == "ioi"
