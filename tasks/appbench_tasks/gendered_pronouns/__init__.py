"""Gendered pronouns (Mathwin, Corlouer et al. 2023) as an appbench task."""

from appbench_tasks.gendered_pronouns.generate import GenderedPronounsTask

__all__ = ["GenderedPronounsTask"]
