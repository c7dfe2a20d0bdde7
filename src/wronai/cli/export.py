"""`wronai export RUN_DIR --format gguf`: one GGUF file for llama.cpp, Ollama and LM Studio."""

from __future__ import annotations

import argparse
import sys

from wronai.cli.run_args import MERGE_INTO_HELP, add_base_model_arg, add_run_command, quiet_third_party

EXPORT_EPILOG = """examples:
  wronai export runs/offline-demo --format gguf                       # RUN_DIR/offline-demo-f16.gguf
  wronai export runs/offline-demo --format gguf --outtype q8_0 --out model-q8_0.gguf
  wronai export runs/offline-demo-merged --format gguf                # from a merged model folder

Llama and Mistral models are written directly with the `gguf` package (pip install gguf): adapter merged in
full precision, tensors renamed and q/k permuted for llama.cpp, tokenizer stored as GGUF metadata.
For other architectures, or k-quants such as Q4_K_M, use llama.cpp itself:
  wronai merge RUN_DIR merged/
  python llama.cpp/convert_hf_to_gguf.py merged/ --outfile model-f16.gguf --outtype f16
  llama.cpp/build/bin/llama-quantize model-f16.gguf model-q4_k_m.gguf Q4_K_M
"""


def register(sub: argparse._SubParsersAction) -> None:

    e = add_run_command(
        sub,
        "export",
        help="export a run for llama.cpp / Ollama (GGUF)",
        description="Export a run (adapter merged in) or a merged model folder to one GGUF file.",
        epilog=EXPORT_EPILOG,
        target_help="a run's training.output_dir, or a folder written by wronai merge",
    )
    e.add_argument(
        "--format", choices=["gguf"], required=True, help="output format (gguf: llama.cpp, Ollama, LM Studio)"
    )
    e.add_argument(
        "--outtype",
        choices=["f32", "f16", "bf16", "q8_0"],
        default="f16",
        help="tensor type of 2-D weights (norms stay f32)",
    )
    e.add_argument(
        "--out", default=None, metavar="FILE", help="output file (default: RUN_DIR/<name>-<outtype>.gguf)"
    )
    add_base_model_arg(e, MERGE_INTO_HELP)
    e.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from wronai.use.export import export_gguf

    with quiet_third_party():
        summary = export_gguf(args.target, args.out, outtype=args.outtype, base_model=args.base_model)
    size = summary.path.stat().st_size / 2**20
    sys.stdout.write(
        f"wrote {summary.path} ({summary.tensors} tensors, {summary.outtype}, {size:.1f} MiB; tokenizer {summary.tokenizer})\n"
    )
    return 0
