"""Parity: the fast PathPatcher reproduces the plain two-passes-per-sender reference exactly
(to 1e-4 in float32) on models of every supported shape and on the zoo model with IOI."""

import random

import pytest
import torch

from appbench import Head, build_model, load_model
from appbench.engine.fused import FusedBlocks, fusable
from appbench.engine.patching import PatchingEngine, PathPatcher, live_windows
from appbench.engine.reference import (
    path_patching_baseline,
    sender_scores_to_logits,
    sender_scores_to_receiver,
)
from appbench.plugins import get_registries
from appbench.runner import CostCounter
from appbench.tasks import PromptPair, TaskSpec
from appbench.testing import ToyTask, toy_tokenizer

TOLERANCE = 1e-4

SHAPES = {
    "attention-only": {"attn_only": True, "normalization_type": "LN"},
    "mlp-layernorm": {"d_mlp": 64, "act_fn": "gelu", "normalization_type": "LN"},
    "gqa-rotary-rmsnorm-gated": {
        "d_mlp": 64,
        "act_fn": "silu",
        "normalization_type": "RMS",
        "gated_mlp": True,
        "positional_embedding_type": "rotary",
        "n_key_value_heads": 2,
    },
    "parallel-attention-mlp": {
        "d_mlp": 64,
        "act_fn": "gelu",
        "normalization_type": "LN",
        "parallel_attn_mlp": True,
    },
}


class RaggedToyTask(ToyTask):
    """The toy task with prompts of 2 to 8 words and the signal (A, corrupted B) anywhere, the
    last word included: every prompt has its own live window (first difference .. target)."""

    def __init__(self) -> None:
        super().__init__()
        self.spec = TaskSpec(**(self.spec.model_dump() | {"name": "ragged-toy", "n_search": 24}))

    def generate(self, tokenizer, n, seed):
        rng, pairs, seen = random.Random(seed), [], set()
        while len(pairs) < n:
            words = [rng.choice("xyz") for _ in range(rng.randint(2, 8))]
            signal = rng.randrange(len(words))
            clean = " ".join([*words[:signal], "A", *words[signal + 1 :]])
            if clean not in seen:
                seen.add(clean)
                corrupt = clean.split(" ")
                corrupt[signal] = "B"
                pairs.append(PromptPair(clean, " ".join(corrupt), (" yes",), (" no",), "toy"))
        return pairs


def random_model(extra):
    tokenizer = toy_tokenizer()
    torch.manual_seed(0)
    config = {"n_layers": 3, "n_heads": 4, "d_model": 32, "d_head": 8, "n_ctx": 8} | extra
    model = build_model(config | {"d_vocab": len(tokenizer.get_vocab())}, tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def assert_parity(model, task, data, receivers, closed_form=True, heads=None, fused=None):
    fused = closed_form if fused is None else fused
    engine = PatchingEngine(model, task, max_rows=64)  # small chunks: exercise chunking too
    patcher = PathPatcher(engine, data)
    patcher.closed_form = patcher.closed_form and closed_form
    patcher.target_only_last_layer = patcher.target_only_last_layer and closed_form
    if not closed_form:
        patcher.fused = None
    assert (patcher.fused is not None) == fused
    base = path_patching_baseline(model, task, data)
    assert patcher.cache.m_clean == pytest.approx(base.m_clean, abs=TOLERANCE)
    if heads is None:
        heads = [
            Head(layer, h) for layer in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)
        ]
    fast = patcher.logits_scores(heads)
    slow = sender_scores_to_logits(model, task, data, heads, base.z_clean, base.z_corrupt)
    worst = max(abs(fast[h] - slow[h]) for h in heads)
    assert worst < TOLERANCE, f"logits stage differs by {worst}"
    for receiver in receivers:
        senders = [h for h in heads if h.layer < receiver.layer]
        fast_inputs = patcher.receiver_scores(receiver, senders)
        for kind in ("q", "k", "v"):
            slow_kind = sender_scores_to_receiver(
                model, task, data, senders, receiver, kind, base.z_clean, base.z_corrupt
            )
            worst = max(abs(fast_inputs[kind][s] - slow_kind[s]) for s in senders)
            assert worst < TOLERANCE, f"{receiver.id}<{kind}> differs by {worst}"


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_parity_on_every_model_shape(shape):
    model = random_model(SHAPES[shape])
    task = ToyTask()
    data, _ = task.splits(model.tokenizer)
    assert_parity(model, task, data, [Head(1, 2), Head(2, 3)])


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_parity_on_prompts_with_their_own_live_windows(shape):
    """Patched runs computed only at each prompt's live positions (its first difference to its
    target, attending to the clean prefix) score exactly as whole runs do."""
    model = random_model(SHAPES[shape])
    task = RaggedToyTask()
    data, _ = task.splits(model.tokenizer)
    starts, stops = live_windows(data)
    assert len(set(zip(starts, stops, strict=True))) > 8  # more windows than spans: merged
    assert min(starts) == 0 < max(starts) and len(set(stops)) > 3
    patcher = PathPatcher(PatchingEngine(model, task), data)
    assert len(patcher.spans) == 8 and any(span.start > 0 for span in patcher.spans)
    assert_parity(model, task, data, [Head(1, 2), Head(2, 3)])


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"d_mlp": 64, "act_fn": "solu_ln", "normalization_type": "LN"}, "activation"),
        ({"d_mlp": 64, "act_fn": "gelu", "attn_scores_soft_cap": 5.0}, "soft cap"),
    ],
)
def test_parity_without_fused_blocks(extra, reason):
    """Configurations the fused blocks do not mirror run through TransformerLens, exactly."""
    model = random_model(extra)
    assert not fusable(model), reason
    task = ToyTask()
    data, _ = task.splits(model.tokenizer)
    assert_parity(model, task, data, [Head(1, 2)], fused=False)


@pytest.mark.parametrize("shape", [*sorted(SHAPES), "gelu-new-pre-norm"])
def test_parity_fused_blocks_match_transformer_lens(shape):
    """The fused forward equals TransformerLens's block by block, and is counted the same."""
    extra = SHAPES.get(shape, {"d_mlp": 64, "act_fn": "gelu_new", "normalization_type": "LNPre"})
    model = random_model(extra)
    assert fusable(model)
    tokens = ToyTask().splits(model.tokenizer)[0].clean
    _, cache = model.run_with_cache(tokens)
    start = cache["blocks.0.hook_resid_pre"]
    counter = CostCounter(model)
    fused_flops = []
    fused = FusedBlocks(model, fused_flops.append)
    for layer in range(model.cfg.n_layers):
        expected = cache[f"blocks.{layer}.hook_resid_post"]
        with torch.no_grad():
            got = fused.run(start, 0, layer + 1)
        # float32 rounding of activations up to ~30 in size
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4, msg=f"block {layer}")
    fused_total = counter.tally.flops + sum(fused_flops)
    counter.tally.flops = 0.0
    for layer in range(model.cfg.n_layers):
        model(start, start_at_layer=0, stop_at_layer=layer + 1)
    assert fused_total == counter.tally.flops
    counter.remove()
    # A window of later positions attending to the keys and values of the earlier ones.
    prefix = 2
    with torch.no_grad():
        got = fused.run(
            start[:, prefix:],
            0,
            model.cfg.n_layers,
            lambda layer: fused.clean_keys_values(
                layer, cache[f"blocks.{layer}.hook_resid_pre"][:, :prefix]
            ),
        )
    expected = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][:, prefix:]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", ["mlp-layernorm", "gqa-rotary-rmsnorm-gated"])
def test_parity_of_the_hook_fallback(shape):
    model = random_model(SHAPES[shape])
    task = ToyTask()
    data, _ = task.splits(model.tokenizer)
    assert_parity(model, task, data, [Head(2, 2)], closed_form=False)


def test_parity_on_the_zoo_model_with_ioi():
    """Real prompts of several lengths (per-row target positions), a trained model."""
    model = load_model("zoo-ioi")
    task = get_registries().tasks.get("ioi")
    data, _ = task.splits(model.tokenizer, n_search=24, n_eval=8)
    assert len(set(data.target_pos.tolist())) > 1
    assert_parity(model, task, data, [Head(3, 0)])


TASKS = ("ioi", "greater_than", "induction", "gendered_pronouns", "docstring")


@pytest.mark.parametrize("task_name", TASKS)
def test_parity_on_the_default_model_for_every_task(task_name):
    """Every task's prompts (their own live windows and metrics: logit differences read from a
    few columns, greater_than's softmax over the vocabulary) on the trained multitask model:
    the scores of every sender into the logits and into a receiver in each later layer, and the
    whole discoverer's circuit, equal the reference's."""
    from appbench import RunContext, SearchSpace
    from appbench_plugins.pathpatch import PathPatch

    model = load_model("zoo-multitask")
    task = get_registries().tasks.get(task_name)
    search, evaluation = task.splits(model.tokenizer, n_search=16, n_eval=4)
    receivers = [Head(layer, (3 * layer) % model.cfg.n_heads) for layer in range(1, 4)]
    assert_parity(model, task, search, receivers)
    ctx = RunContext(
        model, "zoo-multitask", task, search, evaluation, "cpu", 0, PatchingEngine(model, task)
    )
    space = SearchSpace.dense(model.cfg.n_layers, model.cfg.n_heads)
    # Low thresholds, so that the search selects several heads (and, on four of the five
    # tasks, goes on from the logits stage to receivers in later layers).
    params = {
        "selection": "scored",
        "importance_threshold": 1.0,
        "resid_importance_threshold": 0.0,
        "k": 0.0,
    }
    fast = PathPatch().discover(ctx, space, PathPatch.Params(engine="fast", **params))
    slow = PathPatch().discover(ctx, space, PathPatch.Params(engine="reference", **params))
    assert len(fast.heads) >= 4
    assert fast.heads == slow.heads and fast.edges == slow.edges
    assert max(abs(fast.scores[h] - slow.scores[h]) for h in slow.scores) < TOLERANCE


def test_parity_pathpatch_finds_the_same_circuit_with_both_engines():
    """The whole discoverer on a trained model: identical heads, edges and scores."""
    from appbench import RunContext, SearchSpace
    from appbench_plugins.pathpatch import PathPatch

    model = load_model("zoo-ioi")
    task = get_registries().tasks.get("ioi")
    search, evaluation = task.splits(model.tokenizer, n_search=30, n_eval=8)
    ctx = RunContext(
        model, "zoo-ioi", task, search, evaluation, "cpu", 0, PatchingEngine(model, task)
    )
    space = SearchSpace.dense(4, 8)
    params = {"selection": "scored", "importance_threshold": 1.0, "resid_importance_threshold": 0.5}
    fast = PathPatch().discover(ctx, space, PathPatch.Params(engine="fast", **params))
    slow = PathPatch().discover(ctx, space, PathPatch.Params(engine="reference", **params))
    assert len(fast.heads) >= 2  # a search that goes beyond the logits stage
    assert fast.heads == slow.heads and fast.edges == slow.edges
    assert max(abs(fast.scores[h] - slow.scores[h]) for h in slow.scores) < TOLERANCE


@pytest.mark.slow
def test_parity_on_smollm2():
    """The real pretrained model (GQA, rotary, RMSNorm, gated MLPs), on a subset of senders."""
    model = load_model("smollm2-135m")
    task = get_registries().tasks.get("ioi")
    data, _ = task.splits(model.tokenizer, n_search=8, n_eval=2)
    senders = [Head(layer, layer % 9) for layer in range(0, 30, 3)]
    assert_parity(model, task, data, [Head(16, 4), Head(29, 1)], heads=senders)


def test_parity_when_the_memo_evicts_what_a_later_group_resumes_from():
    """A memo budget of two frozen residuals: remembering the layer-1 senders' runs evicts the
    layer-0 senders' runs that the same call resumes from; scores must not change."""
    model = random_model(SHAPES["mlp-layernorm"])
    task = ToyTask()
    data, _ = task.splits(model.tokenizer)
    heads = [Head(layer, h) for layer in range(2) for h in range(model.cfg.n_heads)]
    roomy = PathPatcher(PatchingEngine(model, task), data)
    one = data.clean.shape[0] * data.clean.shape[1] * model.cfg.d_model * 4
    tight = PathPatcher(PatchingEngine(model, task), data, memo_bytes=2 * one)
    for receiver in (Head(1, 0), Head(2, 1), Head(1, 3), Head(2, 2)):
        senders = [h for h in heads if h.layer < receiver.layer]
        expected = roomy.receiver_scores(receiver, senders)
        got = tight.receiver_scores(receiver, senders)
        for kind in expected:
            assert max(abs(got[kind][s] - expected[kind][s]) for s in senders) < 1e-6
    assert len(tight._memo) <= 2 < len(roomy._memo)
