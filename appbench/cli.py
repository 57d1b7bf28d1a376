"""The ``appbench`` command line: a thin click layer over the runner and the registries.

torch and TransformerLens are imported only inside commands that need them, so ``appbench
--help`` and ``appbench list`` stay fast. Bad input exits with code 2 and one line on stderr
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any, NoReturn

import click

from appbench import __version__


class _Device(click.ParamType):
    """A torch device a model can compute on: cpu, cuda, cuda:N or mps (checked before any
    model loads; whether this machine has it is checked when the run starts)."""

    name = "device"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        import re

        if not isinstance(value, str) or not re.fullmatch(r"cpu|cuda(:[0-9]+)?|mps", value):
            self.fail(f"{value!r} is not a device (cpu, cuda, cuda:N or mps)", param, ctx)
        return value


DEVICE = _Device()


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's input or environment, not appbench bugs: one line, exit 2."""
    from appbench.errors import PluginSkippedWarning, RunError
    from appbench.interchange import InterchangeError
    from appbench.models import ModelLoadError
    from appbench.registry import PluginError, UnknownNameError
    from appbench.results import ResultFileError
    from appbench.tasks import TaskError

    return (
        UnknownNameError,
        PluginError,
        ModelLoadError,
        TaskError,
        RunError,
        ResultFileError,
        InterchangeError,
        PluginSkippedWarning,  # under -W error
    )


@contextmanager
def results_only_on_stdout() -> Iterator[None]:
    """Send whatever a model loader or plugin prints to stderr while work runs, so that
    stdout holds only the result (one JSON document with --json)."""
    with redirect_stdout(sys.stderr):
        yield


def _reader_left() -> NoReturn:
    """stdout's reader went away (``appbench list | head -1``): stop quietly, as a program
    killed by SIGPIPE does (exit 141), without a second error when Python flushes stdout."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(141)


def fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


#: What click raises for a group called without a command (click 8.2 and later).
NO_ARGS_IS_HELP: tuple[type[click.UsageError], ...] = tuple(
    cls for cls in [getattr(click.exceptions, "NoArgsIsHelpError", None)] if cls is not None
)


class AppbenchGroup(click.Group):
    """Every failure one clean line: usage errors and bad input exit 2, runtime failures 1,
    an interrupt 130; ``--debug`` (anywhere on the command line) shows the traceback."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        words = list(sys.argv[1:] if args is None else args)
        if "--debug" in words[1:]:
            # Accepted after the subcommand too: it is the group's option.
            words = ["--debug"] + [w for w in words if w != "--debug"]
        try:
            code = super().main(words, prog_name, complete_var, False, **extra)
        except NO_ARGS_IS_HELP as exc:
            # `appbench` or `appbench reference` alone: the help, as click shows it.
            click.echo(exc.format_message())
            sys.exit(0)
        except click.exceptions.UsageError as exc:
            fail(exc.format_message().splitlines()[0], 2)
        except click.exceptions.Abort:
            fail("aborted", 1)
        except click.ClickException as exc:
            fail(exc.format_message().splitlines()[0], exc.exit_code)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        def debug() -> bool:  # set by the group's callback, inside super().invoke
            return bool(ctx.obj and ctx.obj.get("debug"))

        try:
            return super().invoke(ctx)
        except _user_errors() as exc:
            if debug():
                raise
            fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except BrokenPipeError:
            _reader_left()
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            if debug():
                raise
            first = str(exc).splitlines()[0] if str(exc) else ""
            fail(f"{type(exc).__name__}: {first} (rerun with --debug for the traceback)", 1)


@click.group(cls=AppbenchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="appbench")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """appbench: benchmark circuit discovery, pruners x discoverers x tasks x models.

    \b
    Examples:
      appbench run --pruner cflap --discoverer pathpatch
      appbench run --pruner magnitude --discoverer actpatch -p fraction 0.4
      appbench list pruners
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


KINDS = ("pruners", "discoverers", "tasks", "models")


def _listing(kind: str) -> list[dict[str, Any]]:
    from appbench.plugins import get_registries

    regs = get_registries()
    rows: list[dict[str, Any]] = []
    if kind in ("pruners", "discoverers"):
        registry = regs.pruners if kind == "pruners" else regs.discoverers
        for entry in registry:
            params = {
                name: {
                    "default": info.default if info.default is not None else None,
                    "description": info.description,
                }
                for name, info in entry.obj.Params.model_fields.items()
            }
            rows.append(
                {
                    "name": entry.name,
                    "summary": entry.obj.summary,
                    "owner": entry.owner,
                    "params": params,
                }
            )
    elif kind == "tasks":
        for task_entry in regs.tasks:
            spec = task_entry.obj.spec
            rows.append(
                {
                    "name": task_entry.name,
                    "summary": spec.summary,
                    "version": spec.version,
                    "metric": spec.metric,
                    "citation": spec.citation,
                    "owner": task_entry.owner,
                }
            )
    else:
        for model_entry in regs.models:
            rows.append(
                {
                    "name": model_entry.name,
                    "summary": model_entry.obj.description,
                    "owner": model_entry.owner,
                }
            )
    return rows


@cli.command("list")
@click.argument("kind", required=False, type=click.Choice(KINDS))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_command(kind: str | None, as_json: bool) -> None:
    """List registered pruners, discoverers, tasks and models (all kinds if KIND is omitted).

    \b
    Examples:
      appbench list
      appbench list pruners --json
    """
    kinds = [kind] if kind else list(KINDS)
    data = {k: _listing(k) for k in kinds}
    if as_json:
        click.echo(json.dumps(data if kind is None else data[kind], indent=2, default=str))
        return
    from tabulate import tabulate

    for k in kinds:
        click.echo(f"{k}:")
        # Naming one kind of plugin shows its parameters with their defaults too.
        with_params = kind is not None and k in ("pruners", "discoverers")
        rows = [
            [row["name"], row["summary"]]
            + (
                [", ".join(f"{p}={v['default']}" for p, v in row["params"].items()) or "-"]
                if with_params
                else []
            )
            for row in data[k]
        ]
        headers = ["name", "summary"] + (["parameters (defaults)"] if with_params else [])
        click.echo(
            tabulate(rows, headers=headers, tablefmt="simple", maxcolwidths=[None, 60, 60])
            if rows
            else "  (none)"
        )
        click.echo()


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins(as_json: bool) -> None:
    """Show plugins with their distributions and versions: the loaded ones, then those skipped
    because they are broken, with the error (status `skipped: ...`)."""
    from appbench.plugins import plugin_infos, skipped_plugins

    infos = [{**info.__dict__, "status": "loaded", "error": None} for info in plugin_infos()]
    infos += [{**s.__dict__, "status": "skipped"} for s in skipped_plugins()]
    if as_json:
        click.echo(json.dumps(infos, indent=2))
        return
    from tabulate import tabulate

    rows = [
        [i["name"], i["module"], i["dist"], i["version"], i["status"]]
        if i["error"] is None
        else [i["name"], i["module"], i["dist"], i["version"], f"skipped: {i['error']}"]
        for i in infos
    ]
    click.echo(tabulate(rows, headers=["name", "module", "distribution", "version", "status"]))


def _named_folder(ctx: click.Context, param: click.Parameter, value: str | None) -> Path | None:
    """An output folder must be named: ``--out ""`` would write into whatever folder the
    command happens to run in."""
    if value is None:
        return None
    if not value.strip():
        raise click.BadParameter("an empty folder name (give a folder, e.g. appbench-results)")
    return Path(value)


def _finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """A number of seconds must be one: ``nan`` and ``inf`` pass click's range check."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a number of seconds")
    return value


def _params(pairs: tuple[tuple[str, str], ...]) -> dict[str, str]:
    params: dict[str, str] = {}
    for key, value in pairs:
        if key in params:
            raise click.BadParameter(f"parameter {key!r} given twice")
        params[key] = value
    return params


def _cost(c: Any) -> str:
    backward = f" + {c.backward_prompt_passes:.0f} backward" if c.backward_prompt_passes else ""
    return (
        f"{c.wall_seconds:.2f} s, {c.prompt_passes:.0f} prompt passes{backward}, "
        f"{c.flops / 1e9:.2f} GFLOP"
    )


def _ratio(ratio: float) -> str:
    """A speedup ratio in words: "2.50x faster" or "3.40x slower" (never a negative %)."""
    if ratio != ratio:  # NaN: a zero-cost stage on one side
        return "not comparable"
    if ratio >= 1:
        return f"{ratio:.2f}x faster"
    return f"{1 / ratio:.2f}x slower"


def _saved(amount: float, unit: str) -> str:
    """``0.31 s saved``, or ``0.31 s lost`` when the pruned search cost more."""
    return f"{abs(amount):.2f} {unit} {'saved' if amount >= 0 else 'lost'}"


def _summary_table(result: Any, path: Path) -> str:
    from tabulate import tabulate

    f = result.faithfulness

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f}%"

    rows = [
        ["task / model", f"{result.task} / {result.model}"],
        ["pruner -> discoverer", f"{result.pruner} -> {result.discoverer}"],
        [
            "search space",
            f"{result.search_space_size}/{result.total_heads} heads (reduction {result.reduction:.1%})",
        ],
        [
            "circuit",
            f"{result.circuit_size} heads: {' '.join(result.circuit['heads']) or '(empty)'}",
        ],
        ["faithfulness 100·m(C)/m(M)", pct(f.percent)],
        [
            "faithfulness (m(C)-m(∅))/(m(M)-m(∅))",
            "n/a" if f.normalised is None else f"{f.normalised:.3f}",
        ],
        ["m(M) / m(∅) / m(C)", f"{f.m_model:.3f} / {f.m_empty:.3f} / {f.m_circuit:.3f}"],
    ]
    edge = result.edge_faithfulness
    if edge is not None:
        rows.append(
            [
                "edge faithfulness (normalised)",
                "n/a"
                if edge.normalised is None
                else f"{edge.normalised:.3f} (edges outside patched)",
            ]
        )
    if result.overlap is not None and result.reference is not None:
        o = result.overlap
        rows.append(
            [
                "overlap with reference",
                f"precision {o.precision:.2f}, recall {o.recall:.2f}, F1 {o.f1:.2f}, IoU {o.iou:.2f}",
            ]
        )
        if o.edge_f1 is not None:
            rows.append(
                [
                    "edge overlap",
                    f"precision {o.edge_precision:.2f}, recall {o.edge_recall:.2f}, "
                    f"F1 {o.edge_f1:.2f} ({len(result.reference.edges)} reference edges)",
                ]
            )
        aurocs = [
            f"{level} {value:.3f}"
            for level, value in (("heads", o.head_auroc), ("edges", o.edge_auroc))
            if value is not None
        ]
        if aurocs:
            rows.append(["score-sweep AUROC", ", ".join(aurocs)])
        sweep_aucs = [
            f"{level} {value:.3f}"
            for level, value in (("heads", o.head_sweep_auc), ("edges", o.edge_sweep_auc))
            if value is not None
        ]
        if sweep_aucs:
            rows.append(["threshold-sweep AUC", ", ".join(sweep_aucs)])
        rows.append(
            # The full provenance is in the result file; the table names the reference only.
            [
                "reference",
                f"{len(result.reference.heads)} heads: {result.reference.source.split(': ')[0]}",
            ]
        )
    for stage in ("prune", "discover", "evaluate"):
        c = result.cost[stage]
        rows.append([f"{stage} cost", _cost(c)])
        for name in sorted(k for k in result.cost if k.startswith(f"{stage}.")):
            rows.append([f"{name} cost (part of {stage})", _cost(result.cost[name])])
    if result.speedup is not None:
        s = result.speedup
        rows.append(
            [
                "speedup vs none",
                f"wall {_ratio(s.wall_ratio)}, FLOPs {_ratio(s.flops_ratio)} (prune + discover)",
            ]
        )
        rows.append(
            [
                "pruning paid / search saved",
                f"{s.prune_wall_seconds:.2f} s, {s.prune_flops / 1e9:.2f} GFLOP paid; "
                + _saved(s.saved_discover_wall_seconds, "s")
                + ", "
                + _saved(s.saved_discover_flops / 1e9, "GFLOP")
                + " of search",
            ]
        )
    for flag in result.flags:
        rows.append([f"FLAG {flag.code}", flag.message])
    rows.append(["result file", str(path)])
    return tabulate(rows, tablefmt="simple")


@cli.command()
@click.option(
    "--pruner",
    required=True,
    help="Pruner name (`none` = dense baseline); see `appbench list pruners`.",
)
@click.option(
    "--discoverer", required=True, help="Discoverer name; see `appbench list discoverers`."
)
@click.option(
    "--task", default="ioi", show_default=True, help="Task name; see `appbench list tasks`."
)
@click.option(
    "--model",
    default=None,
    help="Registered model (see `appbench models list`), a TransformerLens model name or a "
    "local Hugging Face model directory. Default: the task's ground-truth zoo model "
    "zoo-gt-TASK, or zoo-multitask for a task without one.",
)
@click.option(
    "--seed",
    type=click.IntRange(0, 2**32 - 1),
    default=None,
    help="Prompt seed, 0 to 2**32 - 1 (default: the task's own).",
)
@click.option(
    "--device",
    type=DEVICE,
    default="cpu",
    show_default=True,
    help="Torch device: cpu, cuda, cuda:N or mps.",
)
@click.option(
    "--n-search", type=click.IntRange(min=1), default=None, help="Search prompts (default: task's)."
)
@click.option(
    "--n-eval",
    type=click.IntRange(min=1),
    default=None,
    help="Evaluation prompts (default: task's).",
)
@click.option(
    "-p",
    "pruner_params",
    type=(str, str),
    multiple=True,
    metavar="KEY VALUE",
    help="Pruner parameter.",
)
@click.option(
    "-d",
    "discoverer_params",
    type=(str, str),
    multiple=True,
    metavar="KEY VALUE",
    help="Discoverer parameter.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="appbench-results",
    show_default=True,
    callback=_named_folder,
    help="Results folder; files go to OUT/<task>/<model>/<pruner>__<discoverer>.json.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an earlier result of other parameters at the same path (refused otherwise, "
    "before any work).",
)
@click.option(
    "--fresh",
    is_flag=True,
    help="Discover afresh, ignoring the checkpoint an interrupted run of the same settings "
    "left beside the result (OUT/.../<pruner>__<discoverer>.checkpoint). Without it such a "
    "run goes on from there, its costs summed and flagged.",
)
@click.option(
    "--checkpoint-every",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    callback=_finite,
    help="Seconds between two checkpoints of a long discovery (ACDC saves them).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result JSON instead of a table.")
@click.option("--quiet", is_flag=True, help="No progress messages on stderr.")
@click.option(
    "--no-reference",
    is_flag=True,
    help="When the task ships no reference circuit for the model, skip overlap instead of "
    "computing the dense actpatch circuit (one patching pass per head).",
)
def run(
    pruner: str,
    discoverer: str,
    task: str,
    model: str | None,
    seed: int | None,
    device: str,
    n_search: int | None,
    n_eval: int | None,
    pruner_params: tuple[tuple[str, str], ...],
    discoverer_params: tuple[tuple[str, str], ...],
    out: Path,
    overwrite: bool,
    fresh: bool,
    checkpoint_every: float,
    as_json: bool,
    quiet: bool,
    no_reference: bool,
) -> None:
    """Prune, discover and evaluate a circuit; write one result JSON and print a summary.

    A long discovery (ACDC) saves checkpoints beside the result; run the same command again
    after an interruption (Ctrl-C, a lost session) and it goes on from the last one.

    \b
    Examples:
      appbench run --pruner magnitude --discoverer actpatch
      appbench run --pruner none --discoverer actpatch -d threshold 0.05 --json
      appbench run --pruner cflap --discoverer pathpatch --model gpt2 --device cuda
    """
    from appbench.runner import RunConfig
    from appbench.runner import run as run_once

    config = RunConfig(
        pruner=pruner,
        discoverer=discoverer,
        task=task,
        # No --model: RunConfig picks the task's default model (runner.default_model).
        **({} if model is None else {"model": model}),
        seed=seed,
        device=device,
        n_search=n_search,
        n_eval=n_eval,
        pruner_params=_params(pruner_params),
        discoverer_params=_params(discoverer_params),
        out=out,
        overwrite=overwrite,
        fresh=fresh,
        checkpoint_every=checkpoint_every,
        command=shlex.join(["appbench", *sys.argv[1:]]),
        compute_reference=not no_reference,
    )

    def log(line: str) -> None:
        if not quiet:
            click.echo(f"[appbench] {line}", err=True)

    with results_only_on_stdout():
        result, path = run_once(config, log)
    if as_json:
        click.echo(result.model_dump_json(indent=2))
    else:
        click.echo(_summary_table(result, path))


MODEL_SOURCES_NOTE = (
    "--model also takes any TransformerLens model name (e.g. gpt2, Qwen/Qwen2.5-0.5B; weights "
    "from the Hugging Face cache, or the hub when it is reachable) and any local Hugging Face "
    "model directory (e.g. ./my-model: config.json, weights and tokenizer)."
)


@cli.group()
def models() -> None:
    """Fetch and list models (registered models, TransformerLens names, local directories).

    \b
    Examples:
      appbench models list
      appbench models pull smollm2-135m
      appbench models pull ./my-hf-model
    """


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def models_list(as_json: bool) -> None:
    """List registered models and the other kinds of name --model accepts."""
    from appbench.models import cache_dir

    rows = _listing("models")
    if as_json:
        click.echo(
            json.dumps(
                {"registered": rows, "note": MODEL_SOURCES_NOTE, "cache_dir": str(cache_dir())},
                indent=2,
            )
        )
        return
    from tabulate import tabulate

    click.echo(
        tabulate([[r["name"], r["summary"]] for r in rows], headers=["name", "summary"])
        if rows
        else "(no registered models)"
    )
    click.echo()
    click.echo(MODEL_SOURCES_NOTE)
    click.echo(f"Cache for converted models: {cache_dir()} (set APPBENCH_CACHE to move it).")


@models.command("pull")
@click.argument("name")
@click.option(
    "--device",
    type=DEVICE,
    default="cpu",
    show_default=True,
    help="Torch device to test-load the model on.",
)
def models_pull(name: str, device: str) -> None:
    """Fetch and cache model NAME (by loading it once).

    Progress goes to stderr, a one-line summary to stdout.

    Registered models that need a download (smollm2-135m) are fetched and converted into the
    appbench cache; TransformerLens names are downloaded into the Hugging Face cache (needs hub
    access); zoo models and local directories are only checked.

    \b
    Examples:
      appbench models pull smollm2-135m
      appbench models pull gpt2
    """
    import time

    from appbench.models import load_model

    # No "loading" line first: a name that cannot be loaded is then one line alone, and the
    # loaders that download or convert print their own progress.
    started = time.perf_counter()
    model = load_model(name, device)
    cfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters())
    click.echo(
        f"{name}: ready ({cfg.n_layers} layers x {cfg.n_heads} heads, d_model {cfg.d_model}, "
        f"{n_params / 1e6:.1f}M parameters; loaded in {time.perf_counter() - started:.1f} s)"
    )


@cli.group()
def reference() -> None:
    """Build the reference circuits that runs measure overlap against.

    \b
    Examples:
      appbench reference build --task ioi --model zoo-multitask
    """


@reference.command("build")
@click.option("--task", "task_name", default=None, help="Task name; see `appbench list tasks`.")
@click.option("--model", default=None, help="Model name (as given to `appbench run --model`).")
@click.option(
    "--discoverer", default="pathpatch", show_default=True, help="Dense discoverer to run."
)
@click.option(
    "-d",
    "discoverer_params",
    type=(str, str),
    multiple=True,
    metavar="KEY VALUE",
    help="Discoverer parameter.",
)
@click.option("--device", type=DEVICE, default="cpu", show_default=True, help="Torch device.")
@click.option(
    "--n-search", type=click.IntRange(min=1), default=None, help="Search prompts (default: task's)."
)
@click.option(
    "--seed",
    type=click.IntRange(0, 2**32 - 1),
    default=None,
    help="Prompt seed, 0 to 2**32 - 1 (default: the task's own).",
)
@click.option(
    "--from-result",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Take the circuit of a finished dense run (`appbench run --pruner none ...`) instead "
    "of running the discoverer again.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for <model>.json.",
)
@click.option(
    "--into-package",
    is_flag=True,
    help="Write into the task's shipped reference/ folder instead of --out (for task "
    "developers: every later run for the model reads it).",
)
@click.option(
    "--allow-degenerate",
    is_flag=True,
    help="Write the reference even when it is empty, less faithful than the empty circuit, or "
    "below the normalised faithfulness a reference needs (refused by default).",
)
def reference_build(
    task_name: str | None,
    model: str | None,
    discoverer: str,
    discoverer_params: tuple[tuple[str, str], ...],
    device: str,
    n_search: int | None,
    seed: int | None,
    from_result: Path | None,
    out: Path | None,
    into_package: bool,
    allow_degenerate: bool,
) -> None:
    """Run DISCOVERER on the dense search space and save its circuit as the reference.

    The circuit is stored under the key ``appbench-<discoverer>`` with its provenance
    (command, appbench version and commit, parameters, prompts) and becomes the default
    reference of the file; other circuits already in the file (literature circuits) are kept.
    On big models the dense run takes long: run it once with ``appbench run --pruner none``
    (it is also the baseline that speedups are measured against) and pass its result file
    with ``--from-result``.
    """
    import tempfile
    from importlib import resources

    from appbench.flags import reference_problems
    from appbench.plugins import get_registries
    from appbench.results import load_result, write_atomically
    from appbench.runner import RunConfig
    from appbench.runner import run as run_once
    from appbench.tasks import ReferenceCircuit, ReferenceFile

    command = shlex.join(["appbench", *sys.argv[1:]])
    if (out is None) == (not into_package):
        fail(
            "give --out DIR for the reference file, or --into-package to write into the task's "
            "shipped references (not both)"
        )
    if from_result is not None:
        result = load_result(from_result)
        shape = result.graph_config
        if shape is not None and (shape["n_layers"], shape["n_heads"]) != (
            result.n_layers,
            result.n_heads,
        ):
            fail(
                f"{from_result} says {result.n_layers}x{result.n_heads} heads, but its model is "
                f"{shape['n_layers']}x{shape['n_heads']}"
            )
        for flag, given, found in (
            ("--task", task_name, result.task),
            ("--model", model, result.model),
        ):
            if given is not None and given != found:
                fail(f"{from_result} is a run of {flag} {found}, not {given}")
        if result.pruner != "none":
            fail(f"{from_result} was pruned by {result.pruner}; a reference needs a dense run")
        task_name, model, discoverer = result.task, result.model, result.discoverer
        source_command = result.provenance.command
    elif task_name is None or model is None:
        fail("give --task and --model (or --from-result FILE)")
    task = get_registries().tasks.get(task_name)
    folder = out or Path(str(resources.files(task.package).joinpath("reference")))
    if from_result is None:
        source_command = command
        with tempfile.TemporaryDirectory() as scratch:
            config = RunConfig(
                pruner="none",
                discoverer=discoverer,
                task=task_name,
                model=model,
                seed=seed,
                device=device,
                n_search=n_search,
                n_eval=None,
                discoverer_params=_params(discoverer_params),
                out=Path(scratch),
                command=command,
                compute_reference=False,
            )
            with results_only_on_stdout():
                result, _ = run_once(
                    config, lambda line: click.echo(f"[appbench] {line}", err=True)
                )
    problems = reference_problems(result)
    if problems and not allow_degenerate:
        fail(
            "refusing to write a degenerate reference circuit: "
            + "; ".join(problems)
            + " (--allow-degenerate writes it anyway)"
        )
    path = folder / f"{model.replace('/', '__')}.json"
    existing = task.reference_file(model) if out is None else None
    circuits = dict(existing.circuits) if existing else {}
    key = f"appbench-{discoverer}"
    previous = circuits.get(key)
    version = str(int(previous.version.split(".")[0]) + 1) + ".0" if previous else "1.0"
    circuits[key] = ReferenceCircuit(
        heads=result.circuit["heads"],
        n_layers=result.n_layers,
        n_heads=result.n_heads,
        source=f"{source_command} (appbench {result.provenance.appbench_version}, commit "
        f"{result.provenance.git_commit or 'unknown'}, task version {result.provenance.task_version})"
        + (f"; recorded by {command}" if from_result is not None else ""),
        method=f"dense {discoverer} (pruner none) on the task's search split",
        parameters={
            **result.discoverer_params,
            "n_search": result.n_search,
            "seed": result.seed,
        },
        version=version,
        notes=f"faithfulness on the evaluation split: {result.faithfulness.percent:.1f}% of the full "
        f"model, normalised {result.faithfulness.normalised}"
        + (f"; written with --allow-degenerate: {'; '.join(problems)}" if problems else ""),
    )
    ref_file = ReferenceFile(task=task_name, model=model, default=key, circuits=circuits)
    write_atomically(path, ref_file.model_dump_json(indent=2) + "\n")
    click.echo(f"{path}: {len(result.circuit['heads'])} heads ({key} v{version})")


@cli.group()
def circuit() -> None:
    """Move circuits between appbench and the EAP-IG library's Graph JSON (MIB's format)."""


@circuit.command("export")
@click.argument("result_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["eap-ig", "mib"]),
    default="eap-ig",
    show_default=True,
    help="eap-ig: the circuit as EAP-IG's Graph JSON; mib: the same as an importance-score "
    "file (every edge must carry a score).",
)
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Graph file to write [default: beside the result, <name>.<format>.json].",
)
def circuit_export(result_file: Path, fmt: str, out: Path | None) -> None:
    """Write the circuit of RESULT_FILE (an `appbench run` result) as an EAP-IG / MIB graph."""
    from appbench.circuit import Circuit
    from appbench.interchange import InterchangeError, to_graph_json, write_json_atomically
    from appbench.results import load_result

    result = load_result(result_file)
    if result.graph_config is None:
        fail(f"{result_file} does not record the model's shape (run it again with this appbench)")
    try:
        found = Circuit.from_dict(result.circuit)
    except (KeyError, TypeError, ValueError) as exc:
        raise InterchangeError(f"{result_file}: its circuit is malformed ({exc})") from None
    document = to_graph_json(found, result.graph_config, fmt)
    target = out or result_file.with_name(f"{result_file.stem}.{fmt}.json")
    write_json_atomically(target, document)
    edges = document["edges"].values()
    kept = sum(1 for e in edges if e["in_graph"])
    scored = sum(1 for e in edges if e["score"] == e["score"])
    click.echo(f"{target}: {kept} of {len(edges)} edges in the graph, {scored} scored ({fmt})")


@circuit.command("import")
@click.argument("graph_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="appbench circuit file to write.",
)
def circuit_import(graph_file: Path, out: Path) -> None:
    """Read an EAP-IG / MIB Graph JSON (NaN scores allowed) into an appbench circuit file."""
    from appbench.interchange import read_graph_file, write_json_atomically

    found = read_graph_file(graph_file)
    write_json_atomically(out, found.to_dict())
    click.echo(
        f"{out}: {len(found.edges)} edges, {len(found.heads)} heads, {len(found.mlps)} MLPs, "
        f"{len(found.edge_scores)} scores"
    )


@cli.command("check-plugin")
@click.argument("names", nargs=-1)
@click.option("--all", "check_all", is_flag=True, help="Check every registered plugin.")
@click.option(
    "--model",
    default=None,
    help="Registered model a task's prompts are checked against (default: the task's default "
    "model).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the outcomes as JSON.")
def check_plugin(names: tuple[str, ...], check_all: bool, model: str | None, as_json: bool) -> None:
    """Run the plugin contract checks on registered plugins: one pass/fail/skip line each.

    A NAME may be a pruner, a discoverer, a task or a model (or several of them: eap is a
    pruner and a discoverer). Pruners and discoverers run on the planted test models:
    deterministic for a seed, model weights unchanged, no hooks left, circuit inside the
    search space, Params validated, tiny and empty spaces handled. Tasks: prompts aligned
    token for token under the model's tokenizer, a meaningful metric, reference files that fit.
    Models: a quiet, deterministic loader. Exits 1 when any check fails.

    \b
    Examples:
      appbench check-plugin cflap
      appbench check-plugin my-task --model my-model
      appbench check-plugin --all
    """
    import json

    try:
        from appbench import testing
    except ImportError as exc:  # appbench.testing is a pytest plugin
        fail(f"check-plugin needs pytest ({exc}); pip install pytest")
    from appbench.plugins import get_registries

    regs = get_registries()
    if check_all:
        names = tuple(
            sorted(
                {*regs.pruners.names(), *regs.discoverers.names(), *regs.tasks.names()}
                | set(regs.models.names())
            )
        )
    if not names:
        fail("name a plugin to check (see `appbench list`), or pass --all")
    planned = [(name, testing.contract_checks(name, model)) for name in names]
    outcomes = []
    report = sys.stdout  # plugins' own prints go to stderr meanwhile
    with results_only_on_stdout():
        for name, checks in planned:
            for kind, check, subject in checks:
                outcome = testing.run_check(check, kind, name, subject)
                outcomes.append(outcome)
                if not as_json:
                    click.echo(
                        f"{outcome.status.upper():4}  {kind} {name}: {check.name}: {outcome.detail}",
                        file=report,
                    )
    if as_json:
        click.echo(json.dumps([o.__dict__ for o in outcomes], indent=2))
    failed = [o for o in outcomes if o.status == "fail"]
    skipped = sum(o.status == "skip" for o in outcomes)
    click.echo(
        f"{len(outcomes) - len(failed) - skipped} passed, {len(failed)} failed, {skipped} skipped",
        err=True,
    )
    if failed:
        sys.exit(1)


# ------------------------------------------------------------- leaderboard and plots
@cli.group()
def leaderboard() -> None:
    """Build the leaderboard pages, plots and circuit files from result files.

    \b
    Examples:
      appbench leaderboard build
      appbench leaderboard build --check
    """


@leaderboard.command("build")
@click.option(
    "--results",
    "results_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of result files, searched recursively [default: OUT/results].",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("leaderboards"),
    show_default=True,
    help="Leaderboard folder: README.md, tasks/, plots/ and circuits/ are generated there.",
)
@click.option(
    "--check",
    is_flag=True,
    help="Write nothing: exit 1, listing the files, when the generated files on disk differ "
    "from what the results give (pages and circuit files byte for byte, plots by the data "
    "they were drawn from).",
)
def leaderboard_build(results_dir: Path | None, out: Path, check: bool) -> None:
    """Generate the leaderboard from OUT/results/**.json: a summary (README.md, mean ranks
    across tasks), one page per task (tasks/TASK.md), plots and every circuit as an EAP-IG /
    MIB graph. Plots are redrawn only when their data changed.

    \b
    Examples:
      appbench leaderboard build
      appbench leaderboard build --check
      appbench leaderboard build --results my-runs --out my-board
    """
    from appbench.leaderboard import LeaderboardError, build, drift, load_results, write

    folder = results_dir if results_dir is not None else out / "results"
    try:
        built = build(load_results(folder))
    except LeaderboardError as exc:
        fail(str(exc))
    if check:
        problems = drift(out, built)
        if problems:
            for line in problems:
                click.echo(f"drift: {out / line}", err=True)
            fail(
                f"{len(problems)} generated file(s) in {out} do not match the results; run "
                "`appbench leaderboard build`",
                1,
            )
        click.echo(f"{out}: up to date ({len(built.texts) + len(built.plots)} generated files)")
        return
    done = write(out, built)
    click.echo(
        f"{out}: {done.written} files written, {done.unchanged} unchanged, "
        f"{done.removed} stale removed"
    )


@cli.command("plot")
@click.argument(
    "result_files", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False)
)
@click.option(
    "--out",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the SVG files [default: beside each result].",
)
def plot_command(result_files: tuple[Path, ...], out: Path | None) -> None:
    """Draw the plots of RESULT_FILES (`appbench run` results) as SVG: the circuit diagram
    (layer x head grid, found / missed / extra against the reference, edges where the
    discoverer gives them), performance against sparsity where the pruner swept it, and the
    discovery cost against the dense run of the same discoverer where it lies beside the
    result (none__DISCOVERER.json).

    \b
    Examples:
      appbench plot appbench-results/ioi/zoo-gt-ioi/cflap__pathpatch.json
      appbench plot results/*/*/*.json -o plots
    """
    from appbench.plots import draw, result_plots
    from appbench.results import ResultFileError, load_result, write_atomically

    for path in result_files:
        result = load_result(path)
        dense_path = path.with_name(f"none__{result.discoverer}.json")
        dense = None
        if result.pruner != "none" and dense_path.is_file():
            try:
                dense = load_result(dense_path)
            except ResultFileError as exc:
                click.echo(f"[appbench] no cost plot: {exc}", err=True)
        folder = out if out is not None else path.parent
        for name, data in result_plots(result, dense).items():
            target = folder / f"{path.stem}.{name}.svg"
            write_atomically(target, draw(data))
            click.echo(str(target))


# ------------------------------------------------------------------------- sweep
def _sweep_executor(spec: Any) -> Any:
    """The executor ``spec.executor`` names (appbench.sweep.SweepSpec). Ray is imported only
    when asked for; missing, it is one line saying how to install it."""
    from appbench.sweep import LocalExecutor, SweepError

    if spec.executor == "ray":
        from appbench.sweep_ray import RayExecutor

        return RayExecutor(
            address=spec.address,
            jobs=spec.jobs,
            cpus_per_run=spec.cpus_per_run,
            gpus_per_run=spec.gpus_per_run,
            runtime_env=spec.ray_runtime_env,
        )
    ray_only = ["address", "cpus_per_run", "gpus_per_run", "ray_runtime_env"]
    given = [key for key in ray_only if getattr(spec, key) is not None]
    if given:
        raise SweepError(f"{', '.join(given)}: for --executor ray only")
    return LocalExecutor(jobs=spec.jobs)


@cli.command()
@click.option(
    "--pruners",
    default=None,
    help="Pruners, comma-separated, or all (or pruners: in --config). The dense baseline none "
    "always runs too.",
)
@click.option(
    "--discoverers",
    default=None,
    help="Discoverers, comma-separated, or all (or discoverers: in --config).",
)
@click.option("--tasks", default=None, help="Tasks, comma-separated, or all. [default: ioi]")
@click.option(
    "--models",
    default=None,
    help="Models, comma-separated; default = each task's default model, all = every "
    "registered model. [default: default]",
)
@click.option(
    "--seeds",
    default=None,
    help="Prompt seeds, comma-separated, ranges A-B allowed; default = each task's own. "
    "[default: default]",
)
@click.option(
    "-p",
    "pruner_params",
    type=(str, str),
    multiple=True,
    metavar="KEY VALUE",
    help="Parameter of every pruner but none (per pruner: pruner_params in --config).",
)
@click.option(
    "-d",
    "discoverer_params",
    type=(str, str),
    multiple=True,
    metavar="KEY VALUE",
    help="Parameter of every discoverer (per discoverer: discoverer_params in --config).",
)
@click.option(
    "--n-search",
    type=click.IntRange(min=1),
    default=None,
    help="Search prompts per run (default: each task's).",
)
@click.option(
    "--n-eval",
    type=click.IntRange(min=1),
    default=None,
    help="Evaluation prompts per run (default: each task's).",
)
@click.option(
    "--device",
    type=DEVICE,
    default=None,
    help="Torch device: cpu, cuda, cuda:N or mps. [default: cpu]",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    callback=_named_folder,
    help="Results folder; files go to OUT/seed-N/<task>/<model>/<pruner>__<discoverer>.json. "
    "[default: appbench-sweep]",
)
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(min=1),
    default=None,
    help="Runs at once: worker processes (local; default min(2, CPUs)) or Ray tasks in "
    "flight (ray; default: the cluster's CPUs).",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default=None,
    help="Where runs compute: local (a process pool) or ray (a Ray cluster: pip install "
    "'appbench[ray]'). [default: local]",
)
@click.option(
    "--address",
    default=None,
    help="Ray cluster address for --executor ray (ray://HEAD:10001, HEAD:6379 or auto); "
    "default: RAY_ADDRESS, else a Ray started here.",
)
@click.option(
    "--cpus-per-run",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="CPUs each Ray task declares (default: 1, more for models over 1 GiB).",
)
@click.option(
    "--gpus-per-run",
    type=click.FloatRange(min=0),
    default=None,
    help="GPUs each Ray task declares (default: 1 on cuda, 0.25 for models under 256 MiB; "
    "0 on cpu).",
)
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=None,
    help="Resubmissions of a run whose worker died or that failed in a way that may not "
    "recur (not of runs refused for their input). [default: 1]",
)
@click.option(
    "--checkpoint-every",
    type=click.FloatRange(min=0),
    default=None,
    metavar="SECONDS",
    callback=_finite,
    help="Seconds between two checkpoints of a long discovery in flight (ACDC; local "
    "executor): a run stopped by Ctrl-C, SIGTERM or a crash goes on from its last one when "
    "the sweep runs again. [default: 60]",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="YAML file with the same keys (pruners, discoverers, tasks, models, seeds, "
    "pruner_params, discoverer_params, n_search, n_eval, device, out, jobs, executor, "
    "address, cpus_per_run, gpus_per_run, ray_runtime_env, retries, checkpoint_every); options "
    "given here override it.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Rerun runs whose result files hold runs of other settings, replacing them "
    "(refused otherwise, before any work).",
)
@click.option(
    "--dry-run", is_flag=True, help="Print the plan (what runs, what is skipped) and stop."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of a table.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sweep(
    pruners: str | None,
    discoverers: str | None,
    tasks: str | None,
    models: str | None,
    seeds: str | None,
    pruner_params: tuple[tuple[str, str], ...],
    discoverer_params: tuple[tuple[str, str], ...],
    n_search: int | None,
    n_eval: int | None,
    device: str | None,
    out: Path | None,
    jobs: int | None,
    executor: str | None,
    address: str | None,
    cpus_per_run: float | None,
    gpus_per_run: float | None,
    retries: int | None,
    checkpoint_every: float | None,
    config_file: Path | None,
    overwrite: bool,
    dry_run: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Run a grid of pruners x discoverers x tasks x models x seeds, resumably.

    Runs whose result files already record the same settings are skipped, so the same
    command run again after a crash, a kill or Ctrl-C resumes where it stopped (at most the
    runs in flight are lost, and of a discovery that saves checkpoints, ACDC's, only what it
    did since its last one). The dense run (pruner none) of each discoverer runs first and
    each pruned run after it, so every speedup has its baseline. A failed run is reported in
    one line and the sweep goes on; the exit code is then 1 (130 after Ctrl-C or SIGTERM).

    \b
    Examples:
      appbench sweep --pruners magnitude,cflap --discoverers actpatch,pathpatch --seeds 1-3
      appbench sweep --config sweep.yaml --jobs 2
      appbench sweep --config sweep.yaml --executor ray --address ray://head:10001
      appbench sweep --pruners all --discoverers actpatch --models default --dry-run
    """
    from appbench import sweep as sweeping

    file = sweeping.read_spec_file(config_file) if config_file is not None else {}
    spec = sweeping.make_spec(
        file,
        {
            "pruners": pruners,
            "discoverers": discoverers,
            "tasks": tasks,
            "models": models,
            "seeds": seeds,
            "n_search": n_search,
            "n_eval": n_eval,
            "device": device,
            "out": None if out is None else str(out),
            "jobs": jobs,
            "executor": executor,
            "address": address,
            "cpus_per_run": cpus_per_run,
            "gpus_per_run": gpus_per_run,
            "retries": retries,
            "checkpoint_every": checkpoint_every,
        },
        source=f"--config {config_file}",
    )
    with results_only_on_stdout():
        plan = sweeping.plan(
            spec,
            _params(pruner_params),
            _params(discoverer_params),
            command=shlex.join(["appbench", *sys.argv[1:]]),
        )
        found = sweeping.inspect(plan, overwrite=overwrite)
    if dry_run:
        if as_json:
            rows = sweeping.plan_rows(plan, found)
            click.echo(json.dumps({"out": str(plan.out), "runs": rows}, indent=2))
        else:
            click.echo(sweeping.describe_plan(plan, found))
        return
    runner = _sweep_executor(spec)  # Ray missing: one line, before any work
    sweeping.check_conflicts(plan, found)
    sweeping.check_writable(plan.out)
    with results_only_on_stdout():
        summary = sweeping.Sweep(plan, found, runner, progress=not quiet).run()
    if as_json:
        click.echo(json.dumps(sweeping.summary_json(summary), indent=2))
    else:
        click.echo(sweeping.summary_table(summary))
    if summary.interrupted:
        counts = summary.counts()
        fail(
            f"interrupted ({counts['done']} done now, {counts['cancelled']} cancelled); run "
            "the same command again to resume",
            130,
        )
    if summary.count("failed"):
        fail(f"{summary.count('failed')} of {len(summary.records)} runs failed (see above)", 1)


def _register_plugin_commands() -> None:
    from appbench.plugins import register_commands

    register_commands(cli)


def _plugin_warnings_on_one_line() -> None:
    """A skipped plugin is one line on stderr, not Python's two-line warning format."""
    import warnings

    from appbench.errors import PluginSkippedWarning

    original = warnings.formatwarning

    def format_warning(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        line: str | None = None,
    ) -> str:
        if issubclass(category, PluginSkippedWarning):
            return f"{message}\n"
        return original(message, category, filename, lineno, line)

    warnings.formatwarning = format_warning


def main() -> None:
    """Console entry point."""
    _plugin_warnings_on_one_line()
    try:
        _register_plugin_commands()
    except _user_errors() as exc:
        fail(str(exc))
    cli(obj={})


if __name__ == "__main__":
    main()
