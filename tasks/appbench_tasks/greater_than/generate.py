"""Greater-than prompt generator (Hanna, Liu, Variengien 2023), corrupted by the "01" start year.

A clean prompt reads "The {noun} lasted from the year {CC}{YY} to the year {CC}"; a model that
understands it puts its probability on two-digit continuations greater than YY. The corruption
sets the start year to {CC}01, after which almost every year is a valid end year, so the
information "the end year must exceed YY" is gone while the sentence stays aligned token for
token. The metric is the probability mass on the years YY+1..99 minus the mass on 00..YY.

Years must tokenise the same way as their "01" corruption: with GPT-2's BPE " 1732" is
" 17" + "32" (the two-digit token without a leading space, the token the model then
predicts), but some years are single tokens (" 1280") or split elsewhere (" 1102" is
" 110" + "2"); those are dropped, per tokenizer. Word-level tokenizers keep each year as one
word, so their vocabulary lists every four-digit year.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from appbench import PromptPair, Task, TaskData, TaskError, single_token_id, single_token_words

if TYPE_CHECKING:
    import torch

TEMPLATE = "The {NOUN} lasted from the year {CENTURY}{YY} to the year {CENTURY}"

#: Centuries 11..17, as in Hanna et al.; the start year YY runs over 02..98 so that both the
#: answers (YY+1..99) and the wrong years (00..YY) are never empty.
CENTURIES = tuple(str(c) for c in range(11, 18))
START_YEARS = tuple(range(2, 99))
CORRUPT_YY = "01"

#: Nouns for spans of time; our own list.
NOUNS = (
    "war", "reign", "siege", "trial", "journey", "drought", "famine", "treaty", "rebellion",
    "revolt", "plague", "dynasty", "expedition", "voyage", "campaign", "conflict",
    "occupation", "crisis", "boom", "strike", "festival", "tour", "marriage", "alliance",
    "exile", "construction", "project", "study", "experiment", "program", "empire", "feud",
    "truce", "blockade", "invasion", "migration", "epidemic", "recession", "partnership",
    "friendship", "rivalry", "career", "search", "pilgrimage", "mission",
)  # fmt: skip

GROUP = "year"


def two_digits(yy: int) -> str:
    return f"{yy:02d}"


def vocabulary() -> list[str]:
    """Every word the generator can emit, for building word-level tokenizers.

    A word-level tokenizer keeps "1732" as one word, so every start year and its corruption
    is listed, besides the centuries and the two-digit answers 00..99.
    """
    words = {"The", "lasted", "from", "the", "year", "to", *NOUNS, *CENTURIES}
    words.update(two_digits(yy) for yy in range(100))
    words.update(c + two_digits(yy) for c in CENTURIES for yy in (int(CORRUPT_YY), *START_YEARS))
    return sorted(words)


def _year_form(tokenizer: Any, century: str, yy: str) -> tuple[int, ...] | None:
    """How " {century}{yy}" tokenises: (century id, yy id) when it splits into the century
    token and the two-digit token the model would predict, (id,) when it is one token, None
    otherwise."""
    ids = tokenizer.encode(f" {century}{yy}", add_special_tokens=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids:
        return None
    if len(ids) == 1:
        return (int(ids[0]),)
    split = (single_token_id(tokenizer, " " + century), single_token_id(tokenizer, yy))
    if len(ids) == 2 and list(ids) == list(split):
        return (int(ids[0]), int(ids[1]))
    return None


def usable_years(tokenizer: Any) -> dict[str, list[int]]:
    """For each century, the start years YY whose tokenisation matches that of {CC}01."""
    if any(single_token_id(tokenizer, two_digits(yy)) is None for yy in range(100)):
        raise TaskError(
            "task 'greater_than': the tokenizer does not encode every two-digit year 00..99 "
            "(without a leading space) as a single token"
        )
    years: dict[str, list[int]] = {}
    for century in CENTURIES:
        if single_token_id(tokenizer, " " + century) is None:
            continue
        corrupt = _year_form(tokenizer, century, CORRUPT_YY)
        if corrupt is None:
            continue
        kept = [
            yy
            for yy in START_YEARS
            if (form := _year_form(tokenizer, century, two_digits(yy))) is not None
            and len(form) == len(corrupt)
        ]
        if kept:
            years[century] = kept
    return years


def probability_mass(probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum of ``probs`` [N, V] over the valid (>= 0) ids of each row of ``ids`` [N, K]."""
    valid = ids >= 0
    return (probs.gather(1, ids.clamp(min=0)) * valid).sum(1)


class GreaterThanTask(Task):
    """Greater-than; metric P(year > YY) - P(year <= YY) at the last century token."""

    package = "appbench_tasks.greater_than"

    def vocabulary(self) -> list[str]:
        return vocabulary()

    def metric(self, logits: torch.Tensor, data: TaskData) -> torch.Tensor:
        """Hanna et al.'s probability difference: the softmax (over the whole vocabulary)
        mass on the answers (years YY+1..99) minus the mass on the wrong years (00..YY)."""
        probs = logits.float().softmax(dim=-1)
        return probability_mass(probs, data.answers) - probability_mass(probs, data.wrong)

    def generate(self, tokenizer: Any, n: int, seed: int) -> list[PromptPair]:
        nouns = single_token_words(tokenizer, NOUNS)
        years = [(c, yy) for c, kept in sorted(usable_years(tokenizer).items()) for yy in kept]
        if not nouns or len(years) < 10:
            raise TaskError(
                "task 'greater_than': the tokenizer cannot express the task: "
                f"{len(nouns)} single-token nouns and {len(years)} years that tokenise like "
                "their '01' corruption (need at least 1 and 10)"
            )
        total = len(nouns) * len(years)
        if n > total:
            raise TaskError(
                f"task 'greater_than': cannot generate {n} distinct prompts from "
                f"{len(nouns)} nouns and {len(years)} years"
            )
        # Drawing distinct (noun, year) indices without replacement: no retry loop.
        pairs: list[PromptPair] = []
        for index in random.Random(seed).sample(range(total), n):
            noun = nouns[index % len(nouns)]
            century, yy = years[index // len(nouns)]
            clean = TEMPLATE.format(NOUN=noun, CENTURY=century, YY=two_digits(yy))
            corrupt = TEMPLATE.format(NOUN=noun, CENTURY=century, YY=CORRUPT_YY)
            answers = tuple(two_digits(y) for y in range(yy + 1, 100))
            wrong = tuple(two_digits(y) for y in range(yy + 1))
            pairs.append(PromptPair(clean, corrupt, answers, wrong, GROUP))
        return pairs
