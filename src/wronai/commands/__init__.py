"""Extra `wronai` subcommands, one module each.

Every module here defines ``register(subparsers)`` adding its subcommand(s) with ``set_defaults(func=...)``;
the CLI discovers them automatically. Modules must import only argparse-level things at import time (the
heavy libraries are imported inside the command functions), so `wronai --help` stays fast.
"""

from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser) -> None:
    """The CONFIG argument and repeatable ``--set dotted.key=value`` overrides, shared by every config command."""
    p.add_argument("config", help="YAML config file (see configs/ and docs/configuration.md)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by dotted key, e.g. --set training.max_steps=10 (repeatable; values are YAML)",
    )
