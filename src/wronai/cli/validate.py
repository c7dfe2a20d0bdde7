"""`wronai validate CONFIG`: the resolved config, the device plan and every problem found without loading a model."""

from __future__ import annotations

import argparse
import sys

from wronai.cli.common import add_command, load_config_args
from wronai.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "validate",
        cmd_validate,
        help="check a config and show the device plan",
        description="Load and check a config without loading a model; print the resolved config and the device plan. "
        "Exits 2 and lists the problems if there are any.",
        config=True,
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="print only the device plan and problems, not the resolved config",
    )


def cmd_validate(args: argparse.Namespace) -> int:
    from wronai.config import dump_config
    from wronai.config.preflight import preflight
    from wronai.data.auto import resolve_packing
    from wronai.runtime.batch import resolve as resolve_batch
    from wronai.runtime.hardware import plan_device

    loaded = load_config_args(args)
    cfg = loaded.config
    out = sys.stdout
    if not args.quiet:
        out.write("# resolved config\n" + dump_config(cfg) + "\n")
    plan = plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
    decided, packing_notes = resolve_packing(cfg)  # what `wronai train` will decide for the `auto` settings
    _, batch = resolve_batch(decided, plan.device)
    out.write("# device plan\n" + "".join(f"  {line}\n" for line in plan.describe()))
    for note in [*loaded.notes, *plan.notes, *packing_notes, *batch.notes]:
        out.write(f"  note: {note}\n")
    problems = preflight(cfg)
    if problems:
        raise ConfigError(problems, args.config)
    out.write(f"OK: {args.config} is valid\n")
    return 0
