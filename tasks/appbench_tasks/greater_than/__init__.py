"""Greater-than (Hanna, Liu, Variengien 2023) as an appbench task."""

from appbench_tasks.greater_than.generate import GreaterThanTask

__all__ = ["GreaterThanTask"]
