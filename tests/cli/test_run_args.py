"""cli/run_args: quiet_third_party silences library warnings and progress bars inside its block only."""

from __future__ import annotations

import warnings

from transformers.utils import logging as hf_logging

from wronai.cli.run_args import quiet_third_party


def test_quiet_third_party_restores_warning_filters_and_progress_bars():
    hf_logging.enable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # pytest's own config ignores these categories already
        before = list(warnings.filters)
        with quiet_third_party():
            assert not hf_logging.is_progress_bar_enabled()
            with warnings.catch_warnings(record=True) as seen:
                warnings.warn("old API", FutureWarning, stacklevel=1)
                warnings.warn("older API", DeprecationWarning, stacklevel=1)
            assert seen == []
        assert warnings.filters == before
        assert hf_logging.is_progress_bar_enabled()
        with warnings.catch_warnings(record=True) as seen:
            warnings.warn("old API", FutureWarning, stacklevel=1)
        assert len(seen) == 1


def test_quiet_third_party_leaves_disabled_progress_bars_disabled():
    hf_logging.disable_progress_bar()
    try:
        with quiet_third_party():
            pass
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
