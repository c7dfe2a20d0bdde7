"""`wronai config-docs [--out FILE]`: the configuration reference, rendered from the schema's help strings."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wronai.cli.common import add_command


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "config-docs",
        cmd_config_docs,
        help="write docs/configuration.md from the schema",
        description="Generate the configuration reference.",
    )
    p.add_argument("--out", default=None, help="file to write (default: print)")


def cmd_config_docs(args: argparse.Namespace) -> int:
    from wronai.config.docs import render_reference

    text = render_reference()
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0
