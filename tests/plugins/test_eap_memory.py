"""EAP-IG's memory is bounded by its batch size: under an address-space cap that a batch of 4
prompts fits in, the same 64 prompts in one batch of 64 run out of memory."""

import sys
import textwrap

import pytest

from appbench.testing import run_under_memory_cap

PROBE = textwrap.dedent(
    """
    import sys
    from appbench import edge_scores

    model, task, tokenizer = wide_model()
    search, _ = task.splits(tokenizer, n_search=64, n_eval=10)
    data = search.select(list(range(64)))
    edge_scores(model, task, data.select([0, 1]), steps=2, batch_size=2)  # warm the allocator
    capped(int(sys.argv[2]))
    try:
        scores = edge_scores(model, task, data, steps=2, batch_size=int(sys.argv[1]))
    except (MemoryError, RuntimeError) as exc:
        print("out of memory:", str(exc).splitlines()[0][:120])
    else:
        print("ok", len(scores))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_batch_size_bounds_eap_ig_memory():
    assert run_under_memory_cap(PROBE, "4", "150").startswith("ok 310")
    assert run_under_memory_cap(PROBE, "64", "150").startswith("out of memory")
