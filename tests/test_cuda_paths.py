"""The CUDA side of the pipeline, built on a CPU-only machine: torch is told it sees two GPUs.

Nothing runs on the fake GPUs: the tests build what WronAI hands to the stock libraries — the real
``TrainingArguments`` (with accelerate's state behind it), ``BitsAndBytesConfig``, accelerate's FSDP plugin,
the keyword arguments of ``AutoModelForCausalLM.from_pretrained`` — and check them.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

# imported before any test patches torch.cuda: their import-time checks must see the real (CPU-only) torch
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from transformers import TrainingArguments
from transformers.training_args import ParallelMode

from conftest import REPO
from wronai.config import load_config
from wronai.hardware import plan_device
from wronai.training import training_arguments_kwargs

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
