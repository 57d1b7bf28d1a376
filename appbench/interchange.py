"""Circuits to and from the EAP-IG library's Graph JSON, the file the MIB circuit track reads.

The file (EAP-IG ``Graph.to_json``) holds ``cfg`` (n_layers, n_heads, parallel_attn_mlp,
d_model), ``nodes`` (name -> ``in_graph``) and ``edges`` (name -> ``score``, ``in_graph``) over
the graph of :func:`appbench.circuit.graph_edges`: the input, every head's q/k/v input, every
MLP and the logits. Unscored edges carry a NaN score, as that library writes them.

An appbench circuit becomes a set of in-graph edges as appbench evaluates it:

- a ``full``-graph circuit (EAP, EAP-IG, ACDC): exactly its edges;
- a ``heads``-graph circuit (path patching, activation patching, ACDC with ``graph=heads``):
  heads outside it are ablated while the input and the MLPs stay whole, so its nodes are its
  heads, the input and every MLP; its head -> head and head -> logits edges are its own edges
  when it has them (every such edge between its heads otherwise), and every edge from or into
  the input or an MLP between its nodes is in the graph.

Formats: ``eap-ig`` writes the circuit as it is; ``mib`` writes the same file as an importance
score file for MIB's circuit track, which ranks every edge by its score to build circuits of
each size, and so refuses a circuit without a score on every edge.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from appbench.circuit import Circuit, Edge, Head, Mlp, graph_edges, heads_of

FORMATS = ("eap-ig", "mib")


class InterchangeError(ValueError):
    """A circuit that cannot be written in a format, or a graph file that cannot be read."""


def _shape(graph_config: Mapping[str, Any]) -> tuple[int, int, bool, int]:
    try:
        n_layers, n_heads = int(graph_config["n_layers"]), int(graph_config["n_heads"])
        parallel = bool(graph_config.get("parallel_attn_mlp", False))
        d_model = int(graph_config.get("d_model", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise InterchangeError(f"graph config lacks n_layers/n_heads ({exc})") from None
    if n_layers < 1 or n_heads < 1:
        raise InterchangeError(f"a graph of {n_layers} layers x {n_heads} heads means nothing")
    return n_layers, n_heads, parallel, d_model


def _touches_mlp(edge: Edge) -> bool:
    return isinstance(edge.sender, Mlp) or isinstance(edge.receiver, Mlp)


def in_graph_edges(
    circuit: Circuit, parallel: bool = False, attn_only: bool = False
) -> frozenset[Edge]:
    """The EAP-IG graph edges an appbench circuit keeps (see the module docstring); a model
    without MLPs (``attn_only``) keeps no MLP edge."""
    if circuit.graph == "full":
        return frozenset(circuit.edges)
    heads = set(circuit.heads)
    own = {e for e in circuit.edges if e.between_heads}
    kept: set[Edge] = set()
    for edge in graph_edges(circuit.n_layers, circuit.n_heads, True, parallel):
        ends = [end for end in (edge.sender, edge.receiver) if end is not None]
        if any(isinstance(end, Head) and end not in heads for end in ends):
            continue
        if attn_only and _touches_mlp(edge):
            continue
        if edge.between_heads and circuit.edges:
            if edge in own:
                kept.add(edge)
        else:
            kept.add(edge)
    return frozenset(kept)


def to_graph_json(
    circuit: Circuit, graph_config: Mapping[str, Any], fmt: str = "eap-ig"
) -> dict[str, Any]:
    """The EAP-IG Graph JSON of ``circuit`` on a model of ``graph_config``'s shape."""
    if fmt not in FORMATS:
        raise InterchangeError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    n_layers, n_heads, parallel, d_model = _shape(graph_config)
    if (n_layers, n_heads) != (circuit.n_layers, circuit.n_heads):
        raise InterchangeError(
            f"the circuit is of a {circuit.n_layers}x{circuit.n_heads} model, the graph config "
            f"{n_layers}x{n_heads}"
        )
    every = graph_edges(n_layers, n_heads, True, parallel)
    attn_only = bool(graph_config.get("attn_only", False))
    kept = in_graph_edges(circuit, parallel, attn_only)
    if fmt == "mib":
        real = [e for e in every if not (attn_only and _touches_mlp(e))]
        missing = [e.id for e in real if e.id not in circuit.edge_scores]
        if missing:
            raise InterchangeError(
                f"MIB ranks every edge by its score, and {len(missing)} of {len(real)} edges "
                f"have none (e.g. {missing[0]}); a discoverer that scores every edge of the full "
                "graph (eap, eap-ig) gives them, or export --format eap-ig for the circuit alone"
            )
    nodes = {"input": {"in_graph": False}}
    for layer in range(n_layers):
        for h in range(n_heads):
            nodes[Head(layer, h).id] = {"in_graph": False}
        nodes[Mlp(layer).id] = {"in_graph": False}
    nodes["logits"] = {"in_graph": True}
    for edge in kept:
        nodes[edge.sender.id]["in_graph"] = True
        if edge.receiver is not None:
            nodes[edge.receiver.id]["in_graph"] = True
    edges = {
        e.id: {"score": float(circuit.edge_scores.get(e.id, math.nan)), "in_graph": e in kept}
        for e in every
    }
    config = {
        "n_layers": n_layers,
        "n_heads": n_heads,
        "parallel_attn_mlp": parallel,
        "d_model": d_model,
    }
    return {"cfg": config, "nodes": nodes, "edges": edges}


def from_graph_json(data: Any, source: str = "graph") -> Circuit:
    """An appbench ``full``-graph circuit from an EAP-IG Graph JSON document: its in-graph
    edges, their heads, and every edge's score (NaN: unscored)."""
    if not isinstance(data, dict) or not {"cfg", "edges"} <= set(data):
        raise InterchangeError(f"{source}: not an EAP-IG graph (needs 'cfg', 'nodes', 'edges')")
    n_layers, n_heads, parallel, _ = _shape(data["cfg"])
    known = {e.id: e for e in graph_edges(n_layers, n_heads, True, parallel)}
    kept: set[Edge] = set()
    scores: dict[str, float] = {}
    if not isinstance(data["edges"], dict):
        raise InterchangeError(f"{source}: 'edges' must map edge names to score and in_graph")
    for name, info in data["edges"].items():
        edge = known.get(name)
        if edge is None:
            raise InterchangeError(
                f"{source}: edge {name!r} is not in the graph of a {n_layers}x{n_heads} model"
            )
        if not isinstance(info, dict) or "in_graph" not in info:
            raise InterchangeError(f"{source}: edge {name!r} has no in_graph")
        score = info.get("score")
        if score is not None:
            try:
                value = float(score)
            except (TypeError, ValueError):
                raise InterchangeError(f"{source}: edge {name!r} has score {score!r}") from None
            if not math.isnan(value):
                scores[name] = value
        if info["in_graph"] is True:
            kept.add(edge)
        elif info["in_graph"] is not False:
            raise InterchangeError(f"{source}: edge {name!r} has in_graph {info['in_graph']!r}")
    return Circuit(
        n_layers,
        n_heads,
        heads_of(kept),
        edges=frozenset(kept),
        edge_scores=scores,
        graph="full",
        details={"imported_from": source},
    )


def write_json_atomically(path: Path, document: Any) -> None:
    """Write ``document`` as JSON (NaN as the EAP-IG library writes it) through
    :func:`appbench.results.write_atomically`: a crash never leaves half a file."""
    from appbench.results import write_atomically

    write_atomically(path, json.dumps(document) + "\n")


def read_graph_file(path: Path) -> Circuit:
    """Read an EAP-IG Graph JSON file (NaN scores tolerated) into a circuit; one
    InterchangeError line when it is missing, unreadable or malformed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InterchangeError(f"{path}: {str(exc).splitlines()[0]}") from None
    return from_graph_json(data, str(path))


__all__ = [
    "FORMATS",
    "InterchangeError",
    "from_graph_json",
    "in_graph_edges",
    "read_graph_file",
    "to_graph_json",
    "write_json_atomically",
]
