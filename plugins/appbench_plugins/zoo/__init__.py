"""The built-in model zoo: small models trained by appbench itself, committed as safetensors.

Zoo models need no download, so ``appbench run`` works offline out of the box. Each model lives
in ``weights/<name>/`` (config.json, model.safetensors, tokenizer files, README.md model card)
and is rebuilt with ``appbench zoo train <name>``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import click

from appbench import ModelLoadError, get_registries, hookimpl, load_model_folder, save_model_folder
from appbench_plugins.zoo.train import Recipe

RECIPES = {
    "zoo-ioi": Recipe(
        name="zoo-ioi",
        tasks=("ioi",),
        description=(
            "A 4-layer, 8-head attention-only transformer trained from scratch on the IOI "
            "grammar: the default model of `appbench run`."
        ),
        attn_only=True,
    ),
    "zoo-multitask": Recipe(
        name="zoo-multitask",
        tasks=("ioi", "greater_than", "induction", "gendered_pronouns", "docstring"),
        description=(
            "A 4-layer, 8-head transformer with MLPs trained from scratch on synthetic versions "
            "of all five built-in tasks, so that heads specialise by task."
        ),
        n_ctx=64,
        d_mlp=256,
        batch_size=64,
        steps=3000,
    ),
}

#: The model `appbench run` uses when --model is not given.
DEFAULT_MODEL = "zoo-multitask"


def weights_folder(name: str):
    return resources.files("appbench_plugins.zoo").joinpath("weights", name)


def _loader(name: str):
    def load(device: str = "cpu"):
        folder = weights_folder(name)
        if not folder.joinpath("model.safetensors").is_file():
            raise ModelLoadError(
                f"zoo model '{name}' has no weights in this install; build them with "
                f"`appbench zoo train {name}`"
            )
        return load_model_folder(folder, device)

    return load


@hookimpl
def appbench_register_models(register):
    for name, recipe in RECIPES.items():
        register(name, _loader(name), recipe.description)


@hookimpl
def appbench_register_commands(cli):
    @cli.group()
    def zoo():
        """Build the zoo's small models (appbench zoo train NAME)."""

    @zoo.command()
    @click.argument("name", type=click.Choice(sorted(RECIPES)))
    @click.option(
        "--out",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Folder to write the model to (default: the zoo's own weights folder).",
    )
    @click.option(
        "--steps", type=click.IntRange(min=1), default=None, help="Override the recipe's steps."
    )
    @click.option("--seed", type=int, default=None, help="Override the recipe's seed.")
    def train(name, out, steps, seed):
        """Train zoo model NAME from scratch and write weights and model card.

        Example: appbench zoo train zoo-ioi
        """
        from dataclasses import replace

        from appbench_plugins.zoo.train import model_card
        from appbench_plugins.zoo.train import train as run_training

        recipe = RECIPES[name]
        if steps is not None:
            recipe = replace(recipe, steps=steps)
        if seed is not None:
            recipe = replace(recipe, seed=seed)
        registry = get_registries().tasks
        tasks = {t: registry.get(t) for t in recipe.tasks}
        log = lambda line: click.echo(line, err=True)  # noqa: E731
        model, config, report = run_training(recipe, tasks, log)
        folder = out or Path(str(weights_folder(name)))
        save_model_folder(model, folder, config, model_card(recipe, config, report))
        for task, result in report["tasks"].items():
            log(
                f"{task}: accuracy {result['accuracy']:.3f}, mean metric {result['mean_metric']:.3f}"
            )
        click.echo(str(folder))
