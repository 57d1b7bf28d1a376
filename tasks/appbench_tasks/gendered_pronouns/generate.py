"""Gendered-pronoun prompt generator (Mathwin, Corlouer et al.), corrupted by a neutral subject.

A clean prompt names a person and ends in a tag question, "So John is a loyal friend, isn't";
the model should continue with the pronoun that matches the name's usual gender (" he" for
John, " she" for Mary). The corruption says "That Person is a loyal friend, isn't": "So"
becomes "That" and the name becomes "Person", so the prompt carries no gender while staying
aligned token for token. The metric is logit(correct pronoun) - logit(other pronoun) at the
last token ("'t" under GPT-2's BPE). The tag is spelled "isn't" everywhere (the original
template list has one "isnt't").
"""

from __future__ import annotations

import random
from typing import Any

from appbench import (
    PromptPair,
    Task,
    TaskError,
    distinct_pairs,
    single_token_id,
    single_token_words,
)

TEMPLATE = "{OPENER} {NAME} is {TRAIT}, isn't"
CLEAN_OPENER, CORRUPT_OPENER, NEUTRAL_NAME = "So", "That", "Person"
PRONOUNS = {"male": "he", "female": "she"}

#: The traits, one template group each; our own wording.
TRAITS = (
    "a great cook",
    "very good at chess",
    "always late for work",
    "such a kind neighbour",
    "the best player on the team",
    "really tall",
    "a talented painter",
    "quite shy around strangers",
    "afraid of the dark",
    "the oldest child in the family",
    "a fast runner",
    "proud of the new house",
    "good with numbers",
    "a loyal friend",
    "happy with the result",
)

#: Common first names with a clear conventional gender, the spec's ten of each included.
MALE_NAMES = (
    "John", "David", "Mark", "Paul", "Ryan", "Gary", "Jack", "Sean", "Carl", "Joe", "Mike",
    "Tom", "James", "Peter", "Steve", "Kevin", "Brian", "Eric", "Adam", "Scott", "Greg",
    "Frank", "Henry", "Bob", "Jim", "Tony", "Matt", "George", "Robert", "Richard",
)  # fmt: skip
FEMALE_NAMES = (
    "Mary", "Lisa", "Anna", "Sarah", "Amy", "Carol", "Karen", "Susan", "Julie", "Judy",
    "Emma", "Laura", "Helen", "Linda", "Kate", "Rachel", "Jessica", "Emily", "Nancy", "Alice",
    "Jane", "Rose", "Grace", "Diana", "Ruth", "Anne", "Ellen", "Nicole", "Megan", "Claire",
)  # fmt: skip

#: A tokenizer needs this many single-token names of each gender.
MIN_NAMES = 4


def templates() -> list[tuple[str, str]]:
    """(group name, trait) pairs, one group per trait."""
    return [(f"trait-{i}", trait) for i, trait in enumerate(TRAITS)]


def vocabulary() -> list[str]:
    """Every word the generator can emit, for building word-level tokenizers (which split
    "isn't" into "isn", "'" and "t")."""
    words = {CLEAN_OPENER, CORRUPT_OPENER, NEUTRAL_NAME, "is", "isn", "'", "t", ","}
    words.update(PRONOUNS.values())
    words.update(MALE_NAMES)
    words.update(FEMALE_NAMES)
    for trait in TRAITS:
        words.update(trait.split())
    return sorted(words)


class GenderedPronounsTask(Task):
    """Gendered pronouns; metric logit(correct pronoun) - logit(other pronoun)."""

    package = "appbench_tasks.gendered_pronouns"

    def vocabulary(self) -> list[str]:
        return vocabulary()

    def generate(self, tokenizer: Any, n: int, seed: int) -> list[PromptPair]:
        names = {
            "male": single_token_words(tokenizer, MALE_NAMES),
            "female": single_token_words(tokenizer, FEMALE_NAMES),
        }
        fixed = [" " + p for p in PRONOUNS.values()] + [" " + NEUTRAL_NAME]
        missing = [w for w in fixed if single_token_id(tokenizer, w) is None]
        # The clean and corrupted openers start the prompt, without a leading space.
        missing += [
            w for w in (CLEAN_OPENER, CORRUPT_OPENER) if single_token_id(tokenizer, w) is None
        ]
        if missing or min(map(len, names.values())) < MIN_NAMES:
            raise TaskError(
                "task 'gendered_pronouns': the tokenizer cannot express the task: "
                f"{len(names['male'])} male and {len(names['female'])} female single-token "
                f"names (need {MIN_NAMES} each); not single tokens: {missing}"
            )
        rng = random.Random(seed)
        groups = templates()

        def draw(index: int) -> PromptPair:
            group, trait = groups[index % len(groups)]
            gender = rng.choice(("male", "female"))
            name = rng.choice(names[gender])
            clean = TEMPLATE.format(OPENER=CLEAN_OPENER, NAME=name, TRAIT=trait)
            corrupt = TEMPLATE.format(OPENER=CORRUPT_OPENER, NAME=NEUTRAL_NAME, TRAIT=trait)
            other = "female" if gender == "male" else "male"
            return PromptPair(
                clean, corrupt, (" " + PRONOUNS[gender],), (" " + PRONOUNS[other],), group
            )

        return distinct_pairs("gendered_pronouns", n, draw)
