"""Model ``example-polarity``: a 2-layer, 4-head attention-only transformer wired by hand.

No weights ship with the package: the loader builds a TransformerLens model with
:func:`appbench.build_model`, a word-level tokenizer over the polarity task's words with
:func:`appbench.word_level_tokenizer` (ids 0, 1, 2 are its special tokens ``<pad>``,
``<unk>``, ``<eos>``; the words follow in the order given), and sets every weight.

Every head attends uniformly (W_Q = W_K = 0). The one-hot token embedding fills residual
channels 0-15. The circuit (the task's ground-truth reference):

- ``a0.h2`` reads the polarity word through its value (+1 for "good", -1 for "bad") and writes
  it into channel 16;
- ``a1.h3`` reads channel 16 through its value and writes it into channel 17;
- the unembedding reads channel 17: logit(yes) - logit(no) = 2 x channel 17.

Distractors act but never reach the logits: ``a0.h0`` copies the nouns into channel 18, and
``a1.h1`` reads the polarity word too but writes into channel 19, which nothing reads.
"""

from appbench import build_model, word_level_tokenizer

MODEL_NAME = "example-polarity"


def load_polarity_model(device: str = "cpu"):
    """The hand-wired model on ``device``, with its tokenizer, in eval mode."""
    import torch

    from appbench_example.polarity import PolarityTask

    tokenizer = word_level_tokenizer(PolarityTask().vocabulary())
    vocab = tokenizer.get_vocab()
    config = {
        "n_layers": 2,
        "n_heads": 4,
        "d_model": 24,
        "d_head": 4,
        "n_ctx": 8,
        "d_vocab": len(vocab),
        "attn_only": True,
        "normalization_type": None,
        "positional_embedding_type": "standard",
        "model_name": MODEL_NAME,
    }
    model = build_model(config, tokenizer, device)
    state = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for index in vocab.values():
        state["embed.W_E"][index, index] = 1.0
    good, bad = vocab["good"], vocab["bad"]
    # a0.h2: polarity -> channel 16.
    state["blocks.0.attn.W_V"][2, good, 0] = 1.0
    state["blocks.0.attn.W_V"][2, bad, 0] = -1.0
    state["blocks.0.attn.W_O"][2, 0, 16] = 1.0
    # a0.h0: nouns -> channel 18 (a live head that reaches nothing).
    for noun in PolarityTask.NOUNS:
        state["blocks.0.attn.W_V"][0, vocab[noun], 0] = 1.0
    state["blocks.0.attn.W_O"][0, 0, 18] = 1.0
    # a1.h1: polarity again, into channel 19, which the unembedding ignores.
    state["blocks.1.attn.W_V"][1, good, 0] = 1.0
    state["blocks.1.attn.W_V"][1, bad, 0] = -1.0
    state["blocks.1.attn.W_O"][1, 0, 19] = 1.0
    # a1.h3: channel 16 through its value -> channel 17.
    state["blocks.1.attn.W_V"][3, 16, 0] = 1.0
    state["blocks.1.attn.W_O"][3, 0, 17] = 1.0
    state["unembed.W_U"][17, vocab["yes"]] = 1.0
    state["unembed.W_U"][17, vocab["no"]] = -1.0
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False)
    model.eval()
    return model
