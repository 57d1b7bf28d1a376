"""Faithfulness of known circuits on the planted model (hand-derived answers)."""

import pytest

from appbench import Head
from appbench.runner import evaluate_circuit
from appbench.testing import PLANTED_CIRCUIT, toy_context


def test_planted_circuit_is_fully_faithful():
    f = evaluate_circuit(toy_context(), PLANTED_CIRCUIT)
    assert f.m_model > 0 and f.m_empty == pytest.approx(-f.m_model, abs=1e-5)
    assert f.percent == pytest.approx(100.0, abs=1e-4)
    assert f.normalised == pytest.approx(1.0, abs=1e-6)


def test_a_circuit_missing_its_source_head_carries_nothing():
    # Without a0.h0, a1.h1 reads the corrupted mean of channel 10: the corrupted answer.
    f = evaluate_circuit(toy_context(), frozenset({Head(1, 1)}))
    assert f.normalised == pytest.approx(0.0, abs=1e-6)
    assert f.percent == pytest.approx(-100.0, abs=1e-4)


def test_distractor_heads_change_nothing():
    f = evaluate_circuit(toy_context(), PLANTED_CIRCUIT | {Head(0, 1), Head(1, 0)})
    assert f.normalised == pytest.approx(1.0, abs=1e-6)
