"""Fertility of Polish tokenizers on the held-out data/eval_pl text: base vs extended vs freshly trained.

Three tokenizers, side by side (the same table as `wronai tokenizer stats`):

- ``base``: the tiny byte-level BPE WronAI builds for its offline model (``wronai.model.tiny.train_tokenizer``,
  trained on data/sample_pl/corpus.txt), or any local tokenizer given with ``--base DIR``;
- ``extended``: ``base`` + ``--add`` tokens chosen on data/sample_pl/ (``wronai tokenizer extend``);
- ``polish-bpe``: a Polish byte-level BPE trained on data/sample_pl/ with the extended vocabulary's size
  (``wronai tokenizer train``).

Tokens are chosen / trained on data/sample_pl/ only; data/eval_pl/ shares no 8-word sequence with it.

    python benchmarks/tokenizer_fertility.py                 # base 500 tokens, +300
    python benchmarks/tokenizer_fertility.py --base-vocab 2000 --add 1000 --json
    python benchmarks/tokenizer_fertility.py --base path/to/model_or_tokenizer --add 2000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = [
    str(REPO / "data" / "sample_pl" / name) for name in ("corpus.txt", "instructions.jsonl", "chat.jsonl")
]
EVAL = sorted(str(p) for p in (REPO / "data" / "eval_pl").glob("*.txt"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--base", default=None, help="local tokenizer directory (default: build the tiny base tokenizer)"
    )
    parser.add_argument("--base-vocab", type=int, default=500, help="vocabulary of the tiny base tokenizer")
    parser.add_argument("--add", type=int, default=300, help="tokens added to the base")
    parser.add_argument("--top", type=int, default=3, help="most fragmented words shown per tokenizer")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from wronai.errors import WronAIError
    from wronai.model.tiny import train_tokenizer
    from wronai.tokenizers.extend import extend_with_data
    from wronai.tokenizers.polish import (
        format_stats_table,
        load_tokenizer_dir,
        read_texts,
        tokenizer_stats,
        train_polish_tokenizer,
    )

    start = time.perf_counter()
    train_texts, eval_texts = read_texts(SAMPLE), read_texts(EVAL)
    if args.base:
        try:
            base = load_tokenizer_dir(args.base, "--base")
        except WronAIError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    else:
        base = train_tokenizer(read_texts(SAMPLE[:1]), args.base_vocab)
    extended, new_tokens = extend_with_data(base, train_texts, args.add)
    polish = train_polish_tokenizer(train_texts, len(extended))
    tokenizers = {"base": base, "extended": extended, "polish-bpe": polish}
    stats = [tokenizer_stats(tok, eval_texts, name, top=max(args.top, 1)) for name, tok in tokenizers.items()]
    elapsed = time.perf_counter() - start
    if args.json:
        print(
            json.dumps(
                {
                    "eval": EVAL,
                    "added": len(new_tokens),
                    "seconds": round(elapsed, 1),
                    "tokenizers": [s.to_dict() for s in stats],
                },
                ensure_ascii=False,
                indent=1,
            )
        )
    else:
        print(
            f"eval text: data/eval_pl/*.txt ({len(eval_texts)} paragraphs); tokens chosen/trained on data/sample_pl/"
        )
        print(
            f"base: {args.base or f'tiny byte-level BPE, {args.base_vocab} tokens, data/sample_pl/corpus.txt'}; +{len(new_tokens)} tokens\n"
        )
        print(format_stats_table(stats, top=args.top), end="")
        print(f"\n({elapsed:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
