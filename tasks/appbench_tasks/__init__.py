"""Built-in tasks of appbench, one folder each (task.yaml, generate.py, README.md, reference/).

Registered through the ``appbench_register_tasks`` hook like any third-party task package.
"""

from appbench import hookimpl
from appbench_tasks.docstring import DocstringTask
from appbench_tasks.gendered_pronouns import GenderedPronounsTask
from appbench_tasks.greater_than import GreaterThanTask
from appbench_tasks.induction import InductionTask
from appbench_tasks.ioi import IOITask


@hookimpl
def appbench_register_tasks(register):
    register(IOITask())
    register(GreaterThanTask())
    register(InductionTask())
    register(GenderedPronounsTask())
    register(DocstringTask())
