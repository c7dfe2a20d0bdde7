"""WronAI: fine-tune Polish large language models (QLoRA) from one YAML file.

Importing ``wronai`` is cheap and has no side effects; the heavy stages are imported on first use::

    from wronai import Pipeline, load_config

``WronAITrainer`` is the earlier name of ``Pipeline`` (it is not a transformers ``Trainer``), kept so that
code written against it still runs.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Pipeline", "__version__", "load_config", "run"]


def __getattr__(name: str) -> Any:
    if name in ("Pipeline", "run", "WronAITrainer"):
        from wronai import recipe

        return getattr(recipe, "Pipeline" if name == "WronAITrainer" else name)
    if name == "load_config":
        from wronai.config import load_config

        return load_config
    raise AttributeError(f"module 'wronai' has no attribute {name!r}")
