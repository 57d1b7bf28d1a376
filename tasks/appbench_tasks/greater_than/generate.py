"""Greater-than prompt generator (Hanna, Liu, Variengien 2023), corrupted by the "01" start year.

A clean prompt reads "The {noun} lasted from the year {CC}{YY} to the year {CC}"; a model that
understands it puts its probability on two-digit continuations greater than YY. The corruption
sets the start year to {CC}01, after which almost every year is a valid end year, so the
information "the end year must exceed YY" is gone while the sentence stays aligned token for
token. The metric is the probability mass on the end years after YY minus the mass on the others.

The task has two tokenisation modes, chosen per tokenizer by :func:`tokenization_mode`:

* "two-digit" (GPT-2's BPE, word-level tokenizers): every two-digit year "00".."99" is one
  token. With GPT-2's BPE " 1732" is " 17" + "32" (the two-digit token without a leading
  space, the token the model then predicts), but some years are single tokens (" 1280") or
  split elsewhere (" 1102" is " 110" + "2"); those are dropped, per tokenizer. Word-level
  tokenizers keep each year as one word, so their vocabulary lists every four-digit year.
  Start years run over 02..98; the answers are the tokens YY+1..99, the wrong ones 00..YY.
* "digit" (tokenizers that split numbers into single digits, such as SmolLM2's and
  Qwen2's): " 1739" is the century's tokens followed by "3" and "9", and the model's next
  token after "... to the year 17" is the tens digit of the end year. Start years are
  restricted to YY = t9 (09, 19, .., 89), for which an end year YY' is later than YY exactly
  when its tens digit exceeds t. Hanna et al.'s probability difference is then exactly the
  mass on the digits t+1..9 minus the mass on 0..t, read at one position.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from appbench import PromptPair, Task, TaskData, TaskError, single_token_id, single_token_words

if TYPE_CHECKING:
    import torch

TEMPLATE = "The {NOUN} lasted from the year {CENTURY}{YY} to the year {CENTURY}"

#: Centuries 11..17, as in Hanna et al.; in two-digit mode the start year YY runs over 02..98
#: so that both the answers (YY+1..99) and the wrong years (00..YY) are never empty.
CENTURIES = tuple(str(c) for c in range(11, 18))
START_YEARS = tuple(range(2, 99))
CORRUPT_YY = "01"

#: Digit mode: start years whose units digit is 9, so that "YY' > YY" depends on the tens
#: digit alone; 99 is left out because no two-digit year is later.
DIGITS = tuple(str(d) for d in range(10))
DIGIT_START_YEARS = tuple(10 * t + 9 for t in range(9))

TWO_DIGIT = "two-digit"
DIGIT = "digit"

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
    is listed, besides the centuries and the two-digit answers 00..99 (two-digit mode).
    """
    words = {"The", "lasted", "from", "the", "year", "to", *NOUNS, *CENTURIES}
    words.update(two_digits(yy) for yy in range(100))
    words.update(c + two_digits(yy) for c in CENTURIES for yy in (int(CORRUPT_YY), *START_YEARS))
    return sorted(words)


def tokenization_mode(tokenizer: Any) -> str:
    """TWO_DIGIT when every two-digit year 00..99 is one token, else DIGIT when every digit
    0..9 is; TaskError when neither holds."""
    if all(single_token_id(tokenizer, two_digits(yy)) is not None for yy in range(100)):
        return TWO_DIGIT
    if all(single_token_id(tokenizer, d) is not None for d in DIGITS):
        return DIGIT
    raise TaskError(
        "task 'greater_than': the tokenizer must encode either every two-digit year 00..99 "
        "or every digit 0..9 (without a leading space) as a single token"
    )


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


def _digit_year_fits(tokenizer: Any, century: str, yy: str) -> bool:
    """Whether " {century}{yy}" tokenises as the tokens of " {century}" followed by one token
    per digit of ``yy``, each the digit's own single token: then the model's next token after
    the century is the first digit of the year, and every such year aligns token for token
    with its "01" corruption."""
    prefix = tokenizer.encode(f" {century}", add_special_tokens=False)
    digits = [single_token_id(tokenizer, d) for d in yy]
    ids = tokenizer.encode(f" {century}{yy}", add_special_tokens=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    if not prefix or None in digits or (unk is not None and unk in prefix):
        return False
    return list(ids) == [*prefix, *digits]


def usable_years(tokenizer: Any) -> dict[str, list[int]]:
    """For each century, the start years YY whose tokenisation matches that of {CC}01, under
    the tokenizer's :func:`tokenization_mode`."""
    if tokenization_mode(tokenizer) == DIGIT:
        return {
            century: kept
            for century in CENTURIES
            if _digit_year_fits(tokenizer, century, CORRUPT_YY)
            and (
                kept := [
                    yy
                    for yy in DIGIT_START_YEARS
                    if _digit_year_fits(tokenizer, century, two_digits(yy))
                ]
            )
        }
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


def answer_strings(mode: str, yy: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(answers, wrong) for start year ``yy``: the two-digit years after YY and up to it, or in
    digit mode (YY = t9) the tens digits t+1..9 and 0..t."""
    if mode == DIGIT:
        tens = yy // 10
        return DIGITS[tens + 1 :], DIGITS[: tens + 1]
    return (
        tuple(two_digits(y) for y in range(yy + 1, 100)),
        tuple(two_digits(y) for y in range(yy + 1)),
    )


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
        mass on the answers (years YY+1..99, or in digit mode the tens digits above YY's)
        minus the mass on the wrong answers (00..YY, or the tens digits up to YY's)."""
        probs = logits.float().softmax(dim=-1)
        return probability_mass(probs, data.answers) - probability_mass(probs, data.wrong)

    def generate(self, tokenizer: Any, n: int, seed: int) -> list[PromptPair]:
        mode = tokenization_mode(tokenizer)
        nouns = single_token_words(tokenizer, NOUNS)
        years = [(c, yy) for c, kept in sorted(usable_years(tokenizer).items()) for yy in kept]
        # At least one century's worth of start years in digit mode (9 of them).
        minimum = 10 if mode == TWO_DIGIT else len(DIGIT_START_YEARS)
        if not nouns or len(years) < minimum:
            raise TaskError(
                f"task 'greater_than': the tokenizer cannot express the task ({mode} mode): "
                f"{len(nouns)} single-token nouns and {len(years)} years that tokenise like "
                f"their '01' corruption (need at least 1 and {minimum})"
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
            answers, wrong = answer_strings(mode, yy)
            pairs.append(PromptPair(clean, corrupt, answers, wrong, GROUP))
        return pairs
