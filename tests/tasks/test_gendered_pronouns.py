"""The gendered-pronoun generator under a word-level tokenizer and GPT-2's BPE."""

import pytest
import torch

from appbench import TaskError, word_level_tokenizer
from appbench_tasks.gendered_pronouns import GenderedPronounsTask
from appbench_tasks.gendered_pronouns.generate import (
    FEMALE_NAMES,
    MALE_NAMES,
    TRAITS,
    vocabulary,
)


@pytest.fixture(scope="module")
def word_tok():
    return word_level_tokenizer(vocabulary())


@pytest.fixture(params=["word_tok", "gpt2_tok"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def task():
    return GenderedPronounsTask()


def test_spec_comes_from_task_yaml(task):
    assert task.name == "gendered_pronouns" and task.spec.version == "1.0"
    assert "Mathwin" in task.spec.citation


def test_generation_is_deterministic_and_seed_dependent(task, word_tok):
    a = task.generate(word_tok, 60, seed=3)
    assert a == task.generate(word_tok, 60, seed=3)
    assert a != task.generate(word_tok, 60, seed=4)
    assert len({p.clean for p in a}) == 60


def test_the_pronoun_matches_the_name(task, tokenizer):
    search, _ = task.splits(tokenizer, 90, 10, seed=0)
    genders = set()
    for i, prompt in enumerate(search.prompts):
        assert prompt.startswith("So ") and prompt.endswith(", isn't") and "isnt't" not in prompt
        name = prompt.split()[1]
        answer = tokenizer.decode([int(search.answers[i, 0])]).strip()
        wrong = tokenizer.decode([int(search.wrong[i, 0])]).strip()
        expected = "he" if name in MALE_NAMES else "she"
        assert name in MALE_NAMES + FEMALE_NAMES
        assert (answer, wrong) == (expected, "she" if expected == "he" else "he")
        genders.add(expected)
        corrupt = search.corrupt_prompts[i]
        assert corrupt == prompt.replace(f"So {name} ", "That Person ", 1)
    assert genders == {"he", "she"}


def test_clean_and_corrupt_differ_in_opener_and_name_only(task, tokenizer):
    search, _ = task.splits(tokenizer, 45, 10, seed=1)
    diff = (search.clean != search.corrupt) & search.pad_mask()
    assert diff[:, :2].all() and not diff[:, 2:].any()
    last = {tokenizer.decode([int(search.clean[i, search.target_pos[i]])]) for i in range(45)}
    assert last in ({"'t"}, {"t"})  # GPT-2: " isn" + "'t"; word level: "isn" "'" "t"


def test_groups_are_the_traits_and_splits_are_disjoint(task, tokenizer):
    search, evaluation = task.splits(tokenizer, seed=2)
    assert search.n_groups == len(TRAITS) == 15
    assert len(set(search.groups.tolist())) == 15
    assert not set(search.prompts) & set(evaluation.prompts)
    for g in range(search.n_groups):
        assert len(set(search.lengths[search.groups == g].tolist())) == 1


def test_metric_is_correct_minus_other_pronoun(task, word_tok):
    search, _ = task.splits(word_tok, 6, 6, seed=0)
    he, she = word_tok.convert_tokens_to_ids(["he", "she"])
    logits = torch.zeros(6, len(word_tok))
    logits[:, he], logits[:, she] = 3.0, 1.0
    is_male = search.answers[:, 0] == he
    expected = torch.where(is_male, torch.tensor(2.0), torch.tensor(-2.0))
    assert torch.equal(task.metric(logits, search), expected)


def test_a_tokenizer_without_names_is_rejected(task):
    tok = word_level_tokenizer([w for w in vocabulary() if w not in FEMALE_NAMES])
    with pytest.raises(TaskError, match="0 female"):
        task.generate(tok, 10, seed=0)


def test_a_tokenizer_without_the_neutral_name_is_rejected(task):
    tok = word_level_tokenizer([w for w in vocabulary() if w != "Person"])
    with pytest.raises(TaskError, match="Person"):
        task.generate(tok, 10, seed=0)


def test_too_many_prompts_are_rejected(task):
    tok = word_level_tokenizer(
        [w for w in vocabulary() if w not in MALE_NAMES[4:] + FEMALE_NAMES[4:]]
    )
    assert len(task.generate(tok, 15 * 8, seed=0)) == 120  # every trait x name
    with pytest.raises(TaskError, match="distinct prompts"):
        task.generate(tok, 15 * 8 + 1, seed=0)
