"""Exact resume, checked from outside: SIGTERM at a step between scheduled saves, then `wronai train --resume`.

The run is stopped mid-epoch in its second epoch (the first epoch's order comes out the same after any
restart, so a resume there proves little) with dropout on (the RNG state matters), a warmup + cosine schedule
(the scheduler state matters) and rows grouped by length (the sampler's shuffle matters). The resumed run
must log the same per-step losses, bit for bit, as a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import alpaca_rows, make_config_dict, write_jsonl
from wronai.train import checkpointing

# 20 rows -> 18 train rows -> 5 batches of 4 per epoch: step 8 is the 3rd step of epoch 1, not a multiple of
# save_steps; steps 11-12 run in epoch 2 (the resumed run crosses an epoch boundary)
ROWS, STEPS, SAVE_STEPS, STOP_AT = 20, 12, 5, 8

# SIGTERM while step STOP_AT runs; WronAI's stop callback then checkpoints at the end of that step
SIGTERM_DURING_STEP = """
import os, signal
from transformers import TrainerCallback

class SigtermDuringStep(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == int(os.environ.get("WRONAI_TEST_SIGTERM_DURING", "-1")):
            os.kill(os.getpid(), signal.SIGTERM)
"""


def run_config(root: Path, model_dir: Path, name: str) -> Path:
    data = write_jsonl(root / "train.jsonl", alpaca_rows(ROWS))
    hook = root / "sigterm_hook.py"
    hook.write_text(SIGTERM_DURING_STEP)
    raw = make_config_dict(
        model_dir, data, root / name,
        training={
            "max_steps": STEPS, "save_steps": SAVE_STEPS, "save_total_limit": 10,
            "lr_scheduler_type": "cosine", "warmup_steps": 3, "group_by_length": True,
            # evaluation off: bitsandbytes' CPU inference path repacks 4-bit weights in eval mode (fixed elsewhere)
            "eval_strategy": "no",
        },
        lora={"lora_dropout": 0.1},
        data={"cache_dir": str(root / "cache")},
    )  # fmt: skip
    raw["extensions"] = {"callbacks": [f"{hook}:SigtermDuringStep"]}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


def train(cfg: Path, *extra: str, sigterm_during: int = -1) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "WRONAI_CACHE_DIR": str(cfg.parent / "prepared"),
        "WRONAI_TEST_SIGTERM_DURING": str(sigterm_during),
    }
    return subprocess.run(
        [sys.executable, "-m", "wronai", "train", str(cfg), *extra],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip


def step_losses(out: Path) -> dict[int, float]:
    history = json.loads((out / "trainer_state.json").read_text(encoding="utf-8"))["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """(uninterrupted run, stopped-then-resumed run, the stopped run's stderr and checkpoints)."""
    root = tmp_path_factory.mktemp("resume-exact")
    reference = train(run_config(root, tiny_model_dir, "reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    cfg = run_config(root, tiny_model_dir, "interrupted")
    stopped = train(cfg, sigterm_during=STOP_AT)
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    checkpoints = [p.name for _, p in checkpointing.list_checkpoints(root / "interrupted")]
    resumed = train(cfg, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return root / "reference", root / "interrupted", stopped.stderr, checkpoints


def test_signal_writes_a_checkpoint_between_scheduled_saves(runs):
    _, _, stderr, checkpoints = runs
    assert checkpoints == ["checkpoint-5", f"checkpoint-{STOP_AT}"]
    assert f"at step {STOP_AT}" in stderr and "--resume" in stderr


def test_resumed_run_logs_the_uninterrupted_losses_bit_for_bit(runs):
    reference, resumed, _, _ = runs
    expected = step_losses(reference)
    got = step_losses(resumed)
    assert sorted(expected) == list(range(1, STEPS + 1))
    after = {s: v for s, v in got.items() if s > STOP_AT}
    assert sorted(after) == list(range(STOP_AT + 1, STEPS + 1))
    assert after == {s: expected[s] for s in after}  # exact float equality, not approx
    a = load_file(resumed / "adapter_model.safetensors")
    b = load_file(reference / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_length_grouped_order_depends_on_seed_and_epoch_only():
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from wronai.train.trainer import EpochSeededSampler

    lengths = [3, 9, 4, 7, 1, 8, 2, 6, 5, 10, 11, 12] * 4
    sampler = EpochSeededSampler(LengthGroupedSampler(4, lengths=lengths), seed=42)
    orders = {}
    for epoch, global_seed in ((0, 1), (1, 2), (0, 3), (1, 4)):
        torch.manual_seed(global_seed)  # what dropout and earlier epochs did to the global RNG
        sampler.set_epoch(epoch)
        orders.setdefault(epoch, []).append(list(sampler))
    assert orders[0][0] == orders[0][1] and orders[1][0] == orders[1][1]
    assert orders[0][0] != orders[1][0]  # still a new shuffle each epoch
    assert sorted(orders[0][0]) == list(range(len(lengths)))
