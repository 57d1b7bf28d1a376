"""Known answers on the planted-circuit family (appbench.testing.PlantedCircuit) for the other
built-in plugins: activation patching finds every planted head, in dense and pruned spaces;
contrastive FLAP keeps exactly the heads whose activations the corruption changes; magnitude
keeps the heads with output weights; APP (cflap then pathpatch) recovers the planted chain;
path patching behind any pruner, at any size, finds the part of the chain the pruner kept that
still reaches the logits; merged is the union of its branches and keeps the whole chain."""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appbench import Head, SearchSpace
from appbench.testing import PlantedCircuit, planted_context
from appbench_plugins.actpatch import ActPatch
from appbench_plugins.cflap import CflapPruner
from appbench_plugins.flap import FlapPruner
from appbench_plugins.magnitude import MagnitudePruner
from appbench_plugins.merged import MergedPruner
from appbench_plugins.pathpatch import PathPatch

FOUR_LAYERS = PlantedCircuit(
    4,
    4,
    ((Head(0, 1), None), (Head(1, 2), "v"), (Head(2, 0), "k"), (Head(3, 3), "q")),
    distractors=frozenset({Head(1, 1), Head(2, 1)}),
    weak=frozenset({Head(0, 3), Head(2, 2)}),
    signal="presence",
)


@st.composite
def chains(draw):
    n_layers, n_heads = draw(st.integers(2, 4)), draw(st.sampled_from([2, 4, 8]))
    layers = sorted(
        draw(st.lists(st.integers(0, n_layers - 1), min_size=1, max_size=n_layers, unique=True))
    )
    chain = [(Head(layers[0], draw(st.integers(0, n_heads - 1))), None)]
    for layer in layers[1:]:
        allowed = ["q", "k", "v"] if chain[-1][1] in (None, "v") else ["q"]
        chain.append(
            (Head(layer, draw(st.integers(0, n_heads - 1))), draw(st.sampled_from(allowed)))
        )
    rest = sorted(
        {Head(layer, h) for layer in range(n_layers) for h in range(n_heads)}
        - {h for h, _ in chain}
    )
    distractors = draw(st.sets(st.sampled_from(rest))) if rest else set()
    return PlantedCircuit(
        n_layers,
        n_heads,
        tuple(chain),
        distractors=frozenset(distractors),
        signal=draw(st.sampled_from(["sign", "presence"])),
    )


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=chains(), seed=st.integers(0, 2**16))
def test_actpatch_finds_every_planted_head_in_dense_and_pruned_spaces(spec, seed):
    # Every chain head alone carries the whole effect (its patch turns the output into the
    # corrupted one); distractors change activations but reach nothing.
    ctx = planted_context(spec.build())
    dense = ActPatch().discover(
        ctx, SearchSpace.dense(spec.n_layers, spec.n_heads), ActPatch.Params()
    )
    assert dense.heads == spec.heads
    for head in spec.heads:
        assert dense.scores[head.id] == pytest.approx(-1.0, abs=1e-4)
    others = sorted(SearchSpace.dense(spec.n_layers, spec.n_heads).heads - spec.heads)
    kept = spec.heads | set(random.Random(seed).sample(others, min(3, len(others))))
    pruned = ActPatch().discover(
        ctx, SearchSpace(spec.n_layers, spec.n_heads, kept), ActPatch.Params()
    )
    assert pruned.heads == spec.heads


def test_cflap_keeps_exactly_the_heads_whose_activations_the_corruption_changes():
    ctx = planted_context(FOUR_LAYERS.build())
    changed = FOUR_LAYERS.heads | FOUR_LAYERS.distractors
    space = CflapPruner().prune(ctx, CflapPruner.Params(keep_k=len(changed)))
    assert space.heads == changed
    # A sign flip (+1 clean, -1 corrupted) leaves every second moment alone: cflap is blind to it.
    flipped = PlantedCircuit(2, 4, ((Head(0, 1), None), (Head(1, 2), "v")), signal="sign")
    scores = (
        CflapPruner().prune(planted_context(flipped.build()), CflapPruner.Params(keep_k=2)).scores
    )
    assert len({round(scores[h.id], 6) for h in flipped.heads} | {round(scores["a0.h0"], 6)}) == 1


def test_magnitude_keeps_the_heads_with_output_weights():
    ctx = planted_context(FOUR_LAYERS.build())
    wired = FOUR_LAYERS.heads | FOUR_LAYERS.distractors  # weak heads' weights are 0.005
    space = MagnitudePruner().prune(ctx, MagnitudePruner.Params(fraction=len(wired) / 16))
    assert space.heads == wired


def test_app_recovers_the_planted_chain_and_its_edges():
    ctx = planted_context(FOUR_LAYERS.build())
    space = CflapPruner().prune(ctx, CflapPruner.Params(keep_k=6))
    circuit = PathPatch().discover(ctx, space, PathPatch.Params())
    assert circuit.heads == FOUR_LAYERS.heads
    assert {edge.id for edge in circuit.edges} == FOUR_LAYERS.edges


def kept_suffix(spec: PlantedCircuit, kept: frozenset[Head]) -> set[Head]:
    """The chain heads path patching can reach from the logits inside ``kept``: in a serial
    chain each head is scored only as a sender into its kept successor, so the circuit is the
    longest run of kept heads that ends at the last one."""
    found: set[Head] = set()
    for head, _ in reversed(spec.chain):
        if head not in kept:
            break
        found.add(head)
    return found


@pytest.mark.parametrize(
    ("pruner", "params"),
    [
        (FlapPruner, {"metric": "wifv"}),
        (FlapPruner, {"metric": "wifn"}),
        (CflapPruner, {}),
        (MagnitudePruner, None),
    ],
    ids=["flap-wifv", "flap-wifn", "cflap", "magnitude"],
)
def test_pathpatch_behind_every_pruner_at_every_size_finds_the_kept_chain(pruner, params):
    ctx = planted_context(FOUR_LAYERS.build())
    total = FOUR_LAYERS.n_layers * FOUR_LAYERS.n_heads
    suffixes = set()
    for k in range(1, total + 1):
        if params is None:  # magnitude sizes by fraction
            chosen = pruner.Params(fraction=k / total)
        else:
            chosen = pruner.Params(keep_k=k, **params)
        space = pruner().prune(ctx, chosen)
        circuit = PathPatch().discover(ctx, space, PathPatch.Params())
        expected = kept_suffix(FOUR_LAYERS, space.heads)
        assert circuit.heads == expected, (k, sorted(h.id for h in space.heads))
        # ... with exactly the planted edges among them (weak heads stay below 1% of the gap).
        assert {e.id for e in circuit.edges} == {
            e
            for e in FOUR_LAYERS.edges
            if {p.split("<")[0] for p in e.split("->")} <= {h.id for h in expected} | {"logits"}
        }
        suffixes.add(len(expected))
    # The sizes sweep from a space without the last head to the dense one.
    assert 4 in suffixes and len(suffixes) >= 2


def test_merged_keeps_the_union_of_its_branches_and_app_on_it_recovers_the_chain():
    ctx = planted_context(FOUR_LAYERS.build())
    merged = MergedPruner().prune(ctx, MergedPruner.Params())
    flap = FlapPruner().prune(ctx, FlapPruner.Params())
    cflap = CflapPruner().prune(ctx, CflapPruner.Params())
    assert merged.heads == flap.heads | cflap.heads
    # Contrastive FLAP sees every head the corruption changes ("presence" signal): the chain and
    # the distractors, so the union holds the whole chain whatever FLAP kept.
    assert cflap.heads == FOUR_LAYERS.heads | FOUR_LAYERS.distractors
    circuit = PathPatch().discover(ctx, merged, PathPatch.Params())
    assert circuit.heads == FOUR_LAYERS.heads
    assert {edge.id for edge in circuit.edges} == FOUR_LAYERS.edges
