"""The induction generator (name and random-word families) under word-level and GPT-2 tokenizers."""

import pytest
import torch

from appbench import PromptPair, TaskError, tokenize_pairs, word_level_tokenizer
from appbench_tasks.induction import InductionTask
from appbench_tasks.induction.generate import (
    MIN_SUBWORD_NAMES,
    RANDOM_SHAPES,
    SURNAMES,
    WORDS,
    random_groups,
    templates,
    two_token_names,
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
    return InductionTask()


def tokens(data, i, which="clean"):
    return getattr(data, which)[i, : int(data.lengths[i])].tolist()


def test_spec_comes_from_task_yaml(task):
    assert task.name == "induction" and task.spec.version == "1.0"
    assert (task.spec.n_search, task.spec.n_eval) == (100, 200)


def test_generation_is_deterministic_and_seed_dependent(task, word_tok):
    a = task.generate(word_tok, 64, seed=3)
    assert a == task.generate(word_tok, 64, seed=3)
    assert a != task.generate(word_tok, 64, seed=4)
    assert len({p.clean for p in a}) == 64


def test_gpt2_names_are_single_words_split_in_two(gpt2_tok):
    names = two_token_names(gpt2_tok)
    assert len(names) >= MIN_SUBWORD_NAMES
    by_text = {n.text: n for n in names}
    cornelius = by_text["Cornelius"]
    assert cornelius.first == "Cornel"
    assert gpt2_tok.convert_ids_to_tokens(list(cornelius.ids)) == ["ĠCornel", "ius"]
    assert all(" " not in n.text for n in names)


def test_word_level_names_are_first_name_and_surname(word_tok):
    names = two_token_names(word_tok)
    assert len(names) == 400
    mary = next(n for n in names if n.text == "Mary Smith")
    assert mary.first == "Mary"
    assert mary.ids == tuple(word_tok.convert_tokens_to_ids(["Mary", "Smith"]))


def test_name_prompts_end_with_a_repeated_first_token(task, tokenizer):
    search, _ = task.splits(tokenizer, 96, 16, seed=0)
    name_groups = {i for i, g in enumerate(search.group_names) if g.startswith("names-")}
    checked = 0
    for i in range(len(search)):
        if int(search.groups[i]) not in name_groups:
            continue
        clean, corrupt = tokens(search, i), tokens(search, i, "corrupt")
        answer, wrong = int(search.answers[i, 0]), int(search.wrong[i, 0])
        # the final token occurs exactly once before, and the token after it is the answer
        earlier = [p for p in range(len(clean) - 1) if clean[p] == clean[-1]]
        assert len(earlier) == 1 and clean[earlier[0] + 1] == answer
        assert answer != wrong and wrong not in clean
        # corrupted: the final token never occurred before, so nothing can be copied
        assert corrupt[-1] not in corrupt[:-1] and answer not in corrupt
        diff = [p for p in range(len(clean)) if clean[p] != corrupt[p]]
        assert diff == [earlier[0], earlier[0] + 1, len(clean) - 1]
        checked += 1
    assert checked == 72  # 12 of every 16 prompts


def test_random_prompts_repeat_the_sequence_prefix(task, tokenizer):
    search, _ = task.splits(tokenizer, 64, 16, seed=1)
    shapes = dict(random_groups())
    checked = 0
    for i in range(len(search)):
        group = search.group_names[int(search.groups[i])]
        if group not in shapes:
            continue
        k, j = shapes[group]
        clean, corrupt = tokens(search, i), tokens(search, i, "corrupt")
        assert len(clean) == k + j and len(set(clean[:k])) == k
        assert clean[k:] == clean[:j] and int(search.answers[i, 0]) == clean[j]
        assert len(set(corrupt)) == k + j  # nothing repeats in the corruption
        wrong = int(search.wrong[i, 0])
        assert wrong not in clean and wrong not in corrupt
        assert all(a != b for a, b in zip(clean, corrupt, strict=True))
        checked += 1
    assert checked == 16


def test_every_template_group_has_one_length(task, tokenizer):
    search, evaluation = task.splits(tokenizer, 64, 64, seed=2)
    assert search.n_groups == len(templates()) + len(RANDOM_SHAPES) == 16
    assert len(set(search.groups.tolist())) == 16
    for g in range(search.n_groups):
        lengths = torch.cat(
            [search.lengths[search.groups == g], evaluation.lengths[evaluation.groups == g]]
        )
        assert len(set(lengths.tolist())) == 1, search.group_names[g]


def test_splits_are_disjoint(task, tokenizer):
    search, evaluation = task.splits(tokenizer, seed=5)
    assert (len(search), len(evaluation)) == (100, 200)
    assert not set(search.prompts) & set(evaluation.prompts)


def test_metric_is_logit_of_answer_minus_wrong(task, word_tok):
    search, _ = task.splits(word_tok, 8, 8, seed=0)
    logits = torch.randn(8, len(word_tok))
    expected = logits.gather(1, search.answers)[:, 0] - logits.gather(1, search.wrong)[:, 0]
    assert torch.allclose(task.metric(logits, search), expected)


def test_a_tokenizer_without_two_token_names_is_rejected(task):
    # first names alone are one token each, and there are no surnames to pair them with
    tok = word_level_tokenizer([w for w in vocabulary() if w not in SURNAMES])
    assert two_token_names(tok) == []
    with pytest.raises(TaskError, match="two-token names"):
        task.generate(tok, 10, seed=0)


def test_a_tokenizer_with_too_few_words_is_rejected(task):
    tok = word_level_tokenizer([w for w in vocabulary() if w not in WORDS[5:]])
    with pytest.raises(TaskError, match="single-token words"):
        task.generate(tok, 10, seed=0)


def test_prompt_pairs_may_carry_token_ids(word_tok):
    smith, brown = word_tok.convert_tokens_to_ids(["Smith", "Brown"])
    pair = PromptPair("Then , Mary", "Then , John", (smith,), (" Brown",), "g")
    data = tokenize_pairs(word_tok, [pair], "t")
    assert data.answers.tolist() == [[smith]] and data.wrong.tolist() == [[brown]]
    for bad in (len(word_tok), -3, word_tok.unk_token_id):
        with pytest.raises(TaskError, match="single tokens"):
            tokenize_pairs(word_tok, [PromptPair("Then", "Then", (bad,), (smith,), "g")], "t")
