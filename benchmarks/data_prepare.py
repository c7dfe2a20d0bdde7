"""Time `build_datasets` on 100k short Polish alpaca rows with the tiny tokenizer (cache off).

Rows are generated (seeded) from Polish sentence parts, written as JSONL to a temporary directory, and
prepared once without and once with ``polish.normalize`` (NFC/quotes/dashes/spaces, near-dedupe, language).

    python benchmarks/data_prepare.py                  # 100k rows
    python benchmarks/data_prepare.py --rows 20000 --packing --json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SUBJECTS = ["Warszawa", "Kraków", "Gdańsk", "Wrocław", "Poznań", "Łódź", "Toruń", "Lublin", "Rzeszów", "Szczecin", "Wisła",
            "Tatry", "Mazury", "Bałtyk", "Kopernik", "Chopin", "Skłodowska", "Mickiewicz", "żubr", "bocian"]  # fmt: skip
VERBS = ["Opisz", "Wyjaśnij", "Streść", "Porównaj", "Scharakteryzuj", "Przedstaw", "Omów", "Oceń"]
TOPICS = [
    "historię",
    "znaczenie",
    "położenie",
    "kulturę",
    "przyrodę",
    "gospodarkę",
    "legendy",
    "zabytki",
    "klimat",
    "kuchnię",
]
PARTS = [
    "to ważny element polskiej historii", "przyciąga turystów z całego świata", "słynie z pięknych zabytków",
    "ma bogatą tradycję", "zachwyca przyrodą o każdej porze roku", "jest opisywany w wielu książkach",
    "inspirował pokolenia artystów", "odgrywa dużą rolę w gospodarce", "łączy przeszłość z nowoczesnością",
    "bywa tematem szkolnych wypracowań", "ma wiele ciekawych legend", "zmienia się z każdym rokiem",
]  # fmt: skip
QUOTES = ["„", "”", "—", "\u00a0", "  "]


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        subject = rng.choice(SUBJECTS)
        sentences = [
            f"{subject} {rng.choice(PARTS)}{rng.choice(QUOTES) if rng.random() < 0.2 else ''}."
            for _ in range(rng.randint(1, 3))
        ]
        rows.append(
            {
                "instruction": f"{rng.choice(VERBS)} {rng.choice(TOPICS)}: {subject} (pytanie {i}).",
                "input": "" if rng.random() < 0.7 else f"Kontekst: {rng.choice(PARTS)}.",
                "output": " ".join(sentences),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from wronai.config.sections.data import DataSection
    from wronai.config.sections.polish import NormalizeSpec
    from wronai.data.prepare import build_datasets
    from wronai.model.tiny import train_tokenizer
    from wronai.model.tokenizer import set_pad_token

    rows = make_rows(args.rows)
    texts = [r["instruction"] + "\n" + r["output"] for r in rows[:5000]]
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(texts, vocab_size=2000)
    set_pad_token(tokenizer)
    tokenizer_s = time.perf_counter() - t0
    results = {"rows": args.rows, "tokenizer_build_s": round(tokenizer_s, 2), "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "alpaca.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        cfg = DataSection(
            dataset_name=str(path),
            max_seq_length=args.max_seq_length,
            eval_fraction=0.01,
            packing=args.packing,
        )
        variants = {
            "plain": None,
            "hygiene": NormalizeSpec(
                enabled=True, dedupe="near", near_threshold=0.9, min_chars=10, language="pl"
            ),
        }
        for name, normalize in variants.items():
            t0 = time.perf_counter()
            prepared = build_datasets(cfg, tokenizer, seed=42, use_cache=False, normalize=normalize)
            seconds = time.perf_counter() - t0
            results[name] = {
                "seconds": round(seconds, 2),
                "rows_per_s": round(args.rows / seconds),
                "train_examples": len(prepared.train),
                "hygiene": prepared.stats.hygiene,
            }
    if args.json:
        sys.stdout.write(json.dumps(results, indent=2) + "\n")
    else:
        sys.stdout.write(
            f"{args.rows} alpaca rows, tiny tokenizer (built in {tokenizer_s:.1f} s), {os.cpu_count()} CPUs, cache off\n"
        )
        for name in variants:
            r = results[name]
            extra = f"; hygiene {r['hygiene']}" if r["hygiene"] else ""
            sys.stdout.write(
                f"  {name:8s} {r['seconds']:7.2f} s  {r['rows_per_s']:8d} rows/s  {r['train_examples']} train examples{extra}\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
