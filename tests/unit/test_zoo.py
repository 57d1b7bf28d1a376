"""The committed zoo models really solve their tasks (the behaviour, never a weight hash)."""

import pytest

from appbench import load_model
from appbench.plugins import get_registries
from appbench_plugins.zoo import GROUND_TRUTH_TASKS, RECIPES
from appbench_plugins.zoo.train import evaluate


@pytest.fixture(scope="module", params=sorted(RECIPES))
def zoo(request):
    return request.param, load_model(request.param)


def test_zoo_models_solve_every_task_they_were_trained_on(zoo):
    name, model = zoo
    for task_name in RECIPES[name].tasks:
        task = get_registries().tasks.get(task_name)
        _, evaluation = task.splits(model.tokenizer)
        report = evaluate(model, task, evaluation)
        assert report["accuracy"] >= 0.95, (name, task_name, report)
        # The baseline metric has the sign the task expects: clean prompts favour the answer.
        assert report["mean_metric"] > 0, (name, task_name, report)
        # ... and the corruption takes a good part of it away: the model reads what the
        # corruption changes (else every patching score is rounding noise). greater_than
        # loses the least, its corrupted start year (01) never occurring in training: a
        # quarter on the 4 x 8 models, 19% on zoo-gt-greater_than-8x12 (0.84 -> 0.67).
        share = 0.15 if task_name == "greater_than" else 0.2
        gap = report["mean_metric"] - report["mean_metric_corrupted"]
        assert gap > share * report["mean_metric"], (name, task_name, report)


def test_zoo_model_shapes(zoo):
    name, model = zoo
    recipe = RECIPES[name]
    assert (model.cfg.n_layers, model.cfg.n_heads) == (recipe.n_layers, recipe.n_heads)
    assert model.cfg.d_head == recipe.d_head
    assert model.cfg.attn_only == RECIPES[name].attn_only


def test_the_default_model_is_the_tasks_ground_truth_model_else_the_multitask_model():
    from appbench.runner import DEFAULT_MODEL, RunConfig, default_model

    registered = get_registries().tasks
    # Tasks of installed plugins that name their own model (task.yaml default_model) use it.
    declared = {t: registered.get(t).spec.default_model for t in registered.names()}
    for task, own in declared.items():
        if own:
            assert default_model(task) == own
    tasks = {t for t, own in declared.items() if not own}
    for task in tasks:
        expected = f"zoo-gt-{task}" if task in GROUND_TRUTH_TASKS else "zoo-multitask"
        assert default_model(task) == expected
        assert RunConfig(pruner="none", discoverer="actpatch", task=task).model == expected
    assert default_model("ioi") == "zoo-gt-ioi"
    assert RunConfig(pruner="none", discoverer="actpatch", model="gpt2").model == "gpt2"
    # The fallback runs every built-in task.
    assert DEFAULT_MODEL == "zoo-multitask"
    assert set(RECIPES["zoo-multitask"].tasks) == tasks
    assert not RECIPES["zoo-multitask"].attn_only


def test_larger_ground_truth_models_spread_the_same_chain():
    from appbench_plugins.zoo import (
        GROUND_TRUTH_SHAPES,
        ground_truth_name,
        ground_truth_recipe,
        spread_chain,
    )

    for task, task_shapes in GROUND_TRUTH_SHAPES.items():
        small = RECIPES[ground_truth_name(task)]
        for shape in task_shapes:
            recipe = RECIPES[ground_truth_name(task, shape)]
            assert (recipe.n_layers, recipe.n_heads) == shape
            chain = recipe.circuits[task]
            # Same roles, first layer to last, heads inside the model.
            assert [role for _, role in chain] == [role for _, role in small.circuits[task]]
            heads = recipe.circuit_heads(task)
            assert heads[0].layer == 0 and heads[-1].layer == shape[0] - 1
            assert all(h.head < shape[1] for h in heads)
            assert [h.layer for h in heads] == sorted({h.layer for h in heads})
    recipe = ground_truth_recipe("gendered_pronouns", (8, 12))
    assert recipe.name == "zoo-gt-gendered_pronouns-8x12" and recipe.n_heads == 12
    assert [h.id for h in recipe.circuit_heads("gendered_pronouns")] == [
        "a0.h3",
        "a2.h10",
        "a5.h7",
        "a7.h6",
    ]
    assert spread_chain((("a0.h1", "x"), ("a1.h2", "y"), ("a3.h7", "z")), 8, 12) == (
        ("a0.h1", "x"),
        ("a4.h3", "y"),
        ("a7.h10", "z"),
    )
