"""Pruning holds one chunk of prompts at a time: under an address-space cap that cflap's
scoring fits in with chunks of 50 prompts, the same 2,000 prompts in one chunk run out of
memory."""

import sys
import textwrap

import pytest

from appbench.testing import run_under_memory_cap

PROBE = textwrap.dedent(
    """
    import sys
    from appbench import RunContext
    from appbench.engine.patching import PatchingEngine
    from appbench_plugins.cflap import CflapPruner

    model, task, tokenizer = wide_model()
    search, evaluation = task.splits(tokenizer, n_search=2000, n_eval=10)

    def context(split):
        engine = PatchingEngine(model, task)
        return RunContext(model, "memory-probe", task, split, evaluation, "cpu", 0, engine)

    small = context(search.select(range(4)))
    CflapPruner().prune(small, CflapPruner.Params(keep_k=4, batch_size=2))  # warm up
    capped(int(sys.argv[2]))
    try:
        params = CflapPruner.Params(keep_k=4, batch_size=int(sys.argv[1]))
        space = CflapPruner().prune(context(search), params)
    except (MemoryError, RuntimeError) as exc:
        print("out of memory:", str(exc).splitlines()[0][:120])
    else:
        print("ok", sorted(h.id for h in space.heads))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_cflap_scores_a_large_split_in_chunks_within_a_memory_cap():
    assert run_under_memory_cap(PROBE, "50", "200").startswith("ok")
    assert run_under_memory_cap(PROBE, "2000", "200").startswith("out of memory")
