"""Trackers: TensorBoard event files, W&B offline without a key (never a prompt), run names."""

from __future__ import annotations

from datetime import datetime

import pytest

from conftest import make_config_dict
from wronai.config import load_config
from wronai.config.schema import LoggingSection
from wronai.recipe import run
from wronai.train.monitoring import resolve_report_to, run_name


def test_run_name_timestamp():
    cfg = LoggingSection(wandb_run_name="pl-{timestamp}")
    assert run_name(cfg, datetime(2026, 1, 2, 3, 4, 5)) == "pl-20260102-030405"


def test_wandb_goes_offline_without_key(monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    for key in ("WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(key, raising=False)
    report = resolve_report_to(LoggingSection(report_to=["wandb", "tensorboard"]), str(tmp_path / "out"))
    import os

    assert report == ["wandb", "tensorboard"]
    assert os.environ["WANDB_MODE"] == "offline"
    assert os.environ["WANDB_DIR"].startswith(str(tmp_path / "out"))


def test_wandb_disabled_mode_drops_it(monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    report = resolve_report_to(LoggingSection(report_to=["wandb"], wandb_mode="disabled"), str(tmp_path))
    assert report == ["none"]


def test_tensorboard_and_offline_wandb_in_a_real_run(tmp_path, tiny_model_dir, alpaca_file, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_DIR", raising=False)
    raw = make_config_dict(
        tiny_model_dir, alpaca_file, tmp_path / "out",
        training={"max_steps": 2, "eval_strategy": "no", "save_strategy": "no"},
        logging={"report_to": ["tensorboard", "wandb"], "wandb_run_name": "t-{timestamp}"},
    )  # fmt: skip
    run(load_config(data=raw))
    logs = tmp_path / "out" / "logs"
    assert list(logs.rglob("events.out.tfevents.*")), "no TensorBoard event file"
    assert list(logs.rglob("offline-run-*")), "no offline W&B run"
