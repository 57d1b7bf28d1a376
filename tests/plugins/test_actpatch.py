"""Known-answer tests of activation patching on the planted model."""

import pytest

from appbench import Head, SearchSpace
from appbench.runner import CostCounter
from appbench.testing import PLANTED_CIRCUIT, check_discoverer, toy_context
from appbench_plugins.actpatch import ActPatch


def test_recovers_exactly_the_planted_circuit():
    circuit = check_discoverer(ActPatch)
    assert circuit.heads == PLANTED_CIRCUIT
    assert circuit.scores["a0.h0"] == pytest.approx(-1.0, abs=1e-5)
    assert circuit.scores["a1.h1"] == pytest.approx(-1.0, abs=1e-5)
    # a1.h0 reads the signal too (its activation changes) but cannot reach the logits.
    assert circuit.scores["a1.h0"] == pytest.approx(0.0, abs=1e-6)
    assert circuit.scores["a0.h1"] == pytest.approx(0.0, abs=1e-6)


def test_threshold_above_every_effect_gives_the_empty_circuit():
    assert check_discoverer(ActPatch, threshold=1.5).heads == frozenset()


def test_heads_outside_the_search_space_are_never_run():
    ctx = toy_context()
    counter = CostCounter(ctx.model)
    space = SearchSpace(2, 2, {Head(1, 1)})
    circuit = ActPatch().discover(ctx, space, ActPatch.Params())
    counter.remove()
    n = len(ctx.search)
    assert set(circuit.scores) == {"a1.h1"} and circuit.heads == {Head(1, 1)}
    # clean + corrupt metric (2 full passes), z cache and resid cache (2 full passes), and one
    # patched run of a1.h1 that starts at layer 1 (half a pass).
    assert counter.tally.layer_rows / ctx.n_layers == pytest.approx(4 * n + 0.5 * n)

    counter = CostCounter(ctx.model)
    ActPatch().discover(ctx, SearchSpace.dense(2, 2), ActPatch.Params())
    counter.remove()
    # dense: a0.h0 and a0.h1 from layer 0 (1 pass each), a1.* from layer 1 (half a pass each).
    assert counter.tally.layer_rows / ctx.n_layers == pytest.approx(4 * n + 2 * n + 2 * 0.5 * n)


def test_a_model_that_ignores_the_task_is_reported():
    import torch

    from appbench import RunError

    ctx = toy_context()
    with torch.no_grad():
        ctx.model.unembed.W_U.zero_()
    with pytest.raises(RunError, match="metrics coincide"):
        ActPatch().discover(ctx, SearchSpace.dense(2, 2), ActPatch.Params())


def test_chunks_of_prompts_give_the_effects_of_the_whole_split():
    from appbench import SearchSpace
    from appbench.testing import model_context
    from appbench_plugins.actpatch import ActPatch

    ctx = model_context("zoo-gt-ioi", n_search=30)
    space = SearchSpace.dense(4, 8)
    whole = ActPatch().discover(ctx, space, ActPatch.Params())
    chunked = ActPatch().discover(ctx, space, ActPatch.Params(batch_size=7))
    assert chunked.heads == whole.heads
    for head, effect in whole.scores.items():
        assert chunked.scores[head] == pytest.approx(effect, rel=1e-6, abs=1e-7)
