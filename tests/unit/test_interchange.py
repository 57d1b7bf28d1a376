"""Circuits to and from the EAP-IG / MIB Graph JSON: the graph is the library's (32,491 edges
for GPT-2 small), full-graph circuits survive a round trip exactly, head-graph circuits are
written as appbench evaluates them, and bad files are refused in one line."""

import json
import math
import random

import pytest

from appbench import INPUT, Circuit, Edge, Head, Mlp, graph_edges
from appbench.interchange import (
    InterchangeError,
    from_graph_json,
    in_graph_edges,
    read_graph_file,
    to_graph_json,
)

GPT2 = {"n_layers": 12, "n_heads": 12, "d_model": 768, "parallel_attn_mlp": False}


def test_the_graph_is_the_eap_ig_librarys():
    edges = graph_edges(12, 12)
    assert len(edges) == 32_491 == len({e.id for e in edges})
    ids = {e.id for e in edges}
    assert {"input->a0.h0<q>", "a0.h3->m0", "m0->a1.h5<k>", "m11->logits", "input->logits"} <= ids
    # An MLP reads its own layer's heads; a head never reads its own layer.
    assert "a3.h2->m3" in ids and "m3->a3.h0<q>" not in ids and "a3.h1->a3.h2<v>" not in ids
    # Attention and MLP in parallel (GPT-J, Pythia): the MLP reads only earlier layers.
    parallel = {e.id for e in graph_edges(12, 12, parallel=True)}
    assert "a3.h2->m3" not in parallel and "a2.h2->m3" in parallel
    assert all(Edge.parse(e.id) == e for e in edges)


def test_edges_run_forward_and_nodes_parse():
    with pytest.raises(ValueError, match="forward"):
        Edge(Mlp(3), Head(3, 0), "q")
    with pytest.raises(ValueError, match="input"):
        Edge.parse("a0.h0->a1.h1")
    assert Edge.parse("input->m0") == Edge(INPUT, Mlp(0))
    assert sorted([Mlp(0), Head(1, 0), INPUT, Head(0, 3)]) == [
        INPUT,
        Head(0, 3),
        Mlp(0),
        Head(1, 0),
    ]


def _random_full_circuit(seed: int) -> Circuit:
    rng = random.Random(seed)
    every = graph_edges(12, 12)
    kept = frozenset(e for e in every if rng.random() < 0.3)
    scores = {e.id: rng.gauss(0.0, 0.1) for e in every if rng.random() < 0.9}
    heads = frozenset(n for e in kept for n in (e.sender, e.receiver) if isinstance(n, Head))
    return Circuit(12, 12, heads, edges=kept, edge_scores=scores, graph="full")


def test_a_full_graph_circuit_survives_the_round_trip_on_gpt2_small():
    circuit = _random_full_circuit(0)
    document = to_graph_json(circuit, GPT2)
    assert len(document["edges"]) == 32_491
    # Unscored edges are NaN, as the library writes them; through text and back.
    text = json.dumps(document)
    assert "NaN" in text
    back = from_graph_json(json.loads(text))
    assert back.edges == circuit.edges and back.heads == circuit.heads
    assert dict(back.edge_scores) == dict(circuit.edge_scores)
    assert back.graph == "full"
    assert document["nodes"]["logits"]["in_graph"] is True
    in_nodes = {n for n, v in document["nodes"].items() if v["in_graph"]} - {"logits"}
    assert in_nodes == {n.id for n in circuit.nodes}


def test_a_head_circuit_is_written_as_appbench_evaluates_it():
    """Heads outside the circuit are ablated, the input and MLPs stay whole: the circuit's
    heads, the input and every MLP are in the graph, and the circuit's own head edges."""
    own = {Edge.parse("a0.h1->a2.h3<v>"), Edge.parse("a2.h3->logits")}
    circuit = Circuit(4, 8, frozenset({Head(0, 1), Head(2, 3)}), edges=frozenset(own))
    kept = in_graph_edges(circuit)
    assert {e for e in kept if e.between_heads} == own
    assert Edge.parse("input->a0.h1<q>") in kept and Edge.parse("m1->a2.h3<k>") in kept
    assert Edge.parse("a0.h1->m3") in kept and Edge.parse("m3->logits") in kept
    assert all(
        end in circuit.heads
        for e in kept
        for end in (e.sender, e.receiver)
        if isinstance(end, Head)
    )
    shape = {"n_layers": 4, "n_heads": 8, "d_model": 64}
    once = to_graph_json(circuit, shape)
    again = to_graph_json(from_graph_json(json.loads(json.dumps(once))), shape)
    # NaN never equals itself: compare the texts.
    assert json.dumps(again, sort_keys=True) == json.dumps(once, sort_keys=True)
    # Without edges: every edge between its nodes. A model without MLPs keeps none of theirs.
    bare = in_graph_edges(Circuit(4, 8, frozenset({Head(0, 1), Head(2, 3)})), attn_only=True)
    assert Edge.parse("a0.h1->a2.h3<q>") in bare
    assert not any(isinstance(n, Mlp) for e in bare for n in (e.sender, e.receiver))


def test_mib_needs_a_score_on_every_edge():
    circuit = _random_full_circuit(1)
    with pytest.raises(InterchangeError, match="MIB ranks every edge"):
        to_graph_json(circuit, GPT2, "mib")
    scored = Circuit(
        12,
        12,
        circuit.heads,
        edges=circuit.edges,
        edge_scores={e.id: 0.5 for e in graph_edges(12, 12)},
        graph="full",
    )
    document = to_graph_json(scored, GPT2, "mib")
    assert all(not math.isnan(e["score"]) for e in document["edges"].values())


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"edges": {}}, "not an EAP-IG graph"),
        ({"cfg": {"n_layers": 2}, "nodes": {}, "edges": {}}, "n_heads"),
        ({"cfg": {"n_layers": 0, "n_heads": 4}, "nodes": {}, "edges": {}}, "means nothing"),
        (
            {"cfg": {"n_layers": 2, "n_heads": 4}, "nodes": {}, "edges": {"a5.h0->logits": {}}},
            "not in the graph",
        ),
        (
            {
                "cfg": {"n_layers": 2, "n_heads": 4},
                "nodes": {},
                "edges": {"a0.h0->logits": {"score": 1.0, "in_graph": "yes"}},
            },
            "in_graph",
        ),
        (
            {
                "cfg": {"n_layers": 2, "n_heads": 4},
                "nodes": {},
                "edges": {"a0.h0->logits": {"score": "big", "in_graph": True}},
            },
            "score",
        ),
    ],
)
def test_bad_graph_files_are_refused_in_one_line(document, message):
    with pytest.raises(InterchangeError, match=message) as caught:
        from_graph_json(document)
    assert "\n" not in str(caught.value)


def test_unreadable_files_are_one_line(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{ not json")
    with pytest.raises(InterchangeError, match=r"broken\.json"):
        read_graph_file(broken)
    with pytest.raises(InterchangeError, match=r"missing\.json"):
        read_graph_file(tmp_path / "missing.json")
