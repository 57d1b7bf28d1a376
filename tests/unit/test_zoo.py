"""The committed default model really solves IOI (the behaviour, never a weight hash)."""

import pytest

from appbench import load_model
from appbench.plugins import get_registries
from appbench_plugins.zoo.train import evaluate


@pytest.fixture(scope="module")
def model():
    return load_model("zoo-ioi")


def test_zoo_model_solves_ioi_on_the_evaluation_split(model):
    task = get_registries().tasks.get("ioi")
    _, evaluation = task.splits(model.tokenizer)
    report = evaluate(model, task, evaluation)
    assert report["accuracy"] >= 0.95
    assert report["mean_metric"] > 2.0


def test_zoo_model_shape_and_unprocessed_weights(model):
    assert (model.cfg.n_layers, model.cfg.n_heads) == (4, 8)
    assert model.cfg.d_mlp > 0 and model.cfg.normalization_type == "LN"
