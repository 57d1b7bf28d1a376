"""ACDC's batched engine against its plain one-pass-per-edge reference, and EAP / EAP-IG
against ACDC, on the same workload in the same process.

Both ACDC drivers must remove exactly the same edges (checked here as in the known-answer
tests); the benchmark reports the ratios of wall time and of FLOPs (analytic, forward and
backward, counted by the runner's CostCounter).
"""

from __future__ import annotations

import time

import pytest
from test_bench_path_patching import random_gpt2_small

from appbench import Edge, Head, acdc, edge_scores, load_model
from appbench.engine.acdc import acdc_reference
from appbench.plugins import get_registries
from appbench.runner import CostCounter


def costed(model, fn):
    """fn()'s result, wall seconds and FLOPs (forward and backward)."""
    counter = CostCounter(model)
    started = time.perf_counter()
    result = fn()
    wall = time.perf_counter() - started
    counter.remove()
    return result, wall, counter.tally.flops + counter.tally.backward_flops


def acdc_ratios(benchmark, model, data, heads, label):
    task = get_registries().tasks.get("ioi")
    plain, plain_wall, plain_flops = costed(model, lambda: acdc_reference(model, task, data, heads))
    fast, fast_wall, fast_flops = benchmark.pedantic(
        lambda: costed(model, lambda: acdc(model, task, data, heads)), rounds=1, iterations=1
    )
    # The input corrections (W_O projections, re-made q/k/v) run outside the model's modules.
    plain_flops += plain.extra_flops
    fast_flops += fast.extra_flops
    assert fast.edges == plain.edges and fast.tested == plain.tested
    n_layers = int(model.cfg.n_layers)
    # What restarting at the receiver's layer can save at most: each tested edge run once from
    # its receiver's layer (the logits from the last layer), against every layer.
    suffix = 0
    for ids, _, _ in fast.trace:
        receiver = Edge.parse(ids.split(", ")[0]).receiver
        suffix += n_layers - (n_layers - 1 if receiver is None else receiver.layer)
    info = {
        "model": label,
        "heads_searched": len(heads),
        "edges_tested": fast.tested,
        "edges_kept": len(fast.edges),
        "reference_seconds": round(plain_wall, 2),
        "engine_seconds": round(fast_wall, 2),
        "wall_ratio": round(plain_wall / fast_wall, 2),
        "reference_gflop": round(plain_flops / 1e9, 2),
        "engine_gflop": round(fast_flops / 1e9, 2),
        "flops_ratio": round(plain_flops / fast_flops, 2),
        "restart_bound_ratio": round(n_layers * fast.tested / suffix, 2),
        "reference_runs": plain.forward_runs,
        "engine_runs": fast.forward_runs,
    }
    benchmark.extra_info.update(info)
    print("\n" + "  ".join(f"{k}={v}" for k, v in info.items()))
    return info


@pytest.mark.benchmark(group="acdc")
def test_bench_acdc_on_the_default_model(benchmark):
    model = load_model("zoo-gt-ioi")
    task = get_registries().tasks.get("ioi")
    data, _ = task.splits(model.tokenizer, n_search=30, n_eval=10)
    heads = {Head(layer, h) for layer in range(4) for h in range(8)}
    acdc_ratios(benchmark, model, data, heads, "zoo-gt-ioi (dense)")


@pytest.mark.benchmark(group="acdc")
def test_bench_acdc_gpt2_small_shape(benchmark, gpt2_tok):
    """GPT-2 small's shape with random weights, searched over 2 heads per layer (24 heads, and
    every MLP and the input: about 1,700 edges of the full graph); the whole graph (32,491
    edges) would take the plain reference a day of CPU."""
    model = random_gpt2_small(gpt2_tok)
    task = get_registries().tasks.get("ioi")
    data, _ = task.splits(model.tokenizer, n_search=10, n_eval=10)
    heads = {Head(layer, h) for layer in range(12) for h in (0, 1)}
    acdc_ratios(benchmark, model, data, heads, "gpt2-small-shape (random weights)")


@pytest.mark.benchmark(group="eap")
def test_bench_eap_against_acdc(benchmark):
    """EAP (one backward pass) and EAP-IG (5) against ACDC's engine on the default model."""
    model = load_model("zoo-gt-ioi")
    task = get_registries().tasks.get("ioi")
    data, _ = task.splits(model.tokenizer, n_search=100, n_eval=10)
    heads = {Head(layer, h) for layer in range(4) for h in range(8)}
    found, acdc_wall, acdc_flops = costed(model, lambda: acdc(model, task, data, heads))
    acdc_flops += found.extra_flops
    _, eap_wall, eap_flops = benchmark.pedantic(
        lambda: costed(model, lambda: edge_scores(model, task, data)), rounds=1, iterations=1
    )
    _, ig_wall, ig_flops = costed(model, lambda: edge_scores(model, task, data, steps=5))
    info = {
        "acdc_seconds": round(acdc_wall, 2),
        "acdc_gflop": round(acdc_flops / 1e9, 2),
        "eap_seconds": round(eap_wall, 2),
        "eap_gflop": round(eap_flops / 1e9, 2),
        "eap_ig_seconds": round(ig_wall, 2),
        "eap_ig_gflop": round(ig_flops / 1e9, 2),
        "acdc_over_eap_flops": round(acdc_flops / eap_flops, 1),
        "acdc_over_eap_ig_flops": round(acdc_flops / ig_flops, 1),
        "acdc_over_eap_wall": round(acdc_wall / eap_wall, 1),
    }
    benchmark.extra_info.update(info)
    print("\n" + "  ".join(f"{k}={v}" for k, v in info.items()))
