"""The IOI generator: determinism, alignment, answers, splits, and tokenizers that cannot do it."""

import pytest

from appbench import TaskError, word_level_tokenizer
from appbench_tasks.ioi import IOITask
from appbench_tasks.ioi.generate import NAMES, templates, vocabulary


@pytest.fixture(scope="module")
def tokenizer():
    return word_level_tokenizer(vocabulary())


@pytest.fixture(scope="module")
def task():
    return IOITask()


def test_spec_comes_from_task_yaml(task):
    assert task.name == "ioi" and task.spec.version
    assert "Wang" in task.spec.citation


def test_generation_is_deterministic_and_seed_dependent(task, tokenizer):
    a = task.generate(tokenizer, 50, seed=3)
    assert a == task.generate(tokenizer, 50, seed=3)
    assert a != task.generate(tokenizer, 50, seed=4)
    assert len({p.clean for p in a}) == 50


def test_abba_and_baba_answers(task, tokenizer):
    for pair in task.generate(tokenizer, 64, seed=0):
        words = pair.clean.replace(",", " ").replace(".", " ").split()
        io, s = pair.answers[0].strip(), pair.wrong[0].strip()
        named = [w for w in words if w in NAMES]
        assert len(named) == 3 and named[2] == s, pair.clean
        expected = [io, s, s] if pair.group.startswith("ABBA") else [s, io, s]
        assert named == expected, pair.clean
        assert io not in pair.corrupt.split() and s not in pair.corrupt.replace(",", " ").split()


def test_clean_and_corrupt_are_aligned_token_for_token(task, tokenizer):
    search, evaluation = task.splits(tokenizer, 40, 40, seed=1)
    for data in (search, evaluation):
        assert data.clean.shape == data.corrupt.shape
        diff = (data.clean != data.corrupt) & data.pad_mask()
        # exactly the three name positions differ (a fresh name may coincide with the clean one)
        assert int(diff.sum(1).max()) == 3
        assert bool((data.target_pos == data.lengths - 1).all())
        assert data.answers.shape == (40, 1) and data.wrong.shape == (40, 1)


def test_splits_are_disjoint_and_cover_every_template(task, tokenizer):
    search, evaluation = task.splits(tokenizer, 64, 64, seed=2)
    assert not set(search.prompts) & set(evaluation.prompts)
    assert search.n_groups == len(templates()) == 16
    assert len(set(search.groups.tolist())) == 16


def test_a_tokenizer_without_the_names_is_rejected(task):
    tiny = word_level_tokenizer(["Then", "went"])
    with pytest.raises(TaskError, match="single-token names"):
        task.generate(tiny, 10, seed=0)
