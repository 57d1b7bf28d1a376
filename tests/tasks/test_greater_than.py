"""The greater-than generator and metric, under a word-level tokenizer and GPT-2's BPE
(two-digit mode) and under tokenizers that split numbers into digits (digit mode)."""

import math

import pytest
import torch

from appbench import TaskData, TaskError, cache_dir, word_level_tokenizer
from appbench_tasks.greater_than import GreaterThanTask
from appbench_tasks.greater_than.generate import (
    DIGIT,
    NOUNS,
    TWO_DIGIT,
    tokenization_mode,
    usable_years,
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
    return GreaterThanTask()


def start_year(prompt: str) -> tuple[str, int]:
    """(century, YY) read back from a clean prompt's text."""
    year = prompt.split("from the year ")[1].split()[0]
    return year[:2], int(year[2:])


def test_spec_comes_from_task_yaml(task):
    assert task.name == "greater_than" and task.spec.version == "1.1"
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


# ---------------------------------------------------------------------------------- digit mode

WORDS = ("lasted", "from", "the", "year", "to", *NOUNS)
DIGITS = [str(d) for d in range(10)]


def digit_tokenizer(spaced: bool = True, digits=DIGITS, split_digits: bool = True):
    """A word-level tokenizer that splits numbers into single digits.

    ``spaced`` mimics SmolLM2's byte-level BPE: words carry their leading space (" war") and
    the space before a number is a token of its own, so " 1739" is " ", "1", "7", "3", "9".
    Otherwise words split on whitespace and " 1739" is "1", "7", "3", "9". Without
    ``split_digits`` numbers stay whole (and unknown).
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [" ", "The", *(" " + w for w in WORDS)] if spaced else ["The", *WORDS]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<pad>", "<unk>", *words, *digits]))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    number = r"\d" if split_digits else r"\d+"
    if spaced:
        pattern = Regex(rf" ?[^\s\d]+|\s|{number}")
        core.pre_tokenizer = pre_tokenizers.Split(pattern, behavior="isolated")
    else:
        steps = [pre_tokenizers.WhitespaceSplit()]
        if split_digits:
            steps.append(pre_tokenizers.Digits(individual_digits=True))
        core.pre_tokenizer = pre_tokenizers.Sequence(steps)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module", params=[True, False], ids=["spaced", "plain"])
def digit_tok(request):
    return digit_tokenizer(spaced=request.param)


def test_the_digit_tokenizers_split_years_into_digits(digit_tok):
    tokens = digit_tok.convert_ids_to_tokens(digit_tok.encode(" 1739", add_special_tokens=False))
    assert tokens in ([" ", "1", "7", "3", "9"], ["1", "7", "3", "9"])


def test_the_mode_is_chosen_per_tokenizer(word_tok, gpt2_tok, digit_tok):
    assert tokenization_mode(word_tok) == tokenization_mode(gpt2_tok) == TWO_DIGIT
    assert tokenization_mode(digit_tok) == DIGIT
    years = usable_years(digit_tok)
    assert years == {str(c): [9, 19, 29, 39, 49, 59, 69, 79, 89] for c in range(11, 18)}


def tokens_of(tok, ids):
    return [tok.decode([t]).strip() for t in ids if t >= 0]


def test_digit_answers_are_the_tens_digits_above_the_start_years(task, digit_tok):
    # every prompt there is: 45 nouns x 7 centuries x 9 start years
    pairs = task.generate(digit_tok, 45 * 7 * 9, seed=0)
    assert len({p.clean for p in pairs}) == 2835
    search, _ = task.splits(digit_tok, 150, 10, seed=0)
    for i, prompt in enumerate(search.prompts):
        century, yy = start_year(prompt)
        tens = yy // 10
        assert yy % 10 == 9 and 0 <= tens <= 8 and prompt.endswith(f"to the year {century}")
        answers = tokens_of(digit_tok, search.answers[i].tolist())
        wrong = tokens_of(digit_tok, search.wrong[i].tolist())
        assert answers == [str(d) for d in range(tens + 1, 10)], prompt
        assert wrong == [str(d) for d in range(tens + 1)], prompt
        # the end year's tens digit: an end year later than YY has a larger tens digit
        assert all(int(f"{a}0") > yy for a in answers) and all(int(f"{w}9") <= yy for w in wrong)
        # the target is the century's last digit, and the next token is the end year's tens digit
        pos = int(search.target_pos[i])
        assert pos == int(search.lengths[i]) - 1
        assert tokens_of(digit_tok, [int(search.clean[i, pos])]) == [century[-1]]
        continued = digit_tok.encode(prompt + "45", add_special_tokens=False)
        assert continued[: pos + 1] == search.clean[i, : pos + 1].tolist()
        assert tokens_of(digit_tok, continued[pos + 1 :]) == ["4", "5"]


def test_a_hand_picked_digit_prompt(task, digit_tok):
    pairs = task.generate(digit_tok, 2835, seed=0)
    (pair,) = [p for p in pairs if p.clean == "The war lasted from the year 1739 to the year 17"]
    assert pair.corrupt == "The war lasted from the year 1701 to the year 17"
    assert pair.answers == ("4", "5", "6", "7", "8", "9")
    assert pair.wrong == ("0", "1", "2", "3")


def test_digit_corruption_changes_only_the_start_year_digits(task, digit_tok):
    search, evaluation = task.splits(digit_tok, 100, 200, seed=1)
    for data in (search, evaluation):
        assert data.clean.shape == data.corrupt.shape and len(set(data.lengths.tolist())) == 1
        for i, prompt in enumerate(data.prompts):
            _, yy = start_year(prompt)
            clean = data.clean[i].tolist()
            corrupt = data.corrupt[i].tolist()
            changed = [p for p in range(len(clean)) if clean[p] != corrupt[p]]
            # the start year's digits sit right before " to": tens then units
            to = tokens_of(digit_tok, clean).index("to")
            expected = [to - 1] if yy == 9 else [to - 2, to - 1]  # 09 and 01 share the tens 0
            assert changed == expected, prompt
            assert tokens_of(digit_tok, clean[to - 2 : to]) == list(f"{yy:02d}")
            assert tokens_of(digit_tok, corrupt[to - 2 : to]) == ["0", "1"]


def test_digit_generation_is_deterministic_and_distinct(task, digit_tok):
    a = task.generate(digit_tok, 300, seed=3)
    assert a == task.generate(digit_tok, 300, seed=3)
    assert a != task.generate(digit_tok, 300, seed=4)
    assert len({p.clean for p in a}) == 300
    with pytest.raises(TaskError, match="distinct prompts"):
        task.generate(digit_tok, 2836, seed=0)


def test_digit_metric_is_the_probability_difference_of_tens_digits(task, digit_tok):
    search, _ = task.splits(digit_tok, 20, 10, seed=6)
    logits = torch.randn(20, len(digit_tok))
    probs = logits.softmax(-1)
    digit_ids = [digit_tok.convert_tokens_to_ids(d) for d in DIGITS]
    for i, prompt in enumerate(search.prompts):
        tens = start_year(prompt)[1] // 10
        later = sum(probs[i, digit_ids[d]].item() for d in range(tens + 1, 10))
        earlier = sum(probs[i, digit_ids[d]].item() for d in range(tens + 1))
        assert task.metric(logits, search)[i].item() == pytest.approx(later - earlier, abs=1e-6)


def test_a_tokenizer_missing_a_digit_fits_neither_mode(task):
    tok = digit_tokenizer(digits=[d for d in DIGITS if d != "7"])
    with pytest.raises(TaskError, match=r"two-digit year 00\.\.99 or every digit 0\.\.9") as info:
        task.generate(tok, 10, seed=0)
    assert "\n" not in str(info.value)


def test_digits_without_digit_split_years_cannot_express_the_task(task):
    # digits are tokens, but " 1739" is one unknown word: no year fits
    tok = digit_tokenizer(spaced=False, split_digits=False)
    assert tokenization_mode(tok) == DIGIT and usable_years(tok) == {}
    with pytest.raises(TaskError, match="cannot express the task \\(digit mode\\)"):
        task.generate(tok, 10, seed=0)


# ---------------------------------------------------------------------- the real SmolLM2 (slow)

SMOLLM2 = cache_dir() / "models" / "smollm2-135m"


@pytest.mark.slow
def test_smollm2_tokenizer_uses_digit_mode(task):
    if not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip(f"no converted SmolLM2 in {SMOLLM2}")
    from appbench import load_tokenizer

    tok = load_tokenizer(SMOLLM2)
    assert tokenization_mode(tok) == DIGIT
    assert tok.convert_ids_to_tokens(tok.encode(" 1739")) == ["Ġ", "1", "7", "3", "9"]
    search, evaluation = task.splits(tok)
    assert (len(search), len(evaluation)) == (100, 200)
    for data in (search, evaluation):
        assert set(data.lengths.tolist()) == {17}
        diff = ((data.clean != data.corrupt) & data.pad_mask()).sum(1)
        assert bool(((diff >= 1) & (diff <= 2)).all())
        for i, prompt in enumerate(data.prompts):
            tens = start_year(prompt)[1] // 10
            answers = tokens_of(tok, data.answers[i].tolist())
            assert answers == [str(d) for d in range(tens + 1, 10)]
            assert tokens_of(tok, data.wrong[i].tolist()) == [str(d) for d in range(tens + 1)]


@pytest.mark.slow
def test_smollm2_does_greater_than(task):
    if not (SMOLLM2 / "model.safetensors").is_file():
        pytest.skip(f"no converted SmolLM2 in {SMOLLM2}")
    from appbench import PatchingEngine, load_model

    model = load_model("smollm2-135m")
    engine = PatchingEngine(model, task)
    _, evaluation = task.splits(model.tokenizer)
    with torch.no_grad():
        logits = engine.target_logits(evaluation)[0]
    clean = task.metric(logits, evaluation)
    corrupt = engine.corrupt_metric(evaluation)
    top = logits.argmax(-1)
    accuracy = (top[:, None] == evaluation.answers).any(1).float().mean().item()
    print(
        f"SmolLM2 greater_than (200 eval prompts): clean metric {clean.mean().item():.3f}, "
        f"metric > 0 on {(clean > 0).float().mean().item():.1%}, top-1 a later tens digit on "
        f"{accuracy:.1%}, corrupted metric {corrupt.mean().item():.3f}"
    )
    assert torch.allclose(clean, engine.clean_metric(evaluation), atol=1e-5)
    assert clean.mean().item() > corrupt.mean().item()
