"""``python -m agent``: the same as the ``meetch-gate`` command."""

from agent.cli import main

main(prog_name="meetch-gate")
