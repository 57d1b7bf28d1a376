"""Properties that must hold for every input, checked by hypothesis: set algebra of circuits
and search spaces, overlap measures (empty sides defined once), faithfulness of the full
model, edge ids, and the cliff rules of the sparsity sweep."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from appbench import Circuit, Edge, Head, SearchSpace, connected_to_logits, graph_edges
from appbench.metrics import faithfulness, overlap, overlap_sets
from appbench_plugins.sparsity import RULES, find_cliff

LAYERS, HEADS = 4, 5
heads = st.builds(Head, st.integers(0, LAYERS - 1), st.integers(0, HEADS - 1))
head_sets = st.frozensets(heads, max_size=LAYERS * HEADS)
finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@given(head_sets, head_sets)
def test_overlap_measures_lie_in_0_1_and_mirror_each_other(c, r):
    o, mirrored = overlap(c, r), overlap(r, c)
    for value in (o.precision, o.recall, o.f1, o.iou):
        assert 0.0 <= value <= 1.0
    assert (o.precision, o.recall) == (mirrored.recall, mirrored.precision)
    assert o.f1 == mirrored.f1 and o.iou == mirrored.iou
    assert o.intersection == len(c & r) and o.f1 <= max(o.precision, o.recall)
    perfect = (o.precision, o.recall, o.f1, o.iou) == (1.0, 1.0, 1.0, 1.0)
    assert perfect == (c == r)  # the empty pair included: defined once, as agreement
    if c.isdisjoint(r) and (c or r):
        assert (o.precision, o.recall, o.f1, o.iou) == (0.0, 0.0, 0.0, 0.0)
    ids = overlap_sets({h.id for h in c}, {h.id for h in r})
    assert ids == (o.precision, o.recall, o.f1)


@given(head_sets, head_sets)
def test_search_spaces_and_circuits_are_sets_of_heads(a, b):
    space = SearchSpace(LAYERS, HEADS, a)
    assert SearchSpace.from_dict(space.to_dict()) == space
    assert space.reduction == 1 - len(a) / (LAYERS * HEADS)
    assert sum(map(sum, space.mask())) == len(a)
    assert all((h in space) == (h in a) for h in b)
    union = SearchSpace(LAYERS, HEADS, a | b)
    assert union.reduction <= min(space.reduction, SearchSpace(LAYERS, HEADS, b).reduction)
    circuit = Circuit(LAYERS, HEADS, a & b)
    assert Circuit.from_dict(circuit.to_dict()) == circuit and circuit.nodes == a & b


@given(finite, finite)
def test_the_full_model_is_exactly_100_percent_and_1(m_model, m_empty):
    f = faithfulness(m_model, m_empty, m_model)
    if m_model != 0:
        assert f.percent == 100.0
    if not f.degenerate:
        assert f.normalised == 1.0
    else:
        assert math.isnan(f.normalised)
    empty = faithfulness(m_model, m_empty, m_empty)
    assert f.degenerate or empty.normalised == 0.0


@settings(max_examples=60)
@given(st.data())
def test_edges_parse_back_and_dangling_edges_go(data):
    every = graph_edges(3, 3)
    chosen = data.draw(st.frozensets(st.sampled_from(every), max_size=40))
    assert all(Edge.parse(e.id) == e for e in chosen)
    kept = connected_to_logits(chosen)
    assert kept <= chosen and connected_to_logits(kept) == kept
    receivers = {e.sender for e in kept}
    # Every kept edge ends in the logits or in a node that itself sends a kept edge.
    assert all(e.receiver is None or e.receiver in receivers for e in kept)


@given(
    st.lists(st.floats(-10, 10, allow_nan=False), min_size=0, max_size=60),
    st.sampled_from(RULES),
    st.one_of(st.none(), st.integers(2, 12)),
)
def test_cliff_rules_never_fail_and_stay_inside_the_sweep(values, rule, window):
    cliff = find_cliff(values, rule, window)
    assert cliff == -1 or 0 <= cliff < len(values)
