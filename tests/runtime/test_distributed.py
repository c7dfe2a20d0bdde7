"""Data-parallel training: `wronai train --nproc 2` (torchrun, gloo on CPU) reproduces a 1-process run.

1 process × batch 4 and 2 processes × batch 2 see the same rows per optimizer step (the Trainer shards each
global batch across ranks in sampler order) and, with token-averaged losses across ranks, the same gradients.
Logged losses still differ in the last float32 digits: each rank pads to its own longest row (different
matmul shapes and summation order) and gloo sums the gradients in another order; Adam then carries those
~1e-7 relative differences forward. Measured: < 2e-7 relative over 6 steps; the test allows 1e-4.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, make_config_dict
from wronai.cli import main
from wronai.config import load_config
from wronai.runtime import distributed, sharding
from wronai.runtime.hardware import plan_device
from wronai.train.arguments import training_arguments_kwargs

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is exercised on Linux")


def _losses(out: Path) -> dict[int, float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: e["loss"] for e in history if "loss" in e}


def _write(tmp_path: Path, name: str, raw: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


def _torchrun(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "WRONAI_CACHE_DIR": str(cache),
        "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO / "src")])),
    }
    return subprocess.run(
        [sys.executable, "-m", "wronai", *args], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, tiny_model_dir):
    """The same 6-step run: in-process with 1×4 rows, and under `--nproc 2` with 2×2 rows."""
    from conftest import alpaca_rows, write_jsonl

    tmp = tmp_path_factory.mktemp("ddp")
    data = write_jsonl(tmp / "alpaca.jsonl", alpaca_rows(40))
    one = make_config_dict(tiny_model_dir, data, tmp / "one")
    two = make_config_dict(tiny_model_dir, data, tmp / "two")
    two["training"]["per_device_train_batch_size"] = 2
    os.environ["WRONAI_CACHE_DIR"] = str(tmp / "cache-one")
    assert main(["train", str(_write(tmp, "one", one))]) == 0
    proc = _torchrun(["train", str(_write(tmp, "two", two)), "--nproc", "2"], tmp / "cache-two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, proc


def test_two_processes_match_one(ddp_runs):
    tmp, proc = ddp_runs
    one, two = _losses(tmp / "one"), _losses(tmp / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4, 5, 6]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), (step, one, two)
    log = proc.stderr + proc.stdout
    assert "global batch 4 rows per optimizer step = 2 per device × 1 accumulation × 2 process(es)" in log
    assert log.count("global batch") == 1  # only rank 0 talks
    assert log.count("saved adapter, tokenizer, config and metrics") == 1


def test_two_processes_with_evaluation_and_checkpoints_equal_two_without(ddp_runs, tiny_model_dir):
    """Evaluation and checkpoints every 3 steps change no training loss of a 2-rank run (bit-identical):
    on a CPU with AVX512-BF16 this is where bitsandbytes' packed format used to enter (rank 0 then unpacked
    at the save while the others stayed packed)."""
    tmp, _ = ddp_runs
    raw = yaml.safe_load((tmp / "two.yaml").read_text())
    raw["training"].update({"output_dir": str(tmp / "quiet"), "eval_strategy": "no", "save_strategy": "no"})
    proc = _torchrun(["train", str(_write(tmp, "quiet", raw)), "--nproc", "2"], tmp / "cache-quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list((tmp / "quiet").glob("checkpoint-*"))
    assert _losses(tmp / "quiet") == _losses(tmp / "two")


def test_checkpoints_and_outputs_written_once(ddp_runs):
    tmp, _ = ddp_runs
    out = tmp / "two"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint-", ".tmp"))) == [
        "checkpoint-3",
        "checkpoint-6",
    ]
    assert not list(out.glob(".wronai_write_test*"))
    for ckpt in ("checkpoint-3", "checkpoint-6"):
        manifest = json.loads((out / ckpt / "wronai_checkpoint.json").read_text())
        assert {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors"} <= set(manifest["files"])
    for name in (
        "adapter_model.safetensors",
        "train_results.json",
        "wronai_config.yaml",
        "provenance.json",
        "tokenizer.json",
    ):
        assert (out / name).is_file(), name


def test_resume_with_same_world_size(ddp_runs):
    tmp, _ = ddp_runs
    resumed = tmp / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp / "two" / "checkpoint-3", resumed / "checkpoint-3")
    cfg = yaml.safe_load((tmp / "two.yaml").read_text())
    cfg["training"]["output_dir"] = str(resumed)
    proc = _torchrun(
        ["train", str(_write(tmp, "resumed", cfg)), "--nproc", "2", "--resume"], tmp / "cache-two"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    full, again = _losses(tmp / "two"), _losses(resumed)
    for step in (4, 5, 6):
        assert again[step] == pytest.approx(full[step], rel=1e-4), (step, full, again)


def test_launch_command_and_threads(monkeypatch):
    cmd = distributed.launch_command(2, ["train", "x.yaml"])
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    assert cmd[-3:] == ["wronai", "train", "x.yaml"]
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert distributed.omp_threads(2) == 1 and distributed.omp_threads(4) == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert distributed.omp_threads(4) == 4


def _cfg(**hardware):
    return load_config(
        data={"model": {"name": "org/m"}, "data": {"dataset_name": "org/d"}, "hardware": hardware}
    )


def test_strategy_maps_to_training_arguments(tmp_path, monkeypatch):
    cfg = _cfg(distributed="ddp")
    plan = plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    kwargs = training_arguments_kwargs(
        cfg.training, cfg.hardware, plan, report_to=["none"], run_name="r", has_eval=False
    )
    assert "ddp_backend" not in kwargs  # one process: no process group to join (tests/test_cuda_paths.py)
    monkeypatch.setenv("WORLD_SIZE", "2")
    kwargs = training_arguments_kwargs(
        cfg.training, cfg.hardware, plan, report_to=["none"], run_name="r", has_eval=False
    )
    assert kwargs["ddp_backend"] == "gloo" and kwargs["ddp_find_unused_parameters"] is False
    fsdp = sharding.training_kwargs(_cfg(distributed="fsdp").hardware, "cuda")
    assert fsdp["ddp_backend"] == "nccl" and fsdp["fsdp"] is True
    assert fsdp["fsdp_config"]["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    zero3 = sharding.training_kwargs(_cfg(distributed="deepspeed_zero3").hardware, "cuda")["deepspeed"]
    assert zero3["zero_optimization"]["stage"] == 3
    import torch

    assert sharding.quant_storage_dtype(_cfg(distributed="fsdp").hardware, torch.bfloat16) == torch.bfloat16
    assert sharding.quant_storage_dtype(_cfg(distributed="ddp").hardware, torch.bfloat16) == torch.uint8
    assert sharding.device_map(_cfg(distributed="fsdp").hardware, "cuda") is None
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert sharding.strategy(_cfg(distributed_config=str(ds)).hardware) == "deepspeed_zero3"
    acc = tmp_path / "accelerate.yaml"
    acc.write_text("distributed_type: FSDP\nfsdp_config:\n  fsdp_state_dict_type: SHARDED_STATE_DICT\n")
    hw = _cfg(distributed_config=str(acc)).hardware
    assert sharding.strategy(hw) == "fsdp"
    assert sharding.training_kwargs(hw, "cuda")["fsdp_config"]["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"


def test_fsdp_needs_cuda_and_says_why():
    problems = sharding.preflight_problems(_cfg(distributed="fsdp"), "cpu")
    assert len(problems) == 1 and "\n" not in problems[0]
    assert problems[0].startswith("hardware.distributed=fsdp needs CUDA GPUs (this machine runs on cpu;")
    assert "silently train plain DDP" in problems[0] and "deepspeed_zero3" in problems[0]
    assert sharding.preflight_problems(_cfg(distributed="fsdp"), "cuda") == []
    assert sharding.preflight_problems(_cfg(distributed="ddp"), "cpu") == []
    assert "not found" in sharding.preflight_problems(_cfg(distributed_config="/nope.json"), "cpu")[0]


@pytest.mark.parametrize("name", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_runs_on_cpu_when_installed(name, monkeypatch):
    import importlib.util

    assert sharding.preflight_problems(_cfg(distributed=name), "mps")[0].startswith(
        f"hardware.distributed={name} runs on CUDA GPUs or the CPU (this machine runs on mps)"
    )
    real = importlib.util.find_spec
    present = lambda n, *a: object() if n == "deepspeed" else real(n, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", present)
    assert sharding.preflight_problems(_cfg(distributed=name), "cpu") == []
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "deepspeed" else real(n, *a))
    (problem,) = sharding.preflight_problems(_cfg(distributed=name), "cpu")
    assert problem.startswith(f"hardware.distributed={name} needs the deepspeed package — pip install")


def test_train_nproc_refuses_fsdp_on_cpu_in_one_line(tmp_path, tiny_model_dir, alpaca_file, capsys):
    raw = make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "out", hardware={"distributed": "fsdp"})
    assert main(["train", str(_write(tmp_path, "fsdp", raw)), "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    problems = [line for line in err.splitlines() if "hardware.distributed=fsdp needs CUDA GPUs" in line]
    assert len(problems) == 1 and "silently train plain DDP" in problems[0]  # once (it was printed twice)
    assert "Traceback" not in err


def test_launch_sets_deepspeed_cpu_accelerator(monkeypatch):
    seen = {}
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(subprocess, "call", lambda cmd, env: seen.update(env) or 0)
    assert distributed.launch(2, ["train", "x.yaml"], "cpu") == 0
    assert seen["DS_ACCELERATOR"] == "cpu" and seen["OMP_NUM_THREADS"]


# --- ZeRO-3 load: "auto" values resolved for deepspeed.zero.Init; the HfDeepSpeedConfig handed to the loader ---


def _plan(cfg):
    return plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)


def test_load_time_deepspeed_config_resolves_auto(tmp_path):
    import torch

    from wronai.runtime.batch import resolve

    cfg, _ = resolve(_cfg(distributed="deepspeed_zero3"), "cuda")  # as Pipeline hands it on: batch decided
    plan = _plan(cfg)
    ds = sharding.load_time_deepspeed_config(cfg.hardware, plan, cfg.training)
    assert ds["zero_optimization"]["stage"] == 3 and "auto" not in json.dumps(ds)
    assert ds["train_micro_batch_size_per_gpu"] == cfg.training.per_device_train_batch_size
    assert ds["gradient_accumulation_steps"] == cfg.training.gradient_accumulation_steps
    assert "train_batch_size" not in ds  # DeepSpeed derives it from the world size
    assert ds["bf16"]["enabled"] is (plan.model_dtype == torch.bfloat16)
    assert ds["fp16"]["enabled"] is (plan.model_dtype == torch.float16)
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}, "bf16": {"enabled": True},
                               "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}, "train_batch_size": "auto"}))  # fmt: skip
    hw = _cfg(distributed_config=str(own)).hardware
    ds = sharding.load_time_deepspeed_config(hw, plan, cfg.training)
    assert ds["zero_optimization"] == {"stage": 3} and ds["bf16"]["enabled"] is True and "optimizer" not in ds


def test_prepare_for_sharded_load_turns_on_zero3_loading():
    pytest.importorskip("deepspeed")
    import gc

    from transformers.integrations import is_deepspeed_zero3_enabled

    for name, quant in (("ddp", False), ("deepspeed_zero2", False), ("deepspeed_zero3", True)):
        cfg = load_config(data={"model": {"name": "org/m"}, "data": {"dataset_name": "org/d"}, "hardware": {"distributed": name},
                                "quantization": {"load_in_4bit": quant}})  # fmt: skip
        assert sharding.prepare_for_sharded_load(cfg.hardware, _plan(cfg), cfg.training) is None, name
    cfg = load_config(data={"model": {"name": "org/m"}, "data": {"dataset_name": "org/d"},
                            "hardware": {"distributed": "deepspeed_zero3"}, "quantization": {"load_in_4bit": False}})  # fmt: skip
    keep = sharding.prepare_for_sharded_load(cfg.hardware, _plan(cfg), cfg.training)
    assert keep is not None and keep.is_zero3() and is_deepspeed_zero3_enabled()
    del keep
    gc.collect()
    assert not is_deepspeed_zero3_enabled()  # transformers holds a weakref only: the caller keeps it alive


# --- DeepSpeed ZeRO-3 executed on CPU: 2 gloo processes, weights partitioned while loading ---

ZERO3_CHILD = '''
"""`wronai train`, recording how much of one weight each rank holds right after loading."""
import json
import os
import sys
from pathlib import Path

from wronai import recipe
from wronai.cli import main

original = recipe.Pipeline.load_model


def load_model(self):  # the real load (pipeline calls prepare_for_sharded_load first); records what rank holds
    model = original(self)
    weight = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    seen = {"numel": weight.numel(), "ds_numel": getattr(weight, "ds_numel", None), "hook": self._zero3_load is not None}
    Path(os.environ["ZERO3_PROBE"] + os.environ["RANK"]).write_text(json.dumps(seen))
    return model


recipe.Pipeline.load_model = load_model
sys.exit(main(sys.argv[1:]))
'''


def test_deepspeed_zero3_on_cpu_matches_one_process(tmp_path, tiny_model_dir, alpaca_file):
    """fp32 LoRA, 6 steps: 1 process × 4 rows vs ZeRO-3 on 2 gloo processes × 2 rows (measured: < 2e-7 relative)."""
    pytest.importorskip("deepspeed")
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    fp32 = {"load_in_4bit": False}
    one = make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "one", quantization=fp32)
    zero3 = make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "zero3", quantization=fp32,
                             hardware={"distributed": "deepspeed_zero3"})  # fmt: skip
    zero3["training"]["per_device_train_batch_size"] = 2
    assert main(["train", str(_write(tmp_path, "one", one))]) == 0
    child = tmp_path / "zero3_child.py"
    child.write_text(ZERO3_CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "ZERO3_PROBE": str(tmp_path / "probe-rank"),
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO / "src")]))}  # fmt: skip
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(child)]
    cmd = [*run, "train", str(_write(tmp_path, "zero3", zero3))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):  # each rank held half of the 64x64 weight right after from_pretrained
        seen = json.loads((tmp_path / f"probe-rank{rank}").read_text())
        assert seen == {"numel": 0, "ds_numel": 64 * 64, "hook": True}, seen
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "zero3")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), (step, a, b)
    manifest = json.loads((tmp_path / "zero3" / "checkpoint-6" / "wronai_checkpoint.json").read_text())
    shards = {"global_step6/zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_state_1.pth"}
    assert shards <= set(manifest["files"])
    ref = load_file(tmp_path / "one" / "adapter_model.safetensors")
    got = load_file(tmp_path / "zero3" / "adapter_model.safetensors")
    assert sorted(ref) == sorted(got)
    for key in ref:
        assert (ref[key] - got[key]).abs().max().item() < 1e-5, key
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, tmp_path / "zero3")
    key = next(k for k in got if "lora_B" in k)
    loaded = dict(model.named_parameters())[key.replace(".weight", ".default.weight")]
    assert loaded.detach().equal(got[key])
