"""The `wronai` command line: ``app`` holds ``main`` and the command table, one module per command."""

from wronai.cli.app import main

__all__ = ["main"]
