"""Known-answer and property tests of pathpatch's default selection rule: a head's selection
does not depend on which other heads were scored, so pruning heads away never changes the
circuit inside what is left (issue: "path patching keeps the circuit when pruning works")."""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appbench import Head, SearchSpace
from appbench.testing import PlantedCircuit, planted_context
from appbench_plugins.pathpatch import PathPatch

#: A single dominant head in a 2x4 model: one outlier among 4 or 8 scores can never clear the
#: outlier rules' thresholds ((n-1)/sqrt(n) standard deviations at most).
LONE_HEAD = PlantedCircuit(
    2,
    4,
    ((Head(1, 2), None),),
    distractors=frozenset({Head(0, 1), Head(1, 0)}),
    weak=frozenset({Head(0, 3)}),
)
#: A two-head chain in a 2x4 model, through the receiver's value.
TWO_HEAD_CHAIN = PlantedCircuit(
    2,
    4,
    ((Head(0, 1), None), (Head(1, 2), "v")),
    distractors=frozenset({Head(0, 0), Head(1, 3)}),
    weak=frozenset({Head(1, 1)}),
)


def discover(spec, heads=None, **params):
    ctx = planted_context(spec.build())
    space = SearchSpace(spec.n_layers, spec.n_heads, heads) if heads is not None else None
    space = space or SearchSpace.dense(spec.n_layers, spec.n_heads)
    return PathPatch().discover(ctx, space, PathPatch.Params(**params))


def edge_ids(circuit):
    return {edge.id for edge in circuit.edges}


@pytest.mark.parametrize("spec", [LONE_HEAD, TWO_HEAD_CHAIN], ids=["lone-head", "two-head-chain"])
@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_default_rule_finds_the_dominant_heads_of_a_2x4_model(spec, engine):
    dense = discover(spec, engine=engine)
    assert dense.heads == spec.heads
    assert edge_ids(dense) == spec.edges
    # Pruned to exactly the planted heads, and to those plus every distractor and weak head.
    assert discover(spec, spec.heads, engine=engine).heads == spec.heads
    others = spec.heads | spec.distractors | spec.weak
    assert discover(spec, others, engine=engine).heads == spec.heads


@pytest.mark.parametrize("selection", ["model", "scored"])
def test_outlier_rules_cannot_see_a_lone_head_in_a_2x4_model(selection):
    # Why they are not the default: a lone head among n scores reaches (n-1)/sqrt(n) standard
    # deviations, 2.47 for n = 8 at the logits stage, below T_resid + k/sqrt(n_l) >= 2.71.
    assert discover(LONE_HEAD, selection=selection).heads == frozenset()


def test_the_scored_rule_loses_a_circuit_that_pruning_kept():
    # The old default: the dense search of a 4x8 chain finds it, but pruned to the chain and
    # two other heads the statistics over 5 scored heads can no longer single out any of them.
    spec = PlantedCircuit(4, 8, ((Head(0, 1), None), (Head(2, 3), "v"), (Head(3, 5), "q")))
    assert spec.edges == {"a0.h1->a2.h3<v>", "a2.h3->a3.h5<q>", "a3.h5->logits"}
    assert discover(spec, selection="scored").heads == spec.heads
    small = spec.heads | {Head(1, 0), Head(3, 0)}
    assert discover(spec, small, selection="scored").heads == frozenset()
    assert discover(spec, small).heads == spec.heads


def test_weak_heads_stay_below_the_default_threshold_and_above_a_lower_one():
    spec = PlantedCircuit(
        3,
        4,
        ((Head(0, 0), None), (Head(2, 1), "q")),
        weak=frozenset({Head(1, 3)}),
        weak_effect=0.008,
    )
    circuit = discover(spec)
    assert circuit.heads == spec.heads
    assert circuit.scores["a1.h3"] == pytest.approx(-0.008 / 1.008, abs=1e-4)
    assert discover(spec, effect_threshold=0.007).heads == spec.heads | {Head(1, 3)}


# ----------------------------------------------------------------------------- property test
@st.composite
def planted_circuits(draw):
    """Random planted chains (1 to 4 heads) in models of 2 to 4 layers x 2 to 8 heads, with
    random distractor and weak heads."""
    n_layers = draw(st.integers(2, 4))
    n_heads = draw(st.sampled_from([2, 3, 4, 8]))
    length = draw(st.integers(1, min(4, n_layers)))
    layers = sorted(
        draw(st.lists(st.integers(0, n_layers - 1), min_size=length, max_size=length, unique=True))
    )
    chain = []
    for index, layer in enumerate(layers):
        head = Head(layer, draw(st.integers(0, n_heads - 1)))
        if index == 0:
            chain.append((head, None))
            continue
        previous = chain[-1][1]
        allowed = ["q", "k", "v"] if previous in (None, "v") else ["q"]
        chain.append((head, draw(st.sampled_from(allowed))))
    rest = sorted(
        {Head(layer, h) for layer in range(n_layers) for h in range(n_heads)}
        - {head for head, _ in chain}
    )
    roles = draw(
        st.lists(
            st.sampled_from(["none", "distractor", "weak"]), min_size=len(rest), max_size=len(rest)
        )
    )
    return PlantedCircuit(
        n_layers,
        n_heads,
        tuple(chain),
        distractors=frozenset(h for h, r in zip(rest, roles, strict=True) if r == "distractor"),
        weak=frozenset(h for h, r in zip(rest, roles, strict=True) if r == "weak"),
        weak_effect=draw(st.sampled_from([0.002, 0.005, 0.009])),
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=planted_circuits(), extra=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_pruning_to_the_planted_heads_plus_any_others_keeps_the_dense_circuit(spec, extra, seed):
    ctx = planted_context(spec.build())
    dense_space = SearchSpace.dense(spec.n_layers, spec.n_heads)
    dense = PathPatch().discover(ctx, dense_space, PathPatch.Params())
    assert dense.heads == spec.heads
    assert edge_ids(dense) == spec.edges
    others = sorted(dense_space.heads - spec.heads)
    kept = spec.heads | set(random.Random(seed).sample(others, min(extra, len(others))))
    for heads in (spec.heads, kept):
        pruned = PathPatch().discover(
            ctx, SearchSpace(spec.n_layers, spec.n_heads, heads), PathPatch.Params()
        )
        assert pruned.heads == dense.heads
        assert edge_ids(pruned) == edge_ids(dense)
