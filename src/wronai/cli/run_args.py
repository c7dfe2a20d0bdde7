"""What the run-directory commands (generate, chat, eval, merge, export, report) share: arguments and quiet loading."""

from __future__ import annotations

import argparse
import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

MERGE_INTO_HELP = "merge into this base instead of the saved model.name"  # --base-model of merge/export


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """For the CLI: no weight-loading progress bars or library deprecation warnings between answers.

    Inside the block only: the warning filters and transformers' progress-bar setting are restored on exit.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            from transformers.utils import logging as hf_logging
        except ImportError:
            yield
            return
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            if bars:
                hf_logging.enable_progress_bar()


def add_run_command(
    sub: argparse._SubParsersAction,
    name: str,
    *,
    help: str,
    description: str,
    target_help: str,
    metavar: str = "RUN_DIR",
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """A subcommand whose first argument is a run directory (``args.target``); the epilog keeps its layout."""
    extra: dict[str, Any] = (
        {"epilog": epilog, "formatter_class": argparse.RawDescriptionHelpFormatter} if epilog else {}
    )
    p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=description, **extra)
    p.add_argument("target", metavar=metavar, help=target_help)
    return p


def add_base_model_arg(
    p: argparse.ArgumentParser | argparse._ArgumentGroup,
    help: str = "load this base model instead of the saved model.name",
) -> None:
    """``--base-model PATH_OR_ID``: when the base the run names has moved."""
    p.add_argument("--base-model", default=None, metavar="PATH_OR_ID", help=help)


def add_full_precision_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--full-precision", action="store_true", help="load the base unquantized even if the run was 4-bit"
    )
