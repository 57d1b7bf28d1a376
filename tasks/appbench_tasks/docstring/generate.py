'''Docstring prompt generator (Heimersheim and Janiak 2023), corrupted in the "random_random" way.

A clean prompt is a Python method whose reST docstring documents its arguments in order and
breaks off at the next ``:param``; the model should name the next argument of the def::

    def load(self, port, size, files, mode, user, path):
        """crime population oil

        :param size: unit dark
        :param files: piece column
        :param                                        -> " mode"

The layout is the one APP uses (one def argument before the three matching ones, two after,
no documented argument before them, three description words for the method and two per
argument). The corruption replaces the three matching arguments of the def and the two
documented ones by five fresh names (three in the def, two others in the docstring), so
neither the def nor the docstring tells which name comes next. The metric is
logit(correct) - max logit(wrong) per prompt, the wrong names being the five other def
arguments and the five names the corruption brings in.
'''

from __future__ import annotations

import keyword
import random
from typing import TYPE_CHECKING, Any

from appbench import (
    PromptPair,
    Task,
    TaskData,
    TaskError,
    answer_columns,
    distinct_pairs,
    single_token_id,
    single_token_words,
)

if TYPE_CHECKING:
    import torch

N_PREFIX, N_MATCHING, N_SUFFIX = 1, 3, 2
METHOD_DESC_LEN, ARG_DESC_LEN = 3, 2
#: Names drawn per prompt: the method, the def arguments, and the corruption's fresh names.
N_NAMES = 1 + N_PREFIX + N_MATCHING + N_SUFFIX + N_MATCHING + (N_MATCHING - 1)
N_DESC = METHOD_DESC_LEN + (N_MATCHING - 1) * ARG_DESC_LEN
INDENT = "    "
GROUP = "rest"

#: Identifier-like names for the method and its arguments; our own list.
NAMES = (
    "data", "name", "value", "path", "key", "mode", "count", "index", "item", "text", "line",
    "user", "node", "root", "color", "width", "height", "depth", "limit", "level", "label",
    "group", "field", "token", "state", "query", "result", "source", "target", "model",
    "image", "order", "score", "title", "page", "date", "code", "role", "step", "shape",
    "scale", "seed", "rate", "format", "parent", "child", "record", "message", "event",
    "channel", "buffer", "layer", "block", "frame", "point", "size", "files", "port", "load",
    "host", "config", "options", "status", "content", "session", "server", "output", "input",
    "number", "filename", "header", "version", "prefix", "suffix", "offset", "length", "mask",
    "weight", "delay", "timeout",
)  # fmt: skip
#: Description words, disjoint from NAMES; our own list of common nouns and adjectives.
DESC_WORDS = (
    "crime", "population", "unit", "dark", "oil", "column", "piece", "river", "garden",
    "history", "market", "village", "summer", "island", "doctor", "kitchen", "letter",
    "animal", "bridge", "church", "forest", "engine", "mountain", "window", "bottle",
    "teacher", "machine", "station", "captain", "cotton", "silver", "winter", "valley",
    "harbor", "sugar", "wooden", "golden", "empty", "ancient", "quiet", "bright", "heavy",
    "narrow", "simple", "strange", "warm", "wild", "public", "royal", "final",
)  # fmt: skip


def layout(method: str, def_args: list[str], doc_args: list[str], desc: list[str]) -> str:
    """The prompt text: the def line, the docstring's summary line, one ``:param`` line per
    documented argument, and the open ``:param`` the model completes."""
    method_desc = " ".join(desc[:METHOD_DESC_LEN])
    lines = [f"def {method}(self, {', '.join(def_args)}):", f'{INDENT}"""{method_desc}', ""]
    for i, arg in enumerate(doc_args):
        start = METHOD_DESC_LEN + i * ARG_DESC_LEN
        lines.append(f"{INDENT}:param {arg}: {' '.join(desc[start : start + ARG_DESC_LEN])}")
    lines.append(f"{INDENT}:param")
    return "\n".join(lines)


def vocabulary() -> list[str]:
    """Every word the generator can emit, for building word-level tokenizers (which split
    ``:param`` and the triple quote into punctuation marks and words)."""
    return sorted({"def", "self", "param", "(", ")", ",", ":", '"', *NAMES, *DESC_WORDS})


class DocstringTask(Task):
    """Docstring argument completion; metric logit(correct) - max logit(wrong) per prompt."""

    package = "appbench_tasks.docstring"

    def vocabulary(self) -> list[str]:
        return vocabulary()

    def metric(self, logits: torch.Tensor, data: TaskData) -> torch.Tensor:
        """logit(correct name) - max over the wrong names, row by row (each prompt against its
        own wrong names only; the sign is such that higher is better)."""
        correct = logits.gather(1, data.answers[:, :1].clamp(min=0))[:, 0]
        wrong = logits.gather(1, data.wrong.clamp(min=0))
        wrong = wrong.masked_fill(data.wrong < 0, float("-inf"))
        return correct - wrong.max(dim=1).values

    def metric_columns(self, data: TaskData) -> torch.Tensor:
        """The metric reads the correct and wrong names' logits only."""
        return answer_columns(data)

    def generate(self, tokenizer: Any, n: int, seed: int) -> list[PromptPair]:
        names = [w for w in single_token_words(tokenizer, NAMES) if not keyword.iskeyword(w)]
        desc_words = single_token_words(tokenizer, DESC_WORDS)
        # The summary's first word follows the quotes without a space; it must be one token
        # there too, or prompt lengths would vary within the template.
        openers = [w for w in desc_words if single_token_id(tokenizer, w) is not None]
        fixed = [w for w in ("def", "self", "param") if single_token_id(tokenizer, w) is None]
        if len(names) < N_NAMES or len(desc_words) < N_DESC or not openers or fixed:
            raise TaskError(
                "task 'docstring': the tokenizer cannot express the task: "
                f"{len(names)} single-token names (need {N_NAMES}), {len(desc_words)} "
                f"single-token description words (need {N_DESC}, one of them a single token "
                f"without its leading space too); not single tokens: {fixed}"
            )
        rng = random.Random(seed)

        def draw(index: int) -> PromptPair:
            method, *drawn = rng.sample(names, N_NAMES)
            prefix, drawn = drawn[:N_PREFIX], drawn[N_PREFIX:]
            matching, drawn = drawn[:N_MATCHING], drawn[N_MATCHING:]
            suffix, drawn = drawn[:N_SUFFIX], drawn[N_SUFFIX:]
            fresh_def, fresh_doc = drawn[:N_MATCHING], drawn[N_MATCHING:]
            opener = rng.choice(openers)
            desc = [opener, *rng.sample([w for w in desc_words if w != opener], N_DESC - 1)]
            clean = layout(method, prefix + matching + suffix, matching[:-1], desc)
            corrupt = layout(method, prefix + fresh_def + suffix, fresh_doc, desc)
            answer = matching[-1]
            wrong = [a for a in prefix + matching + suffix + fresh_def + fresh_doc if a != answer]
            return PromptPair(clean, corrupt, (" " + answer,), tuple(" " + w for w in wrong), GROUP)

        return distinct_pairs("docstring", n, draw)
