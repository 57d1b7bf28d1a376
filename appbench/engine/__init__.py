"""The patching engine shared by pruners, discoverers and the evaluation.

- :mod:`appbench.engine.patching`: batched head patching and path patching from cached
  residuals (the fast path every method runs on);
- :mod:`appbench.engine.fused`: fused forward of plain TransformerLens blocks for its reruns;
- :mod:`appbench.engine.reference`: the plain hook-based implementations the fast paths are
  tested against.

Nothing is imported here, so that importing the package does not import torch.
"""
