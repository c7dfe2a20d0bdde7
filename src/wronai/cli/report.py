"""`wronai report`: an HTML report (curves, data, config, samples) and the model card for a run."""

from __future__ import annotations

import argparse
import sys

from wronai.cli.run_args import add_run_command, quiet_third_party
from wronai.rundir.files import CARD_FILE


def register(sub: argparse._SubParsersAction) -> None:

    p = add_run_command(
        sub,
        "report",
        help="write RUN_DIR/report.html and the model card README.md",
        description="Write a self-contained HTML report of a finished run — loss/eval curves, learning rate, throughput "
        "and memory (when logged by wronai.train.throughput:ThroughputMemoryCallback), data statistics, the resolved config "
        "and answers to a few fixed Polish prompts — plus the Hugging Face model card RUN_DIR/README.md.",
        target_help="a finished run's training.output_dir",
    )
    p.add_argument("--no-samples", action="store_true", help="skip loading the model to generate samples")
    p.add_argument("--max-new-tokens", type=int, default=64, help="length of each sample answer")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from wronai.use.report import write_report

    with quiet_third_party():
        path = write_report(args.target, samples=not args.no_samples, max_new_tokens=args.max_new_tokens)
    sys.stdout.write(f"report: {path}\nmodel card: {path.parent / CARD_FILE}\n")
    return 0
