"""Induction prompt generator: repeated two-token names, and repeated random word sequences.

Two families of prompts, told apart by their template group:

- **names** (as in APP's name induction): a name that tokenises to exactly two tokens [A1 A2]
  appears once, then its first token A1 is repeated at the end; an induction circuit
  completes A2. The corruption replaces the first occurrence by a different two-token name
  [X1 X2] and the final token by the first token Y1 of a third one, so no earlier token
  predicts the ending. Metric: logit(A2) - logit(Y2).
- **random** (the random-token induction of ACDC's small attention-only models): a sequence of
  k random words w1..wk followed by its first j words; the next word w(j+1) follows by
  induction. The corruption draws the sequence v1..vk and the repeated part u1..uj afresh, so
  nothing repeats. Metric: logit(w(j+1)) - logit(u(j+1)).

A "two-token name" depends on the tokenizer: with a subword tokenizer (GPT-2's BPE) it is a
single rarer first name split in two ("Cornelius" = " Cornel" + "ius"); when a tokenizer has
fewer than MIN_SUBWORD_NAMES such names (a word-level tokenizer has none), it is a first name
followed by a surname ("Mary Smith").
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from appbench import PromptPair, Task, TaskError, distinct_pairs, single_token_words

#: Name templates, our own wording; {NAME} is the full two-token name and {FIRST} the text of
#: its first token. No template starts with a name, which would tokenise without its space.
NAME_TEMPLATES = (
    "Then, {NAME} went to the {PLACE}. Later, {FIRST}",
    "Yesterday {NAME} visited the {PLACE}, and today {FIRST}",
    "At the {PLACE}, {NAME} met a friend. Afterwards, {FIRST}",
    "The letter from {NAME} reached the {PLACE}. Soon, {FIRST}",
    "Everyone at the {PLACE} knows {NAME}. They say {FIRST}",
    "After lunch, {NAME} cleaned the {PLACE}. Then {FIRST}",
    "The manager of the {PLACE} is {NAME}. Ask {FIRST}",
    "When {NAME} left the {PLACE}, nobody noticed. Later {FIRST}",
    "In the {PLACE}, {NAME} found an old map. Then {FIRST}",
    "Our guide at the {PLACE} was {NAME}. Thanks to {FIRST}",
    "The keys to the {PLACE} belong to {NAME}. Please call {FIRST}",
    "Last night {NAME} stayed at the {PLACE}. This morning {FIRST}",
)

#: (k, j) of the random-word groups: k words, then their first j repeated.
RANDOM_SHAPES = ((6, 2), (8, 4), (10, 3), (12, 7))

#: Single first names; with GPT-2's BPE about half of them split into exactly two tokens.
SUBWORD_NAMES = (
    "Cornelius", "Evander", "Lysander", "Octavia", "Philippa", "Millicent", "Clementine",
    "Seraphina", "Barnaby", "Rowena", "Cosima", "Bettina", "Hortense", "Imogen", "Leonora",
    "Marisol", "Pauline", "Roderick", "Valentina", "Cedric", "Emrys", "Horatio", "Kasimir",
    "Lorcan", "Malachi", "Osric", "Silas", "Tristan", "Wendell", "Anouk", "Brigid", "Fenella",
    "Henrietta", "Juniper", "Nerissa", "Odette", "Prudence", "Sabrina", "Ursula", "Verity",
    "Wilma", "Kendra", "Harlan", "Ingrid", "Joaquin", "Kimball", "Lucinda", "Maxine",
    "Norbert", "Orville", "Ulrike", "Yvette", "Thaddeus", "Ignatius", "Leopold", "Gwendolyn",
    "Araminta", "Percival", "Reginald", "Ambrose", "Isolde", "Ottilie", "Delphine",
    "Eulalia", "Genevieve", "Jocasta", "Noreen", "Ophelia", "Quentin", "Sylvester", "Tobias",
    "Ulysses", "Zebulon", "Alistair", "Gideon", "Isidore", "Jethro", "Peregrine", "Rupert",
    "Dorothea", "Griselda", "Lavinia", "Marguerite", "Rosamund", "Theodora", "Tamsin",
    "Briony", "Alaric", "Elowen", "Priscilla", "Sigrid", "Torvald", "Zachariah",
)  # fmt: skip
FIRST_NAMES = (
    "Mary", "John", "Tom", "James", "Anna", "Lisa", "Mark", "Sarah", "David", "Laura",
    "Peter", "Emma", "Alice", "Carl", "Eric", "Grace", "Helen", "Kevin", "Linda", "Steve",
)  # fmt: skip
SURNAMES = (
    "Smith", "Brown", "Jones", "Miller", "Davis", "Wilson", "Taylor", "Clark", "Lewis",
    "Walker", "Hall", "Allen", "Young", "King", "Wright", "Scott", "Green", "Baker", "Adams",
    "Nelson",
)  # fmt: skip
PLACES = (
    "store", "garden", "school", "hospital", "station", "office", "library", "park", "museum",
    "market",
)  # fmt: skip
#: Words of the random sequences; our own list of common nouns.
WORDS = (
    "apple", "river", "stone", "cloud", "chair", "window", "bread", "horse", "paper", "glass",
    "music", "money", "water", "light", "plant", "train", "field", "table", "watch", "phone",
    "shirt", "sugar", "bottle", "engine", "island", "forest", "pencil", "candle", "basket",
    "button", "carpet", "castle", "desert", "doctor", "dragon", "feather", "guitar", "hammer",
    "jacket", "ladder", "magnet", "mirror", "needle", "orange", "pepper", "rabbit", "saddle",
    "silver", "spider", "ticket", "tunnel", "wallet", "winter", "yellow", "garlic", "marble",
)  # fmt: skip

#: A tokenizer needs this many subword names for the name family to use them.
MIN_SUBWORD_NAMES = 20


@dataclass(frozen=True)
class TwoTokenName:
    """A name and its two token ids; ``first`` is the text that encodes to ``ids[0]``."""

    text: str
    first: str
    ids: tuple[int, int]


def templates() -> list[tuple[str, str]]:
    """(group name, template) pairs of the name family."""
    return [(f"names-{i}", t) for i, t in enumerate(NAME_TEMPLATES)]


def random_groups() -> list[tuple[str, tuple[int, int]]]:
    """(group name, (k, j)) pairs of the random-word family."""
    return [(f"random-{k}x{j}", (k, j)) for k, j in RANDOM_SHAPES]


def _words(text: str) -> list[str]:
    for slot in ("{NAME}", "{FIRST}", "{PLACE}"):
        text = text.replace(slot, " ")
    return text.replace(",", " , ").replace(".", " . ").split()


def vocabulary() -> list[str]:
    """Every word a word-level tokenizer needs. Subword names are left out: a word-level
    tokenizer encodes a single word as one token, so it never uses them."""
    words: set[str] = set(FIRST_NAMES) | set(SURNAMES) | set(PLACES) | set(WORDS)
    for template in NAME_TEMPLATES:
        words.update(_words(template))
    return sorted(words)


def two_token_names(tokenizer: Any) -> list[TwoTokenName]:
    """The names this tokenizer encodes (with a leading space) as exactly two known tokens,
    whose first token re-encodes to itself on its own (the prompt ends with it)."""

    def collect(candidates: list[str]) -> list[TwoTokenName]:
        unk = getattr(tokenizer, "unk_token_id", None)
        found = []
        for text in candidates:
            ids = tokenizer.encode(" " + text, add_special_tokens=False)
            if len(ids) != 2 or unk in ids:
                continue
            first = tokenizer.decode([ids[0]]).strip()
            if not first or tokenizer.encode(" " + first, add_special_tokens=False) != [ids[0]]:
                continue
            found.append(TwoTokenName(text, first, (int(ids[0]), int(ids[1]))))
        return found

    subword = collect(list(SUBWORD_NAMES))
    if len(subword) >= MIN_SUBWORD_NAMES:
        return subword
    return collect([f"{first} {last}" for first in FIRST_NAMES for last in SURNAMES])


def _three_names(rng: random.Random, names: list[TwoTokenName]) -> list[TwoTokenName]:
    """Three names whose first tokens differ and whose second tokens differ, so that neither
    corrupted name can be completed by copying and the wrong answer is never the answer."""
    for _ in range(1000):
        picked = rng.sample(names, 3)
        if len({p.ids[0] for p in picked}) == 3 and len({p.ids[1] for p in picked}) == 3:
            return picked
    raise TaskError("task 'induction': too few two-token names with distinct tokens")


class InductionTask(Task):
    """Induction on two-token names and random word sequences; metric logit(copy) - logit(other)."""

    package = "appbench_tasks.induction"

    def vocabulary(self) -> list[str]:
        return vocabulary()

    def generate(self, tokenizer: Any, n: int, seed: int) -> list[PromptPair]:
        names = two_token_names(tokenizer)
        places = single_token_words(tokenizer, PLACES)
        words = single_token_words(tokenizer, WORDS)
        longest = max(2 * k + j + 1 for k, j in RANDOM_SHAPES)
        if len(names) < 10 or not places or len(words) < longest:
            raise TaskError(
                "task 'induction': the tokenizer cannot express the task: "
                f"{len(names)} two-token names (need 10), {len(places)} single-token places "
                f"(need 1), {len(words)} single-token words (need {longest})"
            )
        rng = random.Random(seed)
        groups: list[tuple[str, str | tuple[int, int]]] = [*templates(), *random_groups()]

        def draw(index: int) -> PromptPair:
            group, shape = groups[index % len(groups)]
            if isinstance(shape, str):
                return _name_pair(rng, shape, group, names, places)
            return _random_pair(rng, shape, group, words)

        return distinct_pairs("induction", n, draw)


def _name_pair(
    rng: random.Random,
    template: str,
    group: str,
    names: list[TwoTokenName],
    places: list[str],
) -> PromptPair:
    answer, first_other, last_other = _three_names(rng, names)
    place = rng.choice(places)
    clean = template.format(NAME=answer.text, FIRST=answer.first, PLACE=place)
    corrupt = template.format(NAME=first_other.text, FIRST=last_other.first, PLACE=place)
    return PromptPair(clean, corrupt, (answer.ids[1],), (last_other.ids[1],), group)


def _random_pair(
    rng: random.Random, shape: tuple[int, int], group: str, words: list[str]
) -> PromptPair:
    k, j = shape
    drawn = rng.sample(words, 2 * k + j + 1)
    sequence, fresh, repeat = drawn[:k], drawn[k : 2 * k], drawn[2 * k :]
    # A leading space keeps every word in its running-text form, the first one included.
    clean = " " + " ".join(sequence + sequence[:j])
    corrupt = " " + " ".join(fresh + repeat[:j])
    return PromptPair(clean, corrupt, (" " + sequence[j],), (" " + repeat[j],), group)
