"""Known answers for EAP and EAP-IG: scores equal finite differences, one IG step is EAP,
planted chains are recovered edge by edge (dense and pruned), and the known blind spot of a
gradient (a saturated query) is seen where it should be."""

import pytest
import torch
from pydantic import ValidationError

from appbench import (
    INPUT,
    Edge,
    Head,
    Mlp,
    RunError,
    SearchSpace,
    build_model,
    connected_to_logits,
    edge_scores,
    get_registries,
    word_level_tokenizer,
)
from appbench.engine.attribution import receiver_inputs
from appbench.testing import PlantedCircuit, planted_context
from appbench_plugins.eap import Eap, EapIg, EapIgPruner, EapPruner
from appbench_plugins.zoo import ground_truth_recipe

#: Every link through a value: linear from the first head to the logits, so EAP is exact.
V_CHAIN = PlantedCircuit(
    4,
    4,
    ((Head(0, 1), None), (Head(1, 2), "v"), (Head(2, 0), "v"), (Head(3, 3), "v")),
    distractors=frozenset({Head(1, 0), Head(2, 3)}),
)
#: The last link through a saturated query: its gradient is ~e^-20, so EAP sees nothing
#: upstream of it, and EAP-IG's interpolation crosses the switch.
Q_CHAIN = PlantedCircuit(
    4,
    4,
    ((Head(0, 1), None), (Head(1, 2), "v"), (Head(2, 0), "v"), (Head(3, 3), "q")),
    distractors=frozenset({Head(1, 0), Head(2, 3)}),
)


def _ctx(spec):
    return planted_context(spec.build())


def _dense(spec):
    return SearchSpace.dense(spec.n_layers, spec.n_heads)


@pytest.mark.parametrize("full", [True, False], ids=["full-graph", "head-graph"])
def test_eap_scores_a_linear_chain_exactly(full):
    ctx = _ctx(V_CHAIN)
    scores = edge_scores(ctx.model, ctx.task, ctx.search, full=full)
    between_heads = 16 + sum(4 * 3 * 4 * (3 - layer) for layer in range(4))
    # The full graph adds the input into every head's q, k and v and into the logits.
    assert len(scores) == between_heads + (16 * 3 + 1 if full else 0)
    planted = V_CHAIN.full_edges if full else V_CHAIN.edges
    for edge, value in scores.items():
        expected = -1.0 if edge.id in planted else 0.0
        assert value == pytest.approx(expected, abs=1e-4), edge.id


def test_eap_ig_with_one_step_is_eap():
    ctx = _ctx(Q_CHAIN)
    eap = edge_scores(ctx.model, ctx.task, ctx.search)
    assert edge_scores(ctx.model, ctx.task, ctx.search, steps=1) == eap
    # Interpolating activations with one step runs every site at its clean value: EAP again.
    activations = edge_scores(ctx.model, ctx.task, ctx.search, steps=1, ig="activations")
    assert activations == pytest.approx(eap, abs=1e-9)
    # Batching changes float rounding only.
    batched = edge_scores(ctx.model, ctx.task, ctx.search, batch_size=5)
    assert batched == pytest.approx(eap, abs=1e-6)


def test_a_saturated_query_hides_its_upstream_edges_from_eap_but_not_from_eap_ig():
    ctx = _ctx(Q_CHAIN)
    eap = edge_scores(ctx.model, ctx.task, ctx.search)
    last = Edge.parse("a3.h3->logits")
    assert eap[last] == pytest.approx(-1.0, abs=1e-4)
    assert all(abs(v) < 1e-4 for e, v in eap.items() if e != last)
    for variant in ("inputs", "activations"):
        ig = edge_scores(ctx.model, ctx.task, ctx.search, steps=50, ig=variant)
        for edge, value in ig.items():
            expected = -1.0 if edge.id in Q_CHAIN.full_edges else 0.0
            assert value == pytest.approx(expected, abs=1e-3), (variant, edge.id)


def test_eap_ig_on_activations_is_exact_on_a_linear_chain_and_refuses_unknown_variants():
    ctx = _ctx(V_CHAIN)
    scores = edge_scores(ctx.model, ctx.task, ctx.search, steps=3, ig="activations")
    for edge, value in scores.items():
        expected = -1.0 if edge.id in V_CHAIN.full_edges else 0.0
        assert value == pytest.approx(expected, abs=1e-4), edge.id
    with pytest.raises(ValueError, match="ig must be one of"):
        edge_scores(ctx.model, ctx.task, ctx.search, steps=3, ig="outputs")


@pytest.fixture(scope="module")
def random_model():
    """A randomly initialised 4 x 8 model with layer norms and MLPs (nothing linear about it)."""
    task = get_registries().tasks.get("ioi")
    tokenizer = word_level_tokenizer(sorted(task.vocabulary()))
    torch.manual_seed(0)
    model = build_model(ground_truth_recipe("ioi").model_config(len(tokenizer)), tokenizer)
    # Double precision: an untrained model's gap is small, and finite differences need digits.
    model = model.double()
    model.cfg.dtype = torch.float64
    search, _ = task.splits(tokenizer)
    return model, task, search.select(list(range(6)))


def _metric(model, task, data, hooks):
    with torch.no_grad(), receiver_inputs(model), model.hooks(fwd_hooks=hooks):
        logits = model(data.clean)
    at_target = logits[torch.arange(len(data)), data.target_pos]
    return task.metric(at_target, data).mean().item()


@pytest.mark.parametrize(
    "edge_id",
    [
        "a0.h2->a1.h3<q>",
        "a0.h5->a2.h1<k>",
        "a1.h0->a3.h7<v>",
        "a2.h6->logits",
        "input->a1.h3<q>",
        "m0->a2.h1<k>",
        "a1.h0->m1",
        "m1->m3",
        "input->m0",
        "m2->logits",
    ],
)
def test_eap_scores_equal_finite_differences(random_model, edge_id):
    model, task, data = random_model
    edge = Edge.parse(edge_id)
    _, cache_clean = model.run_with_cache(data.clean)
    _, cache_corrupt = model.run_with_cache(data.corrupt)
    sender = edge.sender
    if isinstance(sender, Head):
        hook = sender.hook_name("z")
        w_o = model.W_O[sender.layer, sender.head].detach()
        delta = (cache_corrupt[hook] - cache_clean[hook])[:, :, sender.head] @ w_o
    else:
        hook = (
            "blocks.0.hook_resid_pre" if sender == INPUT else f"blocks.{sender.layer}.hook_mlp_out"
        )
        delta = cache_corrupt[hook] - cache_clean[hook]
    if edge.receiver is None:
        name, index = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", None
    elif isinstance(edge.receiver, Mlp):
        name, index = f"blocks.{edge.receiver.layer}.hook_mlp_in", None
    else:
        name, index = f"blocks.{edge.receiver.layer}.hook_{edge.input}_input", edge.receiver.head

    def nudged(eps):
        def add(x, hook):
            if index is None:
                return x + eps * delta
            x = x.clone()
            x[:, :, index] += eps * delta
            return x

        return _metric(model, task, data, [(name, add)])

    eps = 1e-3
    derivative = (nudged(eps) - nudged(-eps)) / (2 * eps)
    m_clean = _metric(model, task, data, [])
    with torch.no_grad():
        m_corrupt = (
            task.metric(model(data.corrupt)[torch.arange(len(data)), data.target_pos].float(), data)
            .mean()
            .item()
        )
    expected = derivative / (m_clean - m_corrupt)
    score = edge_scores(model, task, data)[edge]
    assert abs(expected) > 1e-4  # the edge moves the metric at all
    assert score == pytest.approx(expected, rel=1e-3, abs=1e-7)


@pytest.mark.parametrize(
    ("discoverer", "spec", "params"),
    [
        (Eap, V_CHAIN, {}),
        (EapIg, V_CHAIN, {"steps": 3}),
        (EapIg, Q_CHAIN, {"steps": 50}),
        (EapIg, Q_CHAIN, {"steps": 20, "ig": "activations"}),
    ],
)
def test_the_planted_chain_is_recovered_edge_by_edge(discoverer, spec, params):
    ctx = _ctx(spec)
    circuit = discoverer().discover(ctx, _dense(spec), discoverer.Params(**params))
    assert circuit.heads == spec.heads and circuit.graph == "full"
    assert {e.id for e in circuit.edges} == spec.full_edges
    heads_only = discoverer().discover(
        ctx, _dense(spec), discoverer.Params(graph="heads", **params)
    )
    assert {e.id for e in heads_only.edges} == spec.edges and heads_only.graph == "heads"
    # Pruned to the chain plus one distractor: the same circuit.
    space = SearchSpace(spec.n_layers, spec.n_heads, spec.heads | {Head(1, 0)})
    pruned = discoverer().discover(ctx, space, discoverer.Params(**params))
    assert pruned.heads == spec.heads and pruned.edges == circuit.edges
    assert pruned.details["edges_scored"] < circuit.details["edges_scored"]


def test_eap_behind_a_saturated_query_finds_only_the_last_head():
    circuit = Eap().discover(_ctx(Q_CHAIN), _dense(Q_CHAIN), Eap.Params())
    assert circuit.heads == {Head(3, 3)}
    assert {e.id for e in circuit.edges} == {"a3.h3->logits"}


def test_a_pruned_away_head_cuts_the_chain_at_it():
    ctx = _ctx(V_CHAIN)
    space = SearchSpace(4, 4, V_CHAIN.heads - {Head(2, 0)})
    circuit = Eap().discover(ctx, space, Eap.Params())
    # Only the last head still reaches the logits by edges inside the space.
    assert circuit.heads == {Head(3, 3)}
    top = Eap().discover(ctx, _dense(V_CHAIN), Eap.Params(top_n=5))
    assert {e.id for e in top.edges} == V_CHAIN.full_edges


def test_connected_to_logits_drops_dangling_edges():
    edges = {Edge.parse(e) for e in ("a0.h0->a1.h0<v>", "a1.h0->logits", "a0.h1->a2.h1<q>")}
    assert {e.id for e in connected_to_logits(edges)} == {"a0.h0->a1.h0<v>", "a1.h0->logits"}


@pytest.mark.parametrize(
    ("pruner", "spec", "params"),
    [(EapPruner, V_CHAIN, {}), (EapIgPruner, Q_CHAIN, {"steps": 50})],
)
def test_the_pruners_keep_the_planted_chain(pruner, spec, params):
    space = pruner().prune(_ctx(spec), pruner.Params(keep_k=4, **params))
    assert space.heads == spec.heads
    fraction = pruner().prune(_ctx(spec), pruner.Params(fraction=0.5, **params))
    assert len(fraction.heads) == 8 and spec.heads <= fraction.heads


def test_pruner_sizes_that_cannot_mean_anything_are_refused():
    with pytest.raises(ValidationError, match="not both"):
        EapPruner.Params(fraction=0.5, keep_k=3)
    with pytest.raises(ValidationError):
        EapPruner.Params(fraction=0.0)
    with pytest.raises(RunError, match="exceeds"):
        EapPruner().prune(_ctx(V_CHAIN), EapPruner.Params(keep_k=17))


def test_eap_ig_matches_plain_path_patching_on_the_grouped_query_model():
    """Every edge of the planted GQA model, against the hook-based path-patching reference:
    value and logit paths are linear (EAP is exact), the shared key path is saturated (EAP
    sees 0, EAP-IG at 50 steps the whole -2/3, for every query head of the KV group)."""
    from appbench.engine.reference import (
        cache_z,
        sender_scores_to_logits,
        sender_scores_to_receiver,
    )
    from appbench.testing import planted_gqa_model

    ctx = planted_context(planted_gqa_model())
    model, task, data = ctx.model, ctx.task, ctx.search
    z_clean, z_corrupt = cache_z(model, data.clean)[1], cache_z(model, data.corrupt)[1]
    heads = SearchSpace.dense(2, 8).sorted_heads()
    reference = {
        Edge(h, None): s
        for h, s in sender_scores_to_logits(model, task, data, heads, z_clean, z_corrupt).items()
    }
    for receiver in heads[8:]:
        for kind in ("q", "k", "v"):
            scores = sender_scores_to_receiver(
                model, task, data, heads[:8], receiver, kind, z_clean, z_corrupt
            )
            reference.update({Edge(h, receiver, kind): s for h, s in scores.items()})
    eap = edge_scores(model, task, data, full=False)
    ig = edge_scores(model, task, data, steps=50, full=False)
    assert set(ig) == set(reference)
    # KV head 1's keys are one input for its whole group, a1.h4 to a1.h7.
    key_paths = {Edge.parse(f"a0.h0->a1.h{h}<k>") for h in range(4, 8)}
    assert {e for e, s in reference.items() if s < -0.5} == key_paths
    for edge, expected in reference.items():
        assert ig[edge] == pytest.approx(expected, abs=2e-3), edge.id
        assert eap[edge] == pytest.approx(0.0 if edge in key_paths else expected, abs=1e-4)
