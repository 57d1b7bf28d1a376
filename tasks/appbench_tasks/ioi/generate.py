"""IOI prompt generator: ABBA and BABA templates, corrupted by the ABC distribution.

A clean prompt mentions two names, A (the indirect object, IO) and B (the subject, S), then
repeats B as the giver; the model should complete with A. In ABBA templates A comes first in
the opening clause, in BABA templates B does. The corruption replaces the three name slots with
three fresh names X, Y, Z, removing the information that identifies the IO while keeping the
sentence, token for token, aligned with the clean one. The metric is logit(IO) - logit(S).
"""

from __future__ import annotations

import random

from appbench import PromptPair, Task, TaskError, distinct_pairs, single_token_words

#: Opening clauses and the giving clause; {X} and {Y} are the first two name slots and {Z} is
#: the repeated subject. Our own wording, in the style of Wang et al.'s templates.
BASE_TEMPLATES = (
    "Then, {X} and {Y} went to the {PLACE}. {Z} gave a {OBJECT} to",
    "Then, {X} and {Y} had a long talk at the {PLACE}. {Z} handed a {OBJECT} to",
    "When {X} and {Y} arrived at the {PLACE}, {Z} gave a {OBJECT} to",
    "After {X} and {Y} met at the {PLACE}, {Z} passed a {OBJECT} to",
    "While {X} and {Y} were working at the {PLACE}, {Z} offered a {OBJECT} to",
    "Friends {X} and {Y} found a {OBJECT} at the {PLACE}. {Z} gave it to",
    "Yesterday {X} and {Y} walked to the {PLACE}. {Z} sent a {OBJECT} to",
    "So {X} and {Y} stayed at the {PLACE}, and {Z} brought a {OBJECT} to",
)

NAMES = (
    "Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Kate", "Paul",
    "Anna", "Lisa", "Mark", "Sarah", "David", "Laura", "Peter", "Emma", "Rose", "Jack",
    "Alice", "Bob", "Carl", "Diana", "Eric", "Frank", "Grace", "Helen", "Ivan", "Julia",
    "Kevin", "Linda", "Mike", "Nina", "Oscar", "Pam", "Ryan", "Steve", "Tina", "Victor",
)  # fmt: skip
PLACES = (
    "store", "garden", "school", "hospital", "station", "office", "restaurant", "park",
    "house", "market",
)  # fmt: skip
OBJECTS = (
    "drink", "book", "ring", "kiss", "bone", "basketball", "computer", "necklace", "snack",
    "letter",
)  # fmt: skip

ORDERS = ("ABBA", "BABA")


def templates() -> list[tuple[str, str]]:
    """(group name, template) pairs: every base template in both name orders."""
    return [(f"{order}-{i}", t) for i, t in enumerate(BASE_TEMPLATES) for order in ORDERS]


def vocabulary() -> list[str]:
    """Every word the generator can emit, for building word-level tokenizers."""
    words: set[str] = set(NAMES) | set(PLACES) | set(OBJECTS)
    for template in BASE_TEMPLATES:
        text = template
        for slot in ("{X}", "{Y}", "{Z}", "{PLACE}", "{OBJECT}"):
            text = text.replace(slot, " ")
        words.update(text.replace(",", " , ").replace(".", " . ").split())
    return sorted(words)


class IOITask(Task):
    """Indirect object identification; metric logit(IO) - logit(S) at the final token."""

    package = "appbench_tasks.ioi"

    def vocabulary(self) -> list[str]:
        return vocabulary()

    def generate(self, tokenizer, n: int, seed: int) -> list[PromptPair]:
        names = single_token_words(tokenizer, NAMES)
        places = single_token_words(tokenizer, PLACES)
        objects = single_token_words(tokenizer, OBJECTS)
        if len(names) < 5 or not places or not objects:
            raise TaskError(
                "task 'ioi': the tokenizer has too few single-token names, places or objects "
                f"({len(names)} names, {len(places)} places, {len(objects)} objects)"
            )
        rng = random.Random(seed)
        groups = templates()

        def draw(index: int) -> PromptPair:
            group, template = groups[index % len(groups)]
            io, s, x, y, z = rng.sample(names, 5)
            place, obj = rng.choice(places), rng.choice(objects)
            first, second = (io, s) if group.startswith("ABBA") else (s, io)
            clean = template.format(X=first, Y=second, Z=s, PLACE=place, OBJECT=obj)
            corrupt = template.format(X=x, Y=y, Z=z, PLACE=place, OBJECT=obj)
            return PromptPair(clean, corrupt, (" " + io,), (" " + s,), group)

        return distinct_pairs("ioi", n, draw)
