"""Fault injection: kill -9 during save, SIGTERM then resume, exact resume, NaN, disk errors, config drift."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import alpaca_rows, make_config_dict, write_jsonl
from wronai.config import load_config
from wronai.errors import ConfigError, WronAIError
from wronai.recipe import Pipeline, run
from wronai.train import checkpointing
from wronai.train.faults import NonFiniteLossError
from wronai.train.resume import resume_differences
from wronai.train.trainer import GuardedTrainer


def run_config(tiny_model_dir: Path, root: Path, name: str, **training) -> dict:
    data = write_jsonl(root / "data.jsonl", alpaca_rows(64))
    raw = make_config_dict(
        tiny_model_dir, data, root / name,
        training={"max_steps": 8, "save_steps": 2, "eval_strategy": "no", "save_total_limit": 10, **training},
        lora={"lora_dropout": 0.1},  # exercises the restored RNG state
        data={"packing": True, "max_seq_length": 96, "cache_dir": str(root / "cache")},
    )  # fmt: skip
    return raw


def losses(out: Path) -> dict[int, float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def cli(cfg_path: Path, *extra: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "wronai", "train", str(cfg_path), *extra],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def write(root: Path, raw: dict, name: str = "cfg.yaml") -> Path:
    path = root / name
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return path


def resume_from_reference(
    tmp_path: Path, ref_raw: dict, ref_out: Path, steps: tuple[int, ...]
) -> tuple[Path, dict]:
    """A new output dir holding copies of the reference run's checkpoints, and a config pointing at it."""
    out = tmp_path / "out"
    out.mkdir()
    for step in steps:
        shutil.copytree(ref_out / f"checkpoint-{step}", out / f"checkpoint-{step}")
    raw = yaml.safe_load(yaml.safe_dump(ref_raw))
    raw["training"]["output_dir"] = str(out)
    return out, raw


# ----------------------------------------------------------------------------- checkpoint integrity (unit)


def make_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"w" * 100)
    (path / "trainer_state.json").write_text("{}")
    if complete:
        checkpointing.write_manifest(path, step)
    return path


def test_completeness_needs_manifest_and_intact_files(tmp_path):
    good = make_checkpoint(tmp_path, 2)
    assert checkpointing.is_complete(good)
    assert "manifest" in checkpointing.checkpoint_problem(make_checkpoint(tmp_path, 4, complete=False))
    truncated = make_checkpoint(tmp_path, 6)
    (truncated / "adapter_model.safetensors").write_bytes(b"w" * 10)
    assert "truncated" in checkpointing.checkpoint_problem(truncated)
    missing = make_checkpoint(tmp_path, 8)
    (missing / "trainer_state.json").unlink()
    assert "missing" in checkpointing.checkpoint_problem(missing)
    assert checkpointing.last_complete(tmp_path) == good


def test_rotation_keeps_newest_complete_and_best(tmp_path):
    for step in (2, 4, 6, 8):
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 3, complete=False)  # an old broken one: removed
    make_checkpoint(tmp_path, 10, complete=False)  # newer than the newest complete: a save in progress, kept
    removed = checkpointing.rotate(tmp_path, 1, best=str(tmp_path / "checkpoint-2"))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["checkpoint-10", "checkpoint-2", "checkpoint-8"]
    assert {p.name for p in removed} == {"checkpoint-3", "checkpoint-4", "checkpoint-6"}


def test_resume_differences_list_result_affecting_keys():
    a = {
        "lora": {"r": 8},
        "data": {"max_seq_length": 128},
        "training": {"per_device_train_batch_size": 4, "logging_steps": 1},
    }
    b = {
        "lora": {"r": 16},
        "data": {"max_seq_length": 128},
        "training": {"per_device_train_batch_size": 4, "logging_steps": 50},
    }
    assert resume_differences(a, b) == ["`lora.r`: 8 in the checkpoint, 16 now"]


# ----------------------------------------------------------------------------- exact resume (subprocesses)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("ref")
    raw = run_config(tiny_model_dir, root, "out")
    result = cli(write(root, raw), env_extra={"WRONAI_CACHE_DIR": str(root / "c")})
    assert result.returncode == 0, result.stderr[-3000:]
    return root, raw, root / "out"


SIGTERM_CALLBACK = """
import os, signal
from transformers import TrainerCallback

class SigtermAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(os.environ["WRONAI_TEST_SIGTERM_AT"]):
            os.kill(os.getpid(), signal.SIGTERM)
"""


def test_sigterm_checkpoints_and_resume_equals_uninterrupted(tmp_path, uninterrupted, tiny_model_dir):
    ref_root, ref_raw, ref_out = uninterrupted
    hook = tmp_path / "sigterm_hook.py"
    hook.write_text(SIGTERM_CALLBACK)
    raw = yaml.safe_load(yaml.safe_dump(ref_raw))
    raw["training"]["output_dir"] = str(tmp_path / "out")
    raw["extensions"] = {"callbacks": [f"{hook}:SigtermAt"]}
    cfg = write(tmp_path, raw)
    env = {"WRONAI_CACHE_DIR": str(tmp_path / "c"), "WRONAI_TEST_SIGTERM_AT": "3"}
    stopped = cli(cfg, env_extra=env)
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    assert "--resume" in stopped.stderr and "SIGTERM" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    out = tmp_path / "out"
    last = checkpointing.last_complete(out)
    assert last is not None and last.name in ("checkpoint-3", "checkpoint-4")
    assert not (out / "train_results.json").exists()  # not a finished run

    resumed = cli(cfg, "--resume", env_extra={**env, "WRONAI_TEST_SIGTERM_AT": "-1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # same per-step losses and bit-identical adapter weights as the run that was never interrupted
    assert losses(out) == losses(ref_out)
    a = load_file(out / "adapter_model.safetensors")
    b = load_file(ref_out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_negative_control_resume_without_data_skip_differs(tmp_path, uninterrupted):
    """Proves the equality above can fail: restarting the data at resume changes the losses."""
    _, ref_raw, ref_out = uninterrupted
    out, raw = resume_from_reference(tmp_path, ref_raw, ref_out, (4,))
    raw["training"]["ignore_data_skip"] = True
    result = cli(write(tmp_path, raw), "--resume", env_extra={"WRONAI_CACHE_DIR": str(tmp_path / "c")})
    assert result.returncode == 0, result.stderr[-3000:]
    after = {s: v for s, v in losses(out).items() if s > 4}
    reference = {s: v for s, v in losses(ref_out).items() if s > 4}
    assert after.keys() == reference.keys() and after != reference


KILL_DURING_SAVE = """
import os, signal, sys
from transformers import Trainer
original = Trainer._save_optimizer_and_scheduler
def dying(self, output_dir):
    if self.state.global_step == 4:
        os.kill(os.getpid(), signal.SIGKILL)  # the model is written, the optimizer is not
    return original(self, output_dir)
Trainer._save_optimizer_and_scheduler = dying
from wronai.cli import main
sys.exit(main(["train", sys.argv[1]]))
"""


def test_kill_9_during_save_keeps_previous_checkpoint(tmp_path, tiny_model_dir, uninterrupted):
    _, ref_raw, ref_out = uninterrupted
    raw = yaml.safe_load(yaml.safe_dump(ref_raw))
    raw["training"]["output_dir"] = str(tmp_path / "out")
    cfg = write(tmp_path, raw)
    script = tmp_path / "killer.py"
    script.write_text(KILL_DURING_SAVE)
    env = {**os.environ, "WRONAI_CACHE_DIR": str(tmp_path / "c")}
    died = subprocess.run(
        [sys.executable, str(script), str(cfg)], capture_output=True, text=True, timeout=600, env=env
    )
    assert died.returncode == -signal.SIGKILL
    out = tmp_path / "out"
    assert (out / ".tmp-checkpoint-4").exists() and not (out / "checkpoint-4").exists()
    assert checkpointing.last_complete(out) == out / "checkpoint-2"

    resumed = cli(cfg, "--resume", env_extra={"WRONAI_CACHE_DIR": str(tmp_path / "c")})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not any(p.name.startswith(".tmp-checkpoint") for p in out.iterdir())
    assert losses(out) == losses(ref_out)  # nothing lost beyond the in-flight save


def test_truncated_newest_checkpoint_is_skipped(tmp_path, uninterrupted):
    _, ref_raw, ref_out = uninterrupted
    out, raw = resume_from_reference(tmp_path, ref_raw, ref_out, (4, 6))
    weights = out / "checkpoint-6" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert checkpointing.last_complete(out) == out / "checkpoint-4"
    cfg = load_config(data=raw)
    with pytest.raises(WronAIError, match="truncated"):
        run(cfg, resume=str(out / "checkpoint-6"))


# ----------------------------------------------------------------------------- in-process faults


def test_config_change_between_run_and_resume_is_refused(tmp_path, uninterrupted):
    _, ref_raw, ref_out = uninterrupted
    _, raw = resume_from_reference(tmp_path, ref_raw, ref_out, (4,))
    raw["lora"]["r"] = 8
    raw["training"]["per_device_train_batch_size"] = 2
    with pytest.raises(ConfigError) as info:
        run(load_config(data=raw), resume=True)
    text = str(info.value)
    assert "`lora.r`: 4 in the checkpoint, 8 now" in text
    assert "`training.per_device_train_batch_size`: 4 in the checkpoint, 2 now" in text
    assert "--force-resume" in text


def nan_at(trainer, steps: set[int]):
    original = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        result = original(model, inputs, *args, **kwargs)
        if trainer.state.global_step + 1 in steps:
            loss = result[0] if isinstance(result, tuple) else result
            loss = loss * float("nan")
            return (loss, *result[1:]) if isinstance(result, tuple) else loss
        return result

    trainer.compute_loss = compute_loss


def test_nan_stop_keeps_last_good_checkpoint(tmp_path, tiny_model_dir):
    raw = run_config(tiny_model_dir, tmp_path, "out")
    pipeline = Pipeline(load_config(data=raw))
    pipeline.build_trainer()
    nan_at(pipeline.trainer, {5})
    with pytest.raises(NonFiniteLossError) as info:
        pipeline.train()
    assert info.value.exit_code == 4
    assert "step 5" in str(info.value) and "on_nan: skip_step" in str(info.value)
    assert checkpointing.last_complete(tmp_path / "out") == tmp_path / "out" / "checkpoint-4"


def test_nan_skip_step_skips_the_update_and_counts(tmp_path, tiny_model_dir):
    raw = run_config(tiny_model_dir, tmp_path, "out", on_nan="skip_step", save_strategy="no")
    pipeline = Pipeline(load_config(data=raw))
    pipeline.build_trainer()
    nan_at(pipeline.trainer, {3})
    snapshots = {}

    from transformers import TrainerCallback

    class Snap(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            snapshots[state.global_step] = {
                n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
            }

    pipeline.trainer.add_callback(Snap())
    metrics = pipeline.train()
    assert metrics["skipped_nonfinite_steps"] == 1
    assert all(torch.equal(snapshots[2][n], snapshots[3][n]) for n in snapshots[2])  # step 3 changed nothing
    assert any(not torch.equal(snapshots[3][n], snapshots[4][n]) for n in snapshots[3])  # training went on


def test_nan_skip_step_stops_after_consecutive_limit(tmp_path, tiny_model_dir):
    raw = run_config(
        tiny_model_dir, tmp_path, "out", on_nan="skip_step", max_consecutive_nan_steps=2, save_strategy="no"
    )
    pipeline = Pipeline(load_config(data=raw))
    pipeline.build_trainer()
    nan_at(pipeline.trainer, {2, 3, 4})
    with pytest.raises(NonFiniteLossError, match="2 consecutive steps"):
        pipeline.train()


GUARD_RANK = """
import json, os, sys
import torch
import torch.distributed as dist
from wronai.train.faults import GradientGuard, NonFiniteLossError

policy, init = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
weight = torch.nn.Parameter(torch.ones(3))
optimizer = torch.optim.SGD([weight], lr=0.1)
guard = GradientGuard(policy, max_consecutive=5)
guard.attach(optimizer)
calls = []
original = dist.all_reduce
dist.all_reduce = lambda *a, **k: calls.append(1) or original(*a, **k)
weight.grad = torch.tensor([1.0, float("inf") if rank == 1 else 1.0, 1.0])  # only rank 1 sees the inf
try:
    optimizer.step()
    decision = "stepped" if not torch.equal(weight.detach(), torch.ones(3)) else "skipped"
except NonFiniteLossError:
    decision = "stopped"
dist.barrier()  # every rank reaches the next collective: no rank is left waiting
print(json.dumps({"rank": rank, "decision": decision, "skipped": guard.skipped, "all_reduces": len(calls)}))
dist.destroy_process_group()
"""


@pytest.mark.parametrize(("policy", "expected"), [("skip_step", "skipped"), ("stop", "stopped")])
def test_nan_guard_takes_one_decision_across_ranks(tmp_path, policy, expected):
    """2 gloo processes, an inf in rank 1's gradient only: both ranks skip (or both stop), none steps."""
    script = tmp_path / "guard_rank.py"
    script.write_text(GUARD_RANK)
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), policy, init],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2"},
        )  # fmt: skip
        for rank in (0, 1)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["decision"] for r in results] == [expected, expected]
    assert [r["all_reduces"] for r in results] == [1, 1]  # one collective per step
    if policy == "skip_step":
        assert [r["skipped"] for r in results] == [1, 1]


def test_nan_guard_without_process_group_needs_no_collective(monkeypatch):
    import torch.distributed as dist

    from wronai.train.faults import grads_finite

    def no_collective(*args, **kwargs):
        raise AssertionError("all_reduce without a process group")

    monkeypatch.setattr(dist, "all_reduce", no_collective)
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    weight.grad = torch.tensor([1.0, float("nan")])
    assert grads_finite(optimizer) is False
    weight.grad = torch.ones(2)
    assert grads_finite(optimizer) is True


def test_skipped_step_counts_survive_a_resume(tmp_path, tiny_model_dir):
    """The guard's counts are in the checkpoint: a NaN right after resuming is the 2nd in a row, not the 1st."""
    raw = run_config(
        tiny_model_dir, tmp_path, "out", on_nan="skip_step", max_consecutive_nan_steps=2, max_steps=4, save_steps=4
    )  # fmt: skip
    first = Pipeline(load_config(data=raw))
    first.build_trainer()
    nan_at(first.trainer, {4})
    assert first.train()["skipped_nonfinite_steps"] == 1
    saved = json.loads((tmp_path / "out" / "checkpoint-4" / "wronai_gradient_guard.json").read_text())
    assert saved == {"skipped": 1, "consecutive": 1}
    raw["training"]["max_steps"] = 8
    resumed = Pipeline(load_config(data=raw))
    resumed.build_trainer()
    nan_at(resumed.trainer, {5})
    with pytest.raises(NonFiniteLossError, match="2 consecutive steps"):
        resumed.train(resume=True)
    assert resumed.trainer.gradient_guard.skipped == 2


def test_disk_full_during_save_leaves_previous_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import Trainer

    original = Trainer._save_optimizer_and_scheduler

    def full(self, output_dir):
        if self.state.global_step == 4:
            Path(output_dir, "optimizer.pt").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", full)
    raw = run_config(tiny_model_dir, tmp_path, "out")
    with pytest.raises(WronAIError) as info:
        run(load_config(data=raw))
    out = tmp_path / "out"
    assert "No space left on device" in str(info.value) and "checkpoint-2" in str(info.value)
    assert not any(p.name.startswith(".tmp-checkpoint") for p in out.iterdir())
    assert checkpointing.last_complete(out) == out / "checkpoint-2"
    weights = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert weights and all(torch.isfinite(t).all() for t in weights.values())


def no_cpu_repacking(model) -> None:
    """bitsandbytes rewrites 4-bit weights in place for its CPU inference path the first time a layer runs in
    eval mode (evaluation here), which corrupts later training steps; keep it off in this test."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def test_best_checkpoint_tracked_and_kept_under_its_published_name(tmp_path, tiny_model_dir):
    """transformers' save runs in the staging folder; the best checkpoint must still name checkpoint-N."""
    raw = run_config(
        tiny_model_dir, tmp_path, "out", max_steps=6, save_steps=2, eval_steps=2, eval_strategy="steps",
        save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="eval_loss",
        greater_is_better=True,  # the eval loss falls: the best is the first evaluation, an older checkpoint
    )  # fmt: skip
    out = tmp_path / "out"
    seen = {}

    from transformers import TrainerCallback

    class AfterSave(TrainerCallback):  # called right after each _save_checkpoint
        def on_save(self, args, state, control, **kwargs):
            names = sorted(p.name for p in out.iterdir() if "checkpoint" in p.name)
            newest = out / f"checkpoint-{state.global_step}"
            saved = json.loads((newest / "trainer_state.json").read_text())
            extras = (newest / "wronai_config.yaml").is_file()  # checkpoint_extras in every checkpoint
            seen[state.global_step] = (
                names,
                saved["best_model_checkpoint"],
                checkpointing.is_complete(newest),
                extras,
            )

    pipeline = Pipeline(load_config(data=raw))
    pipeline.build_trainer()
    pipeline.trainer.add_callback(AfterSave())
    no_cpu_repacking(pipeline.model)
    pipeline.train()
    best = str(out / "checkpoint-2")
    assert (
        pipeline.trainer.state.best_global_step == 2 and pipeline.trainer.state.best_model_checkpoint == best
    )
    # the best is named by its published path in every saved state (what --resume reads), and rotation to
    # one checkpoint keeps it next to the newest; nothing is left in staging
    assert seen == {
        2: (["checkpoint-2"], best, True, True),
        4: (["checkpoint-2", "checkpoint-4"], best, True, True),
        6: (["checkpoint-2", "checkpoint-6"], best, True, True),
    }
    assert "wronai_config.yaml" in pipeline.trainer.checkpoint_extras
    assert not hasattr(GuardedTrainer, "checkpoint_extras")  # per instance, never shared


def test_unwritable_output_dir(tmp_path, tiny_model_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    raw = run_config(tiny_model_dir, tmp_path, "unused")
    raw["training"]["output_dir"] = str(blocker / "out")
    with pytest.raises(WronAIError, match="cannot write to"):
        run(load_config(data=raw))
