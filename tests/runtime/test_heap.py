"""CPU memory hygiene: freed loading buffers go back to the OS; hardware.return_freed_memory keeps them going back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wronai.config.sections.run import HardwareSection
from wronai.model.kbit import enable_gradient_checkpointing
from wronai.runtime import heap

# glibc keeps freed buffers in its heap once a larger freed buffer has raised its dynamic mmap threshold.
# Run in a fresh interpreter: the heap of the test process is in no known state.
FRAGMENT = """
import torch
from wronai.runtime import heap
from wronai.config.sections.run import HardwareSection
{setup}
big = torch.ones(16 * 2**20 // 4); del big            # raises glibc's dynamic mmap threshold to 16 MiB
keep = [torch.ones(8 * 2**20 // 4) for _ in range(30)]  # 240 MiB of 8 MiB buffers
pin = torch.ones(2**20 // 4)                            # allocated last: holds the heap top
before = heap.resident_bytes(); del keep
dropped = before - heap.resident_bytes()
print(dropped / 2**20, heap.release_free_memory() / 2**20)
"""
ON = 'import contextlib; SETTINGS = contextlib.ExitStack(); assert SETTINGS.enter_context(heap.memory_settings(HardwareSection(return_freed_memory="on"), "cpu", 1))'
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc heap behaviour")


def run_fragment(setup: str) -> tuple[float, float]:
    code = FRAGMENT.format(setup=setup)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    dropped_on_free, trimmed = (float(x) for x in out.split())
    return dropped_on_free, trimmed


@linux_only
def test_release_free_memory_returns_what_the_heap_kept():
    dropped_on_free, trimmed = run_fragment("")
    assert dropped_on_free < 60  # glibc kept the freed 8 MiB buffers ...
    assert trimmed > 180  # ... and malloc_trim handed them back


@linux_only
def test_return_freed_memory_gives_buffers_back_as_they_are_freed():
    dropped_on_free, trimmed = run_fragment(ON)
    assert dropped_on_free > 180  # above the fixed 4 MiB threshold: unmapped at once
    assert trimmed < 60


@pytest.mark.parametrize(
    ("mode", "device", "parameters", "expected"),
    [
        ("auto", "cpu", 1_100_000_000, "return"),
        ("auto", "cpu", 17_000_000, "keep"),  # small models: page faults cost more than the memory saved
        ("on", "cpu", 17_000_000, "return"),
        ("off", "cpu", 7_000_000_000, "keep"),
        ("auto", "cuda", 7_000_000_000, None),  # GPU memory is not the C heap
        ("on", "mps", 7_000_000_000, None),
        ("off", "cuda", 17_000_000, None),
    ],
)
def test_return_freed_memory_decision(mode, device, parameters, expected):
    resolved = heap.freed_memory_policy(HardwareSection(return_freed_memory=mode), device, parameters)
    assert resolved == expected


@pytest.mark.parametrize(
    ("mode", "device", "parameters", "expected"),
    [
        ("auto", "cpu", 1_100_000_000, "auto -> on (a model of 1.1B parameters, at least the 0.5B from which auto returns it) — buffers of 4 MiB"),
        ("auto", "cpu", 17_000_000, "auto -> off (a model of 17M parameters, under the 0.5B from which auto returns it) — freed buffers are kept"),
        ("on", "cpu", 17_000_000, "on (set in the config) — buffers of 4 MiB"),
        ("off", "cpu", 7_000_000_000, "off (set in the config) — freed buffers are kept"),
        ("auto", "cuda", 7_000_000_000, None),
    ],
)  # fmt: skip
def test_return_freed_memory_note_says_what_and_why(mode, device, parameters, expected):
    note = heap.freed_memory_note(HardwareSection(return_freed_memory=mode), device, parameters)
    if expected is None:
        assert note is None
    else:
        assert note is not None and note.startswith("hardware.return_freed_memory: " + expected)


# a training step's activations: 96 MiB in buffers of 1-6 MiB, all freed when the step ends
STEPS_FRAGMENT = """
import resource, torch
from wronai.runtime import heap
from wronai.config.sections.run import HardwareSection
{setup}
def step():
    acts = [torch.ones((1 + i % 6) * 2**18) for i in range(28)]
    return len(acts)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""
KEEP = 'import contextlib; SETTINGS = contextlib.ExitStack(); assert not SETTINGS.enter_context(heap.memory_settings(HardwareSection(return_freed_memory="off"), "cpu", 10**10))'


@linux_only
@pytest.mark.parametrize(("setup", "kept"), [("", False), (KEEP, True)])
def test_return_freed_memory_off_keeps_a_steps_buffers_for_the_next(setup, kept):
    """glibc's default trims the heap top when a step's buffers are freed, so every step faults them in
    again; with return_freed_memory off the next step reuses them.

    How much of the step glibc trims depends on where the interpreter's own small allocations land above
    the buffers (they pin the heap top) and differs between processes: over 100 fresh interpreters the
    default re-faulted 34%, 64%, 71% or 83% of the step's pages (four modes, none lower), the setting
    1.4-3.8%."""
    code = STEPS_FRAGMENT.format(setup=setup)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    pages = 96 * 2**20 / heap._PAGE
    faults = float(out.split()[-1])
    assert (faults < 0.1 * pages) is kept, faults
    assert (faults > 0.25 * pages) is not kept, faults


# buffers below the fixed 4 MiB threshold stay in the heap once freed, with the threshold on too
SMALL_FRAGMENT = """
import torch
from wronai.runtime import heap
from wronai.config.sections.run import HardwareSection
import contextlib
SETTINGS = contextlib.ExitStack()  # open for the rest of this process
assert SETTINGS.enter_context(heap.memory_settings(HardwareSection(return_freed_memory="on"), "cpu", 1))
keep = [torch.ones(2**20 // 4) for _ in range(200)]     # 200 MiB of 1 MiB buffers: heap, not mmap
pin = torch.ones(2**20 // 4)                            # holds the heap top
trimmer = heap.HeapTrimmer(growth={growth})
trimmer.floor = heap.resident_bytes() - 2**30 if {growth} == 0 else trimmer.floor
del keep
before = heap.resident_bytes(); trimmer()
print((before - heap.resident_bytes()) / 2**20, trimmer.trims)
"""


@linux_only
@pytest.mark.parametrize(("growth", "trimmed"), [(0, True), (2**40, False)])
def test_heap_trimmer_hands_back_freed_small_buffers_once_rss_grew(growth, trimmed):
    code = SMALL_FRAGMENT.format(growth=growth)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    dropped, trims = out.split()
    assert (float(dropped) > 150) is trimmed
    assert int(trims) == int(trimmed)


def tiny_llama(layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch_config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)  # fmt: skip
    return LlamaForCausalLM(torch_config)


def test_decoder_layers_are_found_under_a_peft_wrapper():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(3), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    layers = heap.decoder_layers(model)
    assert [type(layer).__name__ for layer in layers] == ["LlamaDecoderLayer"] * 3


@linux_only
@pytest.mark.parametrize("checkpointing", [False, True])
def test_heap_is_trimmed_between_layers_forward_and_backward(checkpointing):

    model = tiny_llama(3)
    if checkpointing:  # the hooks wrap the checkpointed call: the recomputation inside does not add trims
        enable_gradient_checkpointing(model)
    model.train()
    trimmer = heap.install_heap_trimming(model, growth=0)
    assert trimmer is not None
    trimmer.floor = -(2**40)  # every call counts as grown
    ids = torch.randint(0, 64, (2, 8))
    loss = model(input_ids=ids, labels=ids).loss
    assert trimmer.trims == 3  # after each layer's forward
    loss.backward()
    assert trimmer.trims == 3 + 3  # and before each layer's backward


def test_return_freed_memory_off_keeps_memory_and_installs_no_hooks(monkeypatch):
    kept = []
    monkeypatch.setattr(
        heap, "keep_freed_memory", lambda: kept.append(True) or True
    )  # mallopt is per process
    model = tiny_llama(2)
    with heap.memory_settings(HardwareSection(return_freed_memory="off"), "cpu", 10**10, model) as returned:
        assert not returned
        assert all(not layer._forward_hooks for layer in heap.decoder_layers(model))
    assert kept == [True]
    with heap.memory_settings(HardwareSection(return_freed_memory="off"), "cuda", 10**10, model) as returned:
        assert not returned
    assert kept == [True]  # GPU runs leave the C heap alone


@linux_only
def test_return_freed_memory_on_trims_between_the_layers_of_the_model():
    code = (
        "from test_heap import tiny_llama\n"
        "from wronai.runtime import heap\nfrom wronai.config.sections.run import HardwareSection\n"
        "model = tiny_llama(2)\n"
        "import contextlib\nSETTINGS = contextlib.ExitStack()\n"
        "assert SETTINGS.enter_context(heap.memory_settings(HardwareSection(return_freed_memory='on'), 'cpu', 1, model))\n"
        "print(sum(bool(layer._forward_hooks) for layer in heap.decoder_layers(model)))\n"
    )
    here = str(Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=here)
    assert out.stdout.split()[-1] == "2"


@linux_only
def test_pipeline_trims_between_the_layers_of_the_model_it_loads(tiny_model_dir, alpaca_file, tmp_path):
    """`wronai train`'s model loading applies hardware.return_freed_memory to the prepared model."""
    import json

    from conftest import make_config_dict

    raw = make_config_dict(
        tiny_model_dir, alpaca_file, tmp_path / "out", hardware={"return_freed_memory": "on"}
    )
    config = tmp_path / "config.json"
    config.write_text(json.dumps(raw))
    code = (
        "import json, sys\nfrom wronai.runtime import heap\nfrom wronai.config import load_config\n"
        "from wronai.recipe import Pipeline\n"
        "pipeline = Pipeline(load_config(data=json.load(open(sys.argv[1]))))\nmodel = pipeline.load_model()\n"
        "print(sum(bool(layer._forward_hooks) for layer in heap.decoder_layers(model)))\n"
    )
    here = str(Path(__file__).parent)
    out = subprocess.run(
        [sys.executable, "-c", code, str(config)], capture_output=True, text=True, check=True, cwd=here
    )
    assert out.stdout.split()[-1] == "2"  # the tiny model's two decoder layers


def test_training_hands_the_kept_heap_back_when_it_ends(tiny_model_dir, alpaca_file, tmp_path, monkeypatch):
    """return_freed_memory: off keeps a step's buffers for the next one; once training ends they go back."""
    from conftest import make_config_dict
    from wronai import recipe
    from wronai.config import load_config

    kept, released = [], []
    monkeypatch.setattr(heap, "keep_freed_memory", lambda: kept.append(True) or True)
    monkeypatch.setattr(  # the steps done when the heap is handed back
        "wronai.train.loop.release_free_memory",
        lambda: released.append(trainer.trainer.state.global_step) or 0,
    )
    raw = make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "out", training={"max_steps": 1, "save_strategy": "no",
                           "eval_strategy": "no"}, hardware={"return_freed_memory": "off"})  # fmt: skip
    trainer = recipe.Pipeline(load_config(data=raw))
    trainer.load_dataset()
    trainer.train()
    assert kept == [True]
    assert released == [1]  # after the training loop's one step, not before it


def test_memory_settings_restore_glibcs_defaults_and_remove_the_hooks(monkeypatch):
    """Inside the block hardware.return_freed_memory's settings; after it (also after an error) glibc's
    default thresholds and no trimming hooks on the model."""
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(heap, "_mallopt", lambda parameter, value: calls.append((parameter, value)) or True)
    monkeypatch.setattr(heap.HeapTrimmer, "available", property(lambda self: True))
    model = tiny_llama(2)
    with heap.memory_settings(HardwareSection(return_freed_memory="on"), "cpu", 1, model) as returned:
        assert returned and calls == [(heap.M_MMAP_THRESHOLD, heap.MMAP_THRESHOLD)]
        assert all(layer._forward_hooks for layer in heap.decoder_layers(model))
    defaults = [
        (heap.M_MMAP_THRESHOLD, heap.GLIBC_MMAP_THRESHOLD),
        (heap.M_TRIM_THRESHOLD, heap.GLIBC_TRIM_THRESHOLD),
    ]
    assert calls[1:] == defaults and heap.GLIBC_MMAP_THRESHOLD == heap.GLIBC_TRIM_THRESHOLD == 128 * 1024
    assert all(not layer._forward_hooks for layer in heap.decoder_layers(model))

    calls.clear()
    with (
        pytest.raises(RuntimeError),
        heap.memory_settings(HardwareSection(return_freed_memory="off"), "cpu", 10**10),
    ):
        assert calls == [
            (heap.M_MMAP_THRESHOLD, heap.KEEP_MMAP_THRESHOLD),
            (heap.M_TRIM_THRESHOLD, heap.KEEP_TRIM_THRESHOLD),
        ]
        raise RuntimeError("a failed step")
    assert calls[2:] == defaults

    calls.clear()
    with heap.memory_settings(HardwareSection(return_freed_memory="on"), "cuda", 10**10, model) as returned:
        assert not returned
    assert calls == []  # GPU runs leave the C heap alone, in the block and after it


# kept in the block: freed 8 MiB buffers stay in the heap (RSS does not drop); after it glibc's default
# 128 KiB mmap threshold holds again and a freed 8 MiB buffer goes back to the OS at once. Each measure runs
# in a fresh process: buffers freed inside the block stay in glibc's bins and would serve later requests
# from the heap, whatever the threshold.
RESTORE_FRAGMENT = """
import sys, torch
from wronai.runtime import heap
from wronai.config.sections.run import HardwareSection
def dropped_on_free():
    keep = [torch.ones(8 * 2**20 // 4) for _ in range(30)]  # 240 MiB of 8 MiB buffers
    pin = torch.ones(2**20 // 4)                            # allocated last: holds the heap top
    before = heap.resident_bytes(); del keep
    return (before - heap.resident_bytes()) / 2**20
with heap.memory_settings(HardwareSection(return_freed_memory="off"), "cpu", 10**10):
    if sys.argv[1] == "inside":
        print(dropped_on_free())
if sys.argv[1] == "after":
    print(dropped_on_free())
"""


@linux_only
def test_memory_settings_end_with_the_block():
    def measure(when: str) -> float:
        run = subprocess.run(
            [sys.executable, "-c", RESTORE_FRAGMENT, when], capture_output=True, text=True, check=True
        )
        return float(run.stdout.split()[-1])

    inside, after = measure("inside"), measure("after")
    assert inside < 40 and after > 200, (inside, after)
