"""`wronai init-model OUT_DIR --data FILE...`: a small local Llama and a Polish tokenizer, built offline."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from wronai.cli.common import add_command

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "init-model",
        cmd_init_model,
        help="build a small local Llama model + Polish tokenizer (offline)",
        description="Train a byte-level BPE tokenizer on local text and save a small randomly initialised Llama model, "
        "usable as model.name. Needs no network.",
    )
    p.add_argument("out_dir", help="directory to create")
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="text/JSONL files to train the tokenizer (and pre-training) on",
    )
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument(
        "--pretrain-steps", type=int, default=0, help="quick full-weight pre-training steps on --data"
    )


def cmd_init_model(args: argparse.Namespace) -> int:
    from wronai.config.sections.model import TinyModelSpec
    from wronai.model.tiny import build_tiny_model

    spec = TinyModelSpec(
        tokenizer_data=args.data,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.hidden_size * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=max(1, args.heads // 2),
        pretrain_steps=args.pretrain_steps,
    )
    out = build_tiny_model(spec, args.out_dir)
    logger.info("model ready: set model.name: %s", Path(out).resolve())
    return 0
