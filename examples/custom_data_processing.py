"""A data hook: normalise Polish quotation marks and drop rows with too short an answer.

WronAI calls ``data_hook(row)`` on every raw row (train and eval) before it is formatted and tokenized.
``row`` is a plain dict of the row's columns *as they are in the file* (``data.columns`` renaming happens
after the hook). Return the (changed) row, or ``None`` to drop it; dropped rows are counted in the data
stats (``rows dropped by extensions.data_hook: N`` in the log, ``dropped_by_hook`` in
``<output_dir>/data_stats.json``).

From the YAML config::

    extensions:
      data_hook: "examples/custom_data_processing.py:data_hook"

or on the command line (``wronai data preview`` shows the effect without training)::

    wronai data preview configs/offline_demo.yaml \\
        --set extensions.data_hook=examples/custom_data_processing.py:data_hook

From Python, pass the function to the data stage (it takes precedence over the config key)::

    from wronai.config.extensions import load_object
    from wronai.recipe import Pipeline

    data_hook = load_object("examples/custom_data_processing.py:data_hook", "data_hook")  # or a plain import
    trainer = Pipeline("configs/offline_demo.yaml")
    prepared = trainer.load_dataset(data_hook=data_hook)
    print(prepared.stats.dropped_by_hook)

Prepared data is cached on disk under a key that includes this whole file (so changing ``MIN_OUTPUT_CHARS``
or a helper below prepares the data again), plus the hook's default arguments and closure values.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("examples.custom_data_processing")  # hook files get a generated __name__

#: Rows whose answer (alpaca ``output``, ``completion``, the last chat message, or raw ``text``) has fewer
#: characters than this, after stripping whitespace, are dropped.
MIN_OUTPUT_CHARS = 20

# „…” and «…» (Polish typography), “…” and ‚…’ (nested quotes) -> plain ASCII quotes.
_QUOTES = str.maketrans({"„": '"', "”": '"', "“": '"', "«": '"', "»": '"', "‚": "'", "’": "'", "‘": "'"})


def normalize_quotes(value: Any) -> Any:
    """Replace typographic quotes in a string, or in every string inside lists/dicts (chat messages)."""
    if isinstance(value, str):
        return value.translate(_QUOTES)
    if isinstance(value, list):
        return [normalize_quotes(v) for v in value]
    if isinstance(value, dict):
        return {k: normalize_quotes(v) for k, v in value.items()}
    return value


def answer_text(row: dict[str, Any]) -> str | None:
    """The part of the row the model learns to produce, for the common column layouts (None if unknown)."""
    for column in ("output", "completion", "response", "text"):
        if isinstance(row.get(column), str):
            return row[column]
    messages = row.get("messages") or row.get("conversations")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        content = messages[-1].get("content", messages[-1].get("value"))
        return content if isinstance(content, str) else None
    return None


def data_hook(row: dict[str, Any]) -> dict[str, Any] | None:
    """Normalise quotes in every text field; drop the row if its answer is shorter than MIN_OUTPUT_CHARS."""
    row = normalize_quotes(row)
    answer = answer_text(row)
    if answer is not None and len(answer.strip()) < MIN_OUTPUT_CHARS:
        logger.debug("data_hook: dropping a row with a %d-character answer", len(answer.strip()))
        return None
    return row
