#!/usr/bin/env python3
"""Where a training step of the minimal config goes on this CPU: matmuls, attention, everything else.

    python benchmarks/step_budget.py                      # the precision autotune picks (~1 min)
    python benchmarks/step_budget.py --precision fp32     # what an AVX2-only CPU runs
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python benchmarks/step_budget.py --precision fp32  # an AVX2-only CPU, emulated on a newer one

The model and data are `benchmarks/train_speed.py`'s (built in ``--out`` if absent) and the config is its
minimal one (`wronai train` decides batch, packing, precision and kernels), trained through
``wronai.recipe.Pipeline`` — the same stages, heap settings and Trainer. Steps alternate: plain ones
(their median is the step time; no mode is active in them) and ones run inside a ``TorchDispatchMode`` that
times every ATen operation the forward, the backward and the optimizer run (CPU operations are synchronous, so a wall-clock pair around each is its
time). Printed: the plain step, the measured step split into operation groups, the matmuls by shape with
their GFLOP/s against this machine's matmul peak, the other operations by name (with the number of ATen
calls a step: each costs Python and dispatcher time besides its kernel), and the time outside any operation
(Python, autograd, the timer itself: the difference between a timed and a plain step says how much of it is
the timer's).

Why not ``torch.profiler``: on these 2-core machines it inflated elementwise operations by 3-15x inside a
training step (SwiGLU's multiply read 5.5 ms a call in a profile and 0.4 ms timed by module hooks), so its
split of a step is wrong exactly where the non-matmul time is.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import defaultdict
from pathlib import Path

from train_speed import machine_peaks, minimal_config, prepare

MATMULS = ("mm", "addmm", "addmm_", "bmm", "baddbmm")
ATTENTION = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention_for_cpu_backward",
)
COPIES = ("_to_copy", "copy_", "cat", "clone", "split_with_sizes_copy")


def group(name: str, shapes: tuple) -> str:
    """The budget line an ATen operation counts in."""
    if name in MATMULS:
        a, b = shapes[-2:]
        rank = min(*a, *b)
        return "matmul, base (every dim > 64)" if rank > 64 else "matmul, LoRA / skinny (a dim <= 64)"
    if name in ATTENTION:
        return "attention kernel (sdpa flash, fwd + bwd)"
    if name in COPIES:
        return "copies and casts"
    return "elementwise, norms, reductions, other"


class OpTimer:
    """A dispatch mode that adds each ATen operation's wall time to ``self.groups`` (and matmuls by shape)
    while it is entered (``self.mode``: only around the timed steps, so plain steps pay nothing for it)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        timer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                start = time.perf_counter()
                out = func(*args, **(kwargs or {}))
                spent = time.perf_counter() - start
                name = func._schema.name.split("::")[-1]
                shapes = tuple(tuple(a.shape) for a in args if hasattr(a, "shape"))
                timer.groups[group(name, shapes)] += spent
                if name in MATMULS:
                    a, b = shapes[-2:]
                    timer.matmuls[(a, b)].append(spent)
                else:
                    timer.ops[name].append(spent)
                return out

        self.mode = Mode()
        self.groups: dict[str, float] = defaultdict(float)
        self.matmuls: dict[tuple, list[float]] = defaultdict(list)
        self.ops: dict[str, list[float]] = defaultdict(list)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The speed benchmark's model and data: their size and the folder they are built in."""
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--out", default="/tmp/wronai-budget")


def prepared_minimal_config(args: argparse.Namespace, run: str) -> dict:
    """The minimal config on the speed benchmark's model and data (built in ``args.out`` if absent),
    training into ``args.out / run``, as a dict."""
    out = Path(args.out)
    if not (out / "model" / "config.json").is_file() or not (out / "train.jsonl").is_file():
        prepare(out, args.rows, args.max_len, args.hidden, args.layers)
    return minimal_config(out / "model", out / "train.jsonl", out / run, args.max_len, "cpu")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: what autotune picks on this CPU; fp32/bf16: written into the config")  # fmt: skip
    parser.add_argument(
        "--steps", type=int, default=24, help="measured steps (half plain, half timed per op)"
    )
    parser.add_argument("--warmup", type=int, default=4)
    add_data_arguments(parser)
    args = parser.parse_args()

    import torch
    from transformers import TrainerCallback

    from wronai.config import load_config
    from wronai.recipe import Pipeline

    raw = prepared_minimal_config(args, "run")
    raw["training"].update(max_steps=args.warmup + args.steps, logging_steps=10**6)
    if args.precision != "auto":
        raw["training"]["bf16"] = args.precision == "bf16"
    timer = OpTimer()
    plain: list[float] = []
    timed: list[float] = []

    class Alternate(TrainerCallback):
        """After the warm-up, every second step runs inside the timer's dispatch mode."""

        timing = False

        def on_step_begin(self, args_, state, control, **kwargs):  # noqa: ANN001
            measured = state.global_step - args.warmup
            self.timing = measured >= 0 and measured % 2 == 1
            if self.timing:
                timer.mode.__enter__()
            self.start = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):  # noqa: ANN001
            spent = time.perf_counter() - self.start
            if self.timing:
                timer.mode.__exit__(None, None, None)
            if state.global_step - 1 >= args.warmup:
                (timed if self.timing else plain).append(spent)
            self.timing = False

    with Pipeline(load_config(data=raw)) as pipeline:
        pipeline.extra_callbacks.append(Alternate())
        pipeline.build_trainer().train()
        precision, batch = pipeline.plan.precision, pipeline.config.training.per_device_train_batch_size

    peaks = machine_peaks("cpu", windows=2)
    peak = peaks["bfloat16" if precision == "bf16" else "float32"]
    step, step_timed = statistics.median(plain), statistics.median(timed)
    n = len(timed)
    print(f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads; precision {precision}, {batch} packed rows x {args.max_len} tokens a step; "
          f"matmul peak {peak:.0f} GFLOP/s ({'bf16' if precision == 'bf16' else 'fp32'})")  # fmt: skip
    print(
        f"plain step (median of {len(plain)}): {1000 * step:.0f} ms; timed step (median of {n}): {1000 * step_timed:.0f} ms\n"
    )
    print(f"{'where a timed step goes':44} {'ms/step':>8} {'share':>6}")
    spent = 0.0
    for name, total in sorted(timer.groups.items(), key=lambda kv: -kv[1]):
        spent += total / n
        print(f"{name:44} {1000 * total / n:8.1f} {100 * total / n / step_timed:5.1f}%")
    outside = step_timed - spent
    print(
        f"{'outside any operation (Python, autograd, timer)':44} {1000 * outside:8.1f} {100 * outside / step_timed:5.1f}%"
    )
    print(f"  of which the timer's own cost (timed - plain step): {1000 * (step_timed - step):.1f} ms")
    print(f"\n{'matmul shapes (a @ b)':44} {'calls/step':>10} {'ms/step':>8} {'GFLOP/s':>8} {'of peak':>8}")
    for (a, b), times in sorted(timer.matmuls.items(), key=lambda kv: -sum(kv[1]))[:12]:
        flops = 2 * math.prod(a) * b[-1]
        rate = flops * len(times) / sum(times) / 1e9
        print(
            f"{str(a) + ' @ ' + str(b):44} {len(times) / n:10.1f} {1000 * sum(times) / n:8.1f} {rate:8.0f} {100 * rate / peak:7.0f}%"
        )
    calls = sum(len(t) for t in timer.ops.values()) + sum(len(t) for t in timer.matmuls.values())
    print(
        f"\n{'other operations by name (all: ' + f'{calls / n:.0f} calls a step)':44} {'calls/step':>10} {'ms/step':>8} {'us/call':>8}"
    )
    for name, times in sorted(timer.ops.items(), key=lambda kv: -sum(kv[1]))[:15]:
        print(
            f"{name:44} {len(times) / n:10.1f} {1000 * sum(times) / n:8.1f} {1e6 * sum(times) / len(times):8.0f}"
        )


if __name__ == "__main__":
    main()
