"""The greater-than generator and metric, under a word-level tokenizer and GPT-2's BPE."""

import math

import pytest
import torch

from appbench import TaskData, TaskError, word_level_tokenizer
from appbench_tasks.greater_than import GreaterThanTask
from appbench_tasks.greater_than.generate import NOUNS, usable_years, vocabulary


@pytest.fixture(scope="module")
def word_tok():
    return word_level_tokenizer(vocabulary())


@pytest.fixture(params=["word_tok", "gpt2_tok"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def task():
    return GreaterThanTask()


def start_year(prompt: str) -> tuple[str, int]:
    """(century, YY) read back from a clean prompt's text."""
    year = prompt.split("from the year ")[1].split()[0]
    return year[:2], int(year[2:])


def test_spec_comes_from_task_yaml(task):
    assert task.name == "greater_than" and task.spec.version == "1.0"
    assert "Hanna" in task.spec.citation
    assert (task.spec.n_search, task.spec.n_eval) == (100, 200)


def test_generation_is_deterministic_and_seed_dependent(task, word_tok):
    a = task.generate(word_tok, 80, seed=3)
    assert a == task.generate(word_tok, 80, seed=3)
    assert a != task.generate(word_tok, 80, seed=4)
    assert len({p.clean for p in a}) == 80


def test_answers_are_exactly_the_later_years(task, tokenizer):
    search, _ = task.splits(tokenizer, 60, 10, seed=0)
    for i, prompt in enumerate(search.prompts):
        century, yy = start_year(prompt)
        assert 2 <= yy <= 98 and prompt.endswith(f"to the year {century}")
        answers = [tokenizer.decode([t]).strip() for t in search.answers[i].tolist() if t >= 0]
        wrong = [tokenizer.decode([t]).strip() for t in search.wrong[i].tolist() if t >= 0]
        assert answers == [f"{y:02d}" for y in range(yy + 1, 100)], prompt
        assert wrong == [f"{y:02d}" for y in range(yy + 1)], prompt
        last = tokenizer.decode([int(search.clean[i, search.target_pos[i]])]).strip()
        assert last == century


def test_clean_and_corrupt_differ_only_in_the_start_year(task, tokenizer):
    search, _ = task.splits(tokenizer, 60, 10, seed=1)
    diff = (search.clean != search.corrupt) & search.pad_mask()
    assert bool((diff.sum(1) == 1).all())
    for i in range(len(search)):
        (pos,) = diff[i].nonzero()[:, 0].tolist()
        century, yy = start_year(search.prompts[i])
        corrupted = tokenizer.decode([int(search.corrupt[i, pos])]).strip()
        clean = tokenizer.decode([int(search.clean[i, pos])]).strip()
        # BPE: " 17" + "32" vs " 17" + "01"; word level: "1732" vs "1701"
        assert corrupted in ("01", century + "01") and clean in (f"{yy:02d}", f"{century}{yy:02d}")


def test_gpt2_years_split_into_century_and_two_digit_token(gpt2_tok):
    years = usable_years(gpt2_tok)
    assert sorted(years) == [str(c) for c in range(11, 18)]
    assert 32 in years["17"] and len(years["17"]) == 97
    assert 2 not in years["11"]  # " 1102" is " 110" + "2"
    assert 80 not in years["12"]  # " 1280" is a single token
    assert 40 not in years["14"]  # " 1440" is a single token
    for century, kept in years.items():
        for yy in kept:
            ids = gpt2_tok.encode(f" {century}{yy:02d}")
            assert gpt2_tok.convert_ids_to_tokens(ids) == [f"Ġ{century}", f"{yy:02d}"]


def test_lengths_are_fixed_per_tokenizer(task, word_tok, gpt2_tok):
    for tok, length in ((word_tok, 11), (gpt2_tok, 12)):
        search, evaluation = task.splits(tok, 40, 40, seed=2)
        assert set(search.lengths.tolist()) == set(evaluation.lengths.tolist()) == {length}
        assert search.group_names == ("year",)


def test_splits_are_disjoint(task, tokenizer):
    search, evaluation = task.splits(tokenizer, seed=5)
    assert (len(search), len(evaluation)) == (100, 200)
    assert not set(search.prompts) & set(evaluation.prompts)


def fake_data(answers, wrong):
    n = len(answers)
    zeros = torch.zeros(n, 1, dtype=torch.long)
    return TaskData(
        clean=zeros,
        corrupt=zeros,
        lengths=torch.ones(n, dtype=torch.long),
        target_pos=torch.zeros(n, dtype=torch.long),
        answers=torch.tensor(answers),
        wrong=torch.tensor(wrong),
        groups=torch.zeros(n, dtype=torch.long),
        group_names=("year",),
    )


def test_metric_is_the_probability_difference(task):
    # vocabulary of 5 tokens: 0 "00", 1 "01", 2 "02", 3 "03", 4 something else
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    data = fake_data([[2, 3], [3, -1]], [[0, 1], [0, 1]])
    probs = [[math.exp(v) for v in row] for row in logits.tolist()]
    probs = [[p / sum(row) for p in row] for row in probs]
    expected = [
        probs[0][2] + probs[0][3] - probs[0][0] - probs[0][1],
        probs[1][3] - probs[1][0] - probs[1][1],  # the -1 pad counts for nothing
    ]
    assert task.metric(logits, data).tolist() == pytest.approx(expected, rel=1e-6)


def test_metric_extremes(task):
    data = fake_data([[2, 3]], [[0, 1]])
    all_on_answer = torch.tensor([[-50.0, -50.0, 50.0, -50.0, -50.0]])
    all_on_wrong = torch.tensor([[-50.0, 50.0, -50.0, -50.0, -50.0]])
    assert task.metric(all_on_answer, data).item() == pytest.approx(1.0)
    assert task.metric(all_on_wrong, data).item() == pytest.approx(-1.0)


def test_a_tokenizer_without_two_digit_years_is_rejected(task):
    with pytest.raises(TaskError, match="two-digit year"):
        task.generate(word_level_tokenizer(["The", "year", *NOUNS]), 10, seed=0)


def test_a_tokenizer_without_the_years_is_rejected(task):
    # two-digit tokens but no centuries nor four-digit years
    tok = word_level_tokenizer([*NOUNS, *(f"{y:02d}" for y in range(100))])
    with pytest.raises(TaskError, match="cannot express"):
        task.generate(tok, 10, seed=0)


def test_asking_for_more_prompts_than_exist_is_rejected(task):
    tok = word_level_tokenizer([w for w in vocabulary() if w not in NOUNS[1:]])
    # one noun and 7 x 97 years
    assert len(task.generate(tok, 7 * 97, seed=0)) == 7 * 97
    with pytest.raises(TaskError, match="distinct prompts"):
        task.generate(tok, 7 * 97 + 1, seed=0)
