"""``python -m appbench``: the same as the ``appbench`` command."""

from appbench.cli import main

main()
