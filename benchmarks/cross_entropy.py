#!/usr/bin/env python3
"""The output head + token cross-entropy, forward and backward: the stock loss vs WronAI's fused one.

    python benchmarks/cross_entropy.py [--positions 2048] [--hidden 1024] [--vocab 32000] [--repeat 3] [--bf16]

Each variant runs in its own process (a fresh heap) on the same random hidden states, head and targets
(a quarter of the targets ignored, as prompt positions are): the stock path is what
``wronai.train.loss.trained_positions_loss`` computes without ``hardware.fused_cross_entropy``
(``head(h).float()`` then ``cross_entropy(reduction="sum")``, then ``backward``); the fused one is
``wronai.kernels.cross_entropy.linear_cross_entropy``. Printed: the median time of a forward + backward,
and the peak RSS above the process's RSS once its inputs exist (what the loss itself adds), side by side.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(variant: str, positions: int, hidden: int, vocab: int, repeat: int, bf16: bool) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from wronai.kernels.cross_entropy import linear_cross_entropy

    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
    with torch.no_grad():
        head.weight.normal_(0, hidden**-0.5, generator=generator)
    h = torch.randn(positions, hidden, generator=generator).requires_grad_(True)
    targets = torch.randint(0, vocab, (positions,), generator=generator)
    targets[::4] = -100
    if variant == "stock":

        def loss_fn() -> torch.Tensor:
            return F.cross_entropy(head(h).float(), targets, ignore_index=-100, reduction="sum")
    else:

        def loss_fn() -> torch.Tensor:
            return linear_cross_entropy(h, head, targets)

    base = _peak_mb()
    times = []
    for _ in range(repeat + 1):  # the first one warms up
        tick = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn()
        loss.backward()
        times.append(time.perf_counter() - tick)
        h.grad = None
    return {"seconds": statistics.median(times[1:]), "added_peak_mb": _peak_mb() - base, "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="under CPU bf16 autocast")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.positions, args.hidden, args.vocab, args.repeat, args.bf16)
    if args.child:
        print(json.dumps(child(args.child, *shape)))
        return
    results = {}
    for variant in ("stock", "fused"):
        cmd = [sys.executable, __file__, "--child", variant, "--positions", str(args.positions),
               "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--repeat", str(args.repeat),
               *(["--bf16"] if args.bf16 else [])]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    print(f"positions {args.positions}, hidden {args.hidden}, vocabulary {args.vocab}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}; fp32 logits would take {args.positions * args.vocab * 4 / 2**20:.0f} MiB")  # fmt: skip
    print(f"{'loss':8} {'s per fwd+bwd':>14} {'added peak RSS MB':>18} {'loss value':>14}")
    for name, r in results.items():
        print(f"{name:8} {r['seconds']:14.3f} {r['added_peak_mb']:18.0f} {r['loss']:14.2f}")
    stock, fused = results["stock"], results["fused"]
    print(f"fused / stock: time {fused['seconds'] / stock['seconds']:.2f}x, "
          f"added peak RSS {fused['added_peak_mb'] / max(stock['added_peak_mb'], 1):.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
