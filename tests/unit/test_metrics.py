import math

import pytest

from appbench import Head
from appbench.metrics import faithfulness, overlap, reduction, speedup


def test_faithfulness_hand_computed():
    f = faithfulness(m_model=4.0, m_empty=1.0, m_circuit=3.0)
    assert f.percent == pytest.approx(75.0)
    assert f.normalised == pytest.approx(2.0 / 3.0)
    assert not f.degenerate and not f.inverted


def test_faithfulness_is_unclamped_and_flags_problems():
    above = faithfulness(2.0, 0.0, 3.0)
    assert above.percent == pytest.approx(150.0) and above.normalised == pytest.approx(1.5)
    degenerate = faithfulness(1.0, 1.0 + 1e-9, 0.5)
    assert degenerate.degenerate and math.isnan(degenerate.normalised)
    inverted = faithfulness(-1.0, 1.0, 0.0)
    assert inverted.inverted and inverted.normalised == pytest.approx(0.5)
    assert math.isnan(faithfulness(0.0, -1.0, 0.5).percent)
    assert faithfulness(0.0, -1.0, 0.5).to_dict()["percent"] is None


def test_overlap_hand_computed():
    c = {Head(0, 0), Head(0, 1), Head(1, 0)}
    r = {Head(0, 1), Head(1, 0), Head(1, 1), Head(2, 2)}
    o = overlap(c, r)
    assert (o.intersection, o.circuit_size, o.reference_size) == (2, 3, 4)
    assert o.precision == pytest.approx(2 / 3)
    assert o.recall == pytest.approx(1 / 2)
    assert o.f1 == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))
    assert o.iou == pytest.approx(2 / 5)


def test_overlap_edge_cases():
    assert overlap(set(), {Head(0, 0)}).precision == 0.0
    assert overlap(set(), set()).iou == 1.0
    same = overlap({Head(0, 0)}, {Head(0, 0)})
    assert (same.precision, same.recall, same.f1, same.iou) == (1.0, 1.0, 1.0, 1.0)


def test_reduction_and_speedup():
    assert reduction(50, 144) == pytest.approx(1 - 50 / 144)
    with pytest.raises(ValueError):
        reduction(1, 0)
    s = speedup(10.0, 2.5)
    assert s.ratio == pytest.approx(4.0) and s.percent == pytest.approx(75.0)
    assert math.isnan(speedup(0.0, 1.0).ratio)


def test_score_auroc_ranks_by_absolute_score():
    from appbench.metrics import score_auroc

    universe = ["a", "b", "c", "d"]
    # Perfect ranking by |score| (the sign does not matter), then a fully inverted one.
    assert score_auroc({"a": -3.0, "b": 2.0, "c": 0.1}, {"a", "b"}, universe) == 1.0
    assert score_auroc({"c": 3.0, "d": 2.0, "a": 0.1}, {"a", "b"}, universe) == 0.0
    # One positive ranked between the two negatives: 1 of 2 pairs right; b, unscored, ties d.
    assert score_auroc({"c": 3.0, "a": 2.0}, {"a"}, ["a", "c", "d"]) == pytest.approx(0.5)
    # A positive outside the universe is ranked too (score 0).
    assert score_auroc({"a": 1.0}, {"a", "z"}, ["a", "b"]) == pytest.approx(0.75)
    # No ROC when every item is on one side.
    assert score_auroc({"a": 1.0}, {"a", "b"}, ["a", "b"]) is None
    assert score_auroc({"a": 1.0}, set(), ["a", "b"]) is None


def test_overlap_sets_on_hand_counted_edges():
    from appbench.metrics import overlap_sets

    found = {"a0.h1->logits", "a0.h1->a1.h0<v>", "a0.h2->a1.h0<q>"}
    reference = {"a0.h1->logits", "a0.h1->a1.h0<v>"}
    precision, recall, f1 = overlap_sets(found, reference)
    assert (precision, recall) == (pytest.approx(2 / 3), 1.0)
    assert f1 == pytest.approx(0.8)
    assert overlap_sets(set(), reference) == (0.0, 0.0, 0.0)


def test_pessimistic_auc_hand_computed():
    from appbench.metrics import pessimistic_auc

    assert pessimistic_auc([(0.0, 1.0)]) == 1.0  # a perfect run
    assert pessimistic_auc([]) == 0.0  # only (0,0) and (1,1)
    assert pessimistic_auc([(0.0, 0.0), (1.0, 1.0)]) == 0.0
    # (0,0), (.25,.5), (.5,.75), (1,1): 0 + .75·.5 + .5·.25 + 0·.25
    two = [(0.25, 0.5), (0.5, 0.75)]
    assert pessimistic_auc(two) == pytest.approx(0.5)
    # (.75,.25) is dominated by (.25,.5): ignored, though sorted in it would subtract .125.
    assert pessimistic_auc([*two, (0.75, 0.25)]) == pytest.approx(0.5)
    # So is (.5,.5), weakly; and the order points come in does not matter.
    assert pessimistic_auc([(0.5, 0.5), *reversed(two)]) == pytest.approx(0.5)


@pytest.mark.parametrize("point", [(-0.1, 0.5), (0.5, 1.5), (float("nan"), 0.5)])
def test_pessimistic_auc_refuses_points_outside_the_square(point):
    from appbench.metrics import pessimistic_auc

    with pytest.raises(ValueError, match="outside"):
        pessimistic_auc([point])


def test_roc_point_hand_counted():
    from appbench.metrics import roc_point

    universe = ["a", "b", "c", "d", "e"]
    # TP a; FN b; FP c; TN d, e.
    assert roc_point({"a", "c"}, {"a", "b"}, universe) == (pytest.approx(1 / 3), 0.5)
    assert roc_point(set(), {"a", "b"}, universe) == (0.0, 0.0)
    assert roc_point(universe, {"a", "b"}, universe) == (1.0, 1.0)


@pytest.mark.parametrize(
    ("found", "reference", "match"),
    [
        (set(), set(), "empty"),
        (set(), {"a", "b"}, "whole universe"),
        (set(), {"a", "z"}, "reference items outside"),
        ({"z"}, {"a"}, "found items outside"),
    ],
)
def test_roc_point_refuses_meaningless_input(found, reference, match):
    from appbench.metrics import roc_point

    with pytest.raises(ValueError, match=match):
        roc_point(found, reference, ["a", "b"])


def test_f1_from_counts_never_exceeds_equal_precision_and_recall():
    # 4 shared of 5 and 5: from the rounded ratios 2pr/(p+r) gave 0.8000000000000002.
    c = {Head(0, h) for h in range(5)}
    r = {Head(0, h) for h in range(1, 6)}
    o = overlap(c, r)
    assert (o.precision, o.recall, o.f1) == (0.8, 0.8, 0.8)
