"""What the run-directory commands (generate, chat, eval, merge, export, report) share: arguments and quiet loading."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


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
