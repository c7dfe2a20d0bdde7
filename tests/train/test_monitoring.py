"""Trackers: TensorBoard event files, W&B offline without a key (never a prompt), run names."""

from __future__ import annotations

from datetime import datetime

import pytest

from conftest import make_config_dict
from wronai.config import load_config
from wronai.config.sections.run import LoggingSection
from wronai.recipe import run
from wronai.runtime.environ import environment
from wronai.train.monitoring import resolve_report_to, run_name, tracker_environment


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
    logging_cfg = LoggingSection(report_to=["wandb", "tensorboard"])
    assert resolve_report_to(logging_cfg, str(tmp_path / "out")) == ["wandb", "tensorboard"]
    env = tracker_environment(logging_cfg, str(tmp_path / "out"))
    assert env["WANDB_MODE"] == "offline" and env["WANDB_DIR"].startswith(str(tmp_path / "out"))


def test_tracker_environment_is_set_only_inside_the_block(monkeypatch, tmp_path):
    """The trackers' variables exist while the Trainer is built and trains, and the process's environment
    is exactly as before afterwards (a value the user set is restored, not overwritten for good)."""
    import os

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "/users/own")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    before = dict(os.environ)
    values = {"TENSORBOARD_LOGGING_DIR": str(tmp_path / "logs"), "WANDB_MODE": "offline"}
    with environment(values):
        assert (
            os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "logs")
            and os.environ["WANDB_MODE"] == "offline"
        )
    assert dict(os.environ) == before


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
