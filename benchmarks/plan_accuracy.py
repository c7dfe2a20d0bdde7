"""How close is `wronai plan` to reality? Peak RSS increase of real training steps on CPU vs the estimate.

    python benchmarks/plan_accuracy.py            # all cases (a few minutes on 2 cores)
    python benchmarks/plan_accuracy.py --case tiny-4bit

Each case runs in a fresh subprocess: build a random-init Llama (in-process, nothing downloaded), load it
through WronAI's own model builders (QLoRA 4-bit or 16/32-bit LoRA), record RSS, run two optimizer steps,
and compare ru_maxrss - RSS-before-load with planning.estimate(..., cuda_context=False).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = {  # name: (hidden, intermediate, layers, heads, kv_heads, vocab, quantization, batch, seq, gradient checkpointing)
    "tiny-4bit": (64, 128, 2, 4, 2, 500, "4bit", 4, 128, False),
    "llama-150m-4bit": (768, 2048, 12, 12, 4, 32000, "4bit", 2, 256, False),
    "llama-150m-4bit-gc": (768, 2048, 12, 12, 4, 32000, "4bit", 2, 256, True),
    "llama-150m-fp32": (768, 2048, 12, 12, 4, 32000, "none", 2, 256, False),
}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _trim_and_reset_peak() -> None:
    """Give freed heap back to the OS and reset the kernel's peak-RSS counter (VmHWM) to the current RSS."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def _peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def run_case(name: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from wronai import modeling
    from wronai.config.schema import (
        HardwareSection,
        LoraSection,
        ModelConfig,
        QuantizationSection,
        TrainingSection,
    )
    from wronai.hardware import plan_device
    from wronai.planning import ModelShape, Settings, estimate

    h, i, layers, heads, kv, vocab, quant, batch, seq, gc = CASES[name]
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=max(seq, 512), tie_word_embeddings=False)  # fmt: skip
    tmp = Path(tempfile.mkdtemp())
    LlamaForCausalLM(cfg).save_pretrained(tmp)
    import gc as pygc

    pygc.collect()
    model_cfg = ModelConfig(name=str(tmp), torch_dtype="float32")
    qcfg = QuantizationSection(load_in_4bit=quant == "4bit", bnb_4bit_compute_dtype="float32")
    lcfg = LoraSection(r=16, lora_alpha=32, lora_dropout=0.0)
    plan = plan_device(HardwareSection(device="cpu"), TrainingSection(), qcfg, model_cfg)
    warm = torch.nn.Linear(64, 64)  # load autograd/BLAS code pages before the baseline
    warm(torch.randn(4, 64)).sum().backward()
    _trim_and_reset_peak()
    before = _rss()
    model = modeling.apply_lora(modeling.load_base_model(model_cfg, qcfg, HardwareSection(device="cpu"), plan), lcfg, [], gc)
    _trim_and_reset_peak()  # the fp32 copy read before quantizing is a CPU-loading artefact, not training memory
    loaded = _rss() - before
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq))
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = _peak() - before
    settings = Settings(quantization=quant, double_quant=True, weight_bytes=4, compute_bytes=4, lora_r=16,
                        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                        lora_dropout=False, batch=batch, seq=seq, accumulation=1, gradient_checkpointing=gc, strategy="none", nproc=1)  # fmt: skip
    est = estimate(ModelShape.from_config(cfg.to_dict()), settings, cuda_context=False)
    return {"case": name, "measured_mib": peak / 2**20, "loaded_mib": loaded / 2**20, "estimated_mib": est.total / 2**20,
            "error_pct": 100 * (est.total - peak) / peak, "parts_mib": {k: round(v / 2**20, 1) for k, v in est.parts.items()}}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), action="append", help="run only these cases")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.stdout.write(json.dumps(run_case(args.child)) + "\n")
        return 0
    sys.stdout.write(f"{'case':<22}{'measured MiB':>14}{'estimated MiB':>15}{'error':>8}\n")
    for name in args.case or list(CASES):
        out = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True, check=True,
                             env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        r = json.loads(out.stdout.strip().splitlines()[-1])
        sys.stdout.write(f"{r['case']:<22}{r['measured_mib']:>14.0f}{r['estimated_mib']:>15.0f}{r['error_pct']:>7.0f}%  (model loaded: {r['loaded_mib']:.0f} MiB) {r['parts_mib']}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
