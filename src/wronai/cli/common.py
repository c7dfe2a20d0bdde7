"""What every `wronai` command shares: the CONFIG argument with `--set` overrides, loading it, console logging.

Command modules import only argparse-level things at import time (the heavy libraries are imported inside
the command functions), so `wronai --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any


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


def add_command(
    sub: argparse._SubParsersAction,
    name: str,
    func: Any,
    *,
    help: str,
    description: str,
    config: bool = False,
    **parser_kwargs: Any,
) -> argparse.ArgumentParser:
    """One command's parser, running ``func``; ``config``: it takes CONFIG and ``--set`` overrides."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=description, **parser_kwargs)
    if config:
        add_config_args(p)
    p.set_defaults(func=func)
    return p


def load_config_args(args: argparse.Namespace) -> Any:
    """The config named by a command's CONFIG and ``--set`` arguments, with the loader's notes."""
    from wronai.config import load_config_with_notes

    return load_config_with_notes(args.config, args.overrides)


def setup_logging(level: str = "INFO") -> None:
    """Configure console logging for the CLI (library code only ever calls logging.getLogger)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for noisy in ("httpx", "urllib3", "filelock", "fsspec", "datasets", "bitsandbytes", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from wronai.kernels import quiet_import_warnings

    quiet_import_warnings()
    try:
        import transformers

        transformers.utils.logging.set_verbosity_warning()
        import datasets

        datasets.utils.logging.set_verbosity_warning()
        datasets.disable_progress_bars()
    except ImportError:
        pass
