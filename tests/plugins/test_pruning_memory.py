"""Pruning holds one chunk of prompts at a time: under an address-space cap that cflap's
scoring fits in with chunks of 50 prompts, the same 2,000 prompts in one chunk run out of
memory. Each case runs in its own process, since a cap cannot be lifted once set."""

import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import resource, sys
    import torch
    torch.set_num_threads(1)
    from appbench import RunContext, build_model, get_registries, word_level_tokenizer
    from appbench.engine.patching import PatchingEngine
    from appbench_plugins.cflap import CflapPruner

    def vm_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

    task = get_registries().tasks.get("ioi")
    tokenizer = word_level_tokenizer(sorted(task.vocabulary()))
    config = dict(
        n_layers=2, d_model=512, n_ctx=64, d_head=64, n_heads=8, d_mlp=1024,
        d_vocab=len(tokenizer), act_fn="gelu", normalization_type="LN",
        model_name="memory-probe", positional_embedding_type="standard",
    )
    torch.manual_seed(0)
    model = build_model(config, tokenizer)
    search, evaluation = task.splits(tokenizer, n_search=2000, n_eval=10)
    ctx = RunContext(
        model, "memory-probe", task, search, evaluation, "cpu", 0, PatchingEngine(model, task)
    )
    batch, budget = int(sys.argv[1]), int(sys.argv[2]) * 2**20
    small = RunContext(
        model, "memory-probe", task, search.select(range(4)), evaluation, "cpu", 0,
        PatchingEngine(model, task),
    )
    CflapPruner().prune(small, CflapPruner.Params(keep_k=4, batch_size=2))  # warm up
    resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + budget, resource.RLIM_INFINITY))
    try:
        space = CflapPruner().prune(ctx, CflapPruner.Params(keep_k=4, batch_size=batch))
    except (MemoryError, RuntimeError) as exc:
        print("out of memory:", str(exc).splitlines()[0][:120])
    else:
        print("ok", sorted(h.id for h in space.heads))
    """
)


def _probe(batch_size: int, budget_mib: int) -> str:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(batch_size), str(budget_mib)],
        capture_output=True,
        text=True,
        timeout=600,
        # One malloc arena and one thread: the cap then measures tensors, not thread arenas.
        env={**os.environ, "MALLOC_ARENA_MAX": "1", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_cflap_scores_a_large_split_in_chunks_within_a_memory_cap():
    chunked = _probe(50, 200)
    assert chunked.startswith("ok")
    assert _probe(2000, 200).startswith("out of memory")
