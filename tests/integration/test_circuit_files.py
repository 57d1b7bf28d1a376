"""`appbench circuit export` and `import`: a run's circuit leaves as EAP-IG / MIB Graph JSON
and comes back edge for edge; bad input is one line and exit code 2, and never touches a file
already written."""

import json

from click.testing import CliRunner

from appbench import Circuit, graph_edges
from appbench.cli import cli
from appbench.results import load_result

SMALL = ["--n-search", "20", "--n-eval", "20", "--quiet"]


def invoke(*args):
    return CliRunner().invoke(cli, list(args), obj={})


def test_an_eap_circuit_goes_out_and_comes_back(tmp_path):
    ran = invoke("run", "--pruner", "none", "--discoverer", "eap", "--out", str(tmp_path), *SMALL)
    assert ran.exit_code == 0, ran.output
    path = tmp_path / "ioi" / "zoo-gt-ioi" / "none__eap.json"
    result = load_result(path)
    found = Circuit.from_dict(result.circuit)
    assert found.graph == "full" and found.mlps  # the default model has MLPs in its circuit

    out = tmp_path / "graph.json"
    exported = invoke("circuit", "export", str(path), "--format", "mib", "-o", str(out))
    assert exported.exit_code == 0, exported.output
    document = json.loads(out.read_text())
    assert len(document["edges"]) == len(graph_edges(4, 8))
    assert {n for n, e in document["edges"].items() if e["in_graph"]} == {e.id for e in found.edges}

    back = tmp_path / "circuit.json"
    imported = invoke("circuit", "import", str(out), "-o", str(back))
    assert imported.exit_code == 0, imported.output
    again = Circuit.load(back)
    assert again.edges == found.edges and again.heads == found.heads
    assert dict(again.edge_scores) == dict(found.edge_scores)

    # A head-level circuit has no edge scores: MIB's ranking is refused, EAP-IG's file is not.
    ran = invoke(
        "run", "--pruner", "none", "--discoverer", "actpatch", "--out", str(tmp_path), *SMALL
    )
    heads_only = tmp_path / "ioi" / "zoo-gt-ioi" / "none__actpatch.json"
    refused = invoke("circuit", "export", str(heads_only), "--format", "mib", "-o", str(out))
    assert refused.exit_code == 2 and "MIB ranks every edge" in refused.output
    assert json.loads(out.read_text()) == document  # the earlier file is untouched
    plain = invoke("circuit", "export", str(heads_only))
    assert plain.exit_code == 0, plain.output
    assert (tmp_path / "ioi" / "zoo-gt-ioi" / "none__actpatch.eap-ig.json").exists()


def test_bad_files_are_one_line_and_exit_code_2(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"cfg": {"n_layers": 2, "n_heads": 2}, "nodes": {}, "edges": {"x": 1}}')
    for args in (
        ["circuit", "import", str(broken), "-o", str(tmp_path / "c.json")],
        ["circuit", "import", str(tmp_path / "missing.json"), "-o", str(tmp_path / "c.json")],
        ["circuit", "export", str(broken)],
    ):
        outcome = invoke(*args)
        assert outcome.exit_code == 2, outcome.output
        assert len(outcome.output.strip().splitlines()) == 1 and "Traceback" not in outcome.output
    assert not (tmp_path / "c.json").exists()
