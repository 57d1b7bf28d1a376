"""Docstring argument completion (Heimersheim and Janiak 2023) as an appbench task."""

from appbench_tasks.docstring.generate import DocstringTask

__all__ = ["DocstringTask"]
