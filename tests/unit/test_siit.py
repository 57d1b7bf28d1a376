"""The SIIT losses that build the ground-truth zoo do what their names promise: the strict
step ablates exactly the heads outside the circuit, the interchange step exactly one designated
head per prompt, and the helpers pair prompts within their template."""

import pytest
import torch

from appbench import Head, build_model, word_level_tokenizer
from appbench.plugins import get_registries
from appbench_plugins.zoo import ground_truth_recipe
from appbench_plugins.zoo.siit import (
    STRICT_SOURCES,
    answer_logprob,
    circuit_mask,
    group_means,
    same_template_partner,
    siit_losses,
)
from appbench_plugins.zoo.train import answer_set_loss


@pytest.fixture(scope="module")
def setup():
    task = get_registries().tasks.get("induction")
    recipe = ground_truth_recipe("induction")
    tokenizer = word_level_tokenizer(sorted(task.vocabulary()))
    torch.manual_seed(0)
    model = build_model(recipe.model_config(len(tokenizer)), tokenizer)
    search, _ = task.splits(tokenizer)
    return model, search.select(list(range(12)))


def _losses(model, batch, mask, step, target="corrupted-output"):
    generator = torch.Generator().manual_seed(step)
    return siit_losses(model, batch, mask, step, generator, answer_set_loss, target)


@pytest.mark.parametrize("step", range(len(STRICT_SOURCES)))
def test_a_circuit_of_every_head_ablates_nothing_in_the_strict_step(setup, step):
    model, batch = setup
    everything = torch.ones(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.bool)
    parts = _losses(model, batch, everything, step)
    # No head lies outside: the strict run is the model itself, and the log-probability match
    # adds nothing.
    assert parts["strict"].item() == pytest.approx(parts["task"].item(), rel=1e-5)


@pytest.mark.parametrize("step", range(len(STRICT_SOURCES)))
def test_a_circuit_of_no_head_changes_the_strict_run(setup, step):
    model, batch = setup
    nothing = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.bool)
    nothing[0, 0] = True  # the interchange step needs one designated head
    parts = _losses(model, batch, nothing, step)
    assert parts["strict"].item() != pytest.approx(parts["task"].item(), rel=1e-3)
    for loss in parts.values():
        assert loss.requires_grad and torch.isfinite(loss)


def test_the_necessity_hinge_asks_each_ablation_for_its_margin(setup, monkeypatch):
    import appbench_plugins.zoo.siit as siit

    model, batch = setup
    mask = circuit_mask([Head(0, 1), Head(1, 2), Head(2, 3), Head(3, 4)], 4, 8)
    # No margin asked below any drop: nothing to pay.
    monkeypatch.setattr(siit, "NECESSITY_MARGIN", -100.0)
    assert _losses(model, batch, mask, 0, "necessity")["interchange"].item() == 0.0
    # A margin above every drop is paid in full, less the (small) drops of an untrained model.
    monkeypatch.setattr(siit, "NECESSITY_MARGIN", 100.0)
    assert _losses(model, batch, mask, 0, "necessity")["interchange"].item() == pytest.approx(
        100.0, abs=5.0
    )
    # "both" adds the corrupted-output divergence to the hinge.
    both = _losses(model, batch, mask, 0, "both")["interchange"].item()
    corrupted = _losses(model, batch, mask, 0, "corrupted-output")["interchange"].item()
    assert both == pytest.approx(100.0 + corrupted, abs=5.0) and corrupted > 0
    with pytest.raises(ValueError, match="interchange_target"):
        _losses(model, batch, mask, 0, "everything")


def test_the_source_output_target_follows_the_prompt_the_activation_came_from():
    # Docstring's prompts share one template, so resampling pairs each with another prompt
    # (induction's are one template each).
    task = get_registries().tasks.get("docstring")
    tokenizer = word_level_tokenizer(sorted(task.vocabulary()))
    torch.manual_seed(0)
    model = build_model(ground_truth_recipe("docstring").model_config(len(tokenizer)), tokenizer)
    search, _ = task.splits(tokenizer)
    batch = search.select(list(range(12)))
    assert len(batch.groups.unique()) == 1
    mask = circuit_mask([Head(0, 1), Head(1, 2), Head(2, 3), Head(3, 4)], 4, 8)

    def interchange(step, target):
        return _losses(model, batch, mask, step, target)["interchange"].item()

    paired, resample, mean = (STRICT_SOURCES.index(s) for s in ("paired", "resample", "mean"))
    # Paired ablation: the source is the paired corrupted prompt, as for "both".
    assert interchange(paired, "source-output") == pytest.approx(interchange(paired, "both"))
    # Mean ablation has no source prompt: the hinge alone.
    assert interchange(mean, "source-output") == pytest.approx(interchange(mean, "necessity"))
    # Resample ablation: compared with the partner's output, not the paired prompt's.
    hinge = interchange(resample, "necessity")
    to_partner = interchange(resample, "source-output") - hinge
    to_paired = interchange(resample, "both") - hinge
    assert to_partner > 0 and to_partner != pytest.approx(to_paired, rel=1e-3)


def test_partners_share_the_template_and_differ_when_they_can():
    groups = torch.tensor([0, 0, 1, 1, 1, 2])
    partner = same_template_partner(groups, torch.Generator().manual_seed(3))
    assert torch.equal(groups[partner], groups)
    assert (partner[:5] != torch.arange(5)).all()
    assert partner[5] == 5  # alone in its template


def test_group_means_average_each_template_per_position():
    z = torch.arange(4 * 2 * 1 * 1, dtype=torch.float).view(4, 2, 1, 1)
    groups = torch.tensor([0, 1, 0, 1])
    means = group_means(z, groups)
    assert torch.equal(means[0], (z[0] + z[2]) / 2)
    assert torch.equal(means[3], (z[1] + z[3]) / 2)


def test_answer_logprob_averages_the_answer_set_and_skips_padding():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    answers = torch.tensor([[1, 2], [2, -1]])
    expected = torch.tensor([torch.log(torch.tensor(0.25)), torch.log(torch.tensor(0.8))])
    assert torch.allclose(answer_logprob(logits, answers), expected)
