"""Model loading: registered models (the zoo, plugins), TransformerLens names, the cache directory.

Every model is a TransformerLens ``HookedTransformer`` with **unprocessed** weights (no folded
layer norms or centred weights): FLAP reads ``W_O`` norms, which processing changes.
"""

from __future__ import annotations

import json
import os
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any


class ModelLoadError(RuntimeError):
    """A model cannot be loaded (unknown name, weights unavailable offline, corrupt files)."""


def cache_dir() -> Path:
    """appbench's cache: ``$APPBENCH_CACHE``, else ``$XDG_CACHE_HOME/appbench``, else ~/.cache."""
    root = os.environ.get("APPBENCH_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg or Path.home() / ".cache") / "appbench"


def load_tokenizer(folder: Traversable | Path) -> Any:
    """A fast tokenizer saved with ``save_pretrained`` in ``folder``."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(folder))


#: Special tokens of appbench's word-level tokenizers, with ids 0, 1, 2.
SPECIAL_TOKENS = ("<pad>", "<unk>", "<eos>")


def word_level_tokenizer(words: list[str]) -> Any:
    """A fast word-level tokenizer over ``words``, splitting on spaces and punctuation.

    Ids follow the order of SPECIAL_TOKENS then ``words`` (duplicates dropped), so a word list
    fixes the vocabulary exactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys([*SPECIAL_TOKENS, *words]))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    core.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )


def build_model(config: dict[str, Any], tokenizer: Any = None, device: str = "cpu") -> Any:
    """A randomly initialised HookedTransformer from ``HookedTransformerConfig`` keyword args."""
    import warnings

    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(**{**config, "device": device})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")
        model = HookedTransformer(cfg)
    # Attached directly: TransformerLens's set_tokenizer reloads tokenizers by name from the hub
    # to add a BOS token, which our word-level tokenizers neither have nor need.
    if tokenizer is not None:
        tokenizer.padding_side = "right"
        model.tokenizer = tokenizer
    return model


def load_model_folder(folder: Traversable | Path, device: str = "cpu") -> Any:
    """Load a model saved by :func:`save_model_folder` (config.json, model.safetensors, tokenizer)."""
    from safetensors.torch import load as load_safetensors

    try:
        config = json.loads(folder.joinpath("config.json").read_text())
        tokenizer = load_tokenizer(folder) if folder.joinpath("tokenizer.json").is_file() else None
        state = load_safetensors(folder.joinpath("model.safetensors").read_bytes())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder}: cannot read the model files ({exc})") from exc
    model = build_model(config, tokenizer, device)
    try:
        model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False)
    except RuntimeError as exc:
        raise ModelLoadError(f"{folder}: weights do not fit config.json ({exc})") from exc
    missing = set(model.state_dict()) - set(state)
    # TransformerLens keeps causal masks and rotary tables as buffers; only parameters must match.
    missing_params = {name for name in missing if name in dict(model.named_parameters())}
    if missing_params:
        raise ModelLoadError(f"{folder}: model.safetensors lacks {sorted(missing_params)[:3]}")
    model.eval()
    return model


def save_model_folder(model: Any, folder: Path, config: dict[str, Any], card: str) -> None:
    """Write config.json, model.safetensors (parameters only), the tokenizer and a model card."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    params = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()}
    save_file(params, str(folder / "model.safetensors"))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(folder))
    (folder / "README.md").write_text(card)


def load_transformer_lens(name: str, device: str) -> Any:
    """A TransformerLens model by official name, unprocessed; one clear error when unavailable."""
    import warnings

    try:
        from transformer_lens import HookedTransformer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = HookedTransformer.from_pretrained_no_processing(name, device=device)
    except OSError as exc:
        raise ModelLoadError(
            f"model '{name}': weights are not in the Hugging Face cache and the hub is unreachable "
            f"({type(exc).__name__}); download them once with hub access, or pass a local directory"
        ) from exc
    if model.tokenizer is not None:
        model.tokenizer.padding_side = "right"
    model.eval()
    return model


def is_transformer_lens_name(name: str) -> bool:
    """Whether TransformerLens knows ``name`` (an official model name or alias)."""
    try:
        from transformer_lens.loading_from_pretrained import get_official_model_name

        get_official_model_name(name)
        return True
    except (ValueError, ImportError):
        return False


def load_model(name: str, device: str = "cpu") -> Any:
    """Load a registered model, else a TransformerLens model by name.

    Raises:
        ModelLoadError: unknown name (with did-you-mean over registered models), or weights
            that cannot be had.
    """
    from appbench.plugins import get_registries
    from appbench.registry import UnknownNameError

    models = get_registries().models
    if name in models:
        return models.get(name).loader(device)
    if is_transformer_lens_name(name):
        return load_transformer_lens(name, device)
    try:
        models.get(name)
    except UnknownNameError as exc:
        raise ModelLoadError(f"{exc} (or any TransformerLens model name, e.g. 'gpt2')") from None
    raise AssertionError("unreachable")
