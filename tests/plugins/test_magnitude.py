import pytest
import torch

from appbench import Head
from appbench.testing import check_pruner
from appbench_plugins.magnitude import MagnitudePruner, head_norms
from appbench_plugins.none import NonePruner


def test_none_keeps_every_head():
    space = check_pruner(NonePruner)
    assert len(space) == 4 and space.reduction == 0.0


def test_ov_norm_hand_computed_on_the_planted_model():
    from appbench.testing import planted_model

    norms = head_norms(planted_model(), "ov")
    # a0.h0 and a1.h0 read two tokens with weight +-1 (norm sqrt(2)); a0.h1 three fillers
    # (sqrt(3)); a1.h1 one channel (1).
    expected = torch.tensor([[2**0.5, 3**0.5], [2**0.5, 1.0]])
    torch.testing.assert_close(norms, expected)


def test_keeps_the_top_fraction_by_norm():
    assert check_pruner(MagnitudePruner, fraction=0.25).heads == {Head(0, 1)}
    half = check_pruner(MagnitudePruner, fraction=0.5)
    assert Head(0, 1) in half.heads and len(half) == 2 and Head(1, 1) not in half.heads
    assert half.scores["a1.h1"] == pytest.approx(1.0)


def test_bad_fraction_is_rejected():
    with pytest.raises(ValueError):
        MagnitudePruner.Params(fraction=1.5)
