"""How close is `wronai plan` to reality? Peak RSS increase of real training steps on CPU vs the estimate.

    python benchmarks/plan_accuracy.py                      # quick cases: tiny + Llama-150M (~2 min, 2 cores)
    python benchmarks/plan_accuracy.py --case tinyllama-1.1b-4bit-gc --case qwen2.5-0.5b-4bit-gc
    python benchmarks/plan_accuracy.py --all                # + the 0.5B and 1.1B cases (~15 min)
    python benchmarks/plan_accuracy.py --list
    python benchmarks/plan_accuracy.py --malloc-mmap-threshold 131072   # glibc without heap retention

Each case writes a random-init bf16 checkpoint of a public model's shape (benchmarks/random_checkpoint.py,
nothing downloaded), then in a fresh subprocess loads it through WronAI's own builders (QLoRA 4-bit with
fp32 compute, or fp32 LoRA: this CPU has no native bf16), LoRA r=16 on all linear layers, trims the heap and
resets the kernel's peak counter (so the one-off loading transient is not counted), runs two AdamW steps
and compares VmHWM - RSS-before-load (the libraries are imported before that baseline) with
``planning.estimate(..., device="cpu")``. The GPU formula's number without the CUDA context ("live": the
tensors alive at the peak) is printed too: it is what a run with ``--malloc-mmap-threshold`` (a fixed glibc
mmap threshold, so freed buffers go back to the OS) should be compared with.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from random_checkpoint import SHAPES, llama_config, write_random_checkpoint

QUICK = ("tiny-4bit", "llama-150m-4bit", "llama-150m-4bit-gc", "llama-150m-fp32")
CASES = {  # name: (shape, quantization, batch, seq, gradient checkpointing)
    "tiny-4bit": ("tiny", "4bit", 4, 128, False),
    "llama-150m-4bit": ("llama-150m", "4bit", 2, 256, False),
    "llama-150m-4bit-gc": ("llama-150m", "4bit", 2, 256, True),
    "llama-150m-fp32": ("llama-150m", "none", 2, 256, False),
    "qwen2.5-0.5b-4bit-gc": ("qwen2.5-0.5b", "4bit", 1, 256, True),
    "tinyllama-1.1b-4bit-gc": ("tinyllama-1.1b", "4bit", 1, 256, True),
    "tinyllama-1.1b-fp32-gc": ("tinyllama-1.1b", "none", 1, 256, True),
}


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _trim_and_reset_peak() -> None:
    """Give freed heap back to the OS and reset the kernel's peak-RSS counter (VmHWM) to the current RSS."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def _warm_up() -> None:
    """Import and touch everything a training run loads anyway, so the baseline holds the libraries' code."""
    import bitsandbytes as bnb
    import peft  # noqa: F401
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401

    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict(torch.nn.Linear(64, 64, bias=False).state_dict())
    layer = layer.to("cpu")  # quantizes
    x = torch.randn(4, 64, requires_grad=True)
    (layer(x).sum() + torch.nn.Linear(64, 64)(x).sum()).backward()


def run_case(name: str, checkpoint: str) -> dict:
    import torch

    from wronai.config.sections.model import LoraSection, ModelConfig, QuantizationSection
    from wronai.config.sections.run import HardwareSection
    from wronai.config.sections.training import TrainingSection
    from wronai.model import loading
    from wronai.model.lora import apply_lora
    from wronai.runtime.hardware import plan_device
    from wronai.runtime.memory import ModelShape, Settings, estimate

    shape_name, quant, batch, seq, gc_on = CASES[name]
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model_cfg = ModelConfig(name=checkpoint, torch_dtype="float32")
    qcfg = QuantizationSection(load_in_4bit=quant == "4bit", bnb_4bit_compute_dtype="float32")
    lcfg = LoraSection(r=16, lora_alpha=32, lora_dropout=0.0)
    hardware = HardwareSection(device="cpu")
    plan = plan_device(hardware, TrainingSection(), qcfg, model_cfg)
    _warm_up()
    _trim_and_reset_peak()
    before = _status("VmRSS")
    model = apply_lora(loading.load_base_model(model_cfg, qcfg, hardware, plan), lcfg, [], gc_on)
    load_peak = _status("VmHWM") - before
    _trim_and_reset_peak()
    loaded = _status("VmRSS") - before
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch, seq))
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss
    peak = _status("VmHWM") - before
    settings = Settings(quantization=quant, double_quant=True, weight_bytes=4, compute_bytes=4, lora_r=16,
                        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                        lora_dropout=False, batch=batch, seq=seq, accumulation=1, gradient_checkpointing=gc_on,
                        strategy="none", nproc=1)  # fmt: skip
    shape = ModelShape.from_config(json.loads((Path(checkpoint) / "config.json").read_text()))
    gpu = estimate(shape, settings, cuda_context=False)
    cpu = estimate(shape, settings, device="cpu")
    mib = 2**20
    return {"case": name, "params": cpu.total_params, "baseline_mib": before / mib, "absolute_peak_mib": (peak + before) / mib,
            "measured_mib": peak / mib, "loaded_mib": loaded / mib,
            "load_peak_mib": load_peak / mib, "gpu_formula_mib": gpu.total / mib, "estimated_mib": cpu.total / mib,
            "error_pct": 100 * (cpu.total - peak) / peak, "gpu_formula_error_pct": 100 * (gpu.total - peak) / peak,
            "parts_mib": {k: round(v / mib, 1) for k, v in cpu.parts.items()}}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--case", choices=list(CASES), action="append", help="run only these cases (repeatable)"
    )
    parser.add_argument("--all", action="store_true", help="run every case, including the 0.5B and 1.1B ones")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument(
        "--malloc-mmap-threshold", type=int, metavar="BYTES", help="run with MALLOC_MMAP_THRESHOLD_=BYTES"
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.stdout.write(json.dumps(run_case(*args.child)) + "\n")
        return 0
    if args.list:
        for name, (shape, quant, batch, seq, gc_on) in CASES.items():
            sys.stdout.write(f"{name:<26} {shape} {quant} batch {batch} x seq {seq} gc={'on' if gc_on else 'off'}"
                             f"{'  (default)' if name in QUICK else ''}\n")  # fmt: skip
        return 0
    names = list(CASES) if args.all else args.case or list(QUICK)
    results = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    sys.stdout.write(f"{'case':<26}{'params':>8}{'measured MiB':>14}{'CPU estimate':>14}{'error':>8}"
                     f"{'live (GPU formula)':>20}{'error':>8}\n")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="wronai-plan-accuracy-") as tmp:
        checkpoints: dict[str, str] = {}
        for name in names:
            shape = CASES[name][0]
            if shape not in checkpoints:
                checkpoints[shape] = str(
                    write_random_checkpoint(llama_config(**SHAPES[shape]), Path(tmp) / shape)
                )
            cmd = [sys.executable, __file__, "--child", name, checkpoints[shape]]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                sys.stderr.write(out.stderr[-3000:])
                return 1
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(r)
            sys.stdout.write(f"{r['case']:<26}{r['params'] / 1e6:>7.0f}M{r['measured_mib']:>14.0f}{r['estimated_mib']:>14.0f}"
                             f"{r['error_pct']:>7.0f}%{r['gpu_formula_mib']:>20.0f}{r['gpu_formula_error_pct']:>7.0f}%"
                             f"   loaded {r['loaded_mib']:.0f} MiB, load peak {r['load_peak_mib']:.0f} MiB\n")  # fmt: skip
            sys.stdout.write(f"{'':<26}  estimate parts (MiB): {r['parts_mib']}\n")
            sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
