"""`wronai merge` (adapter -> standalone model) and `wronai export --format gguf` (llama.cpp)."""

from __future__ import annotations

import argparse
import sys

MERGE_EPILOG = """examples:
  wronai merge runs/offline-demo runs/offline-demo-merged             # dtype of the base checkpoint
  wronai merge runs/offline-demo merged-bf16 --dtype bf16

The base is loaded in full precision (never 4-bit), the adapter merged in with merge_and_unload, and the
result saved as safetensors with the run's tokenizer, its wronai_config.yaml and a model card (README.md).
"""

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
    p = sub.add_parser(
        "merge",
        help="merge a run's adapter into its base model (standalone safetensors)",
        description="Merge a LoRA run into a standalone model that loads with transformers alone.",
        epilog=MERGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", metavar="RUN_DIR", help="a run's training.output_dir (or a checkpoint-N folder)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder for the merged model")
    p.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp16", "fp32"],
        default="auto",
        help="saved dtype (auto = the base checkpoint's)",
    )
    p.add_argument(
        "--base-model",
        default=None,
        metavar="PATH_OR_ID",
        help="merge into this base instead of the saved model.name",
    )
    p.add_argument("--device", default="cpu", help="where to merge: cpu (default) or cuda")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.set_defaults(func=cmd_merge)

    e = sub.add_parser(
        "export",
        help="export a run for llama.cpp / Ollama (GGUF)",
        description="Export a run (adapter merged in) or a merged model folder to one GGUF file.",
        epilog=EXPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument(
        "target", metavar="RUN_DIR", help="a run's training.output_dir, or a folder written by wronai merge"
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
    e.add_argument(
        "--base-model",
        default=None,
        metavar="PATH_OR_ID",
        help="merge into this base instead of the saved model.name",
    )
    e.set_defaults(func=cmd_export)


def cmd_merge(args: argparse.Namespace) -> int:
    from wronai.use.inference import quiet_third_party
    from wronai.use.merge import merge_run

    quiet_third_party()
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


def cmd_export(args: argparse.Namespace) -> int:
    from wronai.use.export import export_gguf
    from wronai.use.inference import quiet_third_party

    quiet_third_party()
    summary = export_gguf(args.target, args.out, outtype=args.outtype, base_model=args.base_model)
    size = summary.path.stat().st_size / 2**20
    sys.stdout.write(
        f"wrote {summary.path} ({summary.tensors} tensors, {summary.outtype}, {size:.1f} MiB; tokenizer {summary.tokenizer})\n"
    )
    return 0
