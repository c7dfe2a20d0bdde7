"""The CUDA side of the pipeline, built on a CPU-only machine: torch is told it sees two GPUs.

Nothing runs on the fake GPUs: the tests build what WronAI hands to the stock libraries — the real
``TrainingArguments`` (with accelerate's state behind it), ``BitsAndBytesConfig``, accelerate's FSDP plugin,
the keyword arguments of ``AutoModelForCausalLM.from_pretrained`` — and check them.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import yaml

# imported before any test patches torch.cuda: their import-time checks must see the real (CPU-only) torch
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, get_max_memory
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainingArguments
from transformers import training_args as hf_training_args
from transformers.distributed.fsdp import is_fsdp_enabled
from transformers.training_args import ParallelMode

from conftest import REPO, make_config_dict
from wronai.cli import main
from wronai.config import load_config
from wronai.errors import WronAIError
from wronai.model import loading
from wronai.runtime import sharding
from wronai.runtime.hardware import plan_device
from wronai.train.arguments import training_arguments_kwargs

GIB = 2**30
GPUS = 2
FREE = 70 * GIB  # what torch.cuda.mem_get_info reports free on each fake GPU
LAUNCH_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture()
def fake_cuda(monkeypatch):
    """torch reports two bf16-capable 80 GiB GPUs; accelerate's state is reset afterwards."""
    props = SimpleNamespace(name="Fake H100", total_memory=80 * GIB, is_integrated=False, major=9, minor=0,
                            multi_processor_count=132)  # fmt: skip
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "device_count", lambda: GPUS)
    monkeypatch.setattr(cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(cuda, "get_device_name", lambda device=None: props.name)
    monkeypatch.setattr(cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(cuda, "set_device", lambda device: None)
    monkeypatch.setattr(cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cuda, "mem_get_info", lambda device=None: (FREE, 80 * GIB))
    yield
    AcceleratorState._reset_state(reset_partial_state=True)  # TrainingArguments left a (fake) cuda:0 state


def _one_process(monkeypatch):
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)


def _rank(monkeypatch, rank: int, world_size: int = GPUS):
    """The environment torchrun gives rank ``rank`` (no process group is created)."""
    for name, value in (("WORLD_SIZE", world_size), ("RANK", rank), ("LOCAL_RANK", rank), ("LOCAL_WORLD_SIZE", world_size)):  # fmt: skip
        monkeypatch.setenv(name, str(value))


def _isolate_env(monkeypatch, *names: str):
    """Unset ``names`` for the test; whatever the code under test sets is removed again afterwards."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def _plan(cfg):
    return plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)


def _arguments_kwargs(cfg, plan):
    return training_arguments_kwargs(
        cfg.training, cfg.hardware, plan, report_to=["none"], run_name="cuda-paths", has_eval=True
    )


# --- ddp_backend only with several processes ----------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_ddp_example_config_trains_in_one_process(device, request, monkeypatch, tmp_path):
    """configs/examples/ddp.yaml without --nproc: real TrainingArguments, accelerate's state usable."""
    if device == "cuda":
        request.getfixturevalue("fake_cuda")
    _one_process(monkeypatch)
    cfg = load_config(REPO / "configs/examples/ddp.yaml", [f"training.output_dir={tmp_path / 'out'}"])
    plan = _plan(cfg)
    assert plan.device == device
    kwargs = _arguments_kwargs(cfg, plan)
    assert "ddp_backend" not in kwargs and "ddp_find_unused_parameters" not in kwargs
    args = TrainingArguments(**kwargs)  # accelerate's PartialState is built here (it raised before)
    assert args.device.type == device and args.n_gpu == (GPUS if device == "cuda" else 0)
    assert args.parallel_mode != ParallelMode.DISTRIBUTED and args.world_size == 1
    assert args.distributed_state.distributed_type == DistributedType.NO


@pytest.mark.parametrize(("device", "backend"), [("cpu", "gloo"), ("cuda", "nccl")])
def test_ddp_backend_passed_under_torchrun(device, backend, request, monkeypatch, tmp_path):
    if device == "cuda":
        request.getfixturevalue("fake_cuda")
    _rank(monkeypatch, 1)
    cfg = load_config(REPO / "configs/examples/ddp.yaml", [f"training.output_dir={tmp_path / 'out'}"])
    kwargs = _arguments_kwargs(cfg, _plan(cfg))
    assert kwargs["ddp_backend"] == backend and kwargs["ddp_find_unused_parameters"] is False


# --- device_map auto, max_memory and cpu_offload in one CUDA process ----------------------------------------


class _Loaded:
    """What the patched from_pretrained returns: enough of a model for load_base_model's last lines."""

    config = SimpleNamespace(use_cache=True)


def _load(monkeypatch, hardware=None, quantization=None, device_map="auto"):
    """modeling.load_base_model with from_pretrained patched; returns the keyword arguments it got."""
    data = {"model": {"name": "org/model", "device_map": device_map}, "data": {"dataset_name": "org/data"},
            "hardware": hardware or {}, "quantization": quantization or {"load_in_4bit": True}}  # fmt: skip
    cfg = load_config(data=data)
    seen: dict = {}

    def from_pretrained(name, **kwargs):
        seen.update(kwargs)
        return _Loaded()

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    loading.load_base_model(cfg.model, cfg.quantization, cfg.hardware, _plan(cfg))
    return seen


def test_one_cuda_process_lets_accelerate_spread_within_max_memory(fake_cuda, monkeypatch):
    _one_process(monkeypatch)
    kwargs = _load(monkeypatch, {"max_memory": "30GiB"})
    assert kwargs["device_map"] == "auto"
    assert kwargs["max_memory"] == {0: "30GiB", 1: "30GiB"}  # the GPUs only: cpu_offload is off
    assert get_max_memory(dict(kwargs["max_memory"])) == {0: 30 * GIB, 1: 30 * GIB}  # accelerate takes it
    bnb = kwargs["quantization_config"]
    assert isinstance(bnb, BitsAndBytesConfig) and bnb.load_in_4bit
    assert bnb.bnb_4bit_quant_storage == torch.uint8 and not bnb.llm_int8_enable_fp32_cpu_offload
    # without max_memory: every GPU's free memory and no CPU share (accelerate's default would add the CPU)
    assert _load(monkeypatch)["max_memory"] == {0: FREE, 1: FREE}
    # a config's per-device mapping (YAML keys are strings): GPU indexes as ints, as accelerate requires
    mapped = _load(monkeypatch, {"max_memory": {"0": "20GiB", "1": "10GiB"}})["max_memory"]
    assert get_max_memory(dict(mapped)) == {0: 20 * GIB, 1: 10 * GIB}


def test_cpu_offload_lets_accelerate_use_the_cpu(fake_cuda, monkeypatch):
    _one_process(monkeypatch)
    eight_bit = {"load_in_4bit": False, "load_in_8bit": True}
    kwargs = _load(monkeypatch, {"max_memory": "20GiB", "cpu_offload": True}, eight_bit)
    assert kwargs["device_map"] == "auto"
    memory = kwargs["max_memory"]
    assert memory[0] == memory[1] == "20GiB" and isinstance(memory["cpu"], int) and memory["cpu"] > 0
    assert list(get_max_memory(dict(memory))) == [0, 1, "cpu"]
    assert kwargs["quantization_config"].llm_int8_enable_fp32_cpu_offload is True
    unset = _load(monkeypatch, {"cpu_offload": True}, eight_bit)
    assert unset["device_map"] == "auto" and "max_memory" not in unset  # accelerate's default: GPUs, then CPU


def test_offload_settings_that_cannot_work_are_refused(fake_cuda, monkeypatch):
    _one_process(monkeypatch)
    with pytest.raises(WronAIError) as err:
        _load(monkeypatch, {"cpu_offload": True})  # 4-bit
    assert str(err.value).startswith("hardware.cpu_offload: 4-bit (QLoRA) layers cannot be offloaded")
    assert "\n" not in str(err.value) and "load_in_8bit" in str(err.value)
    with pytest.raises(WronAIError) as err:
        _load(monkeypatch, {"max_memory": {"0": "20GiB", "cpu": "30GiB"}})
    assert str(err.value).startswith("hardware.max_memory: a cpu entry") and "cpu_offload: true" in str(
        err.value
    )


def test_ddp_keeps_one_gpu_per_rank_and_sharded_strategies_place_weights(fake_cuda, monkeypatch):
    _rank(monkeypatch, 1)
    kwargs = _load(monkeypatch, {"max_memory": "30GiB", "distributed": "ddp"})
    assert kwargs["device_map"] == {"": 1} and "max_memory" not in kwargs
    assert _load(monkeypatch, {"distributed": "none"})["device_map"] == {"": 1}  # torchrun without a strategy
    fsdp = _load(monkeypatch, {"distributed": "fsdp"}, {"load_in_4bit": True})
    assert fsdp["device_map"] is None and "max_memory" not in fsdp
    _one_process(monkeypatch)
    assert _load(monkeypatch, device_map={"model": 0, "lm_head": 1})["device_map"] == {
        "model": 0,
        "lm_head": 1,
    }


def test_cpu_run_loads_on_the_cpu(monkeypatch):
    _one_process(monkeypatch)
    kwargs = _load(monkeypatch, {"max_memory": "30GiB"})
    assert kwargs["device_map"] == {"": "cpu"} and "max_memory" not in kwargs


# --- FSDP + QLoRA: fsdp=True, the load-time environment only around from_pretrained -------------------------


def test_fsdp_training_arguments_in_the_current_form(fake_cuda, monkeypatch, tmp_path):
    """fsdp=True + fsdp_config: no deprecation warning; accelerate builds its FSDP2 plugin from it."""
    _isolate_env(monkeypatch, "FSDP_CPU_RAM_EFFICIENT_LOADING", "ACCELERATE_USE_FSDP")
    _one_process(monkeypatch)
    cfg = load_config(REPO / "configs/examples/fsdp_qlora.yaml", [f"training.output_dir={tmp_path / 'out'}"])
    kwargs = _arguments_kwargs(cfg, _plan(cfg))
    assert kwargs["fsdp"] is True
    warned: list[str] = []
    monkeypatch.setattr(hf_training_args.logger, "warning", lambda msg, *a, **k: warned.append(str(msg)))
    args = TrainingArguments(**kwargs)
    assert not [w for w in warned if "deprecated" in w], warned
    assert args.fsdp is True
    assert args.fsdp_plugin_args == {"fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                     "cpu_ram_efficient_loading": True, "state_dict_type": "FULL_STATE_DICT",
                                     "reshard_after_forward": True}  # fmt: skip
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    assert plugin.fsdp_version == 2 and plugin.cpu_ram_efficient_loading is True
    assert plugin.reshard_after_forward is True


def test_fsdp_loading_environment_holds_only_inside_from_pretrained(fake_cuda, monkeypatch, tmp_path):
    _isolate_env(monkeypatch, *sharding.FSDP_LOAD_ENV)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")  # a value set before: restored afterwards
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # as after init_process_group
    _rank(monkeypatch, 1)
    seen = []

    def from_pretrained(name, **kwargs):
        seen.append(({k: os.environ.get(k) for k in sharding.FSDP_LOAD_ENV}, is_fsdp_enabled()))
        return _Loaded()

    def load(hardware, quantization=None):
        cfg = load_config(data={"model": {"name": "org/model"}, "data": {"dataset_name": "org/data"},
                                "hardware": hardware, "quantization": quantization or {"load_in_4bit": True}})  # fmt: skip
        monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
        loading.load_base_model(cfg.model, cfg.quantization, cfg.hardware, _plan(cfg))
        return seen.pop()

    outside = {"ACCELERATE_USE_FSDP": "false", "FSDP_CPU_RAM_EFFICIENT_LOADING": None}
    assert load({"distributed": "fsdp"}) == (dict(sharding.FSDP_LOAD_ENV), True)  # transformers sees FSDP
    assert {k: os.environ.get(k) for k in sharding.FSDP_LOAD_ENV} == outside and not is_fsdp_enabled()
    assert load({"distributed": "ddp"}) == (outside, False)
    off = tmp_path / "accelerate_fsdp.yaml"
    off.write_text(
        yaml.safe_dump({"distributed_type": "FSDP", "fsdp_config": {"fsdp_cpu_ram_efficient_loading": False}})
    )
    assert load({"distributed_config": str(off)}) == (outside, False)

    def failing(name, **kwargs):
        assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
        raise OSError("no such model")

    cfg = load_config(data={"model": {"name": "org/model"}, "data": {"dataset_name": "org/data"},
                            "hardware": {"distributed": "fsdp"}})  # fmt: skip
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", failing)
    with pytest.raises(WronAIError):
        loading.load_base_model(cfg.model, cfg.quantization, cfg.hardware, _plan(cfg))
    assert {k: os.environ.get(k) for k in sharding.FSDP_LOAD_ENV} == outside  # restored on the error too


# --- a paged optimizer under FSDP is refused ----------------------------------------------------------------


@pytest.mark.parametrize("optim", ["paged_adamw_8bit", "paged_adamw_32bit"])
def test_paged_optimizer_with_fsdp_is_refused_in_one_line(optim, tmp_path):
    def cfg(optim, **hardware):
        return load_config(data={"model": {"name": "org/m"}, "data": {"dataset_name": "org/d"},
                                 "training": {"optim": optim}, "hardware": hardware})  # fmt: skip

    (problem,) = sharding.preflight_problems(cfg(optim, distributed="fsdp"), "cuda")
    assert problem.startswith(f"training.optim={optim} does not work with hardware.distributed=fsdp")
    assert (
        problem.endswith("set training.optim: adamw_torch (FSDP shards its states)") and "\n" not in problem
    )
    assert sharding.preflight_problems(cfg("adamw_torch", distributed="fsdp"), "cuda") == []
    assert sharding.preflight_problems(cfg(optim, distributed="ddp"), "cuda") == []
    accelerate_fsdp = tmp_path / "fsdp.yaml"
    accelerate_fsdp.write_text("distributed_type: FSDP\n")
    (problem,) = sharding.preflight_problems(cfg(optim, distributed_config=str(accelerate_fsdp)), "cuda")
    assert problem.startswith(f"training.optim={optim}")


# --- wronai train --nproc: each problem printed once --------------------------------------------------------


def test_train_nproc_prints_each_problem_once(tmp_path, tiny_model_dir, alpaca_file, capsys, monkeypatch):
    _one_process(monkeypatch)
    raw = make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "out", hardware={"distributed": "fsdp"})
    raw["training"]["optim"] = "paged_adamw_8bit"
    path = tmp_path / "fsdp.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    assert main(["train", str(path), "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("hardware.distributed=fsdp needs CUDA GPUs") == 1, err
    assert err.count("training.optim=paged_adamw_8bit does not work with hardware.distributed=fsdp") == 1, err
    assert "2 problem(s)" in err and "Traceback" not in err


def test_a_model_beyond_max_memory_names_the_settings(fake_cuda, monkeypatch):
    """accelerate's refusal to dispatch 4-bit layers to the CPU is about memory, not a broken model dir."""
    _one_process(monkeypatch)
    cfg = load_config(data={"model": {"name": "org/model"}, "data": {"dataset_name": "org/data"},
                            "hardware": {"max_memory": "1GiB"}})  # fmt: skip

    def from_pretrained(name, **kwargs):
        raise ValueError(
            "Some modules are dispatched on the CPU or the disk. Make sure you have enough GPU RAM"
        )

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(WronAIError, match=r"within hardware.max_memory .* raise hardware.max_memory"):
        loading.load_base_model(cfg.model, cfg.quantization, cfg.hardware, _plan(cfg))


def test_fsdp_in_one_process_is_refused_with_the_fix(tmp_path, tiny_model_dir, alpaca_file):
    from wronai.errors import ConfigError
    from wronai.recipe import run

    raw = make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "out", hardware={"distributed": "fsdp"})
    with pytest.raises(ConfigError, match=r"hardware.distributed: fsdp shards .* --nproc"):
        run(load_config(data=raw))
