"""Peak RSS on CPU: QLoRA (4-bit NF4 + double quant) vs bf16 LoRA, and the largest model that trains in RAM.

    python benchmarks/memory_qlora.py                          # TinyLlama-1.1B shape: qlora vs bf16-lora, seq 32
    python benchmarks/memory_qlora.py --shape qwen2.5-0.5b --variant qlora --variant qlora-bf16 --variant bf16-lora
    python benchmarks/memory_qlora.py --variant qlora --malloc-mmap-threshold 131072   # glibc without heap retention
    python benchmarks/memory_qlora.py --shape mistral-7b --variant qlora --seq 64   # 7B check: ~10 min, 14 GB disk
    python benchmarks/memory_qlora.py --predict 24 --seq 256   # largest public shape that fits 24 GiB (no training)

The shape (``--shape``, see benchmarks/random_checkpoint.py: the ``config.json`` fields of a public model,
e.g. ``tinyllama-1.1b`` = TinyLlama-1.1B, ``qwen2.5-0.5b`` = Qwen2.5-0.5B without its q/k/v biases,
``mistral-7b`` = Mistral-7B-v0.1) is written once, random init, as bf16 safetensors to a temp dir. Each
variant then runs in a fresh subprocess: load through WronAI's builders (``loading.load_base_model`` +
``apply_lora``), LoRA r=16 on all linear layers, gradient checkpointing on, AdamW, batch 1, two optimizer
steps on ``--seq`` random tokens. Memory is read from /proc/self/status: RSS after load, the peak (VmHWM)
while loading, and the peak while training (the counter is reset after loading; nothing is trimmed, as in a
real run), plus the peak of the anonymous part of RSS (RssAnon, sampled every 5 ms; it leaves out the
file-backed pages of the mmapped checkpoint). "peak RSS" is the whole process, Python and libraries included; "model" subtracts the RSS the
process had after importing the libraries, before loading.

Variants:
  qlora       load_in_4bit, nf4, double quant, compute float32 (what WronAI's device plan picks on a CPU
              without native bf16); embeddings and head kept bf16 (quantization.keep_embeddings_dtype)
  qlora-fp32-embeddings  the same with PEFT's float32 copies of the embeddings and head (keep_embeddings_dtype: false)
  qlora-bf16  the same with compute bfloat16 (forced; emulated and slow on CPUs without AVX512-BF16/AMX)
  bf16-lora   bf16 weights, no quantization (forced: the device plan would fall back to fp32 on such a CPU)
  fp32-lora   fp32 weights, no quantization

bf16 matmuls are emulated on AVX2-only CPUs (~10x slower than fp32 here): keep --seq short for bf16 variants;
the peak is dominated by the weights anyway. ``--predict`` uses ``wronai.runtime.memory.estimate(device="cpu")``,
whose CPU terms are calibrated by benchmarks/plan_accuracy.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from random_checkpoint import SHAPES, llama_config, write_random_checkpoint

VARIANTS = ("qlora", "qlora-fp32-embeddings", "qlora-bf16", "bf16-lora", "fp32-lora")
OPTIMIZERS = ("adamw", "adamw8bit")
PREDICT_SHAPES = (
    "tinyllama-1.1b",
    "llama3.2-3b",
    "mistral-7b",
    "llama2-13b",
    "qwen2.5-14b",
    "mistral-small-24b",
    "llama1-33b",
    "qwen2.5-32b",
    "llama2-70b",
)
MIB, GIB = 2**20, 2**30
PROCESS_BASELINE = 413 * MIB  # RSS of this script's children after importing torch/transformers/peft/bnb


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


class _AnonSampler:
    """Largest anonymous RSS (RssAnon: heap and tensors, not the file-backed pages of the mmapped checkpoint)
    seen per phase, sampled every few ms by a thread; the kernel keeps no peak for it."""

    def __init__(self) -> None:
        self.phase, self.peaks, self._stop = "idle", {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            value, phase = _status("RssAnon"), self.phase
            self.peaks[phase] = max(value, self.peaks.get(phase, 0))
            self._stop.wait(0.005)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS


def _warm_up() -> None:
    """Import and touch everything a training run loads anyway, so the baseline holds the libraries' code."""
    import bitsandbytes as bnb
    import peft  # noqa: F401
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401

    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict(torch.nn.Linear(64, 64, bias=False).state_dict())
    layer = layer.to("cpu")
    x = torch.randn(4, 64, requires_grad=True)
    (layer(x).sum() + torch.nn.Linear(64, 64)(x).sum()).backward()


def run_variant(
    variant: str, checkpoint: str, seq: int, threads: int, optim: str = "adamw", freed_memory: str = "auto",
    chunk_mib: int = 2, fused_lora: str = "auto",
) -> dict:  # fmt: skip
    import torch

    from wronai.config.sections.model import LoraSection, ModelConfig, QuantizationSection
    from wronai.config.sections.run import HardwareSection
    from wronai.config.sections.training import TrainingSection
    from wronai.model import loading
    from wronai.model.lora import apply_lora
    from wronai.runtime import heap
    from wronai.runtime.hardware import plan_device

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    quantized = variant.startswith("qlora")
    model_cfg = ModelConfig(
        name=checkpoint, torch_dtype={"bf16-lora": "bfloat16", "fp32-lora": "float32"}.get(variant, "auto")
    )
    qcfg = QuantizationSection(load_in_4bit=quantized, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype="bfloat16" if variant == "qlora-bf16" else "float32",
                               keep_embeddings_dtype=variant != "qlora-fp32-embeddings",
                               dequantize_chunk_mib=chunk_mib)  # fmt: skip
    hardware = HardwareSection(device="cpu", fused_lora=fused_lora)
    plan = plan_device(hardware, TrainingSection(gradient_checkpointing=True), qcfg, model_cfg)
    if variant == "bf16-lora":
        plan = dataclasses.replace(plan, model_dtype=torch.bfloat16)
    elif variant == "qlora-bf16":
        plan = dataclasses.replace(plan, compute_dtype=torch.bfloat16)
    _warm_up()
    gc.collect()
    _reset_peak()
    baseline, baseline_anon = _status("VmRSS"), _status("RssAnon")
    sampler = _AnonSampler()
    sampler.phase = "load"
    start = time.perf_counter()
    model = loading.load_base_model(model_cfg, qcfg, hardware, plan)
    model = apply_lora(
        model,
        LoraSection(r=16, lora_alpha=32, lora_dropout=0.0),
        [],
        gradient_checkpointing=True,
        keep_embeddings=plan.keep_embeddings,
        dequantize_chunk_bytes=plan.dequantize_chunk_bytes,
        fused_lora=plan.fused_lora,
    )
    load_s = time.perf_counter() - start
    # hardware.return_freed_memory (auto: on for CPU runs of >= 0.5B parameters), as `wronai train` sets it
    settings = contextlib.ExitStack()  # the child process ends after this run: the settings stay for it
    released = settings.enter_context(
        heap.memory_settings(
            HardwareSection(device="cpu", return_freed_memory=freed_memory),
            "cpu",
            model.get_nb_trainable_parameters()[1],
            model,
        )
    )
    after_load, load_peak = _status("VmRSS"), _status("VmHWM")
    _reset_peak()
    sampler.phase = "train"
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    if optim == "adamw8bit":  # what training.optim: paged_adamw_8bit becomes on a CPU (adamw_8bit)
        import bitsandbytes as bnb

        opt: torch.optim.Optimizer = bnb.optim.AdamW8bit(trained, lr=1e-4)
    else:
        opt = torch.optim.AdamW(trained, lr=1e-4)
    ids = torch.randint(0, model.get_input_embeddings().weight.shape[0], (1, seq))
    step_s, losses = [], []
    for _ in range(2):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        del loss
        step_s.append(time.perf_counter() - t)
    train_peak = _status("VmHWM")
    anon = sampler.stop()
    weights = {str(p.dtype) for p in model.parameters() if not p.requires_grad}
    return {"variant": variant, "seq": seq, "baseline": baseline, "after_load": after_load, "load_peak": load_peak,
            "train_peak": train_peak, "peak": max(load_peak, train_peak), "load_s": load_s, "step_s": step_s,
            "baseline_anon": baseline_anon, "load_anon_peak": anon.get("load", 0), "train_anon_peak": anon.get("train", 0),
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
            "losses": losses, "frozen_dtypes": sorted(weights), "model_dtype": str(plan.model_dtype),
            "compute_dtype": str(plan.compute_dtype), "threads": threads, "optim": optim,
            "return_freed_memory": released, "dequantize_chunk_mib": chunk_mib, "fused_lora": plan.fused_lora}  # fmt: skip


def _shape(name: str):
    from wronai.runtime.memory import ModelShape

    return ModelShape.from_config(llama_config(**SHAPES[name]).to_dict())


def _cpu_settings(seq: int):
    from wronai.runtime.memory import Settings

    return Settings(quantization="4bit", double_quant=True, weight_bytes=4, compute_bytes=4, lora_r=16,
                    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                    lora_dropout=False, batch=1, seq=seq, accumulation=1, gradient_checkpointing=True,
                    strategy="none", nproc=1, embedding_bytes=2)  # fmt: skip


def predict(ram_gib: float, seq: int) -> None:
    """Largest shape that fits: planning.estimate(device="cpu") plus the Python process itself."""
    from wronai.runtime.memory import estimate

    sys.stdout.write(f"QLoRA (nf4 + double quant, fp32 compute), LoRA r=16 all-linear, GC on, batch 1 x seq {seq}; "
                     f"CPU estimate + {PROCESS_BASELINE / MIB:.0f} MiB Python process; RAM {ram_gib:g} GiB\n")  # fmt: skip
    sys.stdout.write(f"{'shape':<18}{'params':>9}{'weights GiB':>13}{'peak GiB':>10}  verdict\n")
    for name in PREDICT_SHAPES:
        est = estimate(_shape(name), _cpu_settings(seq), device="cpu")
        total = est.total + PROCESS_BASELINE
        verdict = "fits" if total <= ram_gib * GIB else "does NOT fit"
        sys.stdout.write(f"{name:<18}{est.total_params / 1e9:>8.2f}B{est.parts['base weights'] / GIB:>13.2f}"
                         f"{total / GIB:>10.2f}  {verdict}\n")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=list(SHAPES), default="tinyllama-1.1b")
    parser.add_argument("--variant", choices=VARIANTS, action="append", help="default: qlora and bf16-lora")
    parser.add_argument("--seq", type=int, default=32, help="tokens per step (batch 1); default 32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--return-freed-memory", choices=("auto", "on", "off"), default="auto",
                        help="hardware.return_freed_memory for every variant (auto: on from 0.5B parameters)")  # fmt: skip
    parser.add_argument("--optim", choices=OPTIMIZERS, default="adamw",
                        help="optimizer of every variant: torch AdamW, or bitsandbytes' 8-bit AdamW (runs on CPU)")  # fmt: skip
    parser.add_argument("--malloc-mmap-threshold", type=int, metavar="BYTES",
                        help="run the children with MALLOC_MMAP_THRESHOLD_=BYTES (glibc: a fixed threshold stops the heap "
                        "from keeping freed activation buffers; 131072 = glibc's initial value)")  # fmt: skip
    parser.add_argument("--dequantize-chunk-mib", type=int, default=2, metavar="MIB",
                        help="quantization.dequantize_chunk_mib of the 4-bit variants (0 = whole weights, as bitsandbytes)")  # fmt: skip
    parser.add_argument("--fused-lora", choices=("auto", "on", "off"), default="auto",
                        help="hardware.fused_lora of every variant (auto: on, as on every CPU run)")  # fmt: skip
    parser.add_argument(
        "--checkpoint", type=Path, help="reuse (or create) the bf16 checkpoint here instead of a temp dir"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument(
        "--predict", type=float, metavar="GIB", help="only print the largest-model prediction for this RAM"
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.predict:
        predict(args.predict, args.seq)
        return 0
    if args.child:
        result = run_variant(
            args.child[0], args.child[1], args.seq, args.threads, args.optim, args.return_freed_memory,
            args.dequantize_chunk_mib, args.fused_lora,
        )  # fmt: skip
        sys.stdout.write(json.dumps(result) + "\n")
        return 0
    variants = args.variant or ["qlora", "bf16-lora"]
    with tempfile.TemporaryDirectory(prefix="wronai-memory-") as tmp:
        checkpoint = args.checkpoint or Path(tmp) / args.shape
        if not (checkpoint / "model.safetensors.index.json").is_file():
            t = time.perf_counter()
            write_random_checkpoint(llama_config(**SHAPES[args.shape]), checkpoint)
            sys.stdout.write(
                f"wrote random bf16 {args.shape} checkpoint to {checkpoint} in {time.perf_counter() - t:.0f} s\n"
            )
        results = []
        for variant in variants:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                variant,
                str(checkpoint),
                "--seq",
                str(args.seq),
                "--threads",
                str(args.threads),
                "--optim",
                args.optim,
                "--return-freed-memory",
                args.return_freed_memory,
                "--dequantize-chunk-mib",
                str(args.dequantize_chunk_mib),
                "--fused-lora",
                args.fused_lora,
            ]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            if args.malloc_mmap_threshold:
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                sys.stderr.write(out.stderr[-3000:])
                return 1
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = results[-1]
            sys.stdout.write(f"  {variant}: load {r['load_s']:.0f} s, steps {', '.join(f'{s:.1f}' for s in r['step_s'])} s, "
                             f"losses {', '.join(f'{x:.3f}' for x in r['losses'])}, frozen weights {r['frozen_dtypes']}\n")  # fmt: skip
            sys.stdout.flush()
    _table(args.shape, args.seq, results)
    if args.json:
        args.json.write_text(
            json.dumps({"shape": args.shape, "results": results}, indent=1), encoding="utf-8"
        )
    return 0


def _table(shape: str, seq: int, results: list[dict]) -> None:
    params = _shape(shape).total_params
    ref = next((r for r in results if r["variant"] == "bf16-lora"), None)
    sys.stdout.write(f"\n{shape} ({params / 1e9:.2f}B params), batch 1 x seq {seq}, LoRA r=16 all-linear, GC on, "
                     f"2 {results[0].get('optim', 'adamw')} steps; MiB; model = minus the {results[0]['baseline'] / MIB:.0f} MiB process baseline\n")  # fmt: skip
    head = ["variant", "RSS after load", "load peak", "train peak", "peak RSS", "anon peak load / train", "model peak",
            "peak / bf16", "model / bf16"]  # fmt: skip
    sys.stdout.write("| " + " | ".join(head) + " |\n|---|" + "---:|" * (len(head) - 1) + "\n")
    for r in results:
        cells = [r["variant"], *(f"{r[k] / MIB:.0f}" for k in ("after_load", "load_peak", "train_peak", "peak")),
                 f"{r['load_anon_peak'] / MIB:.0f} / {r['train_anon_peak'] / MIB:.0f}",
                 f"{(r['peak'] - r['baseline']) / MIB:.0f}"]  # fmt: skip
        if ref is not None:
            cells += [
                f"{r['peak'] / ref['peak']:.0%}",
                f"{(r['peak'] - r['baseline']) / (ref['peak'] - ref['baseline']):.0%}",
            ]
        else:
            cells += ["-", "-"]
        sys.stdout.write("| " + " | ".join(cells) + " |\n")


if __name__ == "__main__":
    sys.exit(main())
