"""Tasks: specs read from task.yaml, tokenised clean/corrupted prompt pairs, and the task metric.

A task turns a tokenizer into :class:`TaskData`: clean prompts, their corrupted counterparts
aligned token for token, the position whose next-token prediction is scored, the answer and
wrong-answer tokens, and template groups (used for per-template mean ablation). Tasks are
generic over tokenizers: every check (single-token answers, aligned lengths) is made with the
model's own tokenizer, and a tokenizer that cannot express the task raises :class:`TaskError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from appbench.circuit import Edge, Head

if TYPE_CHECKING:
    import torch

    from appbench.circuit import Circuit


class TaskError(ValueError):
    """A task cannot be generated (bad spec, a tokenizer that cannot express it, ...)."""


class TaskSpec(BaseModel):
    """The contents of a task folder's task.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]*$", description="CLI name of the task")
    version: str = Field(description="task version; bump when prompts or the metric change")
    summary: str = Field(description="one line shown by `appbench list tasks`")
    citation: str = Field(description="the paper the task comes from")
    metric: str = Field(description="what the per-prompt metric measures")
    n_search: int = Field(default=100, gt=0, description="prompts in the search split")
    n_eval: int = Field(default=200, gt=0, description="prompts in the held-out evaluation split")
    seed: int = Field(default=0, description="default generator seed")
    default_model: str | None = Field(
        default=None,
        description="model a run of this task uses when none is named (a registered model); "
        "default: the ground-truth zoo model zoo-gt-<task>, else zoo-multitask",
    )


@dataclass(frozen=True, eq=False)
class TaskData:
    """One split of a task, tokenised.

    Attributes:
        clean: [N, T] clean token ids, right-padded.
        corrupt: [N, T] corrupted token ids, aligned with ``clean`` position by position.
        lengths: [N] number of real (non-pad) tokens of each prompt.
        target_pos: [N] position whose next-token logits the metric reads.
        answers: [N, A] correct answer token ids (-1 pads rows with fewer answers).
        wrong: [N, W] wrong answer token ids (-1 pads).
        groups: [N] template id of each prompt, indexing ``group_names``.
        group_names: names of the templates.
        prompts: the clean prompt texts.
        corrupt_prompts: the corrupted prompt texts.
    """

    clean: torch.Tensor
    corrupt: torch.Tensor
    lengths: torch.Tensor
    target_pos: torch.Tensor
    answers: torch.Tensor
    wrong: torch.Tensor
    groups: torch.Tensor
    group_names: tuple[str, ...]
    prompts: tuple[str, ...] = field(default=())
    corrupt_prompts: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    @property
    def n_groups(self) -> int:
        return len(self.group_names)

    def pad_mask(self) -> torch.Tensor:
        """[N, T] True on real tokens, False on padding."""
        import torch

        positions = torch.arange(self.clean.shape[1], device=self.clean.device)
        return positions[None, :] < self.lengths[:, None]

    def to(self, device: str | torch.device) -> TaskData:
        return TaskData(
            self.clean.to(device),
            self.corrupt.to(device),
            self.lengths.to(device),
            self.target_pos.to(device),
            self.answers.to(device),
            self.wrong.to(device),
            self.groups.to(device),
            self.group_names,
            self.prompts,
            self.corrupt_prompts,
        )

    def fingerprint(self) -> str:
        """SHA-256 of the token ids, targets, answers and templates: equal exactly when two
        splits hold the same prompts in the same order."""
        import hashlib

        import torch

        digest = hashlib.sha256()
        for tensor in (
            self.clean,
            self.corrupt,
            self.target_pos,
            self.answers,
            self.wrong,
            self.groups,
        ):
            values = tensor.detach().to("cpu", dtype=torch.int64).contiguous()
            digest.update(str(tuple(values.shape)).encode())
            digest.update(values.numpy().tobytes())
        return digest.hexdigest()

    def select(self, index: Sequence[int]) -> TaskData:
        """The prompts at ``index``, in that order."""
        import torch

        idx = torch.as_tensor(list(index), dtype=torch.long)
        return TaskData(
            self.clean[idx],
            self.corrupt[idx],
            self.lengths[idx],
            self.target_pos[idx],
            self.answers[idx],
            self.wrong[idx],
            self.groups[idx],
            self.group_names,
            tuple(self.prompts[i] for i in idx.tolist()) if self.prompts else (),
            tuple(self.corrupt_prompts[i] for i in idx.tolist()) if self.corrupt_prompts else (),
        )


@dataclass(frozen=True)
class PromptPair:
    """One generated example before tokenisation.

    ``answers`` and ``wrong`` are strings that must each tokenise to exactly one token (with
    the leading space they carry in running text, e.g. " Mary"), or token ids of the
    generating tokenizer for answers that are no word of their own (the second subword token
    of a name need not re-encode to that token when encoded alone).
    """

    clean: str
    corrupt: str
    answers: tuple[str | int, ...]
    wrong: tuple[str | int, ...]
    group: str


def single_token_id(tokenizer: Any, text: str) -> int | None:
    """The id of ``text`` if the tokenizer encodes it as exactly one known token, else None.

    A word-level tokenizer encodes every unknown word as one ``<unk>`` token: that is no
    encoding of the word, so the unknown-token id counts as None.
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        return None
    unk = getattr(tokenizer, "unk_token_id", None)
    return None if unk is not None and ids[0] == unk else int(ids[0])


def answer_token_id(tokenizer: Any, answer: str | int) -> int | None:
    """The token id of a :class:`PromptPair` answer: an int is taken as an id (None when out
    of the vocabulary), a string must encode to one known token."""
    if isinstance(answer, int):
        unk = getattr(tokenizer, "unk_token_id", None)
        return answer if 0 <= answer < len(tokenizer) and answer != unk else None
    return single_token_id(tokenizer, answer)


def single_token_words(tokenizer: Any, words: Sequence[str], prefix: str = " ") -> list[str]:
    """The words that encode to one token once ``prefix`` is put before them."""
    return [w for w in words if single_token_id(tokenizer, prefix + w) is not None]


def tokenize_pairs(tokenizer: Any, pairs: Sequence[PromptPair], task: str) -> TaskData:
    """Tokenise prompt pairs into a right-padded, aligned :class:`TaskData`.

    The scored position is each prompt's last token. Raises TaskError when a clean prompt and
    its corruption differ in length or an answer is not a single token.
    """
    import torch

    if not pairs:
        raise TaskError(f"task {task!r}: no prompts were generated")
    group_names = tuple(sorted({p.group for p in pairs}))
    group_index = {g: i for i, g in enumerate(group_names)}
    clean_ids, corrupt_ids, answers, wrong = [], [], [], []
    for pair in pairs:
        c = tokenizer.encode(pair.clean, add_special_tokens=False)
        k = tokenizer.encode(pair.corrupt, add_special_tokens=False)
        if len(c) != len(k):
            raise TaskError(
                f"task {task!r}: clean and corrupted prompts tokenise to different lengths "
                f"({len(c)} vs {len(k)}) for {pair.clean!r} / {pair.corrupt!r}"
            )
        unk = getattr(tokenizer, "unk_token_id", None)
        if unk is not None and (unk in c or unk in k):
            raise TaskError(
                f"task {task!r}: the tokenizer has no token for a word of {pair.clean!r}"
            )
        ans = [answer_token_id(tokenizer, a) for a in pair.answers]
        wro = [answer_token_id(tokenizer, w) for w in pair.wrong]
        bad = [t for t, i in zip(pair.answers + pair.wrong, ans + wro, strict=True) if i is None]
        if bad:
            raise TaskError(
                f"task {task!r}: the tokenizer does not encode {bad!r} as single tokens"
            )
        clean_ids.append(c)
        corrupt_ids.append(k)
        answers.append(ans)
        wrong.append(wro)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None) or 0
    length = max(len(c) for c in clean_ids)

    def padded(rows: list[list[int]], width: int, fill: int) -> torch.Tensor:
        return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.long)

    lengths = torch.tensor([len(c) for c in clean_ids], dtype=torch.long)
    return TaskData(
        clean=padded(clean_ids, length, pad),
        corrupt=padded(corrupt_ids, length, pad),
        lengths=lengths,
        target_pos=lengths - 1,
        answers=padded(answers, max(map(len, answers)), -1),  # type: ignore[arg-type]
        wrong=padded(wrong, max(map(len, wrong)), -1),  # type: ignore[arg-type]
        groups=torch.tensor([group_index[p.group] for p in pairs], dtype=torch.long),
        group_names=group_names,
        prompts=tuple(p.clean for p in pairs),
        corrupt_prompts=tuple(p.corrupt for p in pairs),
    )


def distinct_pairs(task: str, n: int, draw: Callable[[int], PromptPair]) -> list[PromptPair]:
    """``n`` prompt pairs with distinct clean prompts, in order.

    ``draw(i)`` makes a candidate for slot ``i`` (generators cycle templates by slot); a
    candidate whose clean prompt was already drawn is discarded. Raises TaskError when the
    word lists cannot give ``n`` distinct prompts within 100 n + 1000 draws.
    """
    seen: set[str] = set()
    pairs: list[PromptPair] = []
    attempts = 0
    while len(pairs) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise TaskError(
                f"task {task!r}: cannot generate {n} distinct prompts from its word lists"
            )
        pair = draw(len(pairs))
        if pair.clean in seen:
            continue
        seen.add(pair.clean)
        pairs.append(pair)
    return pairs


def mean_of_ids(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean over the valid (>= 0) ids of each row of ``logits`` [N, V] at ``ids`` [N, K]."""
    valid = ids >= 0
    gathered = logits.gather(1, ids.clamp(min=0))
    return (gathered * valid).sum(1) / valid.sum(1).clamp(min=1)


def answer_columns(data: TaskData) -> torch.Tensor:
    """Sorted distinct answer and wrong-answer ids of ``data`` (the -1 padding left out)."""
    import torch

    ids = torch.cat([data.answers.flatten(), data.wrong.flatten()])
    return torch.unique(ids[ids >= 0])


class Task:
    """Base class of tasks; a task folder subclasses it and implements :meth:`generate`.

    Subclasses set ``package`` to their folder's import path; the spec is read from its
    task.yaml and reference circuits from its ``reference/`` folder. A task built from a
    :class:`TaskSpec` in code can still ship reference circuits: ``Task(spec, package=...)``
    names the package whose ``reference/`` folder holds them.
    """

    package: ClassVar[str] = ""

    def __init__(self, spec: TaskSpec | None = None, package: str | None = None) -> None:
        if package is not None:
            self.package = package  # type: ignore[misc]
        if spec is None and not self.package:
            raise TaskError(f"{type(self).__name__} needs a `package` with a task.yaml, or a spec")
        self.spec = spec if spec is not None else load_spec(resources.files(self.package))

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def summary(self) -> str:
        return self.spec.summary

    def generate(self, tokenizer: Any, n: int, seed: int) -> list[PromptPair]:
        """Return ``n`` distinct prompt pairs, deterministically for a given seed."""
        raise NotImplementedError

    def vocabulary(self) -> list[str]:
        """Every word the generator can emit (word-level tokenizers of zoo models are built
        from it); tasks that only work with subword tokenizers may leave it unimplemented."""
        raise NotImplementedError(f"task {self.name!r} does not list its vocabulary")

    def metric(self, logits: torch.Tensor, data: TaskData) -> torch.Tensor:
        """Per-prompt metric from the logits at the target position ([N, V] -> [N]).

        The default is the mean logit of the answers minus the mean logit of the wrong
        answers: logit(IO) - logit(S) for IOI.
        """
        return mean_of_ids(logits, data.answers) - mean_of_ids(logits, data.wrong)

    def metric_columns(self, data: TaskData) -> torch.Tensor | None:
        """The sorted vocabulary ids whose logits :meth:`metric` reads on ``data``, or None
        when it may read any of them (a softmax over the vocabulary, say).

        The patching engine then computes only these logits and hands :meth:`metric` logits
        [N, C] with ``data``'s answer ids renumbered to columns. The default metric reads the
        answers and wrong answers; a task that overrides :meth:`metric` gets None unless it
        overrides this method too.
        """
        if type(self).metric is not Task.metric:
            return None
        return answer_columns(data)

    def splits(
        self,
        tokenizer: Any,
        n_search: int | None = None,
        n_eval: int | None = None,
        seed: int | None = None,
    ) -> tuple[TaskData, TaskData]:
        """The search split and the held-out evaluation split; no prompt appears in both."""
        n_s = n_search or self.spec.n_search
        n_e = n_eval or self.spec.n_eval
        pairs = self.generate(tokenizer, n_s + n_e, self.spec.seed if seed is None else seed)
        if len({p.clean for p in pairs}) != len(pairs):
            raise TaskError(f"task {self.name!r}: the generator returned duplicate prompts")
        search = tokenize_pairs(tokenizer, pairs[:n_s], self.name)
        evaluation = tokenize_pairs(tokenizer, pairs[n_s:], self.name)
        return search, evaluation

    def reference_file(self, model_name: str) -> ReferenceFile | None:
        """The reference circuits shipped for ``model_name`` (``reference/<model>.json``)."""
        if not self.package:
            return None
        folder = resources.files(self.package).joinpath("reference")
        entry = folder.joinpath(f"{model_name.replace('/', '__')}.json")
        if not entry.is_file():
            return None
        try:
            return ReferenceFile.model_validate_json(entry.read_text(encoding="utf-8"))
        except ValidationError as exc:
            # The first problem itself, not pydantic's "1 validation error for ..." header.
            problem = exc.errors()[0]
            where = ".".join(str(part) for part in problem["loc"])
            said = f"{where}: {problem['msg']}" if where else problem["msg"]
            raise TaskError(f"{entry}: invalid reference file ({said})") from exc
        except (OSError, UnicodeDecodeError) as exc:
            first = str(exc).splitlines()[0]
            raise TaskError(f"{entry}: invalid reference file ({first})") from exc

    def reference(self, model_name: str) -> tuple[str, ReferenceCircuit] | None:
        """The default reference circuit for ``model_name`` and its key, or None."""
        shipped = self.reference_file(model_name)
        if shipped is None:
            return None
        return shipped.default, shipped.circuits[shipped.default]


class ReferenceCircuit(BaseModel):
    """One reference circuit with its provenance."""

    model_config = ConfigDict(extra="forbid")

    heads: list[str] = Field(description="head ids, e.g. a9.h6")
    kind: Literal["ground-truth", "method-derived"] = Field(
        default="method-derived",
        description="'ground-truth': built into the model and verified by ablation; "
        "'method-derived': the output of a discovery method, with its parameters",
    )
    n_layers: int = Field(gt=0, description="layers of the model")
    n_heads: int = Field(gt=0, description="heads per layer")
    source: str = Field(description="paper or command the circuit comes from")
    method: str = Field(description="how it was found (manual path patching, automated PP, ...)")
    parameters: dict[str, Any] = Field(default_factory=dict, description="settings of the method")
    version: str = Field(description="version of this reference; bump when the heads change")
    classes: dict[str, list[str]] = Field(
        default_factory=dict, description="optional functional classes of heads (name movers, ...)"
    )
    edges: list[str] = Field(
        default_factory=list,
        description="optional edges between the circuit's heads, 'a0.h1->a2.h3<k>' and "
        "'a3.h6->logits' (EAP-IG/MIB names), for edge-level overlap",
    )
    notes: str = Field(default="", description="caveats (MLPs left out, unverified lists, ...)")

    @model_validator(mode="after")
    def _heads_inside_the_model(self) -> ReferenceCircuit:
        for head_id in self.heads:
            try:
                head = Head.parse(head_id)
            except ValueError as exc:
                raise ValueError(f"bad head id {head_id!r}: {exc}") from None
            if head.layer >= self.n_layers or head.head >= self.n_heads:
                raise ValueError(
                    f"head {head_id} lies outside the {self.n_layers}x{self.n_heads} model"
                )
        members = set(self.heads)
        for edge_id in self.edges:
            edge = Edge.parse(edge_id)
            ends = [edge.sender] + ([edge.receiver] if edge.receiver is not None else [])
            if any(end.id not in members for end in ends):
                raise ValueError(f"edge {edge_id} joins a head outside the circuit")
        return self

    def circuit(self) -> Circuit:
        from appbench.circuit import Circuit

        return Circuit(self.n_layers, self.n_heads, frozenset(Head.parse(h) for h in self.heads))


class ReferenceFile(BaseModel):
    """``reference/<model>.json`` of a task folder: named circuits and which one is the default."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(description="task name")
    model: str = Field(description="model name")
    default: str = Field(description="key of the circuit overlap is measured against")
    circuits: dict[str, ReferenceCircuit] = Field(description="circuits by key")

    def model_post_init(self, context: Any) -> None:
        if self.default not in self.circuits:
            raise ValueError(
                f"default circuit {self.default!r} is not among {sorted(self.circuits)}"
            )


def load_spec(folder: Traversable) -> TaskSpec:
    """Read and validate ``task.yaml`` in a task folder."""
    entry = folder.joinpath("task.yaml")
    try:
        raw = yaml.safe_load(entry.read_text())
        return TaskSpec.model_validate(raw)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise TaskError(f"{entry}: invalid task.yaml ({exc})") from exc
