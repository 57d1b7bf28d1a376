"""appbench-example's own tests: appbench's contract checks for each plugin, the ground truth
verified by ablation, known answers for the pruner and the discoverer, and the CLI end to end."""

import json
import subprocess
import sys

import pytest
from appbench_example import GreedyAblation, PolarityTask, ZDiff
from appbench_example.model import MODEL_NAME, load_polarity_model

from appbench import Head, PatchingEngine, SearchSpace, get_registries
from appbench.testing import (
    DiscovererContract,
    ModelContract,
    PrunerContract,
    TaskContract,
    model_context,
)

TRUTH = frozenset({Head(0, 2), Head(1, 3)})


class TestZDiffContract(PrunerContract):
    plugin = ZDiff


class TestGreedyAblationContract(DiscovererContract):
    plugin = GreedyAblation


class TestPolarityContract(TaskContract):
    task = PolarityTask()
    model = MODEL_NAME


class TestModelContract(ModelContract):
    model = MODEL_NAME


def test_the_entry_point_registered_every_plugin():
    regs = get_registries()
    assert regs.pruners.get("zdiff") is ZDiff
    assert regs.discoverers.get("greedy-ablation") is GreedyAblation
    assert isinstance(regs.tasks.get("polarity"), PolarityTask)
    assert MODEL_NAME in regs.models.names()


def _ablated(kept):
    """Mean metric on the evaluation split with every head outside ``kept`` mean-ablated."""
    import torch

    model, task = load_polarity_model(), PolarityTask()
    _, data = task.splits(model.tokenizer)
    engine = PatchingEngine(model, task)
    means = engine.per_prompt(engine.group_means(engine.cache_z(data.corrupt), data), data)
    keep = torch.zeros(2, 4, dtype=torch.bool)
    for head in kept:
        keep[head.layer, head.head] = True
    return engine.ablated_metric(data, keep, means).mean().item()


def test_the_ground_truth_is_verified_by_ablation():
    every = SearchSpace.dense(2, 4).heads
    full, empty = _ablated(every), _ablated(frozenset())
    assert full - empty > 1.0  # the corruption moves the metric
    # The circuit alone keeps the whole gap ...
    assert (_ablated(TRUTH) - empty) / (full - empty) == pytest.approx(1.0, abs=1e-6)
    # ... each of its heads is necessary ...
    for head in TRUTH:
        assert (_ablated(every - {head}) - empty) / (full - empty) < 0.01
    # ... and the live distractors are not.
    assert _ablated(every - {Head(0, 0), Head(1, 1)}) == pytest.approx(full, abs=1e-6)
    # The shipped reference file says the same.
    name, reference = PolarityTask().reference(MODEL_NAME)
    assert name == "ground-truth" and reference.kind == "ground-truth"
    assert frozenset(Head.parse(h) for h in reference.heads) == TRUTH


def test_greedy_ablation_recovers_the_ground_truth_dense_and_behind_zdiff():
    ctx = model_context(MODEL_NAME, task="polarity", n_search=32, n_eval=16)
    dense = SearchSpace.dense(2, 4)
    assert GreedyAblation().discover(ctx, dense, GreedyAblation.Params()).heads == TRUTH
    space = ZDiff().prune(ctx, ZDiff.Params())
    assert space.heads >= TRUTH  # the circuit heads move most under the corruption
    assert GreedyAblation().discover(ctx, space, GreedyAblation.Params()).heads == TRUTH


def _appbench(*args):
    return subprocess.run(
        [sys.executable, "-m", "appbench", *args], capture_output=True, text=True, timeout=300
    )


def test_appbench_list_shows_the_example_plugins():
    listing = json.loads(_appbench("list", "--json").stdout)
    names = {kind: {entry["name"] for entry in entries} for kind, entries in listing.items()}
    assert "zdiff" in names["pruners"] and "greedy-ablation" in names["discoverers"]
    assert "polarity" in names["tasks"] and MODEL_NAME in names["models"]


@pytest.mark.parametrize(
    ("pruner", "discoverer"),
    [
        ("zdiff", "greedy-ablation"),
        ("none", "greedy-ablation"),
        ("zdiff", "actpatch"),
        ("magnitude", "greedy-ablation"),
    ],
)
def test_appbench_run_with_the_example_plugins_end_to_end(tmp_path, pruner, discoverer):
    done = _appbench(
        "run", "--pruner", pruner, "--discoverer", discoverer, "--task", "polarity",
        "--model", MODEL_NAME, "--out", str(tmp_path), "--json", "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result["circuit"]["heads"]) == {h.id for h in TRUTH}
    assert result["overlap"]["f1"] == 1.0
    assert result["reference"]["kind"] == "ground-truth"
    assert result["faithfulness"]["normalised"] == pytest.approx(1.0, abs=1e-3)
    plugins = {p["dist"] for p in result["provenance"]["plugins"]}
    assert "appbench-example" in plugins


def test_a_pruner_blind_to_the_circuit_gives_an_empty_circuit_that_is_flagged(tmp_path):
    """Contrastive FLAP compares squared activation sizes; the polarity signal flips sign and
    keeps its size, so cflap cannot see the circuit. The run must say so, not print a score."""
    done = _appbench(
        "run", "--pruner", "cflap", "--discoverer", "greedy-ablation", "--task", "polarity",
        "--model", MODEL_NAME, "--out", str(tmp_path), "--json", "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert not set(result["search_space"]["heads"]) >= {h.id for h in TRUTH}
    assert result["circuit"]["heads"] == []
    assert "empty-circuit" in {flag["code"] for flag in result["flags"]}
