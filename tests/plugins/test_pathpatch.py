"""Known-answer tests of automated path patching: planted circuits and edges, the selection
rule on hand-made scores, search-space restriction (counted forward passes), the CLI."""

import dataclasses
import json
import math
import random

import pytest
from click.testing import CliRunner

from appbench import Head, RunError, SearchSpace
from appbench.runner import CostCounter, parse_params
from appbench.testing import (
    PLANTED_CHAIN_CIRCUIT,
    PLANTED_CHAIN_EDGES,
    PLANTED_CIRCUIT,
    PLANTED_EDGES,
    PLANTED_GQA_CIRCUIT,
    PLANTED_GQA_EDGES,
    PLANTED_KEY_CIRCUIT,
    PLANTED_KEY_EDGES,
    PLANTED_QUERY_CIRCUIT,
    PLANTED_QUERY_EDGES,
    check_discoverer,
    planted_chain_model,
    planted_context,
    planted_gqa_model,
    planted_key_model,
    planted_query_model,
)
from appbench_plugins.pathpatch import PathPatch, select_senders


def discover(ctx, space=None, **params):
    """Run pathpatch's reference engine, counting its prompt passes with the runner's counter."""
    params.setdefault("engine", "reference")
    space = space or SearchSpace.dense(ctx.n_layers, ctx.n_heads)
    counter = CostCounter(ctx.model)
    try:
        circuit = PathPatch().discover(ctx, space, PathPatch.Params(**params))
    finally:
        counter.remove()
    passes = counter.tally.layer_rows / ctx.n_layers / len(ctx.search)
    # The trace's own count of whole forward passes agrees with what the model computed.
    assert passes == circuit.details["reference_forward_passes"]
    return circuit, passes


def edge_ids(circuit):
    return {e.id for e in circuit.edges}


# --------------------------------------------------------------------------- planted circuits
@pytest.mark.parametrize(
    ("build", "heads", "edges"),
    [
        (planted_query_model, PLANTED_QUERY_CIRCUIT, PLANTED_QUERY_EDGES),
        (planted_key_model, PLANTED_KEY_CIRCUIT, PLANTED_KEY_EDGES),
        (planted_chain_model, PLANTED_CHAIN_CIRCUIT, PLANTED_CHAIN_EDGES),
    ],
)
def test_default_parameters_recover_exactly_the_planted_heads_and_edges(build, heads, edges):
    ctx = planted_context(build())
    circuit, passes = discover(ctx)
    assert circuit.heads == heads
    assert edge_ids(circuit) == edges
    for head in heads:  # every planted head carries the whole effect on its path
        assert circuit.scores[head.id] == pytest.approx(-1.0, abs=1e-5)
    assert set(circuit.scores) == {h.id for h in SearchSpace.dense(ctx.n_layers, 8).heads}
    assert all(abs(v) < 1e-6 for k, v in circuit.scores.items() if Head.parse(k) not in heads)
    # Receivers are visited from the logits backwards; layer-0 heads have no senders.
    receivers = sorted((h for h in heads if h.layer > 0), key=lambda h: -h.layer)
    assert circuit.details["receivers_visited"] == [h.id for h in receivers]
    # 2 baseline passes, one per head into the logits, two per earlier head per q/k/v input.
    expected = 2 + ctx.n_layers * 8 + sum(3 * 2 * 8 * h.layer for h in receivers)
    assert passes == expected
    assert not circuit.details["early_exit"]


def test_gqa_kv_heads_are_patched_once_and_shared_by_their_query_heads():
    ctx = planted_context(planted_gqa_model())
    # Three equal paths into the logits (z = 2.02) do not clear the outlier rule's resid
    # threshold 2 + 2/sqrt(16) = 2.5; with T_resid = 1 they do (see planted_gqa_model). The
    # default rule keeps every path that carries at least 1% of the gap: all of them.
    assert discover(ctx, selection="model")[0].heads == frozenset()
    assert discover(ctx, selection="model", resid_importance_threshold=1.0)[0].heads == (
        PLANTED_GQA_CIRCUIT
    )
    circuit, passes = discover(ctx)
    assert circuit.heads == PLANTED_GQA_CIRCUIT
    assert edge_ids(circuit) == PLANTED_GQA_EDGES
    assert circuit.scores["a0.h0"] == pytest.approx(-2 / 3, abs=1e-5)
    assert circuit.scores["a0.h4"] == pytest.approx(-1 / 3, abs=1e-5)
    # a1.h6 and a1.h7 share KV head 1: its k and v are scored for a1.h6 and reused for a1.h7.
    cached = [(s["receiver"], s["input"]) for s in circuit.details["trace"] if s["cached"]]
    assert cached == [("a1.h7", "k"), ("a1.h7", "v")]
    assert passes == 2 + 16 + 3 * (3 * 2 * 8) - 2 * (2 * 8)


def test_the_original_planted_model_by_default_and_with_the_outlier_rules():
    circuit = check_discoverer(PathPatch)
    assert circuit.heads == PLANTED_CIRCUIT
    assert edge_ids(circuit) == PLANTED_EDGES
    # With 2 heads per layer no single outlier clears the sqrt rule: for n scores with one
    # outlier, (|R| - |mu|) / sigma is at most (n - 1) / sqrt(n) = 1.5 for n = 4, below
    # T_resid + 2/sqrt(4) = 3. The linear rule with low thresholds recovers it exactly.
    assert check_discoverer(PathPatch, selection="model").heads == frozenset()
    circuit = check_discoverer(
        PathPatch,
        selection="model",
        mode="linear",
        importance_threshold=0.5,
        resid_importance_threshold=1.0,
    )
    assert circuit.heads == PLANTED_CIRCUIT
    assert edge_ids(circuit) == PLANTED_EDGES


# ------------------------------------------------------------------ search-space restriction
def test_heads_outside_the_search_space_cost_nothing_and_never_appear():
    ctx = planted_context(planted_query_model())
    _, dense_passes = discover(ctx)
    sender = Head(0, 0)
    space = SearchSpace(2, 8, SearchSpace.dense(2, 8).heads - {sender})
    circuit, passes = discover(ctx, space)
    # The sender is skipped once into the logits and twice per q/k/v input of the receiver.
    assert dense_passes - passes == 1 + 3 * 2
    assert circuit.heads == {Head(1, 2)}
    assert edge_ids(circuit) == {"a1.h2->logits"}
    assert sender.id not in circuit.scores
    assert all(sender.id not in step["selected"] for step in circuit.details["trace"])


def test_a_pruned_receiver_is_never_visited():
    ctx = planted_context(planted_chain_model())
    space = SearchSpace(3, 8, SearchSpace.dense(3, 8).heads - {Head(1, 3)})
    circuit, passes = discover(ctx, space)
    assert circuit.heads == {Head(2, 5)}
    assert circuit.details["receivers_visited"] == ["a2.h5"]
    assert passes == 2 + 23 + 3 * 2 * 15


def test_early_exit_adds_the_queue_and_stops():
    ctx = planted_context(planted_chain_model())
    # Limit 1.5 heads: a2.h5 is visited, then queue (a1.h3) + visited (a2.h5) = 2 > 1.5.
    circuit, passes = discover(ctx, early_exit_fraction=1.5 / 24)
    assert circuit.details["early_exit"]
    assert circuit.heads == {Head(2, 5), Head(1, 3)}
    assert circuit.details["receivers_visited"] == ["a2.h5"]
    assert passes == 2 + 24 + 3 * 2 * 16


def test_a_model_that_ignores_the_task_is_reported():
    import torch

    ctx = planted_context(planted_query_model())
    with torch.no_grad():
        ctx.model.unembed.W_U.zero_()
    with pytest.raises(RunError, match="metrics coincide"):
        PathPatch().discover(ctx, SearchSpace.dense(2, 8), PathPatch.Params())


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"mode": "exp"}, "mode"),
        ({"early_exit_fraction": "0"}, "early_exit_fraction"),
        ({"selection": "zeros"}, "selection"),
        ({"effect_threshold": "0"}, "effect_threshold"),
        ({"effect_threshold": "inf"}, "effect_threshold"),
        ({"effect_threshold": "nan"}, "effect_threshold"),
        ({"importance_threshold": "1e400"}, "importance_threshold"),
        ({"compat": "true"}, "compat: Extra inputs"),
    ],
)
def test_bad_parameters_are_one_line_errors(params, match):
    with pytest.raises(RunError, match=match):
        parse_params(PathPatch, params)


# ------------------------------------------------------------------------ the selection rule
def grid(rows):
    """Head -> score from a list of rows (None = not scored)."""
    return {
        Head(layer, h): value
        for layer, row in enumerate(rows)
        for h, value in enumerate(row)
        if value is not None
    }


def select(scores, n_rows=2, n_heads=4, **kwargs):
    params = {
        "selection": "scored",
        "threshold": 1.0,
        "min_value_threshold": 0.01,
        "k": 2.0,
        "mode": "sqrt",
    }
    return {h.id for h in select_senders(scores, n_rows, n_heads, **{**params, **kwargs})}


def test_selection_rule_by_hand_in_both_modes():
    # One outlier among 8: mu = -1/8, sigma = sqrt(1/8) (Bessel), |R| - |mu| = 7/8 = 2.475 sigma.
    scores = grid([[-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # sqrt: row 0 has n_0 = 4 heads, base = T + 2/2.
    assert select(scores, threshold=1.4) == {"a0.h0"}  # 2.4 sigma < 2.475 sigma
    assert select(scores, threshold=1.5) == set()  # 2.5 sigma
    assert select(scores, threshold=1.4, k=2.2) == set()  # 1.4 + 1.1
    # linear: base = T + 0.1 (n_rows - 1 - l) = T + 0.1 for row 0.
    assert select(scores, mode="linear", threshold=2.3) == {"a0.h0"}  # 2.4 sigma
    assert select(scores, mode="linear", threshold=2.4) == set()  # 2.5 sigma
    # The same outlier in the last row meets the linear rule's lowest threshold.
    last = grid([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -1.0]])
    assert select(last, mode="linear", threshold=2.4) == {"a1.h3"}
    # sqrt, last row: n_1 = 8, base = T + 2/sqrt(8) = T + 0.707.
    assert select(last, threshold=1.76) == {"a1.h3"}
    assert select(last, threshold=1.78) == set()


def test_effect_rule_by_hand():
    scores = grid([[-0.5, 0.049, None, 0.05], [0.0, -0.2, 0.01, None]])
    assert select(scores, selection="effect", effect_threshold=0.05) == {"a0.h0", "a0.h3", "a1.h1"}
    assert select(scores, selection="effect", effect_threshold=0.3) == {"a0.h0"}
    # The selection of a head never depends on the others: drop any of them, keep the rest.
    for dropped in list(scores):
        rest = {h: v for h, v in scores.items() if h != dropped}
        assert select(rest, selection="effect", effect_threshold=0.05) == (
            {"a0.h0", "a0.h3", "a1.h1"} - {dropped.id}
        )
    # min_value_threshold still applies: nothing when max |R| is at most it.
    assert (
        select(scores, selection="effect", effect_threshold=0.05, min_value_threshold=0.5) == set()
    )


def test_min_value_threshold_and_degenerate_inputs():
    small = grid([[-0.01, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert select(small, threshold=0.0) == set()  # max |R| <= 0.01
    assert select(small, threshold=0.0, min_value_threshold=0.0099) == {"a0.h0"}
    assert select({}, threshold=0.0) == set()
    assert select({Head(0, 1): -1.0}, threshold=0.0) == set()  # one score: sigma = 0
    with pytest.raises(ValueError, match="cannot send"):
        select({Head(2, 0): 1.0}, n_rows=2)


def test_model_statistics_count_unscored_heads_as_zeros():
    # 4 of 8 heads scored. Scored: mu = -1/4, sigma = 1/2, |R| - |mu| = 3/4 = 1.5 sigma, and
    # n_0 = 2 scored heads in row 0 -> base = T + 2/sqrt(2). Model: the 4 unscored heads are
    # zeros (mu = -1/8, sigma = sqrt(1/8), 2.475 sigma) and n_0 = 4 -> base = T + 1.
    scores = grid([[-1.0, 0.0, None, None], [0.0, 0.0, None, None]])
    assert select(scores, threshold=0.05) == {"a0.h0"}  # 1.464 sigma < 1.5 sigma
    assert select(scores, threshold=0.1) == set()  # 1.514 sigma
    assert select(scores, threshold=0.1, selection="model") == {"a0.h0"}
    assert select(scores, threshold=1.4, selection="model") == {"a0.h0"}
    assert select(scores, threshold=1.5, selection="model") == set()
    # linear: only the statistics differ (row 0 base = T + 0.1).
    assert select(scores, mode="linear", threshold=1.39) == {"a0.h0"}
    assert select(scores, mode="linear", threshold=1.41) == set()
    assert select(scores, mode="linear", threshold=2.3, selection="model") == {"a0.h0"}


def test_model_and_scored_statistics_agree_on_a_dense_space():
    rng = random.Random(0)
    for _ in range(50):
        n_rows, n_heads = rng.randint(1, 4), rng.randint(2, 5)
        scores = {
            Head(layer, h): rng.gauss(0.0, 0.1) * (5.0 if rng.random() < 0.1 else 1.0)
            for layer in range(n_rows)
            for h in range(n_heads)
        }
        for mode in ("sqrt", "linear"):
            plain = select(scores, n_rows, n_heads, mode=mode, threshold=1.0)
            assert plain == select(
                scores, n_rows, n_heads, mode=mode, threshold=1.0, selection="model"
            )


def test_selection_matches_a_direct_transcription_of_the_rule():
    # The rule written out over a full [n_rows, H] matrix with NaN for unscored heads and
    # torch-style statistics, compared with select_senders on random inputs.
    rng = random.Random(1)
    for _ in range(100):
        n_rows, n_heads = rng.randint(1, 4), rng.randint(2, 5)
        matrix = [
            [None if rng.random() < 0.3 else rng.gauss(0.0, 0.2) for _ in range(n_heads)]
            for _ in range(n_rows)
        ]
        scores = grid(matrix)
        for selection in ("scored", "model"):
            compat = selection == "model"
            flat = (
                [0.0 if v is None else v for row in matrix for v in row]
                if compat
                else list(scores.values())
            )
            expected = set()
            if len(flat) > 1 and max(abs(v) for v in flat) > 0.01:
                mu = sum(flat) / len(flat)
                sigma = math.sqrt(sum((v - mu) ** 2 for v in flat) / (len(flat) - 1))
                for layer, row in enumerate(matrix):
                    scored_so_far = sum(v is not None for r in matrix[: layer + 1] for v in r)
                    n_l = (layer + 1) * n_heads if compat else scored_so_far
                    base = 1.2 + 2.0 / math.sqrt(n_l) if n_l else math.inf
                    for h, v in enumerate(row):
                        if v is not None and abs(v) - abs(mu) > base * abs(sigma):
                            expected.add(f"a{layer}.h{h}")
            got = select(scores, n_rows, n_heads, threshold=1.2, selection=selection)
            assert got == expected


# ------------------------------------------------------------------------------------- the CLI
def test_cli_run_on_the_default_model(tmp_path):
    from appbench.cli import cli

    args = ["run", "--pruner", "none", "--discoverer", "pathpatch", "--n-search", "30"]
    args += ["--n-eval", "30", "--out", str(tmp_path), "--json", "--quiet"]
    result = CliRunner().invoke(cli, args, obj={})
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["discoverer"] == "pathpatch" and data["n_search"] == 30
    circuit = data["circuit"]
    assert circuit["heads"], "pathpatch found no head on the IOI model"
    assert set(circuit["heads"]) <= set(data["search_space"]["heads"])
    # Every edge joins circuit heads, and every non-logits receiver was visited.
    heads = set(circuit["heads"])
    for edge in circuit["edges"]:
        sender, _, receiver = edge.partition("->")
        assert sender in heads
        if receiver != "logits":
            assert receiver.split("<")[0] in circuit["details"]["receivers_visited"]
    # The fast engine (the default) runs far less than the reference would.
    passes = data["cost"]["discover"]["prompt_passes"]
    assert circuit["details"]["engine"] == "fast"
    assert passes < circuit["details"]["reference_forward_passes"] * 30 / 2
    assert data["faithfulness"]["m_model"] > data["faithfulness"]["m_empty"]


# ------------------------------------------------------------------- fast engine = reference
@pytest.mark.parametrize(
    "build", [planted_query_model, planted_key_model, planted_chain_model, planted_gqa_model]
)
def test_parity_fast_engine_finds_the_reference_circuit(build):
    ctx = planted_context(build())
    extra = {"resid_importance_threshold": 1.0} if build is planted_gqa_model else {}
    fast = PathPatch().discover(
        ctx, SearchSpace.dense(ctx.n_layers, ctx.n_heads), PathPatch.Params(**extra)
    )
    slow, _ = discover(ctx, **extra)
    assert fast.heads == slow.heads and fast.edges == slow.edges
    assert fast.scores.keys() == slow.scores.keys()
    assert max(abs(fast.scores[h] - slow.scores[h]) for h in fast.scores) < 1e-4
    assert fast.details["reference_forward_passes"] == slow.details["reference_forward_passes"]


def test_progress_is_reported_once_per_stage_through_the_context_log():
    lines: list[str] = []
    ctx = dataclasses.replace(planted_context(planted_chain_model()), log=lines.append)
    circuit = PathPatch().discover(ctx, SearchSpace.dense(ctx.n_layers, 8), PathPatch.Params())
    assert lines[0] == f"pathpatch: scoring {ctx.n_layers * 8} senders on the logits"
    visited = circuit.details["receivers_visited"]
    assert len(lines) == 1 + len(visited) > 1
    for line, receiver in zip(lines[1:], visited, strict=True):
        assert line.startswith(f"pathpatch: receiver {receiver} (")
        assert f"{8 * Head.parse(receiver).layer} senders x qkv" in line


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_a_split_scored_in_chunks_finds_what_the_whole_split_finds(engine):
    """batch_size below the split: each receiver is scored chunk by chunk (caches rebuilt per
    chunk) and the chunks' scores combine into the whole split's."""
    from appbench.testing import model_context

    # The plain reference engine runs two whole passes per sender: a small space keeps it short.
    ref_space = {Head(0, 3), Head(1, 5), Head(2, 1), Head(3, 6), Head(1, 0), Head(2, 2)}
    ctx = model_context("zoo-gt-ioi", n_search=20)
    space = SearchSpace.dense(4, 8) if engine == "fast" else SearchSpace(4, 8, ref_space)
    whole = PathPatch().discover(ctx, space, PathPatch.Params(engine=engine))
    chunked = PathPatch().discover(ctx, space, PathPatch.Params(engine=engine, batch_size=6))
    assert chunked.heads == whole.heads and chunked.edges == whole.edges
    for head, score in whole.scores.items():
        assert chunked.scores[head] == pytest.approx(score, rel=1e-4, abs=1e-5)
