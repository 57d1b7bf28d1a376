"""Reference circuits validate their heads and edges, so a wrong answer key cannot load."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from appbench import ReferenceCircuit


def _reference(heads: list[str], edges: list[str]) -> ReferenceCircuit:
    return ReferenceCircuit(
        heads=heads,
        edges=edges,
        n_layers=2,
        n_heads=4,
        source="test",
        method="hand-set",
        version="1",
    )


def test_edges_between_circuit_heads_are_kept() -> None:
    ref = _reference(["a0.h1", "a1.h2"], ["a0.h1->a1.h2<q>", "a1.h2->logits"])
    assert ref.edges == ["a0.h1->a1.h2<q>", "a1.h2->logits"]
    assert {h.id for h in ref.circuit().heads} == {"a0.h1", "a1.h2"}


@pytest.mark.parametrize(
    ("heads", "edges", "message"),
    [
        (["a0.h1", "a1.h2"], ["a0.h3->a1.h2<v>"], "outside the circuit"),
        (["a0.h1", "a1.h2"], ["a0.h1->a1.h3<k>"], "outside the circuit"),
        (["a0.h1"], ["a0.h1->somewhere"], "not an edge id"),
        (["a2.h0"], [], "outside the 2x4 model"),
        (["a0.h4"], [], "outside the 2x4 model"),
        (["head7"], [], "bad head id"),
    ],
)
def test_malformed_references_are_refused(heads: list[str], edges: list[str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _reference(heads, edges)
