#!/usr/bin/env python3
"""Half-precision attention on a CPU: bf16 sdpa vs WronAI's fp32 math, time and C-heap growth, side by side.

    python benchmarks/cpu_attention.py [--heads 6] [--kv-heads 3] [--head-dim 64] [--lengths 30,100,300,512]

For each example length: forward + backward of causal sdpa with bf16 inputs as the model hands them over
under CPU autocast, (a) run by torch in bf16 and (b) by ``wronai.model.attention.packed_sdpa`` (fp32 inside,
bf16 out); median of repeated runs, both in one process. Then the growth of the C heap (glibc ``mallinfo2``
bytes in use, after ``malloc_trim``) over ``--distinct`` different lengths, once per mode, each in its own
subprocess: every new bf16 shape can leave kernels cached for good, which is what packed rows of examples
of all lengths hit. Prints the CPU's bf16 flags with the numbers.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def heap_in_use() -> int:
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().uordblks)


def step(mode: str, q, k, v, module) -> None:
    import torch

    from wronai.model.attention import packed_sdpa

    for t in (q, k, v):
        t.grad = None
    if mode == "bf16":
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1]
        )
    else:
        out, _ = packed_sdpa(module, q, k, v, None, **{"wronai_example_lengths": [[q.shape[2]]]})
        out = out.transpose(1, 2)
    out.float().sum().backward()


def inputs(length: int, args):
    import torch

    gen = torch.Generator().manual_seed(length)
    shapes = [(1, args.heads, length, args.head_dim)] + [(1, args.kv_heads, length, args.head_dim)] * 2
    return [torch.randn(s, generator=gen).bfloat16().requires_grad_() for s in shapes]


def module():
    import torch

    m = torch.nn.Module().train()
    m.is_causal = True
    return m


def timing(args) -> list[dict]:
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        q, k, v = inputs(length, args)
        row: dict = {"length": length}
        for mode in ("bf16", "fp32"):
            for _ in range(3):
                step(mode, q, k, v, module())
            times = []
            for _ in range(args.repeat):
                tick = time.perf_counter()
                step(mode, q, k, v, module())
                times.append(time.perf_counter() - tick)
            row[mode] = statistics.median(times) * 1000
        rows.append(row)
    return rows


def growth(mode: str, args) -> float:
    """MiB of C heap still in use after attention over ``--distinct`` lengths (run in a fresh process)."""
    lengths = range(20, 20 + args.distinct)
    q, k, v = inputs(19, args)
    step(mode, q, k, v, module())
    before = heap_in_use()
    for length in lengths:
        q, k, v = inputs(length, args)
        step(mode, q, k, v, module())
        del q, k, v
    return (heap_in_use() - before) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--lengths", default="30,100,300,512")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--distinct", type=int, default=300, help="lengths for the heap-growth measurement")
    parser.add_argument("--growth-child", choices=["bf16", "fp32"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.growth_child:
        print(json.dumps({"mib": growth(args.growth_child, args)}))
        return
    import torch

    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        flags = sorted({f for f in handle.read().split() if f in ("avx512_bf16", "amx_bf16")})
    print(f"CPU bf16 flags: {', '.join(flags) or 'none (bf16 emulated)'}; torch {torch.__version__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"heads {args.heads} (kv {args.kv_heads}) x {args.head_dim}; forward + backward, median ms")
    print(f"{'length':>7} {'bf16 sdpa':>10} {'fp32 math':>10} {'ratio':>6}")
    for row in timing(args):
        print(
            f"{row['length']:>7} {row['bf16']:>10.2f} {row['fp32']:>10.2f} {row['bf16'] / row['fp32']:>5.2f}x"
        )
    for mode in ("bf16", "fp32"):
        cmd = [sys.executable, __file__, "--growth-child", mode, "--heads", str(args.heads),
               "--kv-heads", str(args.kv_heads), "--head-dim", str(args.head_dim), "--distinct", str(args.distinct)]  # fmt: skip
        mib = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)["mib"]
        print(f"C heap still in use after {args.distinct} distinct lengths, {mode}: {mib:.0f} MiB")


if __name__ == "__main__":
    main()
