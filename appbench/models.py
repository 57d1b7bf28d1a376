"""Model loading: registered models (the zoo, plugins), local Hugging Face directories,
TransformerLens names, the cache directory.

Every model is a TransformerLens ``HookedTransformer`` with **unprocessed** weights (no folded
layer norms or centred weights): FLAP reads ``W_O`` norms, which processing changes.

``load_model(name)`` resolves, in order: a path to an existing directory (a Hugging Face
causal-LM folder saved with ``save_pretrained``), a registered model, a TransformerLens model
name. Only the last may contact the Hugging Face hub, and only when it answers quickly: an
unreachable hub switches that load to offline mode, so that cached weights still load and
missing ones fail at once instead of after half a minute of retries.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
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


#: Seconds to wait for the Hugging Face hub before treating it as unreachable.
HUB_PROBE_TIMEOUT = 3.0


def hub_endpoint() -> str:
    """The Hugging Face hub endpoint in use (``$HF_ENDPOINT`` or huggingface.co)."""
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT)
    except ImportError:
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_offline_requested() -> bool:
    """Whether the user switched the hub off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    try:
        from huggingface_hub import constants

        return bool(constants.is_offline_mode())
    except ImportError:
        flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
        return any((f or "").upper() in {"1", "ON", "YES", "TRUE"} for f in flags)


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """Whether the hub answers an HTTP request within ``timeout`` seconds (any status counts).

    Goes through httpx, as huggingface_hub does, so proxy settings in the environment apply.
    """
    try:
        import httpx
    except ImportError:  # cannot probe: let the hub client decide
        return True
    try:
        httpx.head(hub_endpoint(), timeout=timeout, follow_redirects=False)
    except (httpx.HTTPError, OSError):
        return False
    return True


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Offline mode for the Hugging Face libraries inside the block, restored afterwards.

    huggingface_hub reads ``HF_HUB_OFFLINE`` once, at import, into ``constants.HF_HUB_OFFLINE``;
    its ``is_offline_mode()`` (which transformers consults) returns that constant, so the
    constant is switched along with the variable (the variable covers subprocesses).
    """
    try:
        from huggingface_hub import constants
    except ImportError:
        constants = None  # type: ignore[assignment]
    saved_env = os.environ.get("HF_HUB_OFFLINE")
    saved_const = bool(getattr(constants, "HF_HUB_OFFLINE", False))
    os.environ["HF_HUB_OFFLINE"] = "1"
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env
        if constants is not None:
            constants.HF_HUB_OFFLINE = saved_const


def _hf_cache_hint() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return "the Hugging Face cache"


def load_transformer_lens(name: str, device: str) -> Any:
    """A TransformerLens model by official name, unprocessed; one clear error when unavailable.

    When the hub is unreachable (or ``HF_HUB_OFFLINE`` is set) the load runs in offline mode:
    weights already in the Hugging Face cache load, missing ones fail at once. Users with hub
    access download as usual.
    """
    import warnings

    offline = hub_offline_requested() or not hub_reachable()
    guard = hub_offline() if offline else contextlib.nullcontext()
    try:
        from transformer_lens import HookedTransformer

        with guard, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = HookedTransformer.from_pretrained_no_processing(name, device=device)
    except OSError as exc:
        if offline:
            raise ModelLoadError(
                f"model '{name}': the Hugging Face hub ({hub_endpoint()}) is unreachable or "
                f"switched off and the weights are not in {_hf_cache_hint()}; run "
                f"`appbench models pull {name}` once with hub access, or pass a local model "
                "directory (--model ./dir)"
            ) from exc
        raise ModelLoadError(
            f"model '{name}': cannot download it from the Hugging Face hub "
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    if model.tokenizer is not None:
        model.tokenizer.padding_side = "right"
    model.eval()
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def is_transformer_lens_name(name: str) -> bool:
    """Whether TransformerLens knows ``name`` (an official model name or alias)."""
    try:
        from transformer_lens.loading_from_pretrained import get_official_model_name

        get_official_model_name(name)
        return True
    except (ValueError, ImportError):
        return False


def transformer_lens_names() -> list[str]:
    """Every official TransformerLens model name and alias (empty if TransformerLens is absent)."""
    try:
        from transformer_lens.loading_from_pretrained import make_model_alias_map
    except ImportError:
        return []
    alias_map = make_model_alias_map()
    return sorted(set(alias_map) | set(alias_map.values()))


# ----------------------------------------------------------- local Hugging Face directories
#: Weight files a Hugging Face model directory may hold (any one suffices).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
#: Tokenizer files, any one of which lets AutoTokenizer load the directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a filesystem path rather than a model name."""
    return (
        name.startswith(("./", "../", "/", "~", ".\\", "..\\"))
        or name in {".", ".."}
        or Path(name).expanduser().exists()
    )


def load_hf_directory(path: str | Path, device: str = "cpu", n_ctx: int | None = None) -> Any:
    """A Hugging Face causal-LM directory as a HookedTransformer with unprocessed weights.

    The directory needs ``config.json`` (with ``architectures``), weights (safetensors or
    PyTorch) and a tokenizer, as ``save_pretrained`` writes them. Weights are loaded in float32
    with Hugging Face, then converted by TransformerLens's own converter for the architecture;
    nothing is folded or centred. Nothing is downloaded: the load runs in offline mode.

    Args:
        path: the directory.
        device: torch device for the TransformerLens model.
        n_ctx: context length to build the model with (default: the config's). TransformerLens
            allocates an ``n_ctx x n_ctx`` causal mask per layer, so a shorter context saves
            memory on long-context models; the weights do not depend on it.

    Raises:
        ModelLoadError: the directory lacks a usable config, weights or tokenizer, or
            TransformerLens cannot convert its architecture.
    """
    import warnings

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"{path}: no such model directory")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(
            f"{folder}: no config.json; expected a Hugging Face model directory "
            "(save_pretrained writes config.json, model.safetensors and the tokenizer files)"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config_file}: not valid JSON ({_first_line(exc)})") from exc
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not architectures:
        raise ModelLoadError(
            f"{config_file}: no 'architectures' entry (e.g. [\"LlamaForCausalLM\"]); "
            "TransformerLens picks its converter by architecture"
        )
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise ModelLoadError(f"{folder}: no weights (expected one of {', '.join(WEIGHT_FILES)})")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{folder}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)}); "
            "save the tokenizer with tokenizer.save_pretrained(dir)"
        )
    with hub_offline(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _convert_hf_directory(folder, str(architectures[0]), device, n_ctx)


def _convert_hf_directory(folder: Path, architecture: str, device: str, n_ctx: int | None) -> Any:
    import torch
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import (
        get_pretrained_model_config,
        get_pretrained_state_dict,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises many types for broken tokenizer files
        raise ModelLoadError(f"{folder}: cannot load the tokenizer ({_first_line(exc)})") from exc
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except Exception as exc:
        raise ModelLoadError(
            f"{folder}: Hugging Face cannot load the model ({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    # TransformerLens chooses some converters by substrings of the model *name* ("llama",
    # "gemma", ...) and then skips reading the config, so a directory named after its model
    # breaks it. A neutrally named copy of config.json makes the config.json alone decide.
    with tempfile.TemporaryDirectory(prefix="appbench-config-") as tmp:
        neutral = Path(tmp) / "local-model"
        neutral.mkdir()
        shutil.copy(folder / "config.json", neutral / "config.json")
        try:
            cfg = get_pretrained_model_config(
                str(neutral), fold_ln=False, device=device, dtype=torch.float32, n_ctx=n_ctx
            )
            cfg.model_name = folder.resolve().name
            state = get_pretrained_state_dict(str(neutral), cfg, hf_model=hf_model)
        except Exception as exc:  # TransformerLens raises anything from KeyError to NotImplemented
            raise ModelLoadError(
                f"{folder}: TransformerLens 3.9 cannot convert architecture {architecture} "
                f"({type(exc).__name__}: {_first_line(exc)})"
            ) from exc
    del hf_model
    try:
        model = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right")
        model.load_and_process_state_dict(
            state,
            fold_ln=False,
            center_writing_weights=False,
            center_unembed=False,
            fold_value_biases=False,
            refactor_factored_attn_matrices=False,
        )
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise ModelLoadError(
            f"{folder}: the converted weights do not fit ({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    if model.tokenizer is not None:
        model.tokenizer.padding_side = "right"
    model.eval()
    return model


def _unknown_model(name: str, registered: list[str]) -> ModelLoadError:
    """One line: the unknown name, the closest registered or TransformerLens name, the options."""
    close = difflib.get_close_matches(name, registered, n=1) or difflib.get_close_matches(
        name, transformer_lens_names(), n=1, cutoff=0.75
    )
    hint = f" Did you mean '{close[0]}'?" if close else ""
    listing = ", ".join(registered) if registered else "(none)"
    return ModelLoadError(
        f"Unknown model '{name}'.{hint} Available: {listing}, any TransformerLens model name "
        "(e.g. 'gpt2') or a local Hugging Face model directory (e.g. ./my-model)"
    )


def check_model_name(name: str) -> None:
    """Raise the ModelLoadError :func:`load_model` would for a name that names no model,
    without loading anything (a sweep checks every model before its first run): a local
    directory, a registered model or a TransformerLens name passes."""
    from appbench.plugins import get_registries

    if Path(name).expanduser().is_dir():
        return
    models = get_registries().models
    if name in models:
        return
    if Path(name).expanduser().is_file():
        raise ModelLoadError(f"{name}: a file, not a model directory")
    if looks_like_path(name):
        raise ModelLoadError(f"{name}: no such model directory")
    if not is_transformer_lens_name(name):
        raise _unknown_model(name, models.names())


def load_model(name: str, device: str = "cpu") -> Any:
    """Load a local model directory, a registered model, else a TransformerLens model by name.

    Raises:
        ModelLoadError: unknown name (with did-you-mean over registered and TransformerLens
            names), a path that is not a usable model directory, or weights that cannot be had.
    """
    from appbench.plugins import get_registries

    if Path(name).expanduser().is_dir():
        return load_hf_directory(name, device)
    models = get_registries().models
    if name in models:
        entry = models.entry(name)
        try:
            return entry.obj.loader(device)
        except ModelLoadError:
            raise
        except Exception as exc:
            # A plugin's loader that crashes: one line naming the plugin and its distribution.
            what = type(exc).__name__ + (f": {_first_line(exc)}" if str(exc).strip() else "")
            raise ModelLoadError(
                f"model '{name}' from {entry.owner} failed to load: {what} "
                "(rerun with --debug for the traceback)"
            ) from exc
    if Path(name).expanduser().is_file():
        raise ModelLoadError(f"{name}: a file, not a model directory")
    if looks_like_path(name):
        raise ModelLoadError(f"{name}: no such model directory")
    if is_transformer_lens_name(name):
        return load_transformer_lens(name, device)
    raise _unknown_model(name, models.names())
