#!/usr/bin/env python3
"""One speed setting on against off, step by step in one process: the same batches, forward + backward.

    python benchmarks/step_ab.py --switch rotary                   # fused RoPE against transformers' (~1.5 min)
    python benchmarks/step_ab.py --switch last-layer               # the last layer at trained rows against whole
    python benchmarks/step_ab.py --switch shared-prefix            # the batches' common prompt start once or per example
    python benchmarks/step_ab.py --switch native-attention         # the compiled attention kernel against sdpa per example
    python benchmarks/step_ab.py --switch native-swiglu            # the compiled SwiGLU kernel against silu and mul
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python benchmarks/step_ab.py --switch rotary --precision fp32   # an AVX2-only CPU, emulated on a newer one
    python benchmarks/step_ab.py --switch rotary --null            # off against off: the noise floor

Switches: ``last-layer`` (``hardware.last_layer_trained_only``: the last decoder layer's q/o projections
and MLP at trained positions only), ``rotary`` (``hardware.fused_rotary``: ``wronai.kernels.rotary``'s RoPE)
``shared-prefix`` (``hardware.shared_prefix``: the same rows collated with the prompt start all their
examples repeat computed once, ``wronai.data.prefix``, against every example computing its own) and
``native-attention`` (``hardware.native_attention``: every example of a layer in one call of the compiled
kernel, ``wronai.kernels.cpu_attention``, against one sdpa call per example).
The speed benchmark's model, data and minimal config (`benchmarks/train_speed.py`), built through
``wronai.recipe.Pipeline`` with the other settings as the minimal config decides them. One process, the same
few batches: each round runs ``trainer.training_step`` (forward + backward, no optimizer step) on every batch
with the setting off and on, alternating which goes first. Printed: the loss and the largest relative
gradient difference on the first batch, the median step of each, their ratio and the median of the
per-batch ratios; then, from further rounds run inside ``benchmarks/step_budget.py``'s ``TorchDispatchMode``
timer, the time each side spends in matmuls, attention and the rest per step. On these noisy 2-core
machines a 3% wall-clock difference is within the noise of the alternation (``--null`` reads 1.01–1.03),
while the per-operation times are steadier.
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
    parser.add_argument(
        "--switch",
        choices=["rotary", "last-layer", "shared-prefix", "native-attention", "native-swiglu"],
        required=True,
    )
    parser.add_argument("--null", action="store_true", help="both sides run with the setting off")
    add_data_arguments(parser)
    args = parser.parse_args()

    import torch

    from wronai.config import load_config
    from wronai.recipe import Pipeline

    raw = prepared_minimal_config(args, f"ab-{args.switch}")
    if args.precision != "auto":
        raw["training"]["bf16"] = args.precision == "bf16"
    with Pipeline(load_config(data=raw)) as pipeline:
        trainer = pipeline.build_trainer()
        model = pipeline.model.train()
        switch = setting(args.switch, trainer, model, pipeline.plan.autocast_dtype)
        trainer.current_gradient_accumulation_steps = 1
        loader = trainer.get_train_dataloader()
        batches = [batch for _, batch in zip(range(args.batches), loader)]
        sides = {False: batches, True: batches}
        if args.switch == "shared-prefix":  # the same rows, laid out with and without a shared prefix
            sides = two_layouts(trainer, args.batches)
        bf16 = pipeline.plan.precision == "bf16"

        def step(batch, on: bool) -> float:
            switch(on and not args.null)
            trainer._last_layer_checked = True  # the start-up check is not what is timed
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with autocast:
                return float(trainer.training_step(model, batch))

        losses, grads = [], []
        for on in (False, True):
            model.zero_grad()
            losses.append(step(sides[on and not args.null][0], on))
            grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        diff = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(*grads))
        times: dict[bool, list[float]] = {False: [], True: []}
        for round_ in range(args.rounds):
            for on in (False, True) if round_ % 2 == 0 else (True, False):
                for batch in sides[on and not args.null]:
                    model.zero_grad()
                    start = time.perf_counter()
                    step(batch, on)
                    times[on].append(time.perf_counter() - start)
        timers = {False: OpTimer(), True: OpTimer()}
        for round_ in range(args.timed_rounds):
            for on in (False, True) if round_ % 2 == 0 else (True, False):
                for batch in sides[on and not args.null]:
                    model.zero_grad()
                    with timers[on].mode:
                        step(batch, on)
    off, on = (statistics.median(times[k]) for k in (False, True))
    pairs = statistics.median(a / b for a, b in zip(times[False], times[True]))
    print(
        f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}; precision "
        f"{'bf16' if bf16 else 'fp32'}; {args.batches} batches x {args.rounds} rounds{' (null)' if args.null else ''}"
    )
    print(
        f"{args.switch}: loss {losses[0]:.6f} off / {losses[1]:.6f} on; largest relative gradient difference {diff:.1e}"
    )
    print(
        f"step (forward + backward): off {1000 * off:.1f} ms, on {1000 * on:.1f} ms; "
        f"ratio {off / on:.3f}, median per-batch ratio {pairs:.3f}"
    )
    steps = args.timed_rounds * args.batches
    print(f"\nper step, inside the per-operation timer ({steps} steps each)          off           on")
    groups = sorted(set(timers[False].groups) | set(timers[True].groups))
    for name in [*groups, "all operations"]:
        spent = [
            sum(t.groups.values()) if name == "all operations" else t.groups.get(name, 0.0)
            for t in (timers[False], timers[True])
        ]
        print(f"  {name:52} {1000 * spent[0] / steps:8.1f} ms {1000 * spent[1] / steps:8.1f} ms")


def two_layouts(trainer, count: int) -> dict[bool, list]:  # noqa: ANN001
    """The first ``count`` batches of the training data collated without (False) and with (True) the shared
    prefix (``hardware.shared_prefix``), moved to the model's device as the Trainer would."""
    import dataclasses

    collator = trainer.data_collator
    layouts = {on: dataclasses.replace(collator, share_prefix=on) for on in (False, True)}
    size = trainer.args.per_device_train_batch_size
    rows = [trainer.train_dataset[i] for i in range(count * size)]
    groups = [rows[i : i + size] for i in range(0, len(rows), size)]
    return {on: [trainer._prepare_inputs(layouts[on](g)) for g in groups] for on in (False, True)}


def setting(name: str, trainer, model, autocast):  # noqa: ANN001
    """A function that turns the setting ``name`` on or off on this trainer and model."""
    if name == "shared-prefix":  # the layout is in the batches themselves
        return lambda on: None
    if name == "last-layer":
        from wronai.train.last_layer import last_layer_parts

        parts, why = last_layer_parts(model)
        if why:
            raise SystemExit(f"the last layer cannot run at trained positions: {why}")
        return lambda on: setattr(trainer, "last_layer_parts", parts if on else [])
    if name == "native-attention":
        from wronai.model.attention import NATIVE_ATTENTION, PACKED_SDPA

        base = model.get_base_model()
        if base.config._attn_implementation not in (NATIVE_ATTENTION, PACKED_SDPA):
            raise SystemExit("the model does not run per-example attention (packed rows)")
        return lambda on: base.set_attn_implementation(NATIVE_ATTENTION if on else PACKED_SDPA)
    if name == "native-swiglu":
        from wronai.kernels.swiglu import FusedSwiGLU, fuse_swiglu, unfuse_swiglu

        def swiglu(on: bool) -> None:
            fused = any(isinstance(m, FusedSwiGLU) for m in model.modules())
            if on and not fused and not fuse_swiglu(model, "on"):
                raise SystemExit("the model has no Llama-style SwiGLU MLP")
            if fused and not on:
                unfuse_swiglu(model)

        return swiglu
    from wronai.kernels.rotary import FusedRotaryAttention, fuse_rotary, unfuse_rotary

    def rotary(on: bool) -> None:
        fused = any(isinstance(m, FusedRotaryAttention) for m in model.modules())
        if on and not fused and not fuse_rotary(model, autocast=autocast):
            raise SystemExit("the rotary embedding cannot be fused for this model")
        if fused and not on:
            unfuse_rotary(model)

    return rotary


if __name__ == "__main__":
    main()
