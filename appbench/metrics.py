"""Faithfulness, overlap, search-space reduction and speedup (definitions in METRICS.md).

Pure functions on numbers and head sets, so that each can be checked on hand-computed cases.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from appbench.circuit import Head

#: For each reported measure, whether a higher value is better (leaderboard arrows).
HIGHER_IS_BETTER: dict[str, bool] = {
    "faithfulness_percent": True,
    "faithfulness_normalised": True,
    "precision": True,
    "recall": True,
    "f1": True,
    "iou": True,
    "reduction": True,
    "speedup_wall": True,
    "speedup_prompt_passes": True,
    "speedup_flops": True,
    "circuit_size": False,
    "search_space_size": False,
    "wall_seconds": False,
    "prompt_passes": False,
    "flops": False,
    # A leaderboard's mean rank across tasks: rank 1 is the best row of a task.
    "mean_rank": False,
}

#: Denominators smaller than this make normalised faithfulness meaningless.
DEGENERATE_EPS = 1e-6


@dataclass(frozen=True)
class Faithfulness:
    """Faithfulness of a circuit, both ways the field reports it.

    Attributes:
        m_model: m(M), mean metric of the full model on clean prompts.
        m_empty: m(∅), mean metric with every head mean-ablated.
        m_circuit: m(C), mean metric with every head outside the circuit mean-ablated.
        percent: APP/IOI-style 100·m(C)/m(M) (NaN when m(M) is 0).
        normalised: EAP-IG/MIB-style (m(C)−m(∅))/(m(M)−m(∅)), raw and unclamped
            (NaN when the denominator is degenerate).
        degenerate: |m(M)−m(∅)| < 1e-6.
        inverted: m(M) < m(∅).
    """

    m_model: float
    m_empty: float
    m_circuit: float
    percent: float
    normalised: float
    degenerate: bool
    inverted: bool

    def to_dict(self) -> dict[str, float | bool | None]:
        return {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in asdict(self).items()
        }


def faithfulness(m_model: float, m_empty: float, m_circuit: float) -> Faithfulness:
    """Both faithfulness scores from the three mean metrics (ratio of means, METRICS.md 4.1/4.2)."""
    denom = m_model - m_empty
    degenerate = abs(denom) < DEGENERATE_EPS
    # The ratio first: 100 * (m / m) is exactly 100 for the full model, (100 * m) / m not.
    percent = 100.0 * (m_circuit / m_model) if m_model != 0 else math.nan
    normalised = math.nan if degenerate else (m_circuit - m_empty) / denom
    return Faithfulness(
        m_model, m_empty, m_circuit, percent, normalised, degenerate, m_model < m_empty
    )


@dataclass(frozen=True)
class Overlap:
    """Overlap of a circuit C with a reference circuit R (head sets)."""

    precision: float
    recall: float
    f1: float
    iou: float
    intersection: int
    circuit_size: int
    reference_size: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def overlap(circuit: Iterable[Head], reference: Iterable[Head]) -> Overlap:
    """Precision |C∩R|/|C|, recall (TPR) |C∩R|/|R|, F1 and IoU |C∩R|/|C∪R|.

    Empty sides are defined once for all four (:func:`_set_scores`): two empty sets agree
    perfectly (1.0 each); an empty side against a non-empty one scores 0.0 each.
    """
    c, r = set(circuit), set(reference)
    precision, recall, f1, iou = _set_scores(c, r)
    return Overlap(precision, recall, f1, iou, len(c & r), len(c), len(r))


def _set_scores(found: set[Any], reference: set[Any]) -> tuple[float, float, float, float]:
    """(precision, recall, F1, IoU), with 1.0 for each when both sets are empty (they agree)
    and 0.0 for a ratio over an empty side otherwise."""
    if not found and not reference:
        return 1.0, 1.0, 1.0, 1.0
    inter = len(found & reference)
    precision = inter / len(found) if found else 0.0
    recall = inter / len(reference) if reference else 0.0
    # 2|C∩R| / (|C| + |R|), the harmonic mean of the two, from the counts: computed from the
    # rounded ratios it can exceed both (0.8000000000000002 from 0.8 and 0.8).
    f1 = 2 * inter / (len(found) + len(reference))
    return precision, recall, f1, inter / len(found | reference)


def overlap_sets(found: set[str], reference: set[str]) -> tuple[float, float, float]:
    """(precision, recall, F1) of any two sets of ids, e.g. edges; empty sides as in
    :func:`overlap`."""
    precision, recall, f1, _ = _set_scores(found, reference)
    return precision, recall, f1


def score_auroc(
    scores: Mapping[str, float], positives: Iterable[str], universe: Iterable[str]
) -> float | None:
    """Score-sweep AUROC (METRICS.md 4.4, AutoCircuit's variant): rank ``universe`` by
    |score| (unscored items score 0) against membership in ``positives``. None when every item
    is on one side (no ROC exists). Not comparable with ACDC's threshold-sweep AUC."""
    from sklearn.metrics import roc_auc_score

    items = sorted(set(universe) | set(positives))
    truth = set(positives)
    labels = [item in truth for item in items]
    if all(labels) or not any(labels):
        return None
    return float(roc_auc_score(labels, [abs(scores.get(item, 0.0)) for item in items]))


def roc_point(
    found: Iterable[str], reference: Iterable[str], universe: Iterable[str]
) -> tuple[float, float]:
    """(FPR, TPR) of one found set against a reference, both inside ``universe`` (METRICS.md
    4.4, step 2): TPR = TP/(TP+FN) over the reference, FPR = FP/(FP+TN) over the rest.

    Raises:
        ValueError: when the rates mean nothing: an empty reference, a reference that is the
            whole universe, or a found or reference item outside the universe.
    """
    f, r, u = set(found), set(reference), set(universe)
    if not r:
        raise ValueError("the reference is empty: no true positive rate exists")
    if r == u:
        raise ValueError("the reference is the whole universe: no false positive rate exists")
    for name, items in (("reference", r), ("found", f)):
        if not items <= u:
            outside = sorted(items - u)
            raise ValueError(f"{name} items outside the universe: {', '.join(outside[:3])}")
    return len(f - r) / len(u - r), len(f & r) / len(r)


def pessimistic_auc(points: Iterable[tuple[float, float]]) -> float:
    """ACDC's pessimistic step AUC of a threshold sweep's (FPR, TPR) points (METRICS.md 4.4,
    steps 4-5): add (0,0) and (1,1), keep the Pareto-optimal points, sort by (x, y) and sum
    (1 - x_i)(y_i - y_{i-1}). Each point's TPR counts only from its FPR on: no interpolation
    between runs, hence pessimistic. Not comparable with the score-sweep AUROC.

    Raises:
        ValueError: for a point outside [0, 1]² (or NaN).
    """
    given = {(float(x), float(y)) for x, y in points}
    for x, y in given:
        if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
            raise ValueError(f"ROC point ({x}, {y}) lies outside [0, 1]²")
    given |= {(0.0, 0.0), (1.0, 1.0)}
    # A point is dropped when another is at least as good on both axes (no more false
    # positives, no fewer true ones); what remains rises with x.
    front = sorted(
        p for p in given if not any(q != p and q[0] <= p[0] and q[1] >= p[1] for q in given)
    )
    area, previous = 0.0, 0.0
    for x, y in front:
        area += (1.0 - x) * (y - previous)
        previous = y
    return area


def reduction(space_size: int, total_heads: int) -> float:
    """APP's search-space reduction 1 − |space|/|heads|."""
    if total_heads <= 0:
        raise ValueError("total_heads must be positive")
    return 1.0 - space_size / total_heads


@dataclass(frozen=True)
class Speedup:
    """A cost compared with a baseline: both the ratio and APP's percentage."""

    ratio: float
    percent: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def speedup(baseline: float, new: float) -> Speedup:
    """t_base/t_new and APP's 100·(1 − t_new/t_base)."""
    if baseline <= 0 or new <= 0:
        return Speedup(math.nan, math.nan)
    return Speedup(baseline / new, 100.0 * (1.0 - new / baseline))
