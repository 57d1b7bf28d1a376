"""Verification of a ground-truth circuit by ablation: what a model card reports and a test
recomputes, so that a zoo model's answer key is measured, never declared.

On a task's held-out prompts:

- **accuracy** of the full model (the argmax is a correct answer);
- **faithfulness** of the designated circuit, normalised (m(C) − m(∅)) / (m(M) − m(∅)), with
  every other head ablated two ways: *mean* (its per-template, per-position mean over the
  corrupted prompts, as every appbench evaluation does) and *resample* (its activation on the
  corrupted prompt of a random other prompt of the same template);
- **necessity** of each designated head: the share of the gap lost when that head alone is
  mean-ablated, (m(M) − m(M without h)) / (m(M) − m(∅));
- **edges**: path-patching scores (appbench's exact engine) of every designated head into the
  logits and into each later designated head's q, k and v input. An edge is one whose path
  carries at least ``EDGE_THRESHOLD`` of the clean-corrupted gap: the graph edge-level
  discoverers are scored against.
"""

from __future__ import annotations

from typing import Any

import torch

from appbench import Head
from appbench_plugins.zoo.siit import same_template_partner

#: Goals of a ground-truth circuit (issue: "a model zoo whose circuits are known"). Faithfulness
#: must lie within FAITHFULNESS_TOLERANCE of 1 on both sides: a circuit far *more* faithful than
#: the model means the other heads work against the task, which is not irrelevance either.
FAITHFULNESS_GOAL = 0.95
ACCURACY_GOAL = 0.95
FAITHFULNESS_TOLERANCE = 1 - FAITHFULNESS_GOAL
NECESSITY_GOAL = 0.05
#: An edge carries at least this share of the gap (pathpatch's default effect threshold).
EDGE_THRESHOLD = 0.01


def _normalised(m_model: float, m_empty: float, value: float) -> float:
    return (value - m_empty) / (m_model - m_empty)


def resample_sources(z_corrupt: torch.Tensor, groups: torch.Tensor, seed: int) -> torch.Tensor:
    """For every prompt, the corrupted ``hook_z`` of a random other prompt of its template:
    [L, N, T, H, d] (a prompt alone in its template keeps its own corrupted activation)."""
    partner = same_template_partner(groups, torch.Generator().manual_seed(seed))
    return z_corrupt[:, partner]


@torch.no_grad()
def verify_circuit(model: Any, task: Any, heads: frozenset[Head], data: Any, seed: int = 0) -> dict:
    """Every verification figure of ``heads`` as ``task``'s circuit in ``model`` on ``data``."""
    from appbench import PatchingEngine

    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    engine = PatchingEngine(model, task)
    z_corrupt = engine.cache_z(data.corrupt)
    sources = {
        "mean": engine.per_prompt(engine.group_means(z_corrupt, data), data),
        "resample": resample_sources(z_corrupt, data.groups, seed),
    }
    ordered = sorted(heads)
    # Rows: full model, empty circuit, the circuit, then the full model without each head.
    keep = torch.ones(3 + len(ordered), n_layers, n_heads, dtype=torch.bool)
    keep[1] = False
    keep[2] = False
    for head in ordered:
        keep[2, head.layer, head.head] = True
    for row, head in enumerate(ordered, start=3):
        keep[row, head.layer, head.head] = False
    figures: dict[str, Any] = {}
    for name, source in sources.items():
        rows = keep if name == "mean" else keep[:3]
        values = engine.ablated_metric(data, rows, source).double().mean(dim=1).tolist()
        m_model, m_empty = values[0], values[1]
        figures[f"faithfulness_{name}"] = _normalised(m_model, m_empty, values[2])
        figures[f"m_model_{name}"], figures[f"m_empty_{name}"] = m_model, m_empty
        if name == "mean":
            figures["necessity"] = {
                head.id: (m_model - value) / (m_model - m_empty)
                for head, value in zip(ordered, values[3:], strict=True)
            }
    rows = torch.arange(len(data))
    logits = model(data.clean)[rows, data.target_pos]
    figures["accuracy"] = float(
        (logits.argmax(-1, keepdim=True) == data.answers).any(dim=1).float().mean()
    )
    figures["edge_scores"] = edge_scores(engine, data, ordered)
    figures["edges"] = sorted(
        edge for edge, score in figures["edge_scores"].items() if abs(score) >= EDGE_THRESHOLD
    )
    return figures


def edge_scores(engine: Any, data: Any, heads: list[Head]) -> dict[str, float]:
    """Path-patching score of every designated head into the logits and into each later
    designated head's q, k and v input, by edge id (``a0.h1->a2.h3<k>``, ``a3.h6->logits``)."""
    from appbench import PathPatcher

    patcher = PathPatcher(engine, data)
    scores = {f"{head.id}->logits": value for head, value in patcher.logits_scores(heads).items()}
    for receiver in heads:
        senders = [head for head in heads if head.layer < receiver.layer]
        if not senders:
            continue
        for kind, by_sender in patcher.receiver_scores(receiver, senders).items():
            for sender, value in by_sender.items():
                scores[f"{sender.id}->{receiver.id}<{kind}>"] = value
    return scores


def meets_goals(figures: dict) -> list[str]:
    """The goals a verified circuit misses (empty when it meets every one)."""
    missed = []
    if figures["accuracy"] < ACCURACY_GOAL:
        missed.append(f"accuracy {figures['accuracy']:.3f} < {ACCURACY_GOAL}")
    for name in ("faithfulness_mean", "faithfulness_resample"):
        if figures[name] < FAITHFULNESS_GOAL:
            missed.append(f"{name} {figures[name]:.3f} < {FAITHFULNESS_GOAL}")
        elif figures[name] > 1 + FAITHFULNESS_TOLERANCE:
            missed.append(
                f"{name} {figures[name]:.3f} > {1 + FAITHFULNESS_TOLERANCE:.2f} (the other heads "
                "work against the task)"
            )
    for head, drop in figures["necessity"].items():
        if drop < NECESSITY_GOAL:
            missed.append(f"necessity of {head} {drop:.3f} < {NECESSITY_GOAL}")
    return missed
