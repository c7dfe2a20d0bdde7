"""Loss and perplexity of a run (or a plain model) on the run's eval split or on given data files.

The eval split is rebuilt from the run's saved config with the data stage's own ``build_datasets``: same
split seed, prompt template, masking and ``max_seq_length`` as in training. Data files go through the same
stage (any supported format, detected from the columns; raw text is scored on every token). The loss is the
mean negative log-likelihood per scored (unmasked) token over the whole set — token-weighted, not a mean of
batch means — and perplexity is ``exp(loss)``. With ``base=True`` the same model is also scored with the
adapter switched off, so the gain reads as one line: ``base ppl X → tuned ppl Y``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from wronai.config.sections.data import DataSection
from wronai.errors import WronAIError
from wronai.rundir.files import CONFIG_FILE, EVAL_FILE
from wronai.rundir.reading import read_json
from wronai.use.load import LoadedRun, load_run

logger = logging.getLogger(__name__)

EVAL_SPLIT = "eval split"


@dataclass
class Score:
    loss: float
    perplexity: float


@dataclass
class EvalReport:
    data: str
    examples: int
    tokens: int
    scores: dict[str, Score] = field(default_factory=dict)  # tuned / base, or model for a plain model
    model: str = ""
    quantization: str = "none"

    def lines(self) -> list[str]:
        out = [f"{self.data}: {self.examples} examples, {self.tokens} scored tokens"]
        s = self.scores
        if "base" in s and "tuned" in s:
            change = 100 * (s["tuned"].perplexity / s["base"].perplexity - 1)
            out.append(
                f"base ppl {s['base'].perplexity:.3f} → tuned ppl {s['tuned'].perplexity:.3f} ({change:+.1f}%; "
                f"loss {s['base'].loss:.4f} → {s['tuned'].loss:.4f})"
            )
        else:
            out += [f"{name} ppl {score.perplexity:.3f} (loss {score.loss:.4f})" for name, score in s.items()]
        return out

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return data


def eval_data_section(run_data: DataSection | None, files: list[str]) -> DataSection:
    """The run's data settings pointed at ``files`` (whole files scored, format detected, bad rows skipped)."""
    for name in files:
        if not Path(name).expanduser().exists():
            raise WronAIError(f"--data: {name} not found — pass a local .jsonl/.json/.csv/.parquet/.txt file")
    base = run_data or DataSection(dataset_name=files[0])
    return base.model_copy(
        update={
            "dataset_name": [str(Path(f).expanduser().resolve()) for f in files]
            if len(files) > 1
            else str(Path(files[0]).expanduser().resolve()),
            "format": "auto",
            "train_split": "train",
            "eval_split": None,
            "eval_fraction": 0.0,
            "max_samples": None,
            "packing": False,
            "on_bad_row": "skip",
        }
    )


def build_eval_dataset(run: LoadedRun, files: list[str] | None) -> tuple[Any, str]:
    """(tokenized dataset with input_ids/labels, description) for the eval split or the given files."""
    from wronai.config.extensions import load_object
    from wronai.data import build_datasets

    cfg = run.dir.config
    hook = (
        load_object(cfg.extensions.data_hook, "extensions.data_hook")
        if cfg and cfg.extensions.data_hook
        else None
    )
    seed = cfg.training.seed if cfg else 42
    if files:
        prepared = build_datasets(
            eval_data_section(cfg.data if cfg else None, files), run.tokenizer, seed, hook
        )
        if prepared.stats.skipped:
            logger.warning(
                "--data: skipped rows: %s (first: %s)",
                prepared.stats.skipped,
                next(iter(prepared.stats.skipped_examples.values()), ""),
            )
        return prepared.train, ", ".join(files)
    if cfg is None:
        raise WronAIError(f"{run.path} has no {CONFIG_FILE}, so its eval split is unknown — pass --data FILE")
    prepared = build_datasets(cfg.data, run.tokenizer, seed, hook)
    if prepared.eval is None:
        raise WronAIError(
            f"{run.path}: the run has no eval split (data.eval_fraction is 0 and there is no data.eval_split) — pass --data FILE"
        )
    return prepared.eval, EVAL_SPLIT


def score(model: Any, dataset: Any, pad_token_id: int, batch_size: int = 8) -> tuple[Score, int]:
    """Token-weighted mean NLL over the labelled tokens of ``dataset``; returns (score, number of tokens)."""
    import torch
    import torch.nn.functional as F

    from wronai.data.collate import PaddingCollator
    from wronai.data.tokenize import IGNORE_INDEX

    collate = PaddingCollator(pad_token_id=pad_token_id)
    lengths = (
        dataset["length"] if "length" in dataset.column_names else [len(x) for x in dataset["input_ids"]]
    )
    ordered = dataset.select(sorted(range(len(dataset)), key=lengths.__getitem__))  # less padding per batch
    device = next(model.parameters()).device
    total, count = 0.0, 0
    n_batches = math.ceil(len(ordered) / batch_size)
    with torch.inference_mode():
        for b, start in enumerate(range(0, len(ordered), batch_size)):
            part = ordered[start : start + batch_size]
            batch = collate(
                [
                    {"input_ids": i, "labels": lab}
                    for i, lab in zip(part["input_ids"], part["labels"], strict=True)
                ]
            )
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
            labels = batch["labels"][:, 1:].to(device)
            nll = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            total += float(nll)
            count += int((labels != IGNORE_INDEX).sum())
            if n_batches >= 10 and (b + 1) % max(1, n_batches // 5) == 0:
                logger.info("eval: batch %d/%d", b + 1, n_batches)
    if count == 0:
        raise WronAIError(
            "the evaluation data has no scored tokens (every label is masked) — check the data format"
        )
    loss = total / count
    return Score(loss=loss, perplexity=math.exp(min(loss, 700.0))), count


def evaluate(
    path: str | Path,
    files: list[str] | None = None,
    *,
    base: bool = False,
    batch_size: int | None = None,
    limit: int | None = None,
    base_model: str | None = None,
    quantize: bool = True,
    run: LoadedRun | None = None,
) -> EvalReport:
    """Score a run (and, with ``base``, its base model) or a plain model directory."""
    run = run or load_run(path, base_model=base_model, quantize=quantize)
    dataset, described = build_eval_dataset(run, files)
    if limit:
        dataset = dataset.select(range(min(limit, len(dataset))))
    cfg = run.dir.config
    size = batch_size or (cfg.training.per_device_eval_batch_size if cfg else 8)
    report = EvalReport(
        data=described,
        examples=len(dataset),
        tokens=0,
        model=str(run.dir.base_name),
        quantization=run.quantization,
    )
    pad = run.tokenizer.pad_token_id
    if run.dir.is_adapter:
        if base:
            with run.model.disable_adapter():
                report.scores["base"], report.tokens = score(run.model, dataset, pad, size)
        report.scores["tuned"], report.tokens = score(run.model, dataset, pad, size)
    else:
        if base:
            logger.info("%s is a plain model: scoring it alone (--base applies to runs)", run.path)
        report.scores["model"], report.tokens = score(run.model, dataset, pad, size)
    return report


def save_report(report: EvalReport, out_file: str | Path) -> Path:
    """Add (or replace, by data description) this result in an eval.json file."""
    out = Path(out_file)
    existing = read_json(out) or {}
    results = [r for r in existing.get("results", []) if r.get("data") != report.data]
    results.append(report.to_json())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results}, indent=2, ensure_ascii=False), encoding="utf-8")
    return out


def load_results(run_dir: str | Path) -> list[dict[str, Any]]:
    """The results stored in ``run_dir/eval.json`` (empty when there is none)."""
    return list((read_json(Path(run_dir) / EVAL_FILE) or {}).get("results", []))
