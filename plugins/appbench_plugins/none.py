"""The dense baseline pruner: the search space is every head.

Runs with ``--pruner none`` are what speedups are measured against.
"""

from appbench import Pruner, SearchSpace, hookimpl


class NonePruner(Pruner):
    """Keep every head."""

    name = "none"
    summary = "Dense baseline: the search space is every head of the model."

    def prune(self, ctx, params):
        return SearchSpace.dense(ctx.n_layers, ctx.n_heads)


@hookimpl
def appbench_register_pruners(register):
    register(NonePruner)
