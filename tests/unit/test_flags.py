"""Flags on results that cannot be taken at face value: hand-made numbers in, flags out."""

import pytest

from appbench.flags import (
    MIN_REFERENCE_FAITHFULNESS,
    circuit_flags,
    edge_flags,
    reference_flags,
)
from appbench.metrics import faithfulness
from appbench.results import Faithfulness, Reference


def faith(m_model, m_empty, m_circuit):
    return Faithfulness(**faithfulness(m_model, m_empty, m_circuit).to_dict(), ablation="test")


def codes(flags):
    return [flag.code for flag in flags]


def test_a_sound_circuit_raises_no_flag():
    assert circuit_flags(3, faith(4.0, 0.0, 3.0), 200) == []


def test_an_empty_circuit_with_a_real_gap_is_flagged():
    flags = circuit_flags(0, faith(4.0, 0.0, 0.0), 200)
    assert codes(flags) == ["empty-circuit"]
    assert "m(M) 4" in flags[0].message


def test_a_circuit_worse_than_the_empty_one_is_flagged_with_its_score():
    flags = circuit_flags(2, faith(4.0, 1.0, 0.5), 200)
    assert codes(flags) == ["worse-than-empty"]
    assert "-0.167" in flags[0].message


def test_degenerate_and_inverted_metrics_are_flagged():
    assert codes(circuit_flags(0, faith(1.0, 1.0, 1.0), 200)) == ["degenerate-metric"]
    assert "inverted-metric" in codes(circuit_flags(1, faith(1.0, 2.0, 1.5), 200))


@pytest.mark.parametrize(("n_eval", "flagged"), [(19, True), (20, False), (1, True)])
def test_few_evaluation_prompts_are_flagged(n_eval, flagged):
    assert ("few-evaluation-prompts" in codes(circuit_flags(1, faith(4.0, 0.0, 3.0), n_eval))) == (
        flagged
    )


def test_an_unfaithful_or_empty_reference_is_flagged():
    def ref(heads, f):
        return Reference(source="test", heads=heads, faithfulness=f)

    assert reference_flags(None) == []
    assert reference_flags(ref(["a0.h1"], MIN_REFERENCE_FAITHFULNESS)) == []
    [flag] = reference_flags(ref(["a0.h1"], -0.01))
    assert flag.code == "unfaithful-reference" and "-0.010" in flag.message
    assert "method-derived" in flag.message
    assert codes(reference_flags(ref([], None))) == ["empty-reference"]


def test_edges_worse_than_the_empty_circuit_are_flagged_with_their_score():
    flags = edge_flags(14, faith(4.0, 1.0, 0.5))
    assert codes(flags) == ["edges-worse-than-empty"]
    assert "14 edges" in flags[0].message and "-0.167" in flags[0].message


def test_faithful_degenerate_or_absent_edge_circuits_raise_no_edge_flag():
    assert edge_flags(14, faith(4.0, 0.0, 3.0)) == []
    assert edge_flags(14, faith(1.0, 1.0, 0.5)) == []  # degenerate: flagged on the heads
    assert edge_flags(0, faith(4.0, 1.0, 0.5)) == []
    assert edge_flags(14, None) == []
