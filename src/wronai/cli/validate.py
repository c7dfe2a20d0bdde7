"""`wronai validate CONFIG`: the resolved config, the device plan with every automatic choice and why, and every
problem found — without loading a model."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from wronai.cli.common import add_command, load_config_args
from wronai.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "validate",
        cmd_validate,
        help="check a config and show the device plan",
        description="Load and check a config without loading a model; print the resolved config and the device plan "
        "with each automatic choice `wronai train` makes and why (CPU choices timed on the model's layer shapes "
        "for about two seconds). Exits 2 and lists the problems if there are any.",
        config=True,
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="print only the device plan and problems, not the resolved config",
    )
    p.add_argument(
        "--no-autotune",
        action="store_true",
        help="do not time the CPU choices (precision, LoRA layers, row slices): show the plan's values instead",
    )
    p.add_argument(
        "--data",
        action="store_true",
        help="also prepare the data (cached, as `wronai data prepare`) and show the batch settled for packed rows",
    )


def cmd_validate(args: argparse.Namespace) -> int:
    from wronai.config import dump_config
    from wronai.config.preflight import preflight
    from wronai.recipe import Pipeline
    from wronai.runtime.autotune import tune
    from wronai.runtime.batch import packed_rows_rule

    loaded = load_config_args(args)
    cfg = loaded.config
    out = sys.stdout
    if not args.quiet:
        out.write("# resolved config\n" + dump_config(cfg) + "\n")
    with Pipeline(cfg) as pipeline:  # the `auto` settings decided as `wronai train` decides them
        decided = pipeline.config
        decision = None
        if not args.no_autotune:
            pipeline.plan, decision = tune(decided, pipeline.plan, None, local_only=True)
        out.write("# device plan\n" + "".join(f"  {line}\n" for line in pipeline.plan.describe()))
        notes = [*loaded.notes, *pipeline.plan.notes]
        if decision is not None and decision.source == "timed":
            notes.append("autotune: timed now to show it; `wronai train` times again at its start")
        elif (
            decision is None
            and not args.no_autotune
            and decided.hardware.autotune
            and pipeline.plan.device == "cpu"
        ):
            notes.append(
                f"autotune: not timed here — config.json of {decided.model.name} is not on this machine; "
                "`wronai train` times the CPU choices once it has the model"
            )
        notes += load_time_notes(decided, pipeline.plan.device)
        packed_auto = pipeline.batch_auto and decided.data.packing is True
        if packed_auto and not args.data:
            t = decided.training
            notes.append(packed_rows_rule(t.per_device_train_batch_size, t.gradient_accumulation_steps))
        for note in notes:
            out.write(f"  note: {note}\n")
        problems = preflight(cfg)
        if problems:
            raise ConfigError(problems, args.config)
        if args.data:
            out.flush()
            prepared = pipeline.load_dataset()
            out.write("# data\n" + "".join(f"  {line}\n" for line in prepared.stats.summary_lines()))
            if pipeline.packed_batch is not None:
                out.write(f"  note: {pipeline.packed_batch.reason}\n")
    out.write(f"OK: {args.config} is valid\n")
    return 0


def load_time_notes(config: Any, device: str) -> list[str]:
    """The `auto` choices `wronai train` makes once the model is loaded — gradient checkpointing (from the
    activations and the free memory) and ``hardware.return_freed_memory`` (from the parameter count) — as it
    logs them, decided here from config.json when it is on this machine (nothing is downloaded)."""
    from wronai.errors import WronAIError
    from wronai.runtime.activation_checkpointing import auto_gradient_checkpointing, auto_note
    from wronai.runtime.heap import freed_memory_note
    from wronai.runtime.memory import ModelShape, read_model_config

    checkpointing = config.training.gradient_checkpointing == "auto"
    freed = config.hardware.return_freed_memory == "auto" and device == "cpu"
    if not (checkpointing or freed):
        return []  # nothing left open: config.json is not read
    try:
        model_config = read_model_config(config, local_only=True)
        parameters = ModelShape.from_config(model_config).total_params
    except (WronAIError, OSError, ValueError):
        open_settings = [
            *(["training.gradient_checkpointing: auto"] if checkpointing else []),
            *(["hardware.return_freed_memory: auto"] if freed else []),
        ]
        return [
            f"{' and '.join(open_settings)}: decided by `wronai train` once the model is loaded (its config.json "
            f"is not on this machine or has no decoder sizes to decide from here)"
        ]
    notes: list[str] = []
    if checkpointing:
        _, what, why = auto_gradient_checkpointing(config, model_config, device)
        notes.append(auto_note(what, why))
    line = freed_memory_note(config.hardware, device, parameters) if freed else None
    notes += [line] if line else []
    return notes
