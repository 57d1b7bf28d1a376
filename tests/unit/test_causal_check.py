"""The fast path-patching engine relies on causal attention; a model that sees the future is
refused by PathPatcher, and pathpatch falls back to the reference engine (same scores)."""

import pytest

import appbench.engine.patching as patching
from appbench import Head, NotCausalError, SearchSpace
from appbench.engine.patching import PatchingEngine, PathPatcher, attends_causally
from appbench.engine.reference import path_patching_baseline, sender_scores_to_receiver
from appbench.interfaces import RunContext
from appbench.models import load_model
from appbench.plugins import get_registries
from appbench.testing import planted_chain_model, planted_context
from appbench_plugins.pathpatch import PathPatch


def see_the_future(model):
    """Masked attention scores become 0 instead of -inf: every position attends to later ones."""
    for block in model.blocks:
        block.attn.IGNORE.fill_(0.0)
    return model


@pytest.fixture
def ioi():
    model = load_model("zoo-ioi")
    task = get_registries().tasks.get("ioi")
    search, evaluation = task.splits(model.tokenizer, 10, 10, 1)
    return model, task, search, evaluation


def test_causal_models_pass_and_a_zeroed_ignore_buffer_fails(ioi):
    model, _, search, _ = ioi
    assert attends_causally(model, search.clean)
    assert attends_causally(
        planted_chain_model(), planted_context(planted_chain_model()).search.clean
    )
    assert not attends_causally(see_the_future(model), search.clean)


def test_without_the_check_the_fast_engine_would_return_other_scores(ioi, monkeypatch):
    model, task, search, _ = ioi
    see_the_future(model)
    with pytest.raises(NotCausalError, match="relies on causal attention"):
        PathPatcher(PatchingEngine(model, task), search)
    # Why the check exists: skip it, and a receiver's scores are no longer the reference's.
    monkeypatch.setattr(patching, "attends_causally", lambda model, tokens: True)
    senders = [Head(layer, h) for layer in range(3) for h in range(8)]
    fast = PathPatcher(PatchingEngine(model, task), search).receiver_scores(Head(3, 0), senders)
    base = path_patching_baseline(model, task, search)
    reference = sender_scores_to_receiver(
        model,
        task,
        search,
        senders,
        Head(3, 0),
        "q",
        base.z_clean,
        base.z_corrupt,
        m_clean=base.m_clean,
        m_corrupt=base.m_corrupt,
    )
    assert max(abs(fast["q"][h] - reference[h]) for h in senders) > 1e-3


def test_pathpatch_falls_back_to_the_reference_engine_with_identical_scores(ioi):
    model, task, search, evaluation = ioi
    see_the_future(model)
    lines = []
    ctx = RunContext(
        model,
        "zoo-ioi",
        task,
        search,
        evaluation,
        "cpu",
        0,
        PatchingEngine(model, task),
        lines.append,
    )
    # Layer 2 and one head of layer 3: the reference engine's two whole passes per sender are
    # slow, and one receiver with eight senders is enough to compare.
    space = SearchSpace(4, 8, {Head(2, h) for h in range(8)} | {Head(3, 7)})
    fell_back = PathPatch().discover(ctx, space, PathPatch.Params())
    reference = PathPatch().discover(ctx, space, PathPatch.Params(engine="reference"))
    assert "a3.h7" in fell_back.details["receivers_visited"]
    assert fell_back.details["engine"] == "reference"
    assert "relies on causal attention" in fell_back.details["engine_fallback"]
    assert any("scoring with the reference engine instead" in line for line in lines)
    assert fell_back.scores == reference.scores
    assert fell_back.heads == reference.heads and fell_back.edges == reference.edges
