import json

import pytest

from appbench import Circuit, Edge, Head, SearchSpace


def test_head_id_round_trip_and_order():
    head = Head.parse("a9.h6")
    assert head == Head(9, 6)
    assert head.id == "a9.h6" == str(head)
    assert head.hook_name() == "blocks.9.attn.hook_z"
    assert sorted([Head(1, 0), Head(0, 5), Head(0, 1)]) == [Head(0, 1), Head(0, 5), Head(1, 0)]


@pytest.mark.parametrize("bad", ["9.6", "a9h6", "m3", "a-1.h2", "", "a1.h"])
def test_head_parse_rejects_malformed_ids(bad):
    with pytest.raises(ValueError, match="not a head id"):
        Head.parse(bad)


def test_edge_ids_follow_eap_ig_convention():
    edge = Edge(Head(0, 1), Head(2, 3), "k")
    assert edge.id == "a0.h1->a2.h3<k>"
    assert Edge.parse(edge.id) == edge
    assert Edge.parse("a5.h1->logits") == Edge(Head(5, 1), None)
    with pytest.raises(ValueError):
        Edge(Head(0, 0), Head(1, 0), "x")
    with pytest.raises(ValueError):
        Edge.parse("a0.h1->a2.h3<x>")


def test_the_head_graph_of_a_two_by_two_model_hand_listed():
    from types import SimpleNamespace

    from appbench.circuit import model_graph

    expected = {f"a{layer}.h{h}->logits" for layer in (0, 1) for h in (0, 1)} | {
        f"a0.h{s}->a1.h{r}<{kind}>" for s in (0, 1) for r in (0, 1) for kind in "qkv"
    }
    two = SimpleNamespace(n_layers=2, n_heads=2)
    assert {e.id for e in model_graph(two, full=False)} == expected and len(expected) == 16
    # GPT-2 small: 144 into the logits, 12·36·(11+10+...+0) into later heads' q, k, v.
    gpt2 = SimpleNamespace(n_layers=12, n_heads=12)
    assert len(model_graph(gpt2, full=False)) == 144 + 12 * 36 * 66


def test_search_space_dense_and_reduction():
    space = SearchSpace.dense(4, 8)
    assert len(space) == 32 and space.total_heads == 32 and space.reduction == 0.0
    part = SearchSpace(4, 8, {"a0.h0", Head(3, 7)})
    assert part.reduction == pytest.approx(1 - 2 / 32)
    assert Head(3, 7) in part and Head(1, 1) not in part
    assert part.mask()[3][7] and not part.mask()[0][1]


def test_heads_outside_the_model_are_rejected():
    with pytest.raises(ValueError, match="outside a model of 2 layers x 2 heads"):
        SearchSpace(2, 2, {Head(2, 0)})
    with pytest.raises(ValueError, match="outside"):
        Circuit(2, 2, {Head(0, 2)})


def test_circuit_json_round_trip(tmp_path):
    circuit = Circuit(
        3,
        4,
        {Head(2, 1), Head(0, 3)},
        scores={"a2.h1": -0.5, "a0.h3": 0.25},
        edges=frozenset({Edge(Head(0, 3), Head(2, 1), "q"), Edge(Head(2, 1), None)}),
        details={"note": "x"},
        edge_scores={"a0.h3->a2.h1<q>": -0.75, "a2.h1->logits": 0.5},
    )
    path = tmp_path / "c.json"
    circuit.save(path)
    assert json.loads(path.read_text())["heads"] == ["a0.h3", "a2.h1"]
    again = Circuit.load(path)
    assert again == circuit
    space = SearchSpace(3, 4, {Head(1, 1)}, {"a1.h1": 2.0}, {"p": 0.7})
    assert SearchSpace.from_dict(json.loads(json.dumps(space.to_dict()))) == space


def test_corrupt_circuit_file_gives_a_clear_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a circuit file"):
        Circuit.load(path)


def test_result_paths_are_one_folder_per_model(tmp_path):
    from appbench.results import model_folder_name, result_path

    assert model_folder_name("Qwen/Qwen2.5-0.5B") == "Qwen__Qwen2.5-0.5B"
    assert model_folder_name("zoo-ioi") == "zoo-ioi"
    local = tmp_path / "my-model"
    local.mkdir()
    assert model_folder_name(str(local)) == "local__my-model"
    assert model_folder_name("./does-not-exist") == "local__does-not-exist"
    path = result_path(tmp_path, "ioi", "gpt2", "cflap", "pathpatch")
    assert path == tmp_path / "ioi" / "gpt2" / "cflap__pathpatch.json"
