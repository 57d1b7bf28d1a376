"""K(p), the sweep grid, the cliff rules (on hand-made curves) and the shared sweep stage."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from appbench import Head, RunError
from appbench_plugins.sparsity import (
    Branch,
    SweepParams,
    cliff_biggest,
    cliff_first,
    default_window,
    find_cliff,
    keep_count,
    prune_branches,
    round_half_up,
    sparsity_grid,
    split_halves,
    top_heads,
)


# ------------------------------------------------------------------------------ K(p)
@pytest.mark.parametrize(
    ("p", "n", "expected"),
    [
        (0.94, 144, 8),  # GPT-2 small, run_FLAP.ipynb
        (0.75, 144, 35),
        (0.75, 336, 83),  # Qwen2.5-0.5B
        (0.75, 784, 195),  # Qwen2.5-7B, Table 2
        (0.99, 144, 0),  # the off-by-one keeps nothing
        (0.60, 144, 57),  # 57.6 -> 58 - 1
        (0.75, 10, 1),  # 2.5: the first minimiser of |(k+1) - 2.5| is k = 1
        (1.0, 32, 0),
        (0.0, 32, 31),
    ],
)
def test_compat_keep_count_reproduces_the_authors_off_by_one(p, n, expected):
    assert keep_count(p, n, compat=True) == expected


@pytest.mark.parametrize(
    ("p", "n", "expected"),
    [
        (0.94, 144, 9),  # 8.64
        (0.75, 144, 36),
        (0.75, 784, 196),
        (0.99, 144, 1),  # 1.44
        (0.99, 32, 1),  # 0.32 rounds to 0, clamped to one head
        (0.75, 10, 3),  # 2.5 rounds half up (banker's rounding would give 2)
        (0.75, 18, 5),  # 4.5 -> 5 (banker's: 4)
        (0.60, 32, 13),  # 12.8
        (0.0, 32, 32),
        (1.0, 32, 1),
    ],
)
def test_default_keep_count_rounds_half_up_and_clamps(p, n, expected):
    assert keep_count(p, n) == expected


def test_round_half_up_ignores_float_noise():
    assert round_half_up(144 * (1 - 0.94)) == 9
    assert round_half_up(0.5000000000000001) == 1
    assert round_half_up(2.49999) == 2
    assert round_half_up(2.4999999999) == 3  # within the 1e-9 tolerance of a half
    assert [round_half_up(x) for x in (0.5, 1.5, 2.5, 3.49)] == [1, 2, 3, 3]


def test_keep_count_rejects_bad_input():
    with pytest.raises(ValueError):
        keep_count(1.2, 10)
    with pytest.raises(ValueError):
        keep_count(0.5, 0)


# -------------------------------------------------------------------------- the grid
def test_default_and_compat_grids():
    grid = sparsity_grid(0.60, 0.99, 0.01)
    assert len(grid) == 40 and grid[0] == 0.6 and grid[-1] == 0.99 and grid[15] == 0.75
    assert all(round(p, 2) == p for p in grid)
    assert len(sparsity_grid(0.60, 0.98, 0.01)) == 39
    assert sparsity_grid(0.5, 0.75, 0.25) == [0.5, 0.75]
    assert sparsity_grid(0.5, 0.7, 0.25) == [0.5]
    assert default_window(40) == 4 and default_window(39) == 4
    assert default_window(25) == 3 and default_window(15) == 2 and default_window(3) == 2


def test_sweep_params_defaults_and_compat():
    default = SweepParams()
    assert default.stop == 0.99 and len(default.grid()) == 40
    assert default.selection_mode == "holdout"
    compat = SweepParams(compat=True)
    assert compat.stop == 0.98 and len(compat.grid()) == 39
    assert compat.selection_mode == "same"
    assert SweepParams(compat=True, selection="holdout").selection_mode == "holdout"
    assert SweepParams(sweep_start=0.5, sweep_stop=0.9, sweep_step=0.1).grid() == [
        0.5,
        0.6,
        0.7,
        0.8,
        0.9,
    ]
    with pytest.raises(ValidationError):
        SweepParams(sweep_start=0.9, sweep_stop=0.8)
    with pytest.raises(ValidationError):
        SweepParams(sweep_step=0)
    with pytest.raises(ValidationError):
        SweepParams(windw=3)


# --------------------------------------------------------------------- cliff rules
STEP = [100.0] * 10 + [50.0] * 10  # one cliff between index 9 and 10
TWO_DROPS = [100.0] * 3 + [90.0] * 6 + [40.0] * 6  # small drop after 2, big one after 8


def test_first_and_biggest_find_the_last_point_before_a_single_drop():
    # delta = 5; the first drop >= delta is at i = 7 (|100 - min(100, 100, 50)|), then the
    # one-step falls 0, 0, 50 move it on by 2.
    assert cliff_first(STEP, 4) == 9
    # drops 50 at i = 7, 8, 9 and 0 after: gaps [0, 0, 0, 50] -> m = 3 -> 7 + 3 - 1.
    assert cliff_biggest(STEP, 4) == 9
    assert find_cliff(STEP, "first") == 9  # 20 points -> window 2: i = 9 directly
    assert find_cliff(STEP, "biggest", window=4) == 9


def test_first_takes_the_early_small_drop_and_biggest_the_large_one():
    # delta = 6: first sees |100 - 90| = 10 already at i = 0 and walks on to index 2, the
    # last point before the one-step fall 100 -> 90.
    assert cliff_first(TWO_DROPS, 4) == 2
    # The largest drops (50) sit at i = 6, 7, 8; the gap reaches delta at i = 9.
    assert cliff_biggest(TWO_DROPS, 4) == 8


def test_first_keeps_i_when_no_single_step_reaches_delta():
    curve = [100.0] * 5 + [97.0, 94.0, 91.0] + [40.0] * 7
    # delta = 6: at i = 3 the next three points reach 94 (drop 6); the one-step falls from
    # i = 3 are 0, 3, 3, 3, none >= 6, so c stays 3.
    assert cliff_first(curve, 4) == 3


def test_a_rise_counts_as_a_cliff():
    rise = [50.0] * 10 + [100.0] * 10
    # |50 - min(100, 100, 100)| = 50 at i = 9; the signed one-step "falls" are never >= delta.
    assert cliff_first(rise, 4) == 9
    # biggest: the only positive drop is at i = 9, the next gap (50 - 0) reaches delta: m = 1.
    assert cliff_biggest(rise, 4) == 9


def test_curves_without_a_cliff_fall_back():
    linear = [3.0 * (39 - i) for i in range(40)]
    # delta = 11.7 but three steps fall only 9: no cliff, the fallback (0.75) applies.
    assert cliff_first(linear, 4) == -1
    # biggest always takes its maximum drop, here the first of equal drops.
    assert cliff_biggest(linear, 4) == 0
    # A change in the last point is outside every window.
    late = [100.0] * 14 + [0.0]
    assert cliff_first(late, 4) == -1
    flat = [80.0] * 40
    assert cliff_first(flat, 4) == -1 and cliff_biggest(flat, 4) == -1
    assert find_cliff(STEP, "fixed") == -1
    assert cliff_first([100.0, 0.0, 0.0], 4) == -1  # shorter than the window


def test_unknown_rule_is_rejected():
    with pytest.raises(ValueError, match="unknown cliff rule"):
        find_cliff(STEP, "steepest")


# ---------------------------------------------------------------------- head sets
def test_top_heads_breaks_ties_by_layer_then_head():
    scores = torch.tensor([[0.5, 2.0], [0.5, 1.0]])
    assert top_heads(scores, 1) == {Head(0, 1)}
    assert top_heads(scores, 3) == {Head(0, 1), Head(1, 1), Head(0, 0)}
    assert top_heads(scores, 0) == frozenset()


def test_split_halves_alternates_within_each_template():
    data = SimpleNamespace(groups=torch.tensor([0, 0, 1, 0, 1, 1, 2]))
    assert split_halves(data) == ([0, 2, 3, 5, 6], [1, 4])


# ---------------------------------------------------------------- the sweep stage
def _fixed_branch(scores, **kwargs):
    return Branch("fixed-scores", lambda prompts: scores, **kwargs)


def test_sweep_matches_a_naive_per_point_evaluation(planted_ctx):
    ctx = planted_ctx
    scores = torch.tensor([[4.0, 1.0], [2.0, 3.0]])  # ranking a0.h0, a1.h1, a1.h0, a0.h1
    params = SweepParams(sweep_start=0.25, sweep_stop=0.75, sweep_step=0.25, selection="same")
    [result], common = prune_branches(ctx, params, [_fixed_branch(scores)])
    curve = result.details["curve"]
    assert [(pt["sparsity"], pt["k"]) for pt in curve] == [(0.25, 3), (0.5, 2), (0.75, 1)]

    engine, data = ctx.engine, ctx.search
    means = engine.per_prompt(engine.group_means(engine.cache_z(data.corrupt), data), data)
    m_full = engine.clean_metric(data).mean().item()
    assert common["m_full"] == pytest.approx(m_full, rel=1e-6)
    for point in curve:
        keep = torch.zeros(2, 2, dtype=torch.bool)
        for head in top_heads(scores, point["k"]):
            keep[head.layer, head.head] = True
        m = engine.ablated_metric(data, keep, means).mean().item()
        assert point["performance"] == pytest.approx(100 * m / m_full, rel=1e-6)
    # The planted circuit is {a0.h0, a1.h1}: keeping the top two is the full model's answer.
    assert curve[1]["performance"] == pytest.approx(100.0, rel=1e-5)
    assert common["selection"] == "same" and common["n_selection"] == 12


def test_given_sparsity_keep_k_and_fixed_skip_the_sweep(planted_ctx):
    scores = torch.tensor([[4.0, 1.0], [2.0, 3.0]])
    branches = [
        _fixed_branch(scores, sparsity=0.5),
        _fixed_branch(scores, keep_k=3),
        _fixed_branch(scores, rule="fixed"),
    ]
    results, common = prune_branches(planted_ctx, SweepParams(), branches)
    given, kept, fixed = (r.details for r in results)
    assert common["selection"] == "none" and common["n_calibration"] == 12
    assert (given["source"], given["k"], given["cliff_index"], given["curve"]) == (
        "sparsity",
        2,
        None,
        [],
    )
    assert results[0].heads == {Head(0, 0), Head(1, 1)}
    assert (kept["source"], kept["sparsity"], kept["k"]) == ("keep_k", None, 3)
    assert (fixed["sparsity"], fixed["k"], fixed["fallback_used"], fixed["cliff_index"]) == (
        0.75,
        1,
        True,
        -1,
    )


def test_holdout_splits_the_search_prompts(planted_ctx):
    scores = torch.tensor([[4.0, 1.0], [2.0, 3.0]])
    _, common = prune_branches(planted_ctx, SweepParams(), [_fixed_branch(scores)])
    assert (common["selection"], common["n_calibration"], common["n_selection"]) == (
        "holdout",
        6,
        6,
    )


def test_bad_states_raise_run_errors(planted_ctx):
    scores = torch.zeros(2, 2)
    with pytest.raises(RunError, match="exceeds"):
        prune_branches(planted_ctx, SweepParams(), [_fixed_branch(scores, keep_k=5)])
    one = replace(planted_ctx, search=planted_ctx.search.select([0]))
    with pytest.raises(RunError, match="holdout"):
        prune_branches(one, SweepParams(), [_fixed_branch(scores)])
    planted_ctx.model.unembed.W_U.data[11] *= -1  # the model now answers "no"
    with pytest.raises(RunError, match="m\\(M\\) > 0"):
        prune_branches(planted_ctx, SweepParams(), [_fixed_branch(scores)])


@pytest.mark.parametrize("compat", [False, True])
def test_chunks_of_prompts_give_the_scores_and_curve_of_the_whole_split(compat):
    """Scoring and sweeping chunk by chunk (7 prompts at a time, Chan's merge; FLAP's
    running update continued across chunks with compat) equal the whole split at once."""
    import torch

    from appbench.testing import model_context
    from appbench_plugins.cflap import CflapPruner
    from appbench_plugins.merged import MergedPruner

    ctx = model_context("zoo-gt-ioi", n_search=60)
    for pruner in (CflapPruner, MergedPruner):
        whole = pruner().prune(ctx, pruner.Params(compat=compat))
        chunked = pruner().prune(ctx, pruner.Params(compat=compat, batch_size=7))
        assert chunked.heads == whole.heads
        for head, score in whole.scores.items():
            assert chunked.scores[head] == pytest.approx(score, rel=1e-9, abs=1e-12)
    curve = [p["performance"] for p in whole.details["flap"]["curve"]]
    again = [p["performance"] for p in chunked.details["flap"]["curve"]]
    torch.testing.assert_close(torch.tensor(again), torch.tensor(curve), rtol=1e-9, atol=1e-9)
