"""appbench: a benchmark for circuit discovery (pruners x discoverers x tasks x models).

The public API for plugin authors. Heavy libraries (torch, TransformerLens) are imported only
by the functions that need them, so importing appbench is cheap.
"""

from __future__ import annotations

from typing import Any

import pluggy

from appbench.circuit import (
    INPUT,
    QKV,
    Circuit,
    Edge,
    Head,
    InputNode,
    Mlp,
    SearchSpace,
    connected_to_logits,
    graph_edges,
    heads_of,
    model_graph,
    parse_node,
)
from appbench.engine.reference import (
    PathPatchingBaseline,
    input_head_index,
    metric_gap,
    path_patching_baseline,
    sender_scores_to_logits,
    sender_scores_to_receiver,
)
from appbench.errors import NotCausalError, PluginSkippedWarning, RunError
from appbench.interfaces import Discoverer, Params, Pruner, RunContext
from appbench.models import (
    ModelLoadError,
    build_model,
    cache_dir,
    load_hf_directory,
    load_model,
    load_model_folder,
    load_tokenizer,
    save_model_folder,
    word_level_tokenizer,
)
from appbench.plugins import get_registries
from appbench.registry import PluginError, UnknownNameError
from appbench.tasks import (
    PromptPair,
    ReferenceCircuit,
    ReferenceFile,
    Task,
    TaskData,
    TaskError,
    TaskSpec,
    answer_columns,
    distinct_pairs,
    mean_of_ids,
    single_token_id,
    single_token_words,
    tokenize_pairs,
)

__version__ = "0.4.0"

#: Names served lazily: their modules import torch, which `appbench --help` must not pay for.
_LAZY = {
    "PatchingEngine": "appbench.engine.patching",
    "PathPatcher": "appbench.engine.patching",
    "acdc": "appbench.engine.acdc",
    "auto_batch_size": "appbench.engine.chunks",
    "chunked_ablated_metric": "appbench.engine.chunks",
    "corrupt_group_means": "appbench.engine.chunks",
    "prompt_chunks": "appbench.engine.chunks",
    "edge_scores": "appbench.engine.attribution",
    "head_scores": "appbench.engine.attribution",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'appbench' has no attribute {name!r}")


#: Marks a function as an implementation of an appbench hook.
hookimpl = pluggy.HookimplMarker("appbench")

__all__ = [
    "INPUT",
    "QKV",
    "Circuit",
    "Discoverer",
    "Edge",
    "Head",
    "InputNode",
    "Mlp",
    "ModelLoadError",
    "NotCausalError",
    "Params",
    "PatchingEngine",
    "PathPatcher",
    "PathPatchingBaseline",
    "PluginError",
    "PluginSkippedWarning",
    "PromptPair",
    "Pruner",
    "ReferenceCircuit",
    "ReferenceFile",
    "RunContext",
    "RunError",
    "SearchSpace",
    "Task",
    "TaskData",
    "TaskError",
    "TaskSpec",
    "UnknownNameError",
    "__version__",
    "acdc",
    "answer_columns",
    "auto_batch_size",
    "build_model",
    "cache_dir",
    "chunked_ablated_metric",
    "connected_to_logits",
    "corrupt_group_means",
    "distinct_pairs",
    "edge_scores",
    "get_registries",
    "graph_edges",
    "head_scores",
    "heads_of",
    "hookimpl",
    "input_head_index",
    "load_hf_directory",
    "load_model",
    "load_model_folder",
    "load_tokenizer",
    "mean_of_ids",
    "metric_gap",
    "model_graph",
    "parse_node",
    "path_patching_baseline",
    "prompt_chunks",
    "save_model_folder",
    "sender_scores_to_logits",
    "sender_scores_to_receiver",
    "single_token_id",
    "single_token_words",
    "tokenize_pairs",
    "word_level_tokenizer",
]
