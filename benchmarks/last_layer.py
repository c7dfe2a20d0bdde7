#!/usr/bin/env python3
"""The last decoder layer at trained positions only (hardware.last_layer_trained_only) against the whole layer.

    python benchmarks/last_layer.py                    # the precision autotune picks on this CPU (~1.5 min)
    python benchmarks/last_layer.py --precision fp32   # what an AVX2-only CPU runs
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python benchmarks/last_layer.py --precision fp32   # an AVX2-only CPU, emulated on a newer one
    python benchmarks/last_layer.py --null             # the whole layer against itself: the noise floor

The speed benchmark's model, data and minimal config (`benchmarks/train_speed.py`), built through
``wronai.recipe.Pipeline``. One process, the same few batches: each round runs ``trainer.training_step`` (forward
+ backward, no optimizer step) on every batch with the layer whole and with it at trained positions only,
alternating which goes first. Printed: the loss and the largest relative gradient difference on the first
batch, the median step of each, their ratio and the median of the per-batch ratios; then, from further
rounds run inside ``benchmarks/step_budget.py``'s ``TorchDispatchMode`` timer, the time each side spends in
matmuls, attention and the rest per step. On these noisy 2-core machines a 3% wall-clock difference is
within the noise of the alternation (``--null`` reads 1.01–1.03), while the matmul times are steady.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

from step_budget import OpTimer, add_data_arguments, prepared_minimal_config


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--timed-rounds", type=int, default=4, help="rounds inside the per-operation timer")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--null", action="store_true", help="both sides compute the whole layer")
    add_data_arguments(parser)
    args = parser.parse_args()

    import torch

    from wronai.config import load_config
    from wronai.recipe import Pipeline
    from wronai.train.last_layer import last_layer_parts

    raw = prepared_minimal_config(args, "last-layer")
    raw["hardware"]["last_layer_trained_only"] = "off"  # switched per step below
    if args.precision != "auto":
        raw["training"]["bf16"] = args.precision == "bf16"
    with Pipeline(load_config(data=raw)) as pipeline:
        trainer = pipeline.build_trainer()
        model = pipeline.model.train()
        parts, why = last_layer_parts(model)
        if why:
            raise SystemExit(f"the last layer cannot run at trained positions: {why}")
        trainer.current_gradient_accumulation_steps = 1
        loader = trainer.get_train_dataloader()
        batches = [batch for _, batch in zip(range(args.batches), loader)]
        bf16 = pipeline.plan.precision == "bf16"

        def step(batch, trained_only: bool) -> float:
            trainer.last_layer_parts = parts if trained_only and not args.null else []
            trainer._last_layer_checked = True  # the start-up check is not what is timed
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with autocast:
                return float(trainer.training_step(model, batch))

        losses, grads = [], []
        for trained_only in (False, True):
            model.zero_grad()
            losses.append(step(batches[0], trained_only))
            grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        diff = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(*grads))
        times: dict[bool, list[float]] = {False: [], True: []}
        for round_ in range(args.rounds):
            for trained_only in (False, True) if round_ % 2 == 0 else (True, False):
                for batch in batches:
                    model.zero_grad()
                    start = time.perf_counter()
                    step(batch, trained_only)
                    times[trained_only].append(time.perf_counter() - start)
        timers = {False: OpTimer(), True: OpTimer()}
        for round_ in range(args.timed_rounds):
            for trained_only in (False, True) if round_ % 2 == 0 else (True, False):
                for batch in batches:
                    model.zero_grad()
                    with timers[trained_only].mode:
                        step(batch, trained_only)
    whole, trained = (statistics.median(times[k]) for k in (False, True))
    pairs = statistics.median(a / b for a, b in zip(times[False], times[True]))
    print(
        f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}; precision "
        f"{'bf16' if bf16 else 'fp32'}; {args.batches} batches x {args.rounds} rounds{' (null)' if args.null else ''}"
    )
    print(
        f"loss {losses[0]:.6f} whole / {losses[1]:.6f} trained rows; largest relative gradient difference {diff:.1e}"
    )
    print(
        f"step (forward + backward): whole layer {1000 * whole:.1f} ms, trained rows only {1000 * trained:.1f} ms; "
        f"ratio {whole / trained:.3f}, median per-batch ratio {pairs:.3f}"
    )
    steps = args.timed_rounds * args.batches
    print(f"\nper step, inside the per-operation timer ({steps} steps each)   whole layer   trained rows")
    groups = sorted(set(timers[False].groups) | set(timers[True].groups))
    for name in [*groups, "all operations"]:
        spent = [
            sum(t.groups.values()) if name == "all operations" else t.groups.get(name, 0.0)
            for t in (timers[False], timers[True])
        ]
        print(f"  {name:52} {1000 * spent[0] / steps:8.1f} ms {1000 * spent[1] / steps:8.1f} ms")


if __name__ == "__main__":
    main()
