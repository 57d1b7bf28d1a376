"""Indirect object identification (Wang et al. 2022) as an appbench task."""

from appbench_tasks.ioi.generate import IOITask

__all__ = ["IOITask"]
