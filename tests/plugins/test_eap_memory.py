"""EAP-IG's memory is bounded by its batch size: under an address-space cap that a batch of 4
prompts fits in, the same 64 prompts in one batch of 64 run out of memory. Each case runs in
its own process, since a cap cannot be lifted once set."""

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
    from appbench import build_model, edge_scores, get_registries, word_level_tokenizer

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
    search, _ = task.splits(tokenizer, n_search=64, n_eval=10)
    data = search.select(list(range(64)))
    batch, budget = int(sys.argv[1]), int(sys.argv[2]) * 2**20
    edge_scores(model, task, data.select([0, 1]), steps=2, batch_size=2)  # warm the allocator
    resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + budget, resource.RLIM_INFINITY))
    try:
        scores = edge_scores(model, task, data, steps=2, batch_size=batch)
    except (MemoryError, RuntimeError) as exc:
        print("out of memory:", str(exc).splitlines()[0][:120])
    else:
        print("ok", len(scores))
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
def test_the_batch_size_bounds_eap_ig_memory():
    assert _probe(4, 150).startswith("ok 310")
    assert _probe(64, 150).startswith("out of memory")
