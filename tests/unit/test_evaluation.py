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


def test_without_a_shipped_reference_the_dense_actpatch_circuit_is_used():
    from appbench import Circuit
    from appbench.runner import RunConfig, _reference

    ctx = toy_context()
    found = Circuit(2, 2, frozenset({Head(1, 1)}))
    config = RunConfig(pruner="none", discoverer="pathpatch", model="planted-2x2", task="toy")
    reference = _reference(ctx, config, found)
    assert reference is not None
    assert "dense actpatch circuit" in reference.source
    assert set(reference.heads) == {h.id for h in PLANTED_CIRCUIT}

    skip = RunConfig(
        pruner="none",
        discoverer="pathpatch",
        model="planted-2x2",
        task="toy",
        compute_reference=False,
    )
    assert _reference(ctx, skip, found) is None


@pytest.mark.parametrize(
    "bad", [{"seed": -1}, {"seed": 2**32}, {"device": "meta"}, {"device": "CPU"}]
)
def test_run_config_refuses_seeds_and_devices_that_cannot_mean_anything(bad):
    from pydantic import ValidationError

    from appbench.runner import RunConfig

    with pytest.raises(ValidationError):
        RunConfig(pruner="none", discoverer="actpatch", **bad)


def test_per_prompt_values_are_stored_and_average_to_the_stored_means():
    # The leaderboard's bootstrap intervals resample these lists: they must be exactly the
    # values whose means the result reports, one per evaluation prompt.
    ctx = toy_context()
    circuit = frozenset({Head(1, 1)})
    f = evaluate_circuit(ctx, circuit)
    n = len(ctx.evaluation)
    for values, mean in (
        (f.per_prompt_model, f.m_model),
        (f.per_prompt_empty, f.m_empty),
        (f.per_prompt_circuit, f.m_circuit),
    ):
        assert values is not None and len(values) == n
        assert sum(values) / n == pytest.approx(mean, rel=1e-12, abs=1e-12)
    # Not three copies of one list: the circuit differs from the full model on every prompt.
    assert f.per_prompt_circuit != f.per_prompt_model
    # And the ratio of the means is the stored normalised faithfulness.
    m, e, c = (sum(v) / n for v in (f.per_prompt_model, f.per_prompt_empty, f.per_prompt_circuit))
    assert (c - e) / (m - e) == pytest.approx(f.normalised, abs=1e-9)


def test_results_written_before_per_prompt_values_still_load():
    from appbench.results import Faithfulness

    old = {
        "m_model": 2.0,
        "m_empty": 0.0,
        "m_circuit": 1.0,
        "percent": 50.0,
        "normalised": 0.5,
        "degenerate": False,
        "inverted": False,
        "ablation": "mean",
    }
    f = Faithfulness.model_validate(old)
    assert f.per_prompt_model is None and f.per_prompt_circuit is None
