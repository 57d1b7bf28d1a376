"""Contrastive FLAP: the |M_clean^2 - M_corr^2| score against loops, what it sees on the planted
model (hand-derived), and an end-to-end CLI run on the default model."""

import json
import statistics

import pytest
import torch
from click.testing import CliRunner

from appbench import Head
from appbench.cli import cli
from appbench.testing import check_pruner
from appbench_plugins.cflap import (
    CflapPruner,
    appbench_register_pruners,
    contrastive_channel_scores,
    contrastive_scores,
)
from appbench_plugins.flap import channel_metric
from appbench_plugins.sparsity import find_cliff, keep_count, sparsity_grid


def loop_head_scores(r, n_heads):
    """Per-layer standardisation (unbiased std) and head means, with plain loops."""
    out = []
    for row in r:
        mu, sd = statistics.mean(row), statistics.stdev(row)
        z = [(x - mu) / sd for x in row]
        per = len(row) // n_heads
        out.append([statistics.mean(z[h * per : (h + 1) * per]) for h in range(n_heads)])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("compat", [False, True])
@pytest.mark.parametrize("metric", ["ifv", "wifv", "wifn"])
def test_contrastive_score_is_the_abs_difference_of_squares(metric, compat):
    gen = torch.Generator().manual_seed(3)
    z_clean = torch.randn(2, 3, 4, 2, 3, generator=gen)
    z_corrupt = z_clean + 0.7 * torch.randn(2, 3, 4, 2, 3, generator=gen)
    w_o = torch.randn(2, 2, 3, 5, generator=gen)
    mask = torch.arange(4)[None, :] < torch.tensor([[4], [2], [3]])
    z_clean[:, ~mask] = 9.0  # pad values, aligned in both runs
    z_corrupt[:, ~mask] = -9.0
    clean = channel_metric(z_clean, mask, w_o, metric, compat).tolist()
    corrupt = channel_metric(z_corrupt, mask, w_o, metric, compat).tolist()
    r = [
        [abs(c * c - k * k) for c, k in zip(rc, rk, strict=True)]
        for rc, rk in zip(clean, corrupt, strict=True)
    ]
    got = contrastive_channel_scores(z_clean, z_corrupt, mask, w_o, metric, compat)
    torch.testing.assert_close(got, torch.tensor(r, dtype=torch.float64))
    torch.testing.assert_close(
        contrastive_scores(z_clean, z_corrupt, mask, w_o, metric, compat),
        loop_head_scores(r, 2),
    )


def test_pad_positions_do_not_enter_the_default_score():
    gen = torch.Generator().manual_seed(5)
    z_clean, z_corrupt = torch.randn(2, 2, 2, 3, 4, 2, generator=gen)
    w_o = torch.randn(2, 4, 2, 5, generator=gen)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    before = contrastive_scores(z_clean, z_corrupt, mask, w_o)
    z_clean[:, ~mask] += 5.0
    torch.testing.assert_close(contrastive_scores(z_clean, z_corrupt, mask, w_o), before)
    after = contrastive_scores(z_clean, z_corrupt, mask, w_o, compat=True)
    z_clean[:, ~mask] -= 5.0
    assert not torch.allclose(contrastive_scores(z_clean, z_corrupt, mask, w_o, compat=True), after)


def test_a_sign_flip_corruption_is_invisible_on_the_planted_model(planted_ctx):
    # The planted corruption turns the signal from +1 (A) into -1 (B): every hook_z of the
    # corrupted run is exactly the negated or the unchanged clean one, and every FLAP metric is
    # even in the activations, so all contrastive channel scores are exactly 0.
    ctx = planted_ctx
    z_clean = ctx.engine.cache_z(ctx.search.clean)
    z_corrupt = ctx.engine.cache_z(ctx.search.corrupt)
    assert torch.equal(z_corrupt.abs(), z_clean.abs())
    for metric in ("ifv", "wifv", "wifn"):
        r = contrastive_channel_scores(
            z_clean, z_corrupt, ctx.search.pad_mask(), ctx.model.W_O, metric
        )
        assert torch.equal(r, torch.zeros_like(r))
    # All heads tie at 0, so keep_k=2 falls to the tie-break (lowest layer, then head): the
    # planted circuit {a0.h0, a1.h1} is not what contrastive FLAP recovers on this model.
    space = check_pruner(CflapPruner, keep_k=2)
    assert set(space.scores.values()) == {0.0}
    assert space.heads == {Head(0, 0), Head(0, 1)}


def silence_b(ctx):
    """Make the corruption remove the signal instead of flipping it: B reads as nothing."""
    b = ctx.model.tokenizer.get_vocab()["B"]
    with torch.no_grad():
        ctx.model.blocks[0].attn.W_V[0, b, 0] = 0.0
        ctx.model.blocks[1].attn.W_V[0, b, 0] = 0.0


# hook_z component 0 of each head on clean prompts (running means of the uniform attention);
# with B silenced, the corrupted run has 0 for every head except a0.h1, which is unchanged.
CLEAN = {
    (0, 0): [1, 1 / 2, 1 / 3, 1 / 4],
    (0, 1): [0, 1 / 2, 2 / 3, 3 / 4],
    (1, 0): [1, 1 / 2, 1 / 3, 1 / 4],
    (1, 1): [1, 3 / 4, 11 / 18, 25 / 48],
}


def test_planted_circuit_is_recovered_when_the_corruption_removes_the_signal(planted_ctx):
    ctx = planted_ctx
    silence_b(ctx)
    r = []
    for layer in range(2):
        row = []
        for h in range(2):
            e2 = 0.0 if (layer, h) == (0, 1) else statistics.mean(x * x for x in CLEAN[layer, h])
            row += [e2 * (1 / 16) ** 2, 0.0, 0.0, 0.0]  # mean|w| = 1/16 for component 0
        r.append(row)
    expected = loop_head_scores(r, 2)
    # One non-zero channel among eight scores +-sqrt(2)/4 per head, whatever its size.
    assert expected[0].tolist() == pytest.approx([2**0.5 / 4, -(2**0.5) / 4])
    # In layer 1 a1.h1 changes more (its running mean of running means decays slower).
    assert expected[1, 1] > 0 > expected[1, 0]

    space = CflapPruner().prune(ctx, CflapPruner.Params(keep_k=2))
    got = torch.tensor(
        [[space.scores[f"a{lay}.h{h}"] for h in range(2)] for lay in range(2)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert space.heads == {Head(0, 0), Head(1, 1)}
    three = CflapPruner().prune(ctx, CflapPruner.Params(keep_k=3))
    assert three.heads == {Head(0, 0), Head(1, 1), Head(1, 0)}


def test_default_run_on_the_toy_context():
    space = check_pruner(CflapPruner)
    d = space.details
    json.dumps(d)
    assert (d["metric"], d["rule"], d["source"]) == ("wifn", "first", "sweep")
    assert len(d["curve"]) == 40 and d["k"] == len(space)
    registered = []
    appbench_register_pruners(registered.append)
    assert registered == [CflapPruner]


def test_cli_run_on_the_default_model_records_curve_and_sparsity(tmp_path):
    args = ["run", "--pruner", "cflap", "--discoverer", "actpatch", "--n-search", "40"]
    args += ["--n-eval", "40", "--out", str(tmp_path), "--quiet", "--json"]
    outcome = CliRunner().invoke(cli, args, obj={})
    assert outcome.exit_code == 0, outcome.output
    result = json.loads(outcome.output)
    space = result["search_space"]
    d = space["details"]
    n = result["total_heads"]
    assert n == 32 and d["selection"] == "holdout"
    assert d["n_calibration"] + d["n_selection"] == 40 and d["n_selection"] >= 15
    grid = sparsity_grid(0.60, 0.99, 0.01)
    assert [pt["sparsity"] for pt in d["curve"]] == grid
    assert [pt["k"] for pt in d["curve"]] == [keep_count(p, n) for p in grid]
    values = [pt["performance"] for pt in d["curve"]]
    assert all(v == v for v in values)  # no NaN
    assert d["cliff_index"] == find_cliff(values, "first", 4)
    assert d["sparsity"] == (grid[d["cliff_index"]] if d["cliff_index"] >= 0 else 0.75)
    assert d["k"] == keep_count(d["sparsity"], n) == result["search_space_size"]
    assert d["performance"] == values[[pt["k"] for pt in d["curve"]].index(d["k"])]
    # The kept heads are the top-k scores.
    ranked = sorted(space["scores"], key=lambda h: -space["scores"][h])
    assert set(space["heads"]) == set(ranked[: d["k"]])
    assert result["pruner_params"]["metric"] == "wifn"
