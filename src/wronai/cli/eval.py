"""`wronai eval`: loss and perplexity of a run (or a plain model) on its eval split or on data files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wronai.cli.run_args import add_base_model_arg, add_full_precision_arg, add_run_command, quiet_third_party
from wronai.errors import WronAIError
from wronai.rundir.files import EVAL_FILE

EPILOG = """examples:
  wronai eval runs/offline-demo --base                      # eval split: base ppl X → tuned ppl Y
  wronai eval runs/offline-demo --data data/eval_pl/news.txt --base
  wronai eval runs/offline-demo/merged --data valid.jsonl   # a plain (e.g. merged) model on its own

Results are added to RUN_DIR/eval.json (one entry per data set) and shown in the model card.
"""


def register(sub: argparse._SubParsersAction) -> None:

    p = add_run_command(
        sub,
        "eval",
        help="loss and perplexity on the eval split or a data file",
        description="Score a finished run on its eval split (rebuilt from the saved config: same split, template and "
        "masking as in training) or on data files in any supported format. The loss is the token-weighted mean over "
        "trained tokens; perplexity = exp(loss). With --base the base model is scored too (adapter switched off).",
        epilog=EPILOG,
        metavar="RUN_DIR|MODEL",
        target_help="a run's training.output_dir (or checkpoint), or a plain model directory",
    )
    p.add_argument(
        "--data",
        nargs="+",
        metavar="FILE",
        help="score these files instead of the eval split (.jsonl/.json/.csv/.parquet/.txt)",
    )
    p.add_argument(
        "--base", action="store_true", help="also score the base model, printing `base ppl X → tuned ppl Y`"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="rows per forward pass (default: training.per_device_eval_batch_size)",
    )
    p.add_argument("--limit", type=int, default=None, metavar="N", help="score only the first N examples")
    add_base_model_arg(p)
    add_full_precision_arg(p)
    p.add_argument("--out", default=None, metavar="FILE", help="results file (default: TARGET/eval.json)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from wronai.use.evaluate import evaluate, save_report

    if args.batch_size is not None and args.batch_size < 1:
        raise WronAIError(f"--batch-size {args.batch_size}: must be at least 1")
    with quiet_third_party():
        report = evaluate(
            args.target, args.data, base=args.base, batch_size=args.batch_size, limit=args.limit,
            base_model=args.base_model, quantize=not args.full_precision,
        )  # fmt: skip
    for line in report.lines():
        sys.stdout.write(line + "\n")
    out = Path(args.out) if args.out else Path(args.target) / EVAL_FILE
    try:
        save_report(report, out)
    except OSError as err:
        raise WronAIError(
            f"cannot write {out} ({err.strerror}) — pass --out FILE somewhere writable"
        ) from None
    _refresh_card(Path(args.target))
    sys.stdout.write(f"saved to {out}\n")
    return 0


def _refresh_card(target: Path) -> None:
    """Keep a WronAI-written model card in step with the new results."""
    from wronai.use.model_card import refresh_card

    refresh_card(target)
