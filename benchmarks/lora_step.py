#!/usr/bin/env python3
"""Fused LoRA layers vs PEFT's modules: the same training steps, alternating, in one process.

    python benchmarks/lora_step.py [--rounds 8] [--batches 6] [--out /tmp/wronai-bench]

Builds (or reuses) the model and data of ``benchmarks/train_speed.py`` (hidden 384, 6 layers, 4-bit NF4
QLoRA r 16 on all linear layers, packed rows of 512 tokens), prepares them with ``wronai.recipe`` as
``wronai train`` does, takes the first ``--batches`` batches and times forward + backward over them with
``hardware.fused_lora`` on and off in turn, ``--rounds`` times. Alternating inside one process takes the
machine's drift (±15% over minutes here) out of the ratio. Prints every round, the median time per batch
of each mode, the median of the per-round ratios, and checks both modes give the same losses.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_speed  # noqa: E402  (the benchmark model and data)


def prepare(out: Path, rows: int, batch: int, checkpointing: bool):
    from wronai.config import load_config
    from wronai.recipe import Pipeline

    if not (out / "model" / "config.json").exists():
        train_speed.build_model(out / "model", 384, 6)
    if not (out / "train.jsonl").exists():
        train_speed.make_data(out / "train.jsonl", rows, seed=0)
    raw = {
        "model": {"name": str(out / "model")},
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "quantization": {"load_in_4bit": True},
        "training": {"output_dir": str(out / "lora_step"), "max_steps": 1, "per_device_train_batch_size": batch,
                     "gradient_checkpointing": checkpointing, "save_strategy": "no", "eval_strategy": "no"},
        "data": {"dataset_name": str(out / "train.jsonl"), "max_seq_length": 512, "packing": True,
                 "eval_fraction": 0.0, "cache_dir": str(out / "cache")},
        "logging": {"report_to": ["none"]},
        "hardware": {"fused_lora": "on"},
    }  # fmt: skip
    pipeline = Pipeline(load_config(data=raw))
    pipeline.load_dataset()
    trainer = pipeline.build_trainer()
    return trainer.model, trainer.get_train_dataloader()


def switch(layers: list, fused: dict, on: bool) -> None:
    """Fused forward (the instance attribute ``fuse_lora_layers`` set) or PEFT's (the class's)."""
    for layer in layers:
        if on:
            layer.forward = fused[id(layer)]
        else:
            vars(layer).pop("forward", None)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batches", type=int, default=6, help="batches per timed pass (packed rows of 512)")
    parser.add_argument("--batch", type=int, default=2, help="packed rows per batch")
    parser.add_argument("--rows", type=int, default=1200)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    parser.add_argument("--out", default="/tmp/wronai-bench")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, loader = prepare(out, args.rows, args.batch, args.checkpointing)
    layers = [m for m in model.modules() if "forward" in vars(m) and hasattr(m, "lora_A")]
    fused = {id(layer): vars(layer)["forward"] for layer in layers}
    batches = [b for _, b in zip(range(args.batches), loader, strict=False)]
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    model.train()

    def timed_pass() -> tuple[float, list[float]]:
        start, losses = time.perf_counter(), []
        for batch in batches:
            loss = model(**batch).loss
            loss.backward()
            losses.append(float(loss.detach()))
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start, losses

    switch(layers, fused, True)
    timed_pass()  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    losses: dict[bool, list[float]] = {}
    print(
        f"{len(layers)} LoRA layers; {len(batches)} batches, {tokens} tokens per pass; threads {torch.get_num_threads()}"
    )
    for index in range(args.rounds):
        order = (True, False) if index % 2 == 0 else (False, True)
        for on in order:
            switch(layers, fused, on)
            seconds, losses[on] = timed_pass()
            times[on].append(seconds)
        ratio = times[False][-1] / times[True][-1]
        print(
            f"round {index + 1}: fused {times[True][-1]:.2f} s, PEFT {times[False][-1]:.2f} s, PEFT / fused {ratio:.3f}"
        )
    ratios = [p / f for p, f in zip(times[False], times[True], strict=True)]
    per_batch = {on: statistics.median(t) / len(batches) for on, t in times.items()}
    same = max(abs(a - b) for a, b in zip(losses[True], losses[False], strict=True))
    print(f"median per batch: fused {per_batch[True] * 1000:.0f} ms, PEFT {per_batch[False] * 1000:.0f} ms; "
          f"PEFT / fused median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}); "
          f"largest loss difference {same:.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
