#!/usr/bin/env python3
"""Training speed, side by side in one run: the classic WronAI script vs `wronai train`.

    python benchmarks/train_speed.py [--rows 4000] [--hidden 384] [--layers 6] [--repeat 3] [--out /tmp/wronai-bench]
    python benchmarks/train_speed.py --defaults     # classic vs `wronai train` with a minimal config

Both train the same locally built Llama model with 4-bit NF4 QLoRA on the same generated Polish instruction
set (long-tailed answer lengths) for one epoch, i.e. the same examples:

(a) classic: a faithful reimplementation of the seed `scripts/train.py` — HF Trainer,
    `DataCollatorForLanguageModeling(mlm=False)` (pad = eos, per-batch dynamic padding, loss on all tokens),
    `prepare_model_for_kbit_training` (gradient checkpointing on, as in the classic config), length grouping.
(b) wronai: `wronai.recipe.run` with packing (per-example position ids), answer-only loss, gradient
    checkpointing `auto` (off for a model this small), bf16 only where the CPU has it.

(c) wronai-defaults (``--defaults``): the `wronai train` command with a minimal config — model, LoRA shape,
    quantization, epochs, learning rate, data, max length; no speed setting — in its own process; the
    automatic choices it logged (packing, batch, precision and kernels, checkpointing) are printed.

Printed per run: wall time, non-pad tokens per second, padding fraction, peak RSS, MFU against the best
matmul peak measured in this benchmark (before every round, in alternating fp32/bf16 windows; the FLOPs
of the positions the model ran: a prompt start computed once for several examples counts once), the
answer-only eval loss on the same held-out examples, and the minor page faults while training (buffers
touched again after the heap handed them back).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def matmul_peak(dtype_name: str, device: str = "cpu", seconds: float = 2.0) -> float:
    """FLOP/s of n x n products, timed in groups for `seconds`; the 10th-percentile group time counts, so a
    moment in which the shared machine runs something else does not lower the peak (a plain average did:
    94 GFLOP/s in one run against 121-181 in the others)."""
    import torch

    dtype, n = getattr(torch, dtype_name), 1024 if device == "cpu" else 8192
    group = 1 if device == "cpu" else 16  # one CPU product is ~10 ms (fp32) to ~2 s (emulated bf16)
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    times: list[float] = []
    begin = time.perf_counter()
    while not times or time.perf_counter() - begin < seconds:
        tick = time.perf_counter()
        for _ in range(group):
            a @ b
        sync()
        times.append(time.perf_counter() - tick)
    times.sort()
    return 2 * n**3 * group / times[len(times) // 10]


def machine_peaks(device: str, windows: int = 3, seconds: float = 1.0) -> dict[str, float]:
    """The best matmul peak (GFLOP/s) per dtype over ``windows`` alternating windows of ``seconds``.

    A shared machine runs whole windows slower: on a 2-core AMX-BF16 Xeon, consecutive 1-s bf16 windows
    read 445, 453, 455 and 1131 GFLOP/s. MFU is taken against the best window of the whole benchmark —
    what the machine can do — so a slow moment lowers a run's MFU instead of inflating it.
    """
    best = {"float32": 0.0, "bfloat16": 0.0}
    for _ in range(windows):
        for dtype in best:
            best[dtype] = max(best[dtype], matmul_peak(dtype, device, seconds) / 1e9)
    return best


def make_data(path: Path, rows: int, seed: int = 0) -> None:
    """Polish instructions with a long-tailed answer length (lognormal number of sentences)."""
    source = [
        json.loads(line) for line in (REPO / "data/sample_pl/instructions.jsonl").read_text().splitlines()
    ]
    sentences = [s.strip() + "." for r in source for s in r["output"].split(".") if len(s.strip()) > 20]
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(rows):
            base = rng.choice(source)
            k = max(1, min(40, int(rng.lognormvariate(0.7, 0.9))))
            answer = " ".join(rng.choice(sentences) for _ in range(k))
            row = {"instruction": base["instruction"], "input": base.get("input", ""), "output": answer}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_model(out: Path, hidden: int, layers: int) -> None:
    from wronai.config.sections.model import TinyModelSpec
    from wronai.model.tiny import build_tiny_model

    spec = TinyModelSpec(
        tokenizer_data=[str(REPO / "data/sample_pl/corpus.txt"), str(REPO / "data/sample_pl/instructions.jsonl")],
        vocab_size=4000, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 16 * 16, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128), max_position_embeddings=2048,
    )  # fmt: skip
    build_tiny_model(spec, out)


def prepare(out: Path, rows: int, max_len: int, hidden: int, layers: int) -> list[int]:
    """The benchmark's model (``out/model``) and data (``out/train.jsonl``, 200 held-out rows in
    ``out/eval.jsonl``): only rows that fit ``max_len`` whole (the classic would truncate them). Returns the
    approximate token length of every training row."""
    out.mkdir(parents=True, exist_ok=True)
    build_model(out / "model", hidden, layers)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "model")
    make_data(out / "train.jsonl", rows, seed=0)
    make_data(out / "eval.jsonl", 200, seed=1)
    lengths: list[int] = []
    for name in ("train.jsonl", "eval.jsonl"):
        rows = [json.loads(x) for x in (out / name).read_text().splitlines()]
        sizes = [len(tok(r["instruction"] + r["input"] + r["output"])["input_ids"]) for r in rows]
        fits = [(r, n) for r, n in zip(rows, sizes) if n + 40 <= max_len]
        (out / name).write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r, _ in fits), encoding="utf-8"
        )
        if name == "train.jsonl":
            lengths = [n + 20 for _, n in fits]
    return lengths


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# ------------------------------------------------------------------------------------------- the two runs


def run_classic(model_dir: Path, train_file: Path, out: Path, args) -> dict:
    """The classic script: fp32 on a CPU; on a GPU bf16 compute and bf16 mixed precision, as GPU QLoRA
    scripts of its kind set them."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
        set_seed,
    )  # fmt: skip

    from wronai.data.formats import format_alpaca

    set_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.eos_token  # as the classic script does
    gpu = args.device == "cuda"
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16 if gpu else torch.float32)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quant, device_map={"": 0 if gpu else "cpu"}, dtype=torch.float32
    )
    model = prepare_model_for_kbit_training(model)  # gradient checkpointing on by default
    model = get_peft_model(
        model,
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    ds = load_dataset("json", data_files=str(train_file), split="train")

    def tokenize(batch):
        texts = []
        for ins, inp, outp in zip(batch["instruction"], batch["input"], batch["output"]):
            texts.append(
                "".join(t for t, _ in format_alpaca({"instruction": ins, "input": inp, "output": outp}))
            )
        return tok(texts, truncation=True, padding=False, max_length=args.max_len)

    ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names)
    targs = TrainingArguments(
        output_dir=str(out), num_train_epochs=1, per_device_train_batch_size=args.batch, learning_rate=2e-4,
        logging_steps=10, save_strategy="no", eval_strategy="no", report_to=[], use_cpu=not gpu, bf16=gpu,
        gradient_checkpointing=True, train_sampling_strategy="group_by_length", optim="adamw_torch",
        remove_unused_columns=False, disable_tqdm=True, seed=0,
    )  # fmt: skip
    collator = DataCollatorForLanguageModeling(tokenizer=tok, mlm=False)
    pad_stats = PaddingCounter(collator, tok.pad_token_id)
    trainer = Trainer(model=model, args=targs, train_dataset=ds, data_collator=pad_stats)
    faults, start = minor_faults(), time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    model.save_pretrained(out / "adapter")
    return {
        "wall_s": wall,
        **pad_stats.summary(),
        "gradient_checkpointing": True,
        "page_faults": minor_faults() - faults,
        "precision": "bf16" if gpu else "fp32",
    }


class PaddingCounter:
    """Wraps a collator and counts real vs padded tokens of every batch it makes."""

    def __init__(self, collator, pad_id: int, key: str = "attention_mask") -> None:
        self.collator, self.pad_id, self.key = collator, pad_id, key
        self.real = self.total = 0

    def __call__(self, features):
        batch = self.collator(features)
        if "attention_mask" in batch:
            self.real += int(batch["attention_mask"].sum())
        else:  # packed rows: padding is where labels and position restarts mark the pad block
            lengths = [len(f["input_ids"]) for f in features]
            self.real += sum(lengths)
        self.total += batch["input_ids"].numel()
        return batch

    def summary(self) -> dict:
        return {"tokens": self.real, "padding_fraction": 1 - self.real / max(self.total, 1)}


# wronai variants that switch one optimization off (for the ablation table); "wronai" has them all on
ABLATIONS = {
    "wronai": {},
    "wronai-masked-attention": {
        "model": {"attn_implementation": "sdpa"}
    },  # packed rows with one block-diagonal mask
    "wronai-all-logits": {"training": {"trained_logits_only": False}},  # logits at prompt positions too
    "wronai-unpacked": {
        "data": {"packing": False},
        "training": {"group_by_length": True},
    },  # padded, length-grouped rows
    "wronai-unfused": {
        "hardware": {"fused_lora": "off"}
    },  # PEFT's LoRA modules (wronai.kernels.fused_lora off)
    "wronai-checkpointing": {
        "training": {"gradient_checkpointing": True}
    },  # recompute activations as the classic does
    "wronai-checkpointing-half": {
        "training": {"gradient_checkpointing": True, "checkpoint_every_n_layers": 2}
    },  # recompute every 2nd decoder layer only
    "wronai-return-freed": {"hardware": {"return_freed_memory": "on"}},  # the 1B+ memory setting
    "wronai-stock-norms": {
        "hardware": {"fused_rms_norm": "off"}
    },  # transformers' RMSNorm modules (wronai.kernels.rms_norm off)
    "wronai-stock-loss": {
        "hardware": {"fused_cross_entropy": "off"}
    },  # the head's logits, then cross-entropy (wronai.kernels.cross_entropy off)
    "wronai-whole-last-layer": {
        "hardware": {"last_layer_trained_only": "off"}
    },  # the last decoder layer at every position (wronai.train.last_layer off)
    "wronai-per-call-dequant": {
        "quantization": {"keep_dequantized_mib": 0}
    },  # 4-bit weights dequantized in every forward and backward (wronai.kernels.dequantized off)
    "wronai-glibc-heap": {},  # glibc's own heap thresholds (wronai.runtime.heap.keep_freed_memory skipped)
}


def run_wronai(model_dir: Path, train_file: Path, out: Path, args) -> dict:
    from wronai.config import load_config
    from wronai.model.kbit import gradient_checkpointing_on
    from wronai.recipe import Pipeline

    raw = {
        "model": {"name": str(model_dir)},
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "quantization": {"load_in_4bit": True},
        "training": {
            "output_dir": str(out), "num_train_epochs": 1, "per_device_train_batch_size": max(1, round(args.batch * args.mean_len / args.max_len)),
            "gradient_accumulation_steps": 1, "learning_rate": 2e-4, "logging_steps": 10, "save_strategy": "no",
            "eval_strategy": "no", "gradient_checkpointing": "auto", "bf16": True, "seed": 0, "lr_scheduler_type": "linear",
        },
        "data": {"dataset_name": str(train_file), "max_seq_length": args.max_len, "packing": True, "eval_fraction": 0.0,
                 "cache_dir": str(out / "cache")},
        "logging": {"report_to": ["none"]},
        "hardware": {"device": args.device},
    }  # fmt: skip
    for group, values in ABLATIONS[args.child].items():
        raw[group].update(values)
    if args.child == "wronai-glibc-heap":
        from wronai.runtime import heap

        heap.keep_freed_memory = lambda: False
    if not raw["data"]["packing"]:
        raw["training"]["per_device_train_batch_size"] = args.batch
    pipeline = Pipeline(load_config(data=raw))
    pipeline.load_dataset()
    trainer = pipeline.build_trainer()
    counter = PaddingCounter(trainer.data_collator, pipeline.tokenizer.pad_token_id)
    trainer.data_collator = counter
    faults, start = minor_faults(), time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    faults = minor_faults() - faults
    pipeline.model.save_pretrained(out / "adapter")
    checkpointing = gradient_checkpointing_on(pipeline.model)  # what auto decided
    return {"wall_s": wall, **counter.summary(), "gradient_checkpointing": checkpointing,
            "precision": pipeline.plan.precision, "page_faults": faults}  # fmt: skip


MINIMAL_CONFIG_NOTES = (
    "auto ->", "auto:", "precision:", "LoRA layers", "4-bit", "RMSNorm", "RoPE", "cross-entropy:", "data.packing", "hardware:",
    "last decoder layer:", "packed batches:", "attention:", "attention kernel:",
)  # fmt: skip


def minimal_config(model_dir: Path, train_file: Path, out: Path, max_len: int, device: str) -> dict:
    """The minimal config, as a user copies it: only what the job is — model, LoRA shape, 4-bit, one epoch,
    learning rate, data, max length — and no speed setting (`benchmarks/step_budget.py` trains it too)."""
    return {
        "model": {"name": str(model_dir)},
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "quantization": {"load_in_4bit": True},
        "training": {"output_dir": str(out), "num_train_epochs": 1, "learning_rate": 2e-4, "seed": 0,
                     "save_strategy": "no", "eval_strategy": "no"},
        "data": {"dataset_name": str(train_file), "max_seq_length": max_len, "eval_fraction": 0.0,
                 "cache_dir": str(out.parent / "cache-defaults")},
        "logging": {"report_to": ["none"], "report": False},
        "hardware": {"device": device},
    }  # fmt: skip


def run_defaults(model_dir: Path, train_file: Path, out: Path, args) -> dict:
    """`wronai train` on a minimal config, as a user copies it: only what the job is, no speed settings."""
    import yaml

    config = minimal_config(model_dir, train_file, out, args.max_len, args.device)
    out.mkdir(parents=True, exist_ok=True)
    path = out.parent / "minimal.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "wronai", "train", str(path), "--overwrite"],
        capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )  # fmt: skip
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"wronai train failed ({proc.returncode})")
    choices = [
        line.split(": ", 1)[-1]
        for line in proc.stderr.splitlines()
        if any(k in line for k in MINIMAL_CONFIG_NOTES)
    ]
    results = json.loads((out / "train_results.json").read_text())
    stats = json.loads((out / "data_stats.json").read_text())
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    # the share of tokens computed once for several examples (a shared prompt start) at the last log entry:
    # MFU counts the positions the model computed
    last = [h for h in history if "tokens_seen" in h][-1:] or [{"tokens_seen": 1}]
    shared = last[0].get("tokens_shared", 0) / last[0]["tokens_seen"]
    (out / "adapter").mkdir(exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (out / "adapter" / name).write_bytes((out / name).read_bytes())
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"wall_s": results["train_runtime"], "tokens": stats["total_tokens"], "padding_fraction": 0.0,
            "computed_tokens": stats["total_tokens"] * (1 - shared),
            "precision": _precision_taken(out, choices), "choices": choices, "child_peak_rss_mb": peak}  # fmt: skip


def _precision_taken(out: Path, choices: list[str]) -> str:
    """The precision the run trained in: its saved autotune decision, else the logged precision choice
    (a timed line names both candidates, so only its start tells which one was taken)."""
    decision = out / "wronai_autotune.json"
    if decision.is_file():
        return json.loads(decision.read_text())["precision"]
    taken = [c.split("precision: ", 1)[1] for c in choices if "precision: " in c]
    return "bf16" if taken and taken[0].startswith("bf16") else "fp32"


def eval_loss(model_dir: Path, adapter: Path, eval_file: Path, max_len: int) -> float:
    """Answer-only loss on held-out examples (the same measure for both adapters)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from wronai.config.sections.data import DataSection
    from wronai.config.sections.model import ModelConfig
    from wronai.config.sections.polish import PolishSection
    from wronai.data import PaddingCollator, build_datasets
    from wronai.model.tokenizer import load_tokenizer

    tok, _ = load_tokenizer(ModelConfig(name=str(model_dir)), PolishSection())
    data = build_datasets(
        DataSection(dataset_name=str(eval_file), max_seq_length=max_len, eval_fraction=0.0),
        tok,
        use_cache=False,
    )
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
    collate = PaddingCollator(tok.pad_token_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data.train), 16):
            batch = collate([data.train[j] for j in range(i, min(i + 16, len(data.train)))])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[
                :, :-1
            ]
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += int((labels != -100).sum())
    return total / max(count, 1)


def flops_per_token(model_dir: Path, seq: int) -> float:
    """~4·N per token for LoRA (forward 2N + backward activations 2N; no weight grads for frozen weights) + attention."""
    cfg = json.loads((model_dir / "config.json").read_text())
    h, layers, inter, vocab = (
        cfg["hidden_size"],
        cfg["num_hidden_layers"],
        cfg["intermediate_size"],
        cfg["vocab_size"],
    )
    kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter
    n = layers * per_layer + h * vocab  # lm_head counts; the embedding lookup does not
    attention = 4 * layers * h * seq / 2  # causal QK^T and AV, forward ×2 for backward
    return 4 * n + 2 * attention


def child(args) -> None:
    """One measured run in a fresh process (clean peak RSS)."""
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    fn = {"classic": run_classic, "wronai-defaults": run_defaults}.get(args.child, run_wronai)
    result = fn(out / "model", out / "train.jsonl", out / args.child, args)
    result["peak_rss_mb"] = result.pop("child_peak_rss_mb", None) or peak_rss_mb()
    if args.device == "cuda":
        import torch

        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result["eval_loss"] = eval_loss(
        out / "model", out / args.child / "adapter", out / "eval.jsonl", args.max_len
    )
    (out / f"{args.child}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rows",
        type=int,
        default=4000,
        help="generated training rows (several thousand: the issue's default data)",
    )
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument(
        "--batch", type=int, default=8, help="classic rows per step; wronai packs the same tokens per step"
    )
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--out", default="/tmp/wronai-bench")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where both runs train (auto: cuda when a GPU is visible); eval runs on the CPU")  # fmt: skip
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of all variants, alternating (the machine's speed drifts)",
    )
    parser.add_argument(
        "--variants",
        default="classic,wronai",
        help=f"comma-separated runs: classic and any of {', '.join(ABLATIONS)} (ablations switch one optimization off)",
    )
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="compare the classic script with `wronai train` on a minimal config (variants classic,wronai-defaults)",
    )
    parser.add_argument("--child", choices=["classic", "wronai-defaults", *ABLATIONS], help=argparse.SUPPRESS)
    parser.add_argument("--mean-len", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        child(args)
        return
    out = Path(args.out)
    lengths = prepare(out, args.rows, args.max_len, args.hidden, args.layers)
    mean_len = int(sum(lengths) / len(lengths))
    peaks = machine_peaks(args.device)
    variants = [
        v.strip()
        for v in ("classic,wronai-defaults" if args.defaults else args.variants).split(",")
        if v.strip()
    ]
    unknown = sorted(set(variants) - {"classic", "wronai-defaults", *ABLATIONS})
    if unknown or "classic" not in variants or not ({"wronai", "wronai-defaults"} & set(variants)):
        parser.error(f"--variants must include classic and wronai; unknown: {', '.join(unknown) or 'none'}")
    fpt = flops_per_token(out / "model", mean_len)
    rounds = []  # each round runs every variant once, in order, after measuring the matmul peaks again
    for index in range(args.repeat):
        round_peaks = peaks if index == 0 else machine_peaks(args.device, windows=1)
        peaks = {d: max(peaks[d], round_peaks[d]) for d in peaks}
        results = {}
        for name in variants:
            cmd = [sys.executable, __file__, "--child", name, "--out", str(out), "--rows", str(args.rows), "--batch", str(args.batch),
                   "--max-len", str(args.max_len), "--mean-len", str(mean_len), "--device", args.device]  # fmt: skip
            subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            results[name] = json.loads((out / f"{name}.json").read_text())
        rounds.append({"peaks_gflops": round_peaks, "results": results})
    for round_ in rounds:  # MFU against the best peak seen over the whole benchmark
        score_round(round_["results"], peaks, fpt)
    text = render_rounds(rounds, peaks, args, mean_len)
    sys.stdout.write(text + "\n")
    (out / "results.json").write_text(json.dumps({"rounds": rounds, "peaks_gflops": peaks}, indent=2))


def score_round(results: dict, peaks: dict, fpt: float) -> None:
    """tokens/s, MFU (against the benchmark's best matmul peak) and the ratio to this round's classic run."""
    classic = results["classic"]["tokens"] / results["classic"]["wall_s"]
    for r in results.values():
        tps = r["tokens"] / r["wall_s"]
        peak = peaks["bfloat16"] if r.get("precision") == "bf16" else peaks["float32"]
        computed = r.get("computed_tokens", r["tokens"]) / r["wall_s"]  # a shared prompt start counts once
        r.update(tokens_per_s=tps, mfu=computed * fpt / (peak * 1e9), vs_classic=tps / classic)


def render_rounds(rounds: list[dict], peaks: dict, args, mean_len: int) -> str:
    lines = [
        f"machine: {os.cpu_count()} cores, training on {args.device}; best matmul peak fp32 {peaks['float32']:.0f} GFLOP/s, bf16 {peaks['bfloat16']:.0f} GFLOP/s (MFU against these)",
        f"data: {args.rows} rows, mean {mean_len} tokens/row, max_len {args.max_len}; model: hidden {args.hidden}, {args.layers} layers",
        "",
        f"{'run':28} {'wall s':>8} {'tokens/s':>9} {'padding':>8} {'peak RSS MB':>12} {'MFU':>6} {'eval loss':>10} {'vs classic':>10} {'faults k':>9} {'CUDA MB':>8}",
    ]
    for index, round_ in enumerate(rounds):
        tag = f" #{index + 1}" if len(rounds) > 1 else ""
        if len(rounds) > 1:
            got = round_["peaks_gflops"]
            lines.append(
                f"round {index + 1}: matmul peak before it fp32 {got['float32']:.0f}, bf16 {got['bfloat16']:.0f} GFLOP/s"
            )
        for name, r in round_["results"].items():
            lines.append(f"{name + tag:28} {r['wall_s']:8.1f} {r['tokens_per_s']:9.0f} {100 * r['padding_fraction']:7.1f}% "
                         f"{r['peak_rss_mb']:12.0f} {100 * r['mfu']:5.1f}% {r['eval_loss']:10.4f} {r['vs_classic']:9.2f}x {r.get('page_faults', 0) / 1000:9.0f} {r.get('peak_cuda_mb', 0):8.0f}")  # fmt: skip
    main = "wronai" if "wronai" in rounds[0]["results"] else "wronai-defaults"
    ratios = sorted(r["results"][main]["vs_classic"] for r in rounds)
    mfus = sorted(r["results"][main]["mfu"] for r in rounds)
    memory = [r["results"][main]["peak_rss_mb"] / r["results"]["classic"]["peak_rss_mb"] for r in rounds]
    for choice in rounds[0]["results"].get("wronai-defaults", {}).get("choices", []):
        lines.append(f"  wronai-defaults chose: {choice}")
    lines.append(f"\nspeed-up (tokens/s, {main} / classic): median {statistics.median(ratios):.2f}x "
                 f"(min {ratios[0]:.2f}x, max {ratios[-1]:.2f}x over {len(rounds)} round(s)); "
                 f"{main} MFU median {100 * statistics.median(mfus):.1f}%; memory ratio: {max(memory):.2f}")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
