"""`wronai merge RUN_DIR OUT_DIR`: the adapter merged into its base, saved as a standalone model."""

from __future__ import annotations

import argparse
import sys

from wronai.cli.run_args import MERGE_INTO_HELP, add_base_model_arg, add_run_command, quiet_third_party

MERGE_EPILOG = """examples:
  wronai merge runs/offline-demo runs/offline-demo-merged             # dtype of the base checkpoint
  wronai merge runs/offline-demo merged-bf16 --dtype bf16

The base is loaded in full precision (never 4-bit), the adapter merged in with merge_and_unload, and the
result saved as safetensors with the run's tokenizer, its wronai_config.yaml and a model card (README.md).
"""


def register(sub: argparse._SubParsersAction) -> None:

    p = add_run_command(
        sub,
        "merge",
        help="merge a run's adapter into its base model (standalone safetensors)",
        description="Merge a LoRA run into a standalone model that loads with transformers alone.",
        epilog=MERGE_EPILOG,
        target_help="a run's training.output_dir (or a checkpoint-N folder)",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder for the merged model")
    p.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp16", "fp32"],
        default="auto",
        help="saved dtype (auto = the base checkpoint's)",
    )
    add_base_model_arg(p, MERGE_INTO_HELP)
    p.add_argument("--device", default="cpu", help="where to merge: cpu (default) or cuda")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    from wronai.use.merge import merge_run

    with quiet_third_party():
        out = merge_run(
            args.target,
            args.out_dir,
            dtype=args.dtype,
            base_model=args.base_model,
            overwrite=args.overwrite,
            device=args.device,
        )
    sys.stdout.write(f"merged model saved to {out} (load it with AutoModelForCausalLM.from_pretrained)\n")
    return 0
