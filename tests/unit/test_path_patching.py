"""The plain path-patching reference: hand-derived scores on planted models, GQA indexing, cost."""

from types import SimpleNamespace

import pytest
import torch

from appbench import (
    Head,
    input_head_index,
    path_patching_baseline,
    sender_scores_to_logits,
    sender_scores_to_receiver,
)
from appbench.engine.reference import normalised_score
from appbench.runner import CostCounter
from appbench.testing import (
    planted_chain_model,
    planted_context,
    planted_gqa_model,
    planted_key_model,
    planted_model,
    planted_query_model,
)


def heads_of(model, below=None):
    layers = model.cfg.n_layers if below is None else below
    return [Head(layer, h) for layer in range(layers) for h in range(model.cfg.n_heads)]


def measure(model):
    ctx = planted_context(model)
    base = path_patching_baseline(model, ctx.task, ctx.search)
    kwargs = {
        "z_clean": base.z_clean,
        "z_corrupt": base.z_corrupt,
        "m_clean": base.m_clean,
        "m_corrupt": base.m_corrupt,
    }
    return ctx, base, kwargs


def to_logits(model, ctx, kwargs):
    return sender_scores_to_logits(model, ctx.task, ctx.search, heads_of(model), **kwargs)


def to_receiver(model, ctx, kwargs, receiver, letter):
    senders = heads_of(model, below=receiver.layer)
    return sender_scores_to_receiver(
        model, ctx.task, ctx.search, senders, receiver, letter, **kwargs
    )


def assert_only(scores, expected):
    """Every score is ~0 except the listed ones, which match."""
    for head, value in scores.items():
        assert value == pytest.approx(expected.get(head.id, 0.0), abs=1e-6), head.id


# --------------------------------------------------------------- hand-derived known answers
def test_planted_model_scores_are_the_hand_derived_ones():
    model = planted_model()
    ctx, base, kwargs = measure(model)
    assert base.m_clean > 0 > base.m_corrupt  # "A ..." votes yes, "B ..." votes no
    # Direct paths into the logits: only a1.h1 writes the channel the unembedding reads. a0.h0's
    # corrupted output cannot reach the logits because a1.h1's hook_z is frozen clean.
    assert_only(to_logits(model, ctx, kwargs), {"a1.h1": -1.0})
    # a1.h1 reads a0.h0's channel through its value: the whole effect. W_Q = W_K = 0, so its
    # query and key never change and those paths score exactly 0.
    assert_only(to_receiver(model, ctx, kwargs, Head(1, 1), "v"), {"a0.h0": -1.0})
    for letter in "qk":
        scores = to_receiver(model, ctx, kwargs, Head(1, 1), letter)
        assert all(v == 0.0 for v in scores.values()), (letter, scores)
    # a1.h0 reads the signal too but writes into a channel nothing reads.
    for letter in "qkv":
        assert_only(to_receiver(model, ctx, kwargs, Head(1, 0), letter), {})


#: Planted model -> (builder, receivers whose q/k/v scores are tabulated). Each table holds the
#: planted receivers and a distractor that reads the signal but writes junk; the scores of
#: every sender into every listed receiver input are checked, so each table is a full column
#: of the measurement, not a sample of the planted entries.
TABLES = {
    "query": (planted_query_model, ["a1.h0", "a1.h2"]),
    "key": (planted_key_model, ["a1.h0", "a1.h5"]),
    "chain": (planted_chain_model, ["a1.h0", "a1.h3", "a2.h5"]),
    "gqa": (planted_gqa_model, ["a1.h1", "a1.h3", "a1.h4", "a1.h6"]),
}


@pytest.fixture(scope="module")
def tables():
    """Reference scores of each planted model, computed once (whole forward passes are slow)."""
    built = {}

    def get(name):
        if name not in built:
            build, receivers = TABLES[name]
            model = build()
            ctx, base, kwargs = measure(model)
            scores = {("logits", None): to_logits(model, ctx, kwargs)}
            for receiver in map(Head.parse, receivers):
                for letter in "qkv":
                    scores[(receiver.id, letter)] = to_receiver(
                        model, ctx, kwargs, receiver, letter
                    )
            built[name] = (model, ctx, base, scores)
        return built[name]

    return get


@pytest.mark.parametrize(
    ("name", "planted"),
    [
        ("query", {("logits", None): {"a1.h2": -1.0}, ("a1.h2", "q"): {"a0.h0": -1.0}}),
        ("key", {("logits", None): {"a1.h5": -1.0}, ("a1.h5", "k"): {"a0.h0": -1.0}}),
        (
            "chain",
            {
                ("logits", None): {"a2.h5": -1.0},
                ("a1.h3", "k"): {"a0.h0": -1.0},
                ("a2.h5", "q"): {"a1.h3": -1.0},
            },
        ),
    ],
)
def test_query_and_key_paths_score_only_where_planted(tables, name, planted):
    _, _, base, scores = tables(name)
    assert base.m_clean == pytest.approx(2.0) and base.m_corrupt == pytest.approx(-2.0)
    # Every listed receiver input, every sender: only the planted sender -> receiver<input>
    # scores. In the chain, a0.h0 -> logits and a0.h0 -> a2.h5 <q> are 0: a1.h3 is frozen.
    for key, values in scores.items():
        assert_only(values, planted.get(key, {}))


# --------------------------------------------------------------------- grouped-query attention
def test_input_head_index_maps_k_and_v_to_the_kv_head():
    mha = SimpleNamespace(n_heads=8, n_key_value_heads=None)
    gqa = SimpleNamespace(n_heads=8, n_key_value_heads=2, ungroup_grouped_query_attention=False)
    ungrouped = SimpleNamespace(
        n_heads=8, n_key_value_heads=2, ungroup_grouped_query_attention=True
    )
    for h in range(8):
        assert input_head_index(mha, Head(1, h), "k") == h
        assert input_head_index(gqa, Head(1, h), "q") == h
        assert input_head_index(gqa, Head(1, h), "k") == h // 4
        assert input_head_index(gqa, Head(1, h), "v") == h // 4
        assert input_head_index(ungrouped, Head(1, h), "v") == h
    with pytest.raises(ValueError, match="receiver input"):
        input_head_index(gqa, Head(1, 0), "z")


def test_transformer_lens_keeps_one_k_and_v_slice_per_kv_head():
    # The premise of the indexing above: hook_k / hook_v are [batch, pos, n_kv, d_head].
    model = planted_gqa_model()
    _, cache = model.run_with_cache(torch.tensor([[3, 5, 6, 7]]))
    assert cache["blocks.1.attn.hook_q"].shape[2] == 8
    assert cache["blocks.1.attn.hook_k"].shape[2] == 2
    assert cache["blocks.1.attn.hook_v"].shape[2] == 2


def test_gqa_paths_enter_through_the_shared_kv_head(tables):
    _, _, base, scores = tables("gqa")
    assert base.m_clean == pytest.approx(6.0) and base.m_corrupt == pytest.approx(-6.0)
    third = -1.0 / 3.0
    assert_only(scores[("logits", None)], {"a1.h1": third, "a1.h6": third, "a1.h7": third})
    for h in (1, 3, 4, 6):
        receiver = f"a1.h{h}"
        # Queries are per query head and none of them reads a layer-0 output.
        assert_only(scores[(receiver, "q")], {})
        if h < 4:  # KV head 0: values carry a0.h4's signal (read by a1.h1 only).
            assert_only(scores[(receiver, "v")], {"a0.h4": third})
            assert_only(scores[(receiver, "k")], {})
        else:  # KV head 1: keys carry a0.h0's signal, read by a1.h6 and a1.h7 together.
            assert_only(scores[(receiver, "k")], {"a0.h0": 2 * third})
            assert_only(scores[(receiver, "v")], {})


# ------------------------------------------------------------------ independent cross-checks
def random_model(seed):
    """A small random model with LayerNorm and MLPs on the toy vocabulary."""
    from appbench.models import build_model
    from appbench.testing import toy_tokenizer

    torch.manual_seed(seed)
    tokenizer = toy_tokenizer()
    config = {
        "n_layers": 3,
        "n_heads": 3,
        "d_model": 16,
        "d_head": 4,
        "d_mlp": 32,
        "n_ctx": 8,
        "d_vocab": len(tokenizer.get_vocab()),
        "act_fn": "gelu",
        "normalization_type": "LN",
        "positional_embedding_type": "standard",
        "init_weights": True,
        "seed": seed,
        "model_name": "random",
    }
    model = build_model(config, tokenizer)
    model.eval()
    return model


def test_last_layer_senders_match_activation_patching():
    # Nothing runs after the last layer's heads but its MLP, which is not frozen, so the path
    # to the logits of a last-layer head is its whole effect: activation patching, computed
    # independently by the batched engine.
    model = random_model(0)
    ctx, base, kwargs = measure(model)
    last = [Head(2, h) for h in range(3)]
    scores = sender_scores_to_logits(model, ctx.task, ctx.search, last, **kwargs)
    engine = ctx.engine
    patched = engine.patch_heads(
        ctx.search, last, base.z_corrupt, engine.cache_resid_pre(ctx.search.clean)
    )
    for head in last:
        effect = normalised_score(patched[head].mean().item(), base.m_clean, base.m_corrupt)
        assert scores[head] == pytest.approx(effect, abs=1e-5)
    assert any(abs(v) > 1e-3 for v in scores.values())  # the check is not vacuous


def test_a_sender_with_a_single_route_scores_its_whole_effect_on_that_route():
    # In the planted model a0.h0's only route to the logits is a1.h1's value input (its direct
    # path writes a channel the unembedding ignores, a1.h0 writes junk). So its q + k + v
    # scores into a1.h1 must equal activation patching a0.h0 alone, computed by the engine.
    model = planted_model()
    ctx, base, kwargs = measure(model)
    total = sum(to_receiver(model, ctx, kwargs, Head(1, 1), c)[Head(0, 0)] for c in "qkv")
    patched = ctx.engine.patch_heads(
        ctx.search, [Head(0, 0)], base.z_corrupt, ctx.engine.cache_resid_pre(ctx.search.clean)
    )
    whole = normalised_score(patched[Head(0, 0)].mean().item(), base.m_clean, base.m_corrupt)
    assert total == pytest.approx(whole, abs=1e-6) == pytest.approx(-1.0, abs=1e-6)


# ------------------------------------------------------------------------------- cost and errors
def test_one_pass_per_sender_to_the_logits_and_two_per_sender_to_a_receiver():
    model = planted_query_model()
    ctx, _, kwargs = measure(model)
    n = len(ctx.search)
    counter = CostCounter(model)
    sender_scores_to_logits(model, ctx.task, ctx.search, heads_of(model)[:5], **kwargs)
    assert counter.tally.layer_rows / model.cfg.n_layers == 5 * n
    counter.remove()

    counter = CostCounter(model)
    senders = [Head(0, 0), Head(0, 3), Head(0, 7)]
    sender_scores_to_receiver(model, ctx.task, ctx.search, senders, Head(1, 2), "k", **kwargs)
    assert counter.tally.layer_rows / model.cfg.n_layers == 2 * 3 * n
    counter.remove()

    # Without the baseline metrics, one clean and one corrupted pass are added.
    counter = CostCounter(model)
    sender_scores_to_receiver(
        model,
        ctx.task,
        ctx.search,
        senders,
        Head(1, 2),
        "q",
        kwargs["z_clean"],
        kwargs["z_corrupt"],
    )
    assert counter.tally.layer_rows / model.cfg.n_layers == (2 * 3 + 2) * n
    counter.remove()


def test_bad_senders_receivers_and_inputs_are_refused():
    model = planted_query_model()
    ctx, _, kwargs = measure(model)
    with pytest.raises(ValueError, match="does not precede"):
        sender_scores_to_receiver(
            model, ctx.task, ctx.search, [Head(1, 0)], Head(1, 2), "q", **kwargs
        )
    with pytest.raises(ValueError, match="receiver input"):
        sender_scores_to_receiver(
            model, ctx.task, ctx.search, [Head(0, 0)], Head(1, 2), "z", **kwargs
        )
    with pytest.raises(ValueError, match="outside a model"):
        sender_scores_to_logits(model, ctx.task, ctx.search, [Head(0, 8)], **kwargs)
    with pytest.raises(ValueError, match="outside a model"):
        sender_scores_to_receiver(
            model, ctx.task, ctx.search, [Head(0, 0)], Head(2, 0), "q", **kwargs
        )


def test_normalised_score():
    assert normalised_score(2.0, 2.0, -2.0) == 0.0
    assert normalised_score(-2.0, 2.0, -2.0) == -1.0
    assert normalised_score(3.0, 2.0, -2.0) == 0.25
    with pytest.raises(ValueError, match="coincide"):
        normalised_score(1.0, 1.0, 1.0)


def test_a_gap_within_float_rounding_of_the_metric_is_refused():
    """A probability difference of 1.0 on clean and 0.99999 on corrupted prompts: scores would
    be multiples of float32's step at 1.0 divided by 1e-5, i.e. noise."""
    from appbench import RunError, metric_gap

    assert metric_gap(2.0, -2.0) == 4.0
    assert metric_gap(1.0, 0.99) == pytest.approx(0.01)
    assert metric_gap(-3.0, -1.0) == -2.0  # an inverted gap is still a gap
    for m_clean, m_corrupt in [(1.0, 0.99999), (9000.0, 8999.5), (0.0, 1e-5)]:
        with pytest.raises(RunError, match="metrics coincide"):
            metric_gap(m_clean, m_corrupt)


@pytest.mark.parametrize("name", ["chain", "gqa"])
def test_the_fast_path_patcher_matches_the_reference_on_planted_models(tables, name):
    from appbench.engine.patching import PathPatcher

    _, ctx, _, scores = tables(name)
    fast = PathPatcher(ctx.engine, ctx.search)
    for key, expected in scores.items():
        receiver, letter = key
        if receiver == "logits":
            got = fast.logits_scores(sorted(expected))
        else:
            got = fast.receiver_scores(Head.parse(receiver), sorted(expected), (letter,))[letter]
        assert set(got) == set(expected)
        for head, value in got.items():
            assert value == pytest.approx(expected[head], abs=1e-5), (key, head.id)


def test_the_fast_path_patcher_matches_the_reference_with_layer_norm_and_mlps():
    from appbench.engine.patching import PathPatcher

    model = random_model(1)
    ctx, _, kwargs = measure(model)
    fast = PathPatcher(ctx.engine, ctx.search)
    reference = to_logits(model, ctx, kwargs)
    for head, value in fast.logits_scores(heads_of(model)).items():
        assert value == pytest.approx(reference[head], abs=1e-5), head.id
    largest = 0.0
    for receiver in (Head(1, 2), Head(2, 0)):
        got = fast.receiver_scores(receiver, heads_of(model, below=receiver.layer))
        for letter in "qkv":
            expected = to_receiver(model, ctx, kwargs, receiver, letter)
            assert set(got[letter]) == set(expected)
            for head, value in got[letter].items():
                assert value == pytest.approx(expected[head], abs=1e-5), (receiver.id, letter)
            largest = max(largest, *(abs(v) for v in expected.values()))
    assert largest > 1e-3  # a random model has live paths: the comparison is not vacuous
