"""rundir/locate: a LoRA run, a checkpoint inside it, a plain model, and what is neither."""

from __future__ import annotations

import json

import pytest

from wronai.errors import WronAIError
from wronai.rundir.files import ADAPTER_FILE, DATA_STATS_FILE, MODEL_CONFIG_FILE, TOKENIZER_CONFIG_FILE
from wronai.rundir.locate import locate_run


def _adapter(folder, base="org/base"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTER_FILE).write_text(json.dumps({"base_model_name_or_path": base}))
    return folder


def test_adapter_without_config_names_its_base(tmp_path):
    run = locate_run(_adapter(tmp_path / "run"))
    assert run.is_adapter and run.config is None and run.base_name == "org/base"
    assert run.data_format is None
    assert str(run.tokenizer_dir) == "org/base"  # no saved tokenizer: the base's


def test_checkpoint_borrows_the_runs_tokenizer_and_data_format(tmp_path):
    root = _adapter(tmp_path / "run")
    (root / TOKENIZER_CONFIG_FILE).write_text("{}")
    (root / DATA_STATS_FILE).write_text(json.dumps({"format": "chat"}))
    checkpoint = locate_run(_adapter(root / "checkpoint-4"))
    assert checkpoint.is_adapter and checkpoint.path == root / "checkpoint-4"
    assert checkpoint.tokenizer_dir == root and checkpoint.data_format == "chat"


def test_plain_model_directory(tmp_path):
    (tmp_path / MODEL_CONFIG_FILE).write_text("{}")
    run = locate_run(tmp_path)
    assert not run.is_adapter and run.base_name == str(tmp_path) and run.tokenizer_dir == tmp_path


def test_adapter_naming_no_base(tmp_path):
    with pytest.raises(WronAIError, match="names no base model"):
        locate_run(_adapter(tmp_path, base=""))


def test_neither_run_nor_model(tmp_path):
    with pytest.raises(WronAIError, match=f"{ADAPTER_FILE}.*{MODEL_CONFIG_FILE}"):
        locate_run(tmp_path)
    with pytest.raises(WronAIError, match="no such directory"):
        locate_run(tmp_path / "missing")
