"""The docstring generator and its per-prompt metric, under word-level and GPT-2 tokenizers."""

import re

import pytest
import torch

from appbench import TaskData, TaskError, word_level_tokenizer
from appbench_tasks.docstring import DocstringTask
from appbench_tasks.docstring.generate import DESC_WORDS, NAMES, layout, vocabulary


@pytest.fixture(scope="module")
def word_tok():
    return word_level_tokenizer(vocabulary())


@pytest.fixture(params=["word_tok", "gpt2_tok"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def task():
    return DocstringTask()


def parse(prompt: str) -> tuple[str, list[str], list[str]]:
    """(method, def arguments after self, documented arguments) of a prompt."""
    method, args = re.match(r"def (\w+)\(self, ([\w, ]+)\):", prompt).groups()
    return method, args.split(", "), re.findall(r":param (\w+):", prompt)


def test_spec_comes_from_task_yaml(task):
    assert task.name == "docstring" and task.spec.version == "1.0"
    assert "Heimersheim" in task.spec.citation


def test_layout_matches_the_papers_shape():
    text = layout("load", ["port", "size", "files", "mode"], ["size"], ["a", "b", "c", "d", "e"])
    assert text == (
        'def load(self, port, size, files, mode):\n    """a b c\n\n    :param size: d e\n    :param'
    )


def test_generation_is_deterministic_and_seed_dependent(task, word_tok):
    a = task.generate(word_tok, 40, seed=3)
    assert a == task.generate(word_tok, 40, seed=3)
    assert a != task.generate(word_tok, 40, seed=4)
    assert len({p.clean for p in a}) == 40


def test_answer_is_the_next_documented_argument(task, tokenizer):
    search, _ = task.splits(tokenizer, 50, 10, seed=0)
    for i, prompt in enumerate(search.prompts):
        method, def_args, doc_args = parse(prompt)
        assert len(def_args) == 6 and len(set([method, *def_args])) == 7
        assert doc_args == def_args[1:3]  # one prefix argument, then the matching ones
        answer = tokenizer.decode([int(search.answers[i, 0])]).strip()
        assert answer == def_args[3]
        c_method, c_def, c_doc = parse(search.corrupt_prompts[i])
        assert c_method == method and c_def[0] == def_args[0] and c_def[4:] == def_args[4:]
        fresh = c_def[1:4] + c_doc
        assert len(set(fresh)) == 5 and not set(fresh) & set(def_args)
        wrong = {tokenizer.decode([t]).strip() for t in search.wrong[i].tolist() if t >= 0}
        assert wrong == (set(def_args) - {answer}) | set(fresh)
        assert prompt.endswith("    :param")


def test_clean_and_corrupt_differ_at_the_five_replaced_names(task, tokenizer):
    search, _ = task.splits(tokenizer, 30, 10, seed=1)
    diff = (search.clean != search.corrupt) & search.pad_mask()
    assert bool((diff.sum(1) == 5).all())
    assert len(set(search.lengths.tolist())) == 1


def test_splits_are_disjoint(task, tokenizer):
    search, evaluation = task.splits(tokenizer, seed=5)
    assert (len(search), len(evaluation)) == (100, 200)
    assert not set(search.prompts) & set(evaluation.prompts)
    assert search.wrong.shape == (100, 10) and bool((search.wrong >= 0).all())


def test_metric_is_correct_minus_max_wrong_per_prompt(task):
    # Prompt 0: answer 0, wrong {1, 2} (one pad). Prompt 1: answer 3, wrong {4, 5, 1}.
    # A version that broadcasts answers against every row, counts the -1 pad as token 0 or
    # keeps the negated sign gives other values.
    data = TaskData(
        clean=torch.zeros(2, 1, dtype=torch.long),
        corrupt=torch.zeros(2, 1, dtype=torch.long),
        lengths=torch.ones(2, dtype=torch.long),
        target_pos=torch.zeros(2, dtype=torch.long),
        answers=torch.tensor([[0], [3]]),
        wrong=torch.tensor([[1, 2, -1], [4, 5, 1]]),
        groups=torch.zeros(2, dtype=torch.long),
        group_names=("rest",),
    )
    logits = torch.tensor([[5.0, 1.0, 2.0, 9.0, 9.0, 9.0], [9.0, 8.0, 0.0, 4.0, 1.0, 2.0]])
    assert task.metric(logits, data).tolist() == [3.0, -4.0]


def test_a_tokenizer_without_enough_names_is_rejected(task):
    tok = word_level_tokenizer([w for w in vocabulary() if w not in NAMES[11:]])
    with pytest.raises(TaskError, match="11 single-token names"):
        task.generate(tok, 10, seed=0)


def test_a_tokenizer_without_description_words_is_rejected(task):
    tok = word_level_tokenizer([w for w in vocabulary() if w not in DESC_WORDS])
    with pytest.raises(TaskError, match="description words"):
        task.generate(tok, 10, seed=0)
