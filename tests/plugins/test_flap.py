"""FLAP statistics, metrics and head scores against plain-loop references and hand-derived
activations of the planted model; the pruner's contract and details."""

import json
import statistics

import pytest
import torch
from pydantic import ValidationError

from appbench import Head
from appbench.testing import check_pruner
from appbench_plugins.flap import (
    FlapPruner,
    appbench_register_pruners,
    channel_metric,
    channel_second_moment,
    channel_variance,
    flap_scores,
    head_scores,
    standardise,
)
from appbench_plugins.sparsity import find_cliff, keep_count, sparsity_grid

L, N, T, H, D, D_MODEL = 2, 3, 4, 2, 3, 5
LENGTHS = [4, 2, 3]  # prompt 1 has two pad positions, prompt 2 one


def hand_built():
    """Activations [L, N, T, H, D] with absurd values at pad positions, weights, pad mask."""
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(L, N, T, H, D, generator=gen)
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    z[:, ~mask] = 40.0
    w_o = torch.randn(L, H, D, D_MODEL, generator=gen)
    return z, mask, w_o


def naive_channel_metric(z, w_o, metric, compat):
    """Spec 1.2-1.3 with plain loops over layers, channels, prompts and positions."""
    out = []
    for layer in range(L):
        row = []
        for h in range(H):
            for e in range(D):
                w = [float(w_o[layer, h, e, i]) for i in range(D_MODEL)]
                prompts = [
                    [float(z[layer, n, t, h, e]) for t in range(T if compat else LENGTHS[n])]
                    for n in range(N)
                ]
                if compat:
                    e2 = sum(sum(x * x for x in p) for p in prompts) / N
                    # FLAP's running update: mean first, then the fluctuation with the new mean.
                    mean = sum(prompts[0]) / T
                    var = 0.0
                    for n in range(1, N):
                        mean = mean * n / (n + 1) + sum(prompts[n]) / T / (n + 1)
                        var = var * (n - 1) / n + sum((x - mean) ** 2 for x in prompts[n]) / (n + 1)
                else:
                    tokens = [x for p in prompts for x in p]
                    e2 = sum(x * x for x in tokens) / len(tokens)
                    var = statistics.variance(tokens)
                if metric == "ifv":
                    row.append(var)
                elif metric == "wifv":
                    row.append(var * sum(x * x for x in w))
                else:
                    row.append(e2**0.5 * sum(abs(x) for x in w) / D_MODEL)
        out.append(row)
    return out


def naive_head_scores(r, n_heads):
    """Standardise each layer's channel scores (unbiased std), then average each head's."""
    scores = []
    for row in r:
        mu, sd = statistics.mean(row), statistics.stdev(row)
        z = [(x - mu) / sd for x in row]
        per = len(row) // n_heads
        scores.append([statistics.mean(z[h * per : (h + 1) * per]) for h in range(n_heads)])
    return torch.tensor(scores, dtype=torch.float64)


@pytest.mark.parametrize("compat", [False, True])
@pytest.mark.parametrize("metric", ["ifv", "wifv", "wifn"])
def test_channel_metric_and_head_scores_match_plain_loops(metric, compat):
    z, mask, w_o = hand_built()
    expected = naive_channel_metric(z, w_o, metric, compat)
    got = channel_metric(z, mask, w_o, metric, compat)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)
    squared = [[m * m for m in row] for row in expected]
    torch.testing.assert_close(
        flap_scores(z, mask, w_o, metric, compat),
        naive_head_scores(squared, H),
        rtol=1e-5,
        atol=1e-7,
    )


def test_hand_computed_statistics_with_padding():
    # One channel; prompt 0 = [1, 3], prompt 1 = [5, <pad> 7].
    z = torch.tensor([[[[[1.0]], [[3.0]]], [[[5.0]], [[7.0]]]]])  # [1, 2, 2, 1, 1]
    mask = torch.tensor([[True, True], [True, False]])
    # Per token over {1, 3, 5}: mean 3, unbiased variance 8/2, second moment 35/3.
    assert channel_variance(z, mask).item() == pytest.approx(4.0)
    assert channel_second_moment(z, mask).item() == pytest.approx(35 / 3)
    # compat: the first prompt adds no fluctuation; the mean becomes (2 + 6)/2 = 4 and the
    # second prompt adds ((5-4)^2 + (7-4)^2) / 2 = 5. E2 = ((1 + 9) + (25 + 49)) / 2 = 42.
    assert channel_variance(z, mask, compat=True).item() == pytest.approx(5.0)
    assert channel_second_moment(z, mask, compat=True).item() == pytest.approx(42.0)


def test_pad_positions_are_excluded_by_default_and_included_in_compat():
    z, mask, w_o = hand_built()
    other = z.clone()
    other[:, ~mask] = -3.0
    for metric in ("ifv", "wifv", "wifn"):
        torch.testing.assert_close(
            flap_scores(z, mask, w_o, metric), flap_scores(other, mask, w_o, metric)
        )
        assert not torch.allclose(
            flap_scores(z, mask, w_o, metric, compat=True),
            flap_scores(other, mask, w_o, metric, compat=True),
        )


def test_a_layer_without_spread_scores_zero():
    r = torch.tensor([[2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    out = standardise(r)
    assert torch.equal(out[:2], torch.zeros(2, 4))
    # one outlier among four: mean 1/4, std 1/2 -> (3/2, -1/2, -1/2, -1/2)
    torch.testing.assert_close(out[2], torch.tensor([1.5, -0.5, -0.5, -0.5]))
    torch.testing.assert_close(head_scores(r, 2)[2], torch.tensor([0.5, -0.5]))


# The planted model attends uniformly, so each head's hook_z component 0 at positions 0..3 is
# a running mean (module doc of appbench.testing): a0.h0 and a1.h0 read the signal at position 0,
# a0.h1 the fillers at 1..3, a1.h1 the output of a0.h0. Every other channel is 0.
PLANTED_CLEAN = {
    (0, 0): [1, 1 / 2, 1 / 3, 1 / 4],
    (0, 1): [0, 1 / 2, 2 / 3, 3 / 4],
    (1, 0): [1, 1 / 2, 1 / 3, 1 / 4],
    (1, 1): [1, 3 / 4, 11 / 18, 25 / 48],
}


def test_planted_wifv_scores_from_hand_derived_activations(planted_ctx):
    ctx = planted_ctx
    n = len(ctx.search)
    r = []
    for layer in range(2):
        row = []
        for h in range(2):
            # ||w||^2 = 1 for component 0 of every head; the 12 prompts repeat the same values.
            var = statistics.variance(PLANTED_CLEAN[layer, h] * n)
            row += [var**2, 0.0, 0.0, 0.0]
        r.append(row)
    expected = naive_head_scores(r, 2)
    z = ctx.engine.cache_z(ctx.search.clean)
    got = flap_scores(z, ctx.search.pad_mask(), ctx.model.W_O, "wifv")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # a0.h0 and a0.h1 fluctuate alike (1/(t+1) vs 1 - 1/(t+1)), so layer 0 ties at 0; in
    # layer 1 the distractor a1.h0 fluctuates more than the planted a1.h1.
    assert abs(got[0, 0]) < 1e-4 and abs(got[0, 1]) < 1e-4
    assert got[1, 0] > 0 and got[1, 1] == pytest.approx(-got[1, 0])
    space = check_pruner(FlapPruner, keep_k=1)
    assert space.heads == {Head(1, 0)}
    assert space.details["k"] == 1 and space.details["source"] == "keep_k"


def test_default_run_records_the_sweep():
    space = check_pruner(FlapPruner)
    d = space.details
    json.dumps(d)  # JSON-serialisable as the result file needs
    assert (d["metric"], d["rule"], d["selection"], d["compat"]) == (
        "wifv",
        "first",
        "holdout",
        False,
    )
    assert (d["n_calibration"], d["n_selection"]) == (6, 6)
    grid = sparsity_grid(0.60, 0.99, 0.01)
    assert [pt["sparsity"] for pt in d["curve"]] == grid
    assert [pt["k"] for pt in d["curve"]] == [keep_count(p, 4) for p in grid]
    cliff = find_cliff([pt["performance"] for pt in d["curve"]], "first", d["window"])
    assert d["cliff_index"] == cliff and d["fallback_used"] == (cliff == -1)
    assert d["sparsity"] == (grid[cliff] if cliff >= 0 else 0.75)
    assert d["k"] == keep_count(d["sparsity"], 4) == len(space)
    assert set(space.scores) == {"a0.h0", "a0.h1", "a1.h0", "a1.h1"}


def test_compat_fixed_rule_keeps_the_off_by_one_count():
    space = check_pruner(FlapPruner, compat=True, rule="fixed")
    d = space.details
    # round(4 x 0.25) - 1 = 0 heads: the authors' mapping empties a 4-head model at p = 0.75.
    assert (d["sparsity"], d["k"], d["fallback_used"], d["curve"]) == (0.75, 0, True, [])
    assert len(space) == 0
    sweep = check_pruner(FlapPruner, compat=True).details
    assert len(sweep["curve"]) == 39 and sweep["selection"] == "same"
    assert sweep["n_calibration"] == 12
    assert {pt["k"] for pt in sweep["curve"]} == {0, 1}


def test_params_are_validated_and_the_pruner_is_registered():
    with pytest.raises(ValidationError):
        FlapPruner.Params(metric="wanda")
    with pytest.raises(ValidationError):
        FlapPruner.Params(rule="smooth_first")
    with pytest.raises(ValidationError):
        FlapPruner.Params(keep_k=0)
    registered = []
    appbench_register_pruners(registered.append)
    assert registered == [FlapPruner]
