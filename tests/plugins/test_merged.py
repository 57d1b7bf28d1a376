"""The merged (APP) search space: the union of the FLAP and contrastive-FLAP sets, each sized
on its own, with one shared sweep."""

import json

import pytest
from click.testing import CliRunner

from appbench import Head
from appbench.cli import cli
from appbench.testing import check_pruner, toy_context
from appbench_plugins.cflap import CflapPruner
from appbench_plugins.flap import FlapPruner
from appbench_plugins.merged import MergedPruner, appbench_register_pruners


def silence_b(ctx):
    """B reads as nothing, so the corruption removes the signal (see test_cflap)."""
    import torch

    b = ctx.model.tokenizer.get_vocab()["B"]
    with torch.no_grad():
        ctx.model.blocks[0].attn.W_V[0, b, 0] = 0.0
        ctx.model.blocks[1].attn.W_V[0, b, 0] = 0.0


def test_union_of_the_two_branches(planted_ctx):
    ctx = planted_ctx
    silence_b(ctx)
    params = MergedPruner.Params(flap_keep_k=1, cflap_keep_k=2)
    space = MergedPruner().prune(ctx, params)
    flap = FlapPruner().prune(ctx, FlapPruner.Params(keep_k=1))
    cflap = CflapPruner().prune(ctx, CflapPruner.Params(keep_k=2))
    # FLAP keeps the busiest head a1.h0 (clean prompts are unchanged by silencing B);
    # contrastive FLAP keeps the planted circuit.
    assert flap.heads == {Head(1, 0)} and cflap.heads == {Head(0, 0), Head(1, 1)}
    assert space.heads == flap.heads | cflap.heads
    d = space.details
    assert (d["union_size"], d["overlap_size"]) == (3, 0)
    assert d["flap"]["heads"] == ["a1.h0"] and d["cflap"]["heads"] == ["a0.h0", "a1.h1"]
    assert (d["flap"]["metric"], d["cflap"]["metric"]) == ("wifv", "wifn")
    for head_id, score in space.scores.items():
        assert score == pytest.approx(max(flap.scores[head_id], cflap.scores[head_id]))


def test_shared_sweep_gives_each_branch_its_standalone_curve():
    space = check_pruner(MergedPruner, cflap_rule="biggest")
    flap = check_pruner(FlapPruner)
    cflap = check_pruner(CflapPruner, rule="biggest")
    d = space.details
    json.dumps(d)
    for branch, alone in (("flap", flap), ("cflap", cflap)):
        mine = d[branch]
        assert [pt["k"] for pt in mine["curve"]] == [pt["k"] for pt in alone.details["curve"]]
        assert [pt["performance"] for pt in mine["curve"]] == pytest.approx(
            [pt["performance"] for pt in alone.details["curve"]], rel=1e-5
        )
        assert (mine["sparsity"], mine["k"], mine["cliff_index"]) == (
            alone.details["sparsity"],
            alone.details["k"],
            alone.details["cliff_index"],
        )
        assert set(mine["heads"]) == {h.id for h in alone.heads}
    assert d["cflap"]["rule"] == "biggest"
    assert space.heads == flap.heads | cflap.heads
    assert d["union_size"] == len(space)


def test_branches_may_skip_the_sweep():
    space = check_pruner(MergedPruner, flap_rule="fixed", cflap_sparsity=0.5)
    d = space.details
    assert d["selection"] == "none" and d["n_calibration"] == 12
    assert (d["flap"]["source"], d["flap"]["k"], d["flap"]["fallback_used"]) == ("fixed", 1, True)
    assert (d["cflap"]["source"], d["cflap"]["k"]) == ("sparsity", 2)
    # One branch sweeping makes the other calibrate on the same half.
    mixed = MergedPruner().prune(toy_context(), MergedPruner.Params(flap_keep_k=1)).details
    assert mixed["selection"] == "holdout" and mixed["flap"]["curve"] == []
    assert len(mixed["cflap"]["curve"]) == 40


def test_registration_and_params():
    registered = []
    appbench_register_pruners(registered.append)
    assert registered == [MergedPruner]
    fields = set(MergedPruner.Params.model_fields)
    assert {"flap_rule", "cflap_rule", "flap_metric", "cflap_metric", "compat"} <= fields


def test_cli_run_on_the_default_model(tmp_path):
    args = ["run", "--pruner", "merged", "--discoverer", "actpatch", "--n-search", "40"]
    args += ["--n-eval", "40", "--out", str(tmp_path), "--quiet", "--json"]
    args += ["-p", "cflap_rule", "biggest"]
    outcome = CliRunner().invoke(cli, args, obj={})
    assert outcome.exit_code == 0, outcome.output
    result = json.loads(outcome.output)
    d = result["search_space"]["details"]
    union = set(d["flap"]["heads"]) | set(d["cflap"]["heads"])
    assert set(result["search_space"]["heads"]) == union
    assert result["search_space_size"] == d["union_size"] == len(union)
    for branch in ("flap", "cflap"):
        assert len(d[branch]["curve"]) == 40
        assert len(d[branch]["heads"]) == d[branch]["k"]
    assert d["cflap"]["rule"] == "biggest" and result["pruner_params"]["cflap_rule"] == "biggest"
