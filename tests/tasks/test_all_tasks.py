"""Every registered task: valid, aligned default splits under a word-level tokenizer built from
its own vocabulary and under GPT-2's BPE, a sound task.yaml, a metric that rewards answers, and
a TaskError under a tokenizer that cannot express the task."""

import functools

import pytest
import torch

from appbench import TaskError, get_registries, word_level_tokenizer

TASKS = get_registries().tasks.names()


@functools.cache
def word_tokenizer(name):
    task = get_registries().tasks.get(name)
    try:
        return word_level_tokenizer(task.vocabulary())
    except NotImplementedError:
        return None


@pytest.fixture(params=["word", "gpt2"])
def tokenizer_for(request, gpt2_tok):
    def get(name):
        if request.param == "gpt2":
            return gpt2_tok
        tok = word_tokenizer(name)
        if tok is None:
            pytest.skip(f"task {name!r} lists no vocabulary (subword tokenizers only)")
        return tok

    return get


def test_the_built_in_tasks_are_registered():
    assert {"ioi", "greater_than", "induction", "gendered_pronouns", "docstring"} <= set(TASKS)


@pytest.mark.parametrize("name", TASKS)
def test_spec(name):
    spec = get_registries().tasks.get(name).spec
    assert spec.name == name
    assert spec.summary and spec.citation and spec.metric and spec.version
    assert spec.n_search > 0 and spec.n_eval > 0


@pytest.mark.parametrize("name", TASKS)
def test_vocabulary_words_are_single_tokens_of_a_word_level_tokenizer(name):
    tok = word_tokenizer(name)
    if tok is None:
        pytest.skip(f"task {name!r} lists no vocabulary")
    words = get_registries().tasks.get(name).vocabulary()
    for word in words:
        ids = tok.encode(word, add_special_tokens=False)
        assert tok.convert_ids_to_tokens(ids) == [word], f"{word!r} is no single word"


@pytest.mark.parametrize("name", TASKS)
def test_default_splits_are_valid_and_aligned(name, tokenizer_for):
    task = get_registries().tasks.get(name)
    tok = tokenizer_for(name)
    search, evaluation = task.splits(tok)
    assert (len(search), len(evaluation)) == (task.spec.n_search, task.spec.n_eval)
    assert len(set(search.prompts) | set(evaluation.prompts)) == len(search) + len(evaluation)
    assert task.splits(tok)[0].prompts == search.prompts  # deterministic
    unk = getattr(tok, "unk_token_id", None)
    for data in (search, evaluation):
        n, t = data.clean.shape
        assert data.corrupt.shape == (n, t) and data.clean.dtype == torch.long
        real = data.pad_mask()
        assert int(data.lengths.max()) == t and bool((data.target_pos < data.lengths).all())
        assert bool((data.clean[~real] == data.corrupt[~real]).all())
        if unk is not None:
            assert not bool((data.clean[real] == unk).any() | (data.corrupt[real] == unk).any())
        # every corruption changes something
        assert bool(((data.clean != data.corrupt) & real).any(1).all())
        assert bool(((data.answers >= 0).any(1) & (data.wrong >= 0).any(1)).all())
        assert int(max(data.answers.max(), data.wrong.max())) < len(tok)
        for answers, wrong in zip(data.answers.tolist(), data.wrong.tolist(), strict=True):
            assert not ({a for a in answers if a >= 0} & {w for w in wrong if w >= 0})
        assert list(data.group_names) == sorted(set(data.group_names))
        assert int(data.groups.min()) >= 0 and int(data.groups.max()) < data.n_groups


@pytest.mark.parametrize("name", TASKS)
def test_metric_rewards_answers_over_wrong_answers(name, tokenizer_for):
    task = get_registries().tasks.get(name)
    tok = tokenizer_for(name)
    search, _ = task.splits(tok, 16, 16, seed=7)
    vocab = len(tok)
    good = torch.zeros(16, vocab)
    bad = torch.zeros(16, vocab)
    rows = torch.arange(16)[:, None]
    for ids, high, low in ((search.answers, good, bad), (search.wrong, bad, good)):
        index = ids.clamp(min=0)
        high[rows.expand_as(index)[ids >= 0], index[ids >= 0]] = 10.0
        low[rows.expand_as(index)[ids >= 0], index[ids >= 0]] = -10.0
    good_metric, bad_metric = task.metric(good, search), task.metric(bad, search)
    assert good_metric.shape == (16,) and bool(torch.isfinite(good_metric).all())
    assert bool((good_metric > 0).all()) and bool((bad_metric < 0).all())
    noisy = task.metric(torch.randn(16, vocab), search)
    assert noisy.shape == (16,) and bool(torch.isfinite(noisy).all())


def byte_tokenizer():
    """GPT-2's byte-level BPE with its merges taken away: every byte is one token, so no word
    or name is a single token and no task can be expressed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate([*alphabet, "<|endoftext|>"])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")


@pytest.mark.parametrize("name", TASKS)
def test_a_tokenizer_that_cannot_express_the_task_raises_task_error(name):
    tok = byte_tokenizer()
    assert tok.convert_ids_to_tokens(tok.encode(" Mary")) == ["Ġ", "M", "a", "r", "y"]
    with pytest.raises(TaskError, match=name):
        get_registries().tasks.get(name).splits(tok, 4, 4)


@pytest.mark.parametrize("name", TASKS)
def test_the_metric_on_its_own_columns_equals_the_metric_on_all_logits(name):
    """The patching engine computes only the logits a metric reads (``Task.metric_columns``);
    the metric must come out the same as from the whole vocabulary."""
    from appbench import load_model
    from appbench.engine.patching import PatchingEngine

    # zoo-multitask runs every built-in task; an installed plugin task names its own model.
    model = load_model(get_registries().tasks.get(name).spec.default_model or "zoo-multitask")
    task = get_registries().tasks.get(name)
    data, _ = task.splits(model.tokenizer, n_search=20, n_eval=4)
    engine = PatchingEngine(model, task)
    torch.manual_seed(0)
    final = torch.randn(3, len(data), model.cfg.d_model) * 3  # three variants' final residuals
    expected = engine.metric(
        data, engine.unembed_residual(final.view(-1, final.shape[-1])).view(3, len(data), -1)
    )
    torch.testing.assert_close(engine.target_metric(data, final), expected, rtol=1e-5, atol=1e-5)
    columns = task.metric_columns(data)
    if name == "greater_than":  # a softmax over the vocabulary: every logit counts
        assert columns is None
    else:
        ids = torch.cat([data.answers.flatten(), data.wrong.flatten()])
        assert columns.tolist() == sorted(set(ids[ids >= 0].tolist()))


def test_a_task_that_overrides_the_metric_reads_every_logit_unless_it_says_otherwise():
    from appbench.testing import ToyTask, toy_tokenizer

    class Softmaxed(ToyTask):
        def metric(self, logits, data):
            return logits.softmax(-1)[:, 0]

    data, _ = ToyTask().splits(toy_tokenizer())
    assert ToyTask().metric_columns(data) is not None
    assert Softmaxed().metric_columns(data) is None
