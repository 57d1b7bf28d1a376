"""The built-in model zoo: small models trained by appbench itself, committed as safetensors.

Zoo models need no download, so ``appbench run`` works offline out of the box. Each model lives
in ``weights/<name>/`` (config.json, model.safetensors, tokenizer files, README.md model card)
and is rebuilt with ``appbench zoo train <name>``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import click

from appbench import (
    Head,
    ModelLoadError,
    get_registries,
    hookimpl,
    load_model_folder,
    save_model_folder,
)
from appbench_plugins.zoo.train import Recipe

RECIPES = {
    "zoo-ioi": Recipe(
        name="zoo-ioi",
        tasks=("ioi",),
        description=(
            "A 4-layer, 8-head attention-only transformer trained from scratch on the IOI "
            "grammar (the first zoo model)."
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

#: Ground-truth models: each task's behaviour runs through a designated chain of heads (one
#: per layer, strictly increasing), trained by SIIT and verified by ablation.
GROUND_TRUTH_CIRCUITS = {
    "ioi": (
        ("a0.h3", "duplicate-token: finds the repeated name"),
        ("a1.h5", "S-inhibition: marks the subject"),
        ("a2.h1", "name mover: moves the other name"),
        ("a3.h6", "output: writes the answer"),
    ),
    "greater_than": (
        ("a0.h1", "year reader: reads the start year's tens"),
        ("a1.h2", "mover: carries the year to the end"),
        ("a2.h7", "comparator: builds the later-year preference"),
        ("a3.h0", "output: writes the later years"),
    ),
    "induction": (
        ("a0.h6", "previous-token: copies each token's predecessor"),
        ("a1.h0", "induction: attends to the token after the earlier match"),
        ("a2.h4", "mover: carries the completion"),
        ("a3.h2", "output: writes the completion"),
    ),
    "gendered_pronouns": (
        ("a0.h2", "name reader: reads the name"),
        ("a1.h7", "gender: carries the name's gender"),
        ("a2.h5", "mover: carries it to the end"),
        ("a3.h4", "output: writes the pronoun"),
    ),
    "docstring": (
        # The answer's slot in the def is fixed by the layout, so the task needs no induction:
        # the chain reads the name there and passes it on through values (measured edges).
        ("a0.h5", "parameter reader: reads the name in the answer's slot of the def"),
        ("a1.h3", "mover: carries the name on"),
        ("a2.h0", "mover: carries it to the final position"),
        ("a3.h7", "output: writes its name"),
    ),
}

#: What each task's interchange loss asks of a designated head's ablation (siit module): in a
#: serial chain every head passes everything on, so ablating any one gives the corrupted output.
INTERCHANGE_TARGETS = {
    "greater_than": "corrupted-output",
    "induction": "both",
    "gendered_pronouns": "corrupted-output",
    "docstring": "source-output",
}

#: Tasks with a ground-truth model that trains to every verification goal.
GROUND_TRUTH_TASKS = ("ioi", "greater_than", "induction", "gendered_pronouns", "docstring")

#: Per task, the fraction of the steps after which the interchange loss joins (1.0: never; the
#: strict step's log-probability match alone leaves IOI's chain necessary, head by head).
#: Docstring's needs it from the start: its answer sits at a fixed position, so once the first
#: head has learned to copy it straight to the output (by 40% of the steps) the later heads
#: never become necessary (0.6% to 1.4% of the gap each).
INTERCHANGE_FROM = {"ioi": 1.0, "docstring": 0.0}
#: Per task, training steps (IOI learns slower than the others under the strict step).
STEPS = {"ioi": 1500, "docstring": 1500}
#: Per task, the width of each head (docstring's chain passes one of 80 names from head to
#: head, more than 16 dimensions carry cleanly among 28 ablated heads).
D_HEAD = {"docstring": 32}


#: Larger ground-truth models, (layers, heads) per task, so that cost curves have a slope: the
#: same chain of roles spread over more layers, among more distractor heads. They train with
#: the interchange step from the first step on, aimed at the source prompt's output
#: (``source-output``): with the paired prompt's output as the target from 40% of the steps on,
#: greater_than at 8 x 12 reached faithfulness 0.82 / -0.09 and gendered_pronouns 1.23 to 1.42,
#: its later chain heads unnecessary.
GROUND_TRUTH_SHAPES: dict[str, tuple[tuple[int, int], ...]] = {
    "ioi": ((8, 12),),
    "greater_than": ((8, 12),),
    "gendered_pronouns": ((6, 10), (8, 12)),
}


#: Training steps of the larger shapes.
LARGER_STEPS = 2000


def spread_chain(chain: tuple, n_layers: int, n_heads: int) -> tuple:
    """A 4-layer x 8-head designated chain moved to an ``n_layers`` x ``n_heads`` model: the
    i-th of k heads goes to layer round(i (n_layers - 1) / (k - 1)), head h to h n_heads // 8,
    so the chain starts in the first layer, ends in the last, and keeps its roles."""
    last = len(chain) - 1
    return tuple(
        (f"a{round(i * (n_layers - 1) / last)}.h{Head.parse(head).head * n_heads // 8}", role)
        for i, (head, role) in enumerate(chain)
    )


def ground_truth_name(task: str, shape: tuple[int, int] = (4, 8)) -> str:
    """``zoo-gt-<task>`` for the 4 x 8 model, ``zoo-gt-<task>-<L>x<H>`` for the larger ones."""
    return f"zoo-gt-{task}" if shape == (4, 8) else f"zoo-gt-{task}-{shape[0]}x{shape[1]}"


def ground_truth_recipe(task: str, shape: tuple[int, int] = (4, 8)) -> Recipe:
    """The recipe of a ground-truth model of ``task``: ``shape`` (layers, heads) with MLPs,
    one task, SIIT."""
    n_layers, n_heads = shape
    circuit = GROUND_TRUTH_CIRCUITS[task]
    if shape != (4, 8):
        circuit = spread_chain(circuit, n_layers, n_heads)
    return Recipe(
        name=ground_truth_name(task, shape),
        tasks=(task,),
        description=(
            f"Ground truth for {task}: {n_layers} layers x {n_heads} heads with MLPs, trained "
            f"by SIIT so that the task runs through a designated chain of 4 heads, verified by "
            f"ablation (see its model card)."
        ),
        n_layers=n_layers,
        n_heads=n_heads,
        d_head=D_HEAD.get(task, 16),
        n_ctx=64,
        d_mlp=256,
        batch_size=48,
        steps=STEPS.get(task, 1000) if shape == (4, 8) else LARGER_STEPS,
        circuits={task: circuit},
        interchange_from=INTERCHANGE_FROM.get(task, 0.4) if shape == (4, 8) else 0.0,
        interchange_targets={
            task: INTERCHANGE_TARGETS.get(task, "necessity") if shape == (4, 8) else "source-output"
        },
        consistency_weight=4.0,
    )


RECIPES.update({ground_truth_name(task): ground_truth_recipe(task) for task in GROUND_TRUTH_TASKS})
RECIPES.update(
    {
        ground_truth_name(task, shape): ground_truth_recipe(task, shape)
        for task, shapes in GROUND_TRUTH_SHAPES.items()
        for shape in shapes
    }
)


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
        missed: list[str] = []
        if recipe.circuits:
            from appbench_plugins.zoo.verify import meets_goals

            report["ground_truth"] = verify_recipe(recipe, model, tasks, log)
            missed = [
                f"{task}: {miss}"
                for task, figures in report["ground_truth"].items()
                for miss in meets_goals(figures)
            ]
        if missed and out is None:
            # An answer key that fails its own verification is not installed over the zoo's.
            raise click.ClickException(
                f"{name} misses its ground-truth goals ({'; '.join(missed)}); the zoo is left "
                "as it was (pass --out DIR to keep these weights for inspection)"
            )
        folder = out or Path(str(weights_folder(name)))
        save_model_folder(model, folder, config, model_card(recipe, config, report))
        for task, result in report["tasks"].items():
            log(
                f"{task}: accuracy {result['accuracy']:.3f}, mean metric {result['mean_metric']:.3f}"
            )
        if recipe.circuits and out is None:
            for task, figures in report["ground_truth"].items():
                path = write_ground_truth_reference(recipe, tasks[task], figures)
                log(f"{task}: ground-truth reference written to {path}")
        click.echo(str(folder))


def verify_recipe(recipe: Recipe, model, tasks: dict, log) -> dict:
    """Verify every designated circuit of ``recipe`` on its task's evaluation split."""
    from appbench_plugins.zoo.verify import meets_goals, verify_circuit

    verified = {}
    for task_name in recipe.circuits:
        task = tasks[task_name]
        _, evaluation = task.splits(model.tokenizer)
        figures = verify_circuit(
            model, task, frozenset(recipe.circuit_heads(task_name)), evaluation
        )
        missed = meets_goals(figures)
        log(
            f"{task_name}: ground truth faithfulness {figures['faithfulness_mean']:.3f} (mean) "
            f"{figures['faithfulness_resample']:.3f} (resample); "
            + ("meets every goal" if not missed else "MISSES " + "; ".join(missed))
        )
        verified[task_name] = figures
    return verified


def write_ground_truth_reference(recipe: Recipe, task, figures: dict) -> Path:
    """Record a verified designated circuit as the task's ground-truth reference for the model."""
    from appbench import ReferenceCircuit, ReferenceFile
    from appbench_plugins.zoo.verify import meets_goals

    circuit = recipe.circuits[task.name]
    necessity = ", ".join(f"{h} {v:.3f}" for h, v in figures["necessity"].items())
    missed = meets_goals(figures)
    reference = ReferenceCircuit(
        heads=[head for head, _ in circuit],
        kind="ground-truth",
        n_layers=recipe.n_layers,
        n_heads=recipe.n_heads,
        source=f"designated circuit of {recipe.name}, trained by `appbench zoo train "
        f"{recipe.name}` (SIIT, seed {recipe.seed})",
        method="built into the model by strict interchange-intervention training; verified by "
        "ablation on the evaluation split",
        parameters={"steps": recipe.steps, "batch_size": recipe.batch_size, "seed": recipe.seed},
        version="1.0",
        classes={role.split(":")[0]: [head] for head, role in circuit},
        edges=figures["edges"],
        notes=f"accuracy {figures['accuracy']:.3f}; normalised faithfulness with every other "
        f"head mean-ablated {figures['faithfulness_mean']:.3f}, resample-ablated "
        f"{figures['faithfulness_resample']:.3f}; gap lost when each head alone is "
        f"mean-ablated: {necessity}"
        + (f"; MISSES: {'; '.join(missed)}" if missed else "; meets every goal"),
    )
    folder = Path(str(resources.files(task.package).joinpath("reference")))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{recipe.name}.json"
    existing = task.reference_file(recipe.name)
    circuits = dict(existing.circuits) if existing else {}
    circuits["ground-truth"] = reference
    ref_file = ReferenceFile(
        task=task.name, model=recipe.name, default="ground-truth", circuits=circuits
    )
    path.write_text(ref_file.model_dump_json(indent=2) + "\n")
    return path
