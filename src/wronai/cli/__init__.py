"""The `wronai` command line: ``app`` holds ``main`` and the command table, one module per command."""

from wronai.cli.app import ERROR_LOG, main

__all__ = ["ERROR_LOG", "main"]
