"""Ground-truth zoo models: the answer key is measured by ablation, not declared. The test
recomputes every verification figure the model card and the reference files report."""

import pytest

from appbench import Head, load_model
from appbench.plugins import get_registries
from appbench_plugins.zoo import RECIPES
from appbench_plugins.zoo.verify import (
    EDGE_THRESHOLD,
    FAITHFULNESS_TOLERANCE,
    NECESSITY_GOAL,
    meets_goals,
    verify_circuit,
)

GROUND_TRUTH = sorted((name, task) for name, recipe in RECIPES.items() for task in recipe.circuits)


@pytest.fixture(scope="module")
def models():
    """Each ground-truth model, loaded once on first use."""
    loaded: dict = {}

    class Models:
        def __getitem__(self, name):
            if name not in loaded:
                loaded[name] = load_model(name)
            return loaded[name]

    return Models()


def test_every_ground_truth_model_has_circuits_of_at_least_4_heads_in_3_layers():
    assert GROUND_TRUTH, "no ground-truth model is registered"
    for name, recipe in RECIPES.items():
        if not recipe.circuits:
            continue
        assert recipe.n_layers >= 4 and recipe.n_heads >= 8
        for task, circuit in recipe.circuits.items():
            heads = recipe.circuit_heads(task)
            assert len(heads) >= 4 and len({h.layer for h in heads}) >= 3, (name, task)
            assert all(role for _, role in circuit)


@pytest.mark.parametrize(("name", "task_name"), GROUND_TRUTH)
def test_the_ground_truth_is_verified_by_ablation(models, name, task_name):
    model = models[name]
    task = get_registries().tasks.get(task_name)
    _, evaluation = task.splits(model.tokenizer)
    recipe = RECIPES[name]
    figures = verify_circuit(model, task, frozenset(recipe.circuit_heads(task_name)), evaluation)
    assert figures["accuracy"] >= 0.95
    for ablation in ("mean", "resample"):
        # Within 5% of the whole model either way: the other heads neither carry the task nor
        # work against it.
        assert abs(figures[f"faithfulness_{ablation}"] - 1) <= FAITHFULNESS_TOLERANCE
    assert min(figures["necessity"].values()) >= NECESSITY_GOAL
    assert meets_goals(figures) == []
    # The shipped reference is the designated circuit, with the edges measured here.
    reference = task.reference_file(name)
    assert reference is not None and reference.default == "ground-truth"
    truth = reference.circuits["ground-truth"]
    assert truth.kind == "ground-truth"
    assert {Head.parse(h) for h in truth.heads} == set(recipe.circuit_heads(task_name))
    assert truth.edges == figures["edges"]
    assert all(abs(figures["edge_scores"][e]) >= EDGE_THRESHOLD for e in truth.edges)
    # Every designated head but the first receives an edge, and the last one reaches the logits.
    heads = recipe.circuit_heads(task_name)
    assert f"{heads[-1].id}->logits" in truth.edges
    for head in heads[1:]:
        assert any(e.split("->")[1].startswith(head.id) for e in truth.edges), head
    # The model card reports the same figures.
    from appbench_plugins.zoo import weights_folder

    card = weights_folder(name).joinpath("README.md").read_text()
    assert f"{figures['faithfulness_mean']:.3f} / {figures['faithfulness_resample']:.3f}" in card
