"""The timed CPU choices in a run: decided before the model loads, applied to the plan the run uses, saved in
the run directory and every checkpoint, and taken from the checkpoint (never timed again) on resume."""

from __future__ import annotations

import json

import pytest

from conftest import make_config_dict
from wronai.config import load_config
from wronai.rundir.files import AUTOTUNE_FILE


@pytest.fixture
def tuned_run(tiny_model_dir, alpaca_file, tmp_path):
    from wronai.recipe import run

    raw = make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "out", hardware={"autotune": True},
                           training={"max_steps": 2, "save_steps": 1, "eval_strategy": "no"})  # fmt: skip
    return run(load_config(data=raw)).output_dir, raw


def test_the_decision_is_saved_with_the_run_and_each_checkpoint(tuned_run):
    out, _ = tuned_run
    saved = json.loads((out / AUTOTUNE_FILE).read_text(encoding="utf-8"))
    assert saved["source"] in ("timed", "fixed") and saved["reasons"]
    for checkpoint in sorted(out.glob("checkpoint-*")):
        assert json.loads((checkpoint / AUTOTUNE_FILE).read_text(encoding="utf-8")) == saved


def test_resume_takes_the_checkpoints_decision_without_timing(tuned_run, monkeypatch):
    from wronai.recipe import Pipeline
    from wronai.runtime import autotune

    out, raw = tuned_run
    saved = json.loads((out / "checkpoint-1" / AUTOTUNE_FILE).read_text(encoding="utf-8"))

    def never(*args, **kwargs):
        raise AssertionError("a resumed run timed its choices again")

    monkeypatch.setattr(autotune, "decide", never)
    pipeline = Pipeline(load_config(data=raw), resume=str(out / "checkpoint-1"))
    pipeline.load_model()
    assert pipeline.decision is not None and pipeline.decision.source == "resumed"
    assert (pipeline.plan.precision, pipeline.plan.fused_lora) == (saved["precision"], saved["fused_lora"])


def test_autotune_off_leaves_the_plan_as_planned(tiny_model_dir, alpaca_file, tmp_path, monkeypatch):
    from wronai.recipe import Pipeline
    from wronai.runtime import autotune

    monkeypatch.setattr(autotune, "decide", lambda *a, **k: (_ for _ in ()).throw(AssertionError("timed")))
    pipeline = Pipeline(load_config(data=make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "out")))
    planned = pipeline.plan
    pipeline.load_model()
    assert pipeline.decision is None and pipeline.plan is planned
