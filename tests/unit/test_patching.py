"""The patching engine against naive TransformerLens runs (full forward, hooks at every layer)."""

import torch

from appbench import Head
from appbench.engine.patching import PatchingEngine, Replacement, z_hook_name
from appbench.testing import toy_context


def naive_metric(ctx, data, hooks):
    logits = ctx.model.run_with_hooks(data.clean, fwd_hooks=hooks)
    at_target = logits[torch.arange(len(data)), data.target_pos]
    return ctx.task.metric(at_target, data)


def random_ctx():
    """The toy task on a randomly initialised 2x2 model with MLPs-free attention: every head matters a bit."""
    ctx = toy_context()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ctx.model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return ctx


def test_target_logits_match_a_plain_forward():
    ctx = random_ctx()
    data = ctx.search
    full = ctx.model(data.clean)[torch.arange(len(data)), data.target_pos]
    engine_logits = ctx.engine.target_logits(data)[0]
    torch.testing.assert_close(engine_logits, full, rtol=0, atol=1e-5)


def test_patch_heads_matches_naive_patching_for_every_head():
    ctx = random_ctx()
    data, engine = ctx.search, ctx.engine
    z_corrupt = engine.cache_z(data.corrupt)
    resid = engine.cache_resid_pre(data.clean)
    heads = [Head(layer, h) for layer in range(2) for h in range(2)]
    fast = engine.patch_heads(data, heads, z_corrupt, resid)
    for head in heads:

        def hook(z, hook, head=head):
            z[:, :, head.head] = z_corrupt[head.layer][:, :, head.head]
            return z

        naive = naive_metric(ctx, data, [(z_hook_name(head.layer), hook)])
        torch.testing.assert_close(fast[head], naive, rtol=0, atol=1e-5)


def test_ablated_metric_matches_naive_mean_ablation_and_batches_variants():
    ctx = random_ctx()
    data, engine = ctx.search, ctx.engine
    means = engine.per_prompt(engine.group_means(engine.cache_z(data.corrupt), data), data)
    keeps = torch.tensor(
        [
            [[True, True], [True, True]],
            [[False, True], [True, False]],
            [[False, False], [False, False]],
        ]
    )
    batched = engine.ablated_metric(data, keeps, means)
    for k, keep in enumerate(keeps):
        hooks = []
        for layer in range(2):

            def hook(z, hook, layer=layer, keep=keep):
                for h in range(2):
                    if not keep[layer, h]:
                        z[:, :, h] = means[layer][:, :, h]
                return z

            hooks.append((z_hook_name(layer), hook))
        torch.testing.assert_close(batched[k], naive_metric(ctx, data, hooks), rtol=0, atol=1e-5)


def test_group_means_are_per_template_and_position():
    ctx = toy_context()
    data = ctx.search
    z = torch.arange(2 * len(data) * 4 * 2 * 4, dtype=torch.float32).view(2, len(data), 4, 2, 4)
    means = PatchingEngine.group_means(z, data)
    assert means.shape == (2, 1, 4, 2, 4)
    torch.testing.assert_close(means[:, 0], z.mean(dim=1))


def test_chunks_respect_the_row_budget():
    ctx = toy_context()
    engine = PatchingEngine(ctx.model, ctx.task, max_rows=25)
    assert [list(c) for c in engine.chunks(5, 12)] == [[0, 1], [2, 3], [4]]
    rep = Replacement(torch.ones(1, 2, dtype=torch.bool), torch.zeros(12, 4, 2, 4))
    assert rep.mask.shape == (1, 2)


def test_live_windows_and_their_merging_into_spans():
    """Live positions run from the first clean/corrupted difference (at or before the target)
    to the target; spans merge the windows whose union adds the fewest positions."""
    from dataclasses import replace

    from appbench.engine.patching import live_spans, live_windows

    data = toy_context().search.select(range(5))
    clean = torch.tensor(
        [
            [1, 2, 3, 4, 5, 6],  # differs at 2, target 5
            [1, 2, 3, 4, 5, 6],  # differs at 2, target 5
            [1, 2, 3, 4, 0, 0],  # differs at 1, target 3
            [1, 2, 3, 4, 5, 0],  # differs only after its target 2: window is the target alone
            [1, 2, 3, 4, 5, 6],  # differs at 0, target 5
        ]
    )
    corrupt = clean.clone()
    corrupt[0, 2] = corrupt[1, 2] = corrupt[1, 4] = corrupt[2, 1] = corrupt[3, 3] = 9
    corrupt[4, 0] = 9
    data = replace(data, clean=clean, corrupt=corrupt, target_pos=torch.tensor([5, 5, 3, 2, 5]))
    assert live_windows(data) == ([2, 2, 1, 2, 0], [6, 6, 4, 3, 6])
    windows = {(s.start, s.stop): s.rows.tolist() for s in live_spans(data)}
    assert windows == {(2, 6): [0, 1], (1, 4): [2], (2, 3): [3], (0, 6): [4]}
    # Three spans: merging (1, 4) with (2, 3) costs 2 extra positions, the least (with
    # (0, 6) it would cost 3, (2, 6) with (2, 3) 3).
    merged = live_spans(data, max_spans=3)
    assert {(s.start, s.stop): s.rows.tolist() for s in merged} == {
        (2, 6): [0, 1],
        (1, 4): [2, 3],
        (0, 6): [4],
    }
    assert [len(s.data) for s in merged] == [len(s.rows) for s in merged]
    assert sorted(r for s in live_spans(data, max_spans=1) for r in s.rows.tolist()) == [
        0,
        1,
        2,
        3,
        4,
    ]
