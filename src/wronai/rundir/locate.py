"""Finding a run: classify a directory (LoRA run, checkpoint, plain model) and read its saved config."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from wronai.config import load_config_with_notes
from wronai.config.schema import WronAIConfig
from wronai.errors import WronAIError
from wronai.rundir.files import (
    ADAPTER_FILE,
    CONFIG_FILE,
    DATA_STATS_FILE,
    MODEL_CONFIG_FILE,
    TOKENIZER_CONFIG_FILE,
)
from wronai.rundir.reading import read_json

__all__ = ["RunDir", "locate_run", "read_config"]


@dataclass
class RunDir:
    """What a directory holds: a LoRA run (adapter) or a plain model, plus the run config if there is one."""

    path: Path
    is_adapter: bool
    config: WronAIConfig | None
    data_format: str | None
    tokenizer_dir: Path
    base_name: str  # model.name for an adapter, the directory itself for a plain model


def read_config(path: Path) -> WronAIConfig:
    """The resolved config a run saved (``wronai_config.yaml``)."""

    return load_config_with_notes(path).config


def _data_format(folders: list[Path], config: WronAIConfig | None) -> str | None:
    """The format the run trained on: data_stats.json (resolved) first, then an explicit data.format."""
    for folder in folders:
        fmt = (read_json(folder / DATA_STATS_FILE) or {}).get("format")
        if fmt:
            return str(fmt)
    if config is not None and config.data.format != "auto":
        return config.data.format
    return None


def locate_run(path: str | Path) -> RunDir:
    """Classify ``path``: a run dir or checkpoint (adapter_config.json) or a plain/merged model (config.json).

    A checkpoint-N folder borrows the config, data statistics and tokenizer of the run folder above it.
    """
    run = Path(path).expanduser()
    if not run.is_dir():
        raise WronAIError(
            f"{run}: no such directory — pass a finished run's training.output_dir (or a model directory)"
        )
    is_adapter = (run / ADAPTER_FILE).is_file()
    folders = [run, run.parent] if is_adapter else [run]
    config_file = next((d / CONFIG_FILE for d in folders if (d / CONFIG_FILE).is_file()), None)
    config = read_config(config_file) if config_file else None
    if is_adapter:
        base = (
            config.model.name
            if config
            else json.loads((run / ADAPTER_FILE).read_text()).get("base_model_name_or_path")
        )
        if not base:
            raise WronAIError(
                f"{run}: the adapter names no base model and there is no {CONFIG_FILE} — pass --base-model"
            )
        tok_dir = next((d for d in folders if (d / TOKENIZER_CONFIG_FILE).is_file()), Path(base))
        return RunDir(run, True, config, _data_format(folders, config), tok_dir, base)
    if (run / MODEL_CONFIG_FILE).is_file():
        return RunDir(run, False, config, _data_format(folders, config), run, str(run))
    raise WronAIError(
        f"{run}: neither a WronAI run ({ADAPTER_FILE} + {CONFIG_FILE}) nor a model directory ({MODEL_CONFIG_FILE}) — "
        "pass the training.output_dir of a finished run"
    )
