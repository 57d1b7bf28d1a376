"""Known answers for ACDC: the batched engine and the plain one-pass-per-edge reference
remove exactly the same edges, and both recover planted circuits edge by edge, in dense and in
pruned search spaces, with either distance."""

import json

import pytest
from pydantic import ValidationError

from appbench import Head, SearchSpace, acdc
from appbench.checkpoint import Checkpoint
from appbench.engine.acdc import acdc_reference
from appbench.testing import (
    PLANTED_GQA_EDGES,
    PLANTED_GQA_FULL_EDGES,
    PlantedCircuit,
    planted_context,
    planted_gqa_model,
)
from appbench_plugins.acdc import Acdc

#: A chain through values and a saturated query, among distractors and a weak head (0.5% of
#: the gap: below tau, removed).
CHAIN = PlantedCircuit(
    4,
    4,
    ((Head(0, 1), None), (Head(1, 2), "v"), (Head(2, 0), "v"), (Head(3, 3), "q")),
    distractors=frozenset({Head(1, 0), Head(2, 3)}),
    weak=frozenset({Head(2, 2)}),
)
KEY_CHAIN = PlantedCircuit(
    3,
    4,
    ((Head(0, 2), None), (Head(1, 1), "k"), (Head(2, 3), "q")),
    distractors=frozenset({Head(0, 0), Head(2, 0)}),
)


@pytest.mark.parametrize("full", [True, False], ids=["full-graph", "head-graph"])
@pytest.mark.parametrize("distance", ["kl", "metric"])
@pytest.mark.parametrize("spec", [CHAIN, KEY_CHAIN], ids=["q-chain", "k-chain"])
def test_acdc_recovers_the_planted_chain_as_its_reference_does(spec, distance, full):
    ctx = planted_context(spec.build())
    planted = spec.full_edges if full else spec.edges
    dense = SearchSpace.dense(spec.n_layers, spec.n_heads).heads
    fast = acdc(ctx.model, ctx.task, ctx.search, dense, distance=distance, full=full)
    plain = acdc_reference(ctx.model, ctx.task, ctx.search, dense, distance=distance, full=full)
    assert {e.id for e in fast.edges} == planted
    assert fast.edges == plain.edges and fast.tested == plain.tested
    assert fast.forward_runs < plain.forward_runs  # batched: one run per kept edge or so
    pruned = spec.heads | {next(iter(spec.distractors))}
    small = acdc(ctx.model, ctx.task, ctx.search, pruned, distance=distance, full=full)
    assert {e.id for e in small.edges} == planted and small.tested < fast.tested


@pytest.mark.parametrize(
    ("full", "planted"), [(True, PLANTED_GQA_FULL_EDGES), (False, PLANTED_GQA_EDGES)]
)
def test_acdc_on_the_grouped_query_model(full, planted):
    ctx = planted_context(planted_gqa_model())
    dense = SearchSpace.dense(2, 8).heads
    fast = acdc(ctx.model, ctx.task, ctx.search, dense, full=full)
    assert {e.id for e in fast.edges} == planted
    assert fast.edges == acdc_reference(ctx.model, ctx.task, ctx.search, dense, full=full).edges


def test_a_head_outside_the_space_is_never_tested_and_cuts_the_chain():
    ctx = planted_context(CHAIN.build())
    space = CHAIN.heads - {Head(2, 0)}
    result = acdc(ctx.model, ctx.task, ctx.search, space)
    assert {e.id for e in result.edges} == {"a3.h3->logits"}
    assert all("a2.h0" not in ids for ids, _, _ in result.trace)


def test_a_tau_above_every_effect_removes_everything():
    ctx = planted_context(CHAIN.build())
    dense = SearchSpace.dense(4, 4).heads
    assert acdc(ctx.model, ctx.task, ctx.search, dense, tau=1e6).edges == frozenset()


def test_the_discoverer_reports_edges_and_heads():
    ctx = planted_context(CHAIN.build())
    circuit = Acdc().discover(ctx, SearchSpace.dense(4, 4), Acdc.Params(max_rows=7))
    assert circuit.heads == CHAIN.heads and circuit.graph == "full"
    assert {e.id for e in circuit.edges} == CHAIN.full_edges
    heads_only = Acdc().discover(ctx, SearchSpace.dense(4, 4), Acdc.Params(graph="heads"))
    assert {e.id for e in heads_only.edges} == CHAIN.edges and heads_only.graph == "heads"
    assert circuit.details["edges_tested"] > circuit.details["edges_removed"] > 0


#: Every edge kept (tau 0: no removal lowers the distance), the chain and the weak head's edge
#: into the logits, the chain exactly (the default tau), nothing.
SWEEP = (0.0, 1e-5, 0.01, 1.0)


def test_a_threshold_sweep_records_what_acdc_finds_at_each_tau():
    """Each sweep entry is what a separate ACDC run at its tau finds (here on the head graph);
    the circuit stays the main tau's. With the exact chain among the runs the pessimistic AUC
    is 1 on both levels; without it the best run keeps the weak head's edge too, a
    hand-counted false positive."""
    from dataclasses import replace

    from appbench.results import Reference
    from appbench.runner import _edge_and_score_overlap

    ctx = planted_context(CHAIN.build())
    space = SearchSpace.dense(4, 4)
    circuit = Acdc().discover(ctx, space, Acdc.Params(sweep=SWEEP, graph="heads"))
    assert {e.id for e in circuit.edges} == CHAIN.edges
    sweep = circuit.details["threshold_sweep"]
    assert [run["tau"] for run in sweep] == list(SWEEP)
    for run in sweep:
        alone = acdc(ctx.model, ctx.task, ctx.search, space.heads, tau=run["tau"], full=False)
        heads = {e.sender for e in alone.edges} | {e.receiver for e in alone.edges if e.receiver}
        assert run["edges"] == sorted(e.id for e in alone.edges)
        assert run["heads"] == [h.id for h in sorted(heads)]
    # 4x4 model: 16 edges into the logits, 4·4·3·(3+2+1) into later heads' inputs.
    assert [len(run["edges"]) for run in sweep] == [304, 5, 4, 0]
    assert set(sweep[1]["edges"]) == CHAIN.edges | {"a2.h2->logits"}

    reference = Reference(
        source="planted", heads=sorted(h.id for h in CHAIN.heads), edges=sorted(CHAIN.edges)
    )
    found = _edge_and_score_overlap(circuit, reference)
    assert (found["edge_sweep_auc"], found["head_sweep_auc"]) == (1.0, 1.0)
    inexact = [run for run in sweep if run["tau"] != 0.01]
    without = replace(circuit, details={"threshold_sweep": inexact})
    found = _edge_and_score_overlap(without, reference)
    # Best run: TPR 1 at FPR 1/(304-4) for edges and 1/(16-4) for heads (a2.h2).
    assert found["edge_sweep_auc"] == pytest.approx(1 - 1 / 300)
    assert found["head_sweep_auc"] == pytest.approx(1 - 1 / 12)
    # No reference edges: no edge ROC; no sweep: neither.
    assert "edge_sweep_auc" not in _edge_and_score_overlap(
        circuit, reference.model_copy(update={"edges": []})
    )
    plain = _edge_and_score_overlap(replace(circuit, details={}), reference)
    assert "head_sweep_auc" not in plain
    # In the full graph against this head-graph reference only edges between heads count.
    full = Acdc().discover(ctx, space, Acdc.Params(sweep=SWEEP))
    assert set(full.details["threshold_sweep"][2]["edges"]) == CHAIN.full_edges
    assert _edge_and_score_overlap(full, reference)["edge_sweep_auc"] == 1.0


def test_a_sweep_given_on_the_command_line_is_split_at_commas():
    assert Acdc.Params.model_validate({"sweep": "0.001, 0.01,0.1"}).sweep == (0.001, 0.01, 0.1)
    assert Acdc.Params().sweep == ()


@pytest.mark.parametrize(
    "bad",
    [
        {"tau": -0.1},
        {"tau": float("nan")},
        {"distance": "l2"},
        {"sweep": [0.01, -0.1]},
        {"sweep": [float("nan")]},
        {"sweep": [float("inf")]},
        {"sweep": []},
        {"sweep": ""},
        {"sweep": [0.01, 0.1, 0.01]},
        {"sweep": "0.01,lots"},
    ],
)
def test_values_that_cannot_mean_anything_are_refused(bad):
    with pytest.raises(ValidationError):
        Acdc.Params(**bad)


def test_edge_faithfulness_patches_exactly_the_missing_edges():
    """The planted chain's edges keep the task (the weak head, outside, costs its 0.5%); drop
    one link and the chain carries nothing; an extra edge between circuit heads changes
    nothing (it carries nothing)."""
    from appbench import Edge
    from appbench.engine.acdc import edge_circuit_metric

    ctx = planted_context(CHAIN.build())
    engine, data = ctx.engine, ctx.evaluation
    means = engine.per_prompt(engine.group_means(engine.cache_z(data.corrupt), data), data)
    source = [means[layer] for layer in range(4)]
    edges = {Edge.parse(e) for e in CHAIN.edges}
    full = engine.clean_metric(data).mean().item()

    def metric(edge_set):
        return edge_circuit_metric(ctx.model, ctx.task, data, edge_set, source)

    import torch

    keep = torch.zeros(4, 4, dtype=torch.bool)
    for head in CHAIN.heads:
        keep[head.layer, head.head] = True
    node = engine.ablated_metric(data, keep, means).mean().item()
    assert node == pytest.approx(full - 0.02, abs=1e-4)  # the weak head's share, ablated
    assert metric(edges) == pytest.approx(node, abs=1e-5)
    assert metric(edges - {Edge.parse("a1.h2->a2.h0<v>")}) == pytest.approx(-full, rel=1e-3)
    assert metric(edges | {Edge.parse("a0.h1->a2.h0<v>")}) == pytest.approx(metric(edges))


def test_full_graph_edge_faithfulness_ablates_the_input_and_missing_input_edges():
    """In the full graph the input is a node like the heads: the planted chain with its input
    edge keeps what the head circuit keeps; without it the first head reads the corrupted
    signal and the chain carries the corrupted answer."""
    import torch

    from appbench import Edge
    from appbench.engine.acdc import edge_circuit_metric

    ctx = planted_context(CHAIN.build())
    engine, data = ctx.engine, ctx.evaluation
    means = engine.per_prompt(engine.group_means(engine.cache_z(data.corrupt), data), data)
    source = [means[layer] for layer in range(4)]
    _, cache = ctx.model.run_with_cache(data.corrupt)
    embeds = cache["blocks.0.hook_resid_pre"][None, :, :, None]
    embed = engine.per_prompt(engine.group_means(embeds, data), data)[0, :, :, 0]
    heads_graph = {Edge.parse(e) for e in CHAIN.edges}
    full_graph = {Edge.parse(e) for e in CHAIN.full_edges}

    def metric(edge_set, full):
        return edge_circuit_metric(
            ctx.model, ctx.task, data, edge_set, source, full=full, source_embed=embed
        )

    full = engine.clean_metric(data).mean().item()
    assert metric(full_graph, True) == pytest.approx(metric(heads_graph, False), abs=1e-5)
    assert metric(heads_graph, True) == pytest.approx(-full, rel=1e-3)
    with pytest.raises(ValueError, match="source embedding"):
        edge_circuit_metric(ctx.model, ctx.task, data, full_graph, source, full=True)
    assert torch.isfinite(embed).all()


def _random_ioi_model():
    """A random 4 x 8 IOI-shaped model with MLPs and layer norms (float64), 4 of its prompts
    and a 4-head space."""
    import torch

    from appbench import build_model, get_registries, word_level_tokenizer
    from appbench_plugins.zoo import ground_truth_recipe

    task = get_registries().tasks.get("ioi")
    tokenizer = word_level_tokenizer(sorted(task.vocabulary()))
    torch.manual_seed(1)
    model = build_model(ground_truth_recipe("ioi").model_config(len(tokenizer)), tokenizer)
    model = model.double()
    model.cfg.dtype = torch.float64
    search, _ = task.splits(tokenizer)
    data = search.select(list(range(4)))
    return model, task, data, {Head(0, 1), Head(1, 2), Head(2, 3), Head(3, 0)}


def test_the_engine_matches_the_reference_through_mlps_and_the_input():
    """Every MLP and input edge is a candidate too, and the batched engine decides each edge
    as the plain reference does."""
    model, task, data, space = _random_ioi_model()
    fast = acdc(model, task, data, space, tau=0.02, distance="metric", max_rows=12)
    plain = acdc_reference(model, task, data, space, tau=0.02, distance="metric")
    assert fast.edges == plain.edges and fast.tested == plain.tested
    assert any(ids.startswith("m") for ids, _, _ in fast.trace)  # MLP senders were tested
    assert any("->m" in ids for ids, _, _ in fast.trace)  # and MLP receivers
    assert any(ids.startswith("input->") for ids, _, _ in fast.trace)
    assert fast.removed > 0 and fast.edges


@pytest.mark.parametrize("full", [True, False], ids=["full-graph", "head-graph"])
@pytest.mark.parametrize("distance", ["kl", "metric"])
def test_acdc_in_chunks_of_prompts_decides_as_on_the_whole_split(distance, full):
    """A split run 5 prompts at a time (each chunk's caches rebuilt per run) gives the same
    edges, tested in the same order, with the same distances."""
    ctx = planted_context(CHAIN.build())
    dense = SearchSpace.dense(4, 4).heads
    whole = acdc(ctx.model, ctx.task, ctx.search, dense, distance=distance, full=full)
    chunked = acdc(
        ctx.model, ctx.task, ctx.search, dense, distance=distance, full=full, batch_size=5
    )
    assert len(ctx.search) > 5
    assert chunked.edges == whole.edges and chunked.tested == whole.tested
    for (ids, value, kept), (ids2, value2, kept2) in zip(chunked.trace, whole.trace, strict=True):
        assert (ids, kept) == (ids2, kept2) and value == pytest.approx(value2, abs=1e-6)
    plain = acdc_reference(
        ctx.model, ctx.task, ctx.search, dense, distance=distance, full=full, batch_size=5
    )
    assert plain.edges == whole.edges


def _random_model(kind: str):
    """A random float64 model with the toy vocabulary: MLPs and layer norms, attention only,
    grouped-query attention, or attention and MLP in parallel (GPT-J style)."""
    import torch

    from appbench.models import build_model
    from appbench.testing import toy_tokenizer

    tokenizer = toy_tokenizer()
    config = {
        "n_layers": 3,
        "n_heads": 4,
        "d_model": 16,
        "d_head": 4,
        "d_mlp": 32,
        "n_ctx": 8,
        "d_vocab": len(tokenizer.get_vocab()),
        "act_fn": "gelu",
        "normalization_type": "LN",
        "model_name": f"random-{kind}",
    }
    if kind == "attn-only":
        config["attn_only"] = True
    if kind == "gqa":
        config.update(
            n_key_value_heads=2,
            normalization_type="RMS",
            positional_embedding_type="rotary",
            rotary_dim=4,
        )
    if kind == "parallel":
        config["parallel_attn_mlp"] = True
    torch.manual_seed(3)
    model = build_model(config, tokenizer)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    model = model.double()
    model.cfg.dtype = torch.float64
    return model


@pytest.mark.parametrize("kind", ["mlps", "attn-only", "gqa", "parallel"])
@pytest.mark.parametrize("full", [True, False], ids=["full-graph", "head-graph"])
def test_the_fast_corrections_give_the_plain_logits(kind, full):
    """The engine's run (edges applied per receiver input in the cheaper of two equal forms,
    q/k/v recomputed for corrected inputs only, logits at the targets) gives the logits of the
    plain run (every removed edge subtracted from per-head input copies) for random edge sets:
    few removed, almost all removed, speculative prefixes, from a later layer, ablated nodes."""
    import random

    import torch

    from appbench.circuit import INPUT, Mlp, model_graph
    from appbench.engine.acdc import _Graph, _slot
    from appbench.testing import ToyTask

    model = _random_model(kind)
    task = ToyTask()
    search, _ = task.splits(model.tokenizer)
    data = search.select(list(range(6)))
    cfg = model.cfg
    every = sorted({(e.sender, _slot(cfg, e)) for e in model_graph(cfg, full)}, key=str)
    rng = random.Random(0)
    plain, fast = _Graph(model, task, data, "kl", plain=True), _Graph(model, task, data, "kl")

    def same(variants, start=0, ablated=frozenset()):
        kwargs = {}
        if start:
            kwargs = {
                "start": start,
                "resid": plain.resid_clean[start],
                "z_before": plain.z_clean[:start],
                "mlp_before": plain.mlp_clean[:start],
            }
        plain.ablated = fast.ablated = ablated
        want, got = plain.run(variants, **kwargs), fast.run(variants, **kwargs)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)

    for share in (0.1, 0.5, 0.97, 1.0):
        common = frozenset(c for c in every if rng.random() < share)
        extra = [c for c in every if c not in common]
        prefixes = [common | frozenset(extra[:i]) for i in range(1, min(5, len(extra)) + 1)]
        same([common, *prefixes] if prefixes else [common])
        late = frozenset(c for c in common if c[1] is None or c[1][0] >= 2)
        same([late, late | frozenset(c for c in extra if c[1] is None)], start=2)
    # Every edge into one kind of input removed, the rest of the model live (so the senders'
    # own outputs differ from their sources).
    for kind in ("q", "k", "v", "mlp", None):
        into = frozenset(
            c
            for c in every
            if (c[1] is None if kind is None else c[1] is not None and c[1][1] == kind)
        )
        if into:
            same([into, into - {next(iter(sorted(into, key=str)))}])
    nodes = {INPUT, Head(0, 1), Head(1, 3)} | ({Mlp(0)} if kind != "attn-only" else set())
    same([frozenset(c for c in every if rng.random() < 0.5)], ablated=frozenset(nodes))


def test_models_whose_inputs_cannot_be_recomputed_run_the_plain_way():
    """Post-norm blocks (OLMo 2) and shortformer embeddings put something other than
    ``ln1(input) @ W + b`` into q/k/v, so ACDC runs them the plain way."""
    import copy

    from appbench.engine.acdc import _Graph, _recomputable_inputs
    from appbench.testing import ToyTask

    model = _random_model("mlps")
    task = ToyTask()
    data = task.splits(model.tokenizer)[0].select([0, 1])
    assert _recomputable_inputs(model.cfg) and not _Graph(model, task, data, "kl").plain
    assert _Graph(model, task, data, "kl", plain=True).plain
    for key, value in [
        ("original_architecture", "Olmo2ForCausalLM"),
        ("positional_embedding_type", "shortformer"),
        ("load_in_4bit", True),
    ]:
        cfg = copy.copy(model.cfg)
        setattr(cfg, key, value)
        assert not _recomputable_inputs(cfg), key


def _no_cost():
    from appbench.results import StageCost

    return StageCost(
        wall_seconds=0.0,
        forward_calls=0,
        prompt_passes=0.0,
        tokens=0.0,
        flops=0.0,
        peak_rss_bytes=0,
    )


class _StopAfter(Checkpoint):
    """A checkpoint whose run is killed right after its n-th save (nothing done after it is
    lost, so the resumed run must add up to the whole one exactly)."""

    def __init__(self, path, n):
        super().__init__(path, {"run": 1}, _no_cost, every=0)
        self.n = n

    def save(self, state, uncounted_flops=0.0):
        super().save(state, uncounted_flops)
        if self.saves == self.n:
            raise KeyboardInterrupt


@pytest.mark.parametrize("full", [True, False], ids=["full-graph", "head-graph"])
@pytest.mark.parametrize("stops", [1, 7, 19])
def test_an_interrupted_acdc_goes_on_from_its_checkpoint_to_the_same_decisions(
    tmp_path, full, stops
):
    ctx = planted_context(CHAIN.build())
    dense = SearchSpace.dense(CHAIN.n_layers, CHAIN.n_heads).heads
    whole = acdc(ctx.model, ctx.task, ctx.search, dense, full=full)
    path = tmp_path / "none__acdc.checkpoint"
    with pytest.raises(KeyboardInterrupt):
        acdc(ctx.model, ctx.task, ctx.search, dense, full=full, checkpoint=_StopAfter(path, stops))
    lines: list[str] = []
    again = Checkpoint(path, {"run": 1}, _no_cost, lines.append, every=0)
    resumed = acdc(ctx.model, ctx.task, ctx.search, dense, full=full, checkpoint=again)
    assert again.segments == 1 and again.prior is not None and any("resuming" in x for x in lines)
    assert {e.id for e in resumed.edges} == (CHAIN.full_edges if full else CHAIN.edges)
    assert resumed.edges == whole.edges
    assert (resumed.tested, resumed.removed, resumed.forward_runs) == (
        whole.tested,
        whole.removed,
        whole.forward_runs,
    )
    assert resumed.trace == whole.trace and resumed.distance == whole.distance
    # The corrections' FLOPs of the first segment travel in the checkpoint's cost.
    assert again.prior.flops + resumed.extra_flops == pytest.approx(whole.extra_flops)
    assert 0 < resumed.extra_flops < whole.extra_flops
    # The whole search saved at its end: once more, nothing is tested again.
    last = acdc(
        ctx.model,
        ctx.task,
        ctx.search,
        dense,
        full=full,
        checkpoint=Checkpoint(path, {"run": 1}, _no_cost, every=0),
    )
    assert last.edges == whole.edges and last.extra_flops == 0


@pytest.mark.parametrize("stops", [2, 9])
def test_a_grouped_query_acdc_goes_on_from_its_checkpoint(tmp_path, stops):
    """Shared k/v inputs (one slot per key-value head) survive the file."""
    ctx = planted_context(planted_gqa_model())
    dense = SearchSpace.dense(2, 8).heads
    whole = acdc(ctx.model, ctx.task, ctx.search, dense)
    path = tmp_path / "none__acdc.checkpoint"
    with pytest.raises(KeyboardInterrupt):
        acdc(ctx.model, ctx.task, ctx.search, dense, checkpoint=_StopAfter(path, stops))
    again = Checkpoint(path, {"run": 1}, _no_cost, every=0)
    resumed = acdc(ctx.model, ctx.task, ctx.search, dense, checkpoint=again)
    assert {e.id for e in resumed.edges} == PLANTED_GQA_FULL_EDGES
    assert (resumed.edges, resumed.tested, resumed.trace) == (
        whole.edges,
        whole.tested,
        whole.trace,
    )
    state = json.loads(path.read_text())["state"]
    assert {slot[1] for _, slot in state["removed"] if slot} >= {"k", "v"}


def test_an_acdc_through_mlps_and_the_input_goes_on_from_its_checkpoint(tmp_path):
    model, task, data, space = _random_ioi_model()
    whole = acdc(model, task, data, space, tau=0.02, distance="metric", max_rows=12)
    path = tmp_path / "none__acdc.checkpoint"
    with pytest.raises(KeyboardInterrupt):
        acdc(model, task, data, space, 0.02, "metric", max_rows=12, checkpoint=_StopAfter(path, 6))
    state = json.loads(path.read_text())["state"]
    assert "input" in {sender for sender, _ in state["removed"] + state["kept"]}
    assert "mlp" in {slot[1] for _, slot in state["removed"] + state["kept"] if slot}
    again = Checkpoint(path, {"run": 1}, _no_cost, every=0)
    resumed = acdc(model, task, data, space, 0.02, "metric", max_rows=12, checkpoint=again)
    assert (resumed.edges, resumed.tested, resumed.trace) == (
        whole.edges,
        whole.tested,
        whole.trace,
    )


def test_a_checkpoint_of_another_acdc_is_refused(tmp_path):
    ctx = planted_context(CHAIN.build())
    dense = SearchSpace.dense(CHAIN.n_layers, CHAIN.n_heads).heads
    path = tmp_path / "none__acdc.checkpoint"
    with pytest.raises(KeyboardInterrupt):
        acdc(ctx.model, ctx.task, ctx.search, dense, checkpoint=_StopAfter(path, 3))
    with pytest.raises(ValueError, match="another ACDC run"):
        acdc(
            ctx.model,
            ctx.task,
            ctx.search,
            dense,
            tau=0.02,
            checkpoint=Checkpoint(path, {"run": 1}, _no_cost, every=0),
        )
