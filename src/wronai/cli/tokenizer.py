"""`wronai tokenizer stats|train|extend`: measure, train and extend Polish tokenizers."""

from __future__ import annotations

import argparse
import json
import sys

from wronai.cli.common import add_command
from wronai.errors import WronAIError

EPILOG = """examples:
  wronai tokenizer stats runs/tiny-model runs/pl-bpe                    # on data/eval_pl/*.txt
  wronai tokenizer stats runs/tiny-model --data my_text.txt --json
  wronai tokenizer train --data data/sample_pl/corpus.txt --vocab-size 4000 --out runs/pl-bpe
  wronai tokenizer extend runs/tiny-model --data data/sample_pl/*.jsonl --add 300 --out runs/tiny-ext
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenizer",
        help="measure, train and extend Polish tokenizers",
        description="Polish tokenization tools: statistics (fertility, characters per token, byte fallback), "
        "training a Polish byte-level BPE, and extending an existing tokenizer with Polish tokens.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")

    s = add_command(
        tsub,
        "stats",
        cmd_stats,
        help="fertility, characters per token, byte fallback, most fragmented words",
        description="Tokenize Polish text with each tokenizer and print the statistics side by side.",
    )
    s.add_argument("tokenizers", nargs="+", metavar="TOKENIZER", help="local tokenizer or model directories")
    _add_data(s, "text/JSONL files (default: the bundled data/eval_pl/*.txt)", required=False)
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--top", type=int, default=5, help="most fragmented frequent words to show per tokenizer")

    t = add_command(
        tsub,
        "train",
        cmd_train,
        help="train a Polish byte-level BPE tokenizer",
        description="Train a byte-level BPE (no unknown tokens) with NFC normalization and Polish-aware "
        "pre-tokenization; save it as a Hugging Face fast tokenizer (AutoTokenizer loads it).",
    )
    _add_data(t, "text/JSONL files to train on")
    t.add_argument("--vocab-size", type=int, required=True, help="vocabulary size (more than 259)")
    t.add_argument("--min-frequency", type=int, default=2, help="a pair must occur this often to be merged")
    _add_out(t)

    e = add_command(
        tsub,
        "extend",
        cmd_extend,
        help="add the most useful Polish tokens to an existing tokenizer",
        description="Continue BPE from BASE's vocabulary on --data: add the --add merges that save the most "
        "tokens. Writes the tokenizer and wronai_extension.json (each new token and its base token ids).",
    )
    e.add_argument("base", metavar="BASE", help="local tokenizer or model directory (a BPE fast tokenizer)")
    _add_data(e, "Polish text/JSONL files to choose tokens on")
    e.add_argument("--add", type=int, required=True, help="how many tokens to add")
    _add_out(e)

    p.set_defaults(func=lambda args: _help(p))


def _add_data(p: argparse.ArgumentParser, help: str, required: bool = True) -> None:
    p.add_argument("--data", nargs="+", required=required, metavar="FILE", help=help)


def _add_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="directory to write")


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def cmd_stats(args: argparse.Namespace) -> int:
    from wronai.tokenizers.polish import (
        column_names,
        format_stats_table,
        load_tokenizer_dir,
        read_texts,
        resolve_data,
        tokenizer_stats,
    )

    if args.top < 0:
        raise WronAIError(f"--top: {args.top} is negative — pass 0 or more")
    files = resolve_data(args.data)
    texts = read_texts(files)
    names = column_names(args.tokenizers)
    stats = [
        tokenizer_stats(load_tokenizer_dir(path), texts, name, top=max(args.top, 1))
        for path, name in zip(args.tokenizers, names)
    ]
    if args.json:
        payload = {
            "data": files,
            "tokenizers": [{"path": p, **s.to_dict()} for p, s in zip(args.tokenizers, stats)],
        }
        sys.stdout.write(json.dumps(payload, ensure_ascii=False, indent=1) + "\n")
    else:
        sys.stdout.write(f"data: {', '.join(files)}\n\n" + format_stats_table(stats, top=args.top))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from wronai.tokenizers.polish import read_texts, resolve_data, train_polish_tokenizer

    files = resolve_data(args.data)
    tokenizer = train_polish_tokenizer(read_texts(files), args.vocab_size, min_frequency=args.min_frequency)
    tokenizer.save_pretrained(args.out)
    sys.stdout.write(f"saved a {len(tokenizer):,}-token Polish byte-level BPE tokenizer to {args.out}\n")
    return 0


def cmd_extend(args: argparse.Namespace) -> int:
    from wronai.tokenizers.extend import extend_with_data, save_extension
    from wronai.tokenizers.polish import load_tokenizer_dir, read_texts, resolve_data

    if args.add < 1:
        raise WronAIError(f"--add: {args.add} — pass a positive number of tokens")
    base = load_tokenizer_dir(args.base, "BASE")
    files = resolve_data(args.data)
    extended, new_tokens = extend_with_data(base, read_texts(files), args.add)
    save_extension(extended, new_tokens, args.out, args.base, files)
    out = sys.stdout
    out.write(
        f"added {len(new_tokens)} tokens to {args.base} ({len(base):,} -> {len(extended):,}); saved to {args.out}\n"
    )
    if new_tokens:
        shown = ", ".join(repr(t.text) for t in new_tokens[:12])
        out.write(f"first new tokens (most tokens saved first): {shown}\n")
    return 0
