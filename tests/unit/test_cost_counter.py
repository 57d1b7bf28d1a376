"""The runner's analytic FLOP count against torch.utils.flop_counter, and pass counting."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from appbench import build_model
from appbench.runner import CostCounter

CONFIGS = {
    "mlp-layernorm": {"d_mlp": 256, "act_fn": "gelu", "normalization_type": "LN"},
    "attention-only": {"attn_only": True, "normalization_type": "LN"},
    "gqa-rotary-gated": {
        "n_key_value_heads": 2,
        "d_mlp": 128,
        "act_fn": "silu",
        "normalization_type": "RMS",
        "gated_mlp": True,
        "positional_embedding_type": "rotary",
    },
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_analytic_flops_equal_torch_flop_counter(name):
    model = build_model(
        {"n_layers": 2, "n_heads": 4, "d_model": 64, "d_head": 16, "n_ctx": 32, "d_vocab": 100}
        | CONFIGS[name]
    )
    counter = CostCounter(model)
    tokens = torch.randint(0, 100, (3, 10))
    with FlopCounterMode(display=False) as reference, torch.no_grad():
        model(tokens)
    counter.remove()
    assert counter.tally.flops == reference.get_total_flops()
    assert counter.tally.calls == 1
    assert counter.tally.layer_rows == 2 * 3 and counter.tally.layer_tokens == 2 * 30


def test_partial_passes_count_only_the_layers_run():
    model = build_model(
        {
            "n_layers": 4,
            "n_heads": 2,
            "d_model": 32,
            "d_head": 8,
            "n_ctx": 16,
            "d_vocab": 20,
            "attn_only": True,
        }
    )
    counter = CostCounter(model)
    with torch.no_grad():
        resid = model(torch.randint(0, 20, (5, 6)), stop_at_layer=0)
        model(resid, start_at_layer=3)
    counter.remove()
    assert counter.tally.layer_rows == 5  # one block of 5 rows: a quarter of a pass each
    with torch.no_grad():
        model(torch.randint(0, 20, (5, 6)))
    assert counter.tally.layer_rows == 5  # removed hooks count nothing


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_backward_flops_equal_torch_flop_counter(name):
    model = build_model(
        {"n_layers": 2, "n_heads": 4, "d_model": 64, "d_head": 16, "n_ctx": 32, "d_vocab": 100}
        | CONFIGS[name]
    )
    counter = CostCounter(model)
    tokens = torch.randint(0, 100, (3, 10))
    with FlopCounterMode(display=False) as reference:
        model(tokens).sum().backward()
    counter.remove()
    assert counter.tally.flops + counter.tally.backward_flops == reference.get_total_flops()
    assert counter.tally.backward_flops == 2 * counter.tally.flops
    assert counter.tally.backward_prompt_passes == 3  # 3 prompts, every layer
    # Without gradients nothing is counted backwards.
    counter = CostCounter(model)
    with torch.no_grad():
        model(tokens)
    counter.remove()
    assert counter.tally.backward_flops == 0 and counter.tally.backward_prompt_passes == 0
