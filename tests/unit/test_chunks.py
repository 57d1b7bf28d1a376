"""Prompts a chunk at a time give the whole split's group means and ablated metrics."""

import torch

from appbench import Head
from appbench.engine.chunks import chunked_ablated_metric, corrupt_group_means, prompt_chunks
from appbench.testing import PlantedCircuit, planted_context


def test_chunks_give_the_whole_splits_means_and_metrics():
    spec = PlantedCircuit(3, 4, ((Head(0, 1), None), (Head(1, 2), "v"), (Head(2, 0), "v")))
    ctx = planted_context(spec.build())
    engine, data = ctx.engine, ctx.evaluation
    whole = engine.group_means(engine.cache_z(data.corrupt), data)
    keep = torch.rand(5, 3, 4, generator=torch.Generator().manual_seed(0)) > 0.5
    expected = engine.ablated_metric(data, keep, engine.per_prompt(whole, data))
    for batch in (1, 3, len(data), 10 * len(data)):
        sizes = [len(chunk) for chunk in prompt_chunks(data, batch)]
        assert sum(sizes) == len(data) and max(sizes) <= batch
        means = corrupt_group_means(engine, data, batch)
        torch.testing.assert_close(means, whole, rtol=1e-6, atol=1e-7)
        got = chunked_ablated_metric(engine, data, keep, means, batch)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
