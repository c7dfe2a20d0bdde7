#!/usr/bin/env python3
"""The CPU matrix, measured: {native bf16 or not} × {mixed precision fp32 or bf16} × {4-bit, 8-bit, 16-bit}.

    python benchmarks/cpu_matrix.py [--out /tmp/wronai-matrix]

For each combination (native bf16 forced either way in the plan, as tests/test_hardware_matrix.py does; bf16
is emulated, slowly but correctly, where it is not native) it builds the bundled-data tiny Llama (hidden 128,
352-wide MLP, 4 layers) through WronAI's builders, with fused LoRA layers and with PEFT's modules, and
prints what the plan says and what ran: mixed precision, 4-bit compute dtype, fused layers and fused calls
in one forward/backward, the residual stream's dtype, and the largest relative difference of the loss and
of any LoRA gradient between the two (the tolerance the tests allow: 1e-4 in fp32, 2e-2 under bf16). Last
column: the largest change of any LoRA gradient after one eval-mode forward with bitsandbytes' packed CPU
path armed (must be 0). Also prints what /proc/cpuinfo, torch and bitsandbytes say of this CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[1]


def build_model(out: Path) -> Path:
    from wronai.config.sections.model import TinyModelSpec
    from wronai.model.tiny import build_tiny_model

    if not (out / "config.json").exists():
        spec = TinyModelSpec(tokenizer_data=[str(REPO / "data/sample_pl/corpus.txt")], vocab_size=600)
        build_tiny_model(spec, out)
    return out


def one(model_dir: Path, native: bool, precision: str, quant: str) -> dict:
    import bitsandbytes as bnb

    from wronai.config import load_config
    from wronai.kernels import fused_lora
    from wronai.model import loading
    from wronai.model.lora import apply_lora
    from wronai.model.tokenizer import load_tokenizer
    from wronai.runtime import hardware

    quantization = {"4bit": {"load_in_4bit": True}, "8bit": {"load_in_4bit": False, "load_in_8bit": True},
                    "16bit": {"load_in_4bit": False}}[quant]  # fmt: skip
    cfg = load_config(
        data={
            "model": {"name": str(model_dir)},
            "data": {"dataset_name": str(REPO / "data/sample_pl/instructions.jsonl")},
            "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
            "quantization": quantization,
            "training": {"bf16": precision == "bf16"},
            "hardware": {"device": "cpu"},
        }
    )
    with mock.patch.object(hardware, "cpu_supports_bf16", lambda: native):
        plan = hardware.plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
    tok, _ = load_tokenizer(cfg.model, cfg.polish)
    batch = tok(["Warszawa jest stolicą Polski.", "Kraków leży nad Wisłą, a Gdańsk nad morzem."],
                return_tensors="pt", padding=True)  # fmt: skip
    autocast = (
        torch.autocast("cpu", dtype=plan.autocast_dtype) if plan.autocast_dtype else contextlib.nullcontext()
    )

    def run(fused: bool, eval_first: bool = False):
        torch.manual_seed(0)
        with mock.patch.object(bnb.nn.modules, "has_avx512bf16", lambda: True):  # packed path armed
            base = loading.load_base_model(cfg.model, cfg.quantization, cfg.hardware, plan)
        model = apply_lora(
            base, cfg.lora, [], gradient_checkpointing=0, keep_embeddings=plan.keep_embeddings,
            dequantize_chunk_bytes=plan.dequantize_chunk_bytes, fused_lora=fused, autocast=plan.autocast_dtype,
        )  # fmt: skip
        generator = torch.Generator().manual_seed(1)  # lora_B as after some training (PEFT starts it at 0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        if eval_first:
            model.eval()
            with torch.no_grad(), autocast:
                model(**batch)
        model.train()
        seen: list = []
        hook = (
            model.get_base_model()
            .model.layers[0]
            .register_forward_pre_hook(
                lambda m, args, kw: seen.append((args or (kw["hidden_states"],))[0].dtype), with_kwargs=True
            )
        )
        with autocast:
            loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        hook.remove()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
        fused_layers = sum(isinstance(m, tuple(fused_lora.SWAPS.values())) for m in model.modules())
        return float(loss), grads, fused_layers, fused_lora.fused_call_count(model), seen[0]

    loss, grads, layers, calls, residual = run(True)
    ref_loss, ref_grads, *_ = run(False)
    _, eval_grads, *_ = run(True, eval_first=True)

    def worst(a: dict, b: dict) -> float:
        return max(float((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-12)) for n in b)

    return {
        "native bf16": "yes" if native else "no", "asked": precision, "quant": quant,
        "precision": plan.precision, "compute": str(plan.compute_dtype).removeprefix("torch."),
        "quantized": plan.quantization, "fused": f"{layers}/{calls}",
        "residual": str(residual).removeprefix("torch."),
        "loss diff": f"{abs(loss - ref_loss) / abs(ref_loss):.1e}", "grad diff": f"{worst(grads, ref_grads):.1e}",
        "after eval": f"{worst(eval_grads, grads):.0e}",
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/wronai-matrix"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from wronai.runtime.hardware import cpu_capability

    print(cpu_capability().describe())
    model_dir = build_model(args.out / "model")
    rows = [
        one(model_dir, n, p, q)
        for n in (True, False)
        for p in ("fp32", "bf16")
        for q in ("4bit", "8bit", "16bit")
    ]
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in keys}
    print(" | ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print(" | ".join(r[k].ljust(widths[k]) for k in keys))


if __name__ == "__main__":
    main()
