"""appbench-example: one of each plugin kind, registered through appbench's hooks.

- pruner ``zdiff``: keep the heads whose activations differ most between clean and corrupted
  prompts;
- discoverer ``greedy-ablation``: mean-ablate heads one at a time, last layer first, and leave
  ablated every head the metric does not miss;
- model ``example-polarity``: a hand-wired 2-layer, 4-head transformer (no weights to ship);
- task ``polarity``: "good movie film show" -> " yes", "bad ..." -> " no", with a ground-truth
  reference circuit for ``example-polarity``.

Everything here imports only names that ``appbench`` itself exports.
"""

from appbench import hookimpl
from appbench_example.greedy import GreedyAblation
from appbench_example.model import MODEL_NAME, load_polarity_model
from appbench_example.polarity import PolarityTask
from appbench_example.zdiff import ZDiff


@hookimpl
def appbench_register_pruners(register):
    register(ZDiff)


@hookimpl
def appbench_register_discoverers(register):
    register(GreedyAblation)


@hookimpl
def appbench_register_models(register):
    register(
        MODEL_NAME,
        load_polarity_model,
        "hand-wired 2x4 attention-only model for the polarity task (appbench-example)",
    )


@hookimpl
def appbench_register_tasks(register):
    register(PolarityTask())
