"""`wronai data preview|prepare|check CONFIG`: what the model will be trained on, prepared and checked."""

from __future__ import annotations

import argparse
import logging
import sys

from wronai.cli.common import add_command, load_config_args

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data", help="inspect the training data", description="Inspect what the model will see."
    )
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    pp = add_command(
        data_sub,
        "preview",
        cmd_data_preview,
        help="show formatted examples with trained tokens marked",
        description="Print examples as the model sees them: masked (prompt) text in [brackets] or dim, trained text plain; "
        "token counts and the length distribution.",
        config=True,
    )
    pp.add_argument("-n", type=int, default=3, help="examples to show")
    pp.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    pp = add_command(
        data_sub,
        "prepare",
        cmd_data_prepare,
        help="prepare and cache the data now",
        description="Run data preparation once and cache it.",
        config=True,
    )
    pp = add_command(
        data_sub,
        "check",
        cmd_data_check,
        help="run the pre-flight data checks",
        description="Prepare the data and run the pre-flight checks (EOS/end-of-turn trained, chat template equal to the "
        "tokenizer's, share of too-long rows), even when data.checks is false; exit 2 naming each failed check.",
        config=True,
    )


def cmd_data_preview(args: argparse.Namespace) -> int:
    from wronai.data.preview import preview

    loaded = load_config_args(args)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    sys.stdout.write(preview(loaded.config, n=args.n, color=color))
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from wronai.recipe import Pipeline

    loaded = load_config_args(args)
    trainer = Pipeline(loaded.config)
    prepared = trainer.load_dataset()
    logger.info("prepared data cached (key %s)", prepared.stats.cache_key)
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from wronai.recipe import Pipeline

    loaded = load_config_args(args)
    config = loaded.config.model_copy(update={"data": loaded.config.data.model_copy(update={"checks": True})})
    prepared = Pipeline(config).load_dataset()
    lines = [f"{name}: {result}" for name, result in prepared.stats.checks.items()]
    sys.stdout.write("data checks passed\n" + "".join(f"  {line}\n" for line in lines))
    return 0
