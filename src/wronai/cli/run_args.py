"""What the run-directory commands (generate, chat, eval, merge, export, report) share: arguments and quiet loading."""

from __future__ import annotations


def quiet_third_party() -> None:
    """For the CLI: no weight-loading progress bars or library deprecation warnings between answers."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
