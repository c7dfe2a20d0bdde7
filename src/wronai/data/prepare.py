"""The data stage: raw rows -> formatted segments -> tokenized, masked, checked (and packed) datasets.

``build_datasets(data_cfg, tokenizer, seed)`` is the one entry point. Results are cached on disk
(:mod:`wronai.data.cache`), so changing the data, tokenizer, config, seed, data code or data hook
prepares the data again.
"""

from __future__ import annotations

import logging
from typing import Any

from wronai.config.sections.data import DataSection
from wronai.config.sections.polish import NormalizeSpec
from wronai.data import checks, formats
from wronai.data.cache import cache_key, cache_root, load_cached, save_cached
from wronai.data.collate import pack_examples, padding_fraction
from wronai.data.encode import (
    DataHook,
    RowFormatter,
    encode_rows,
    length_stats,
    make_encoder,
    make_row_formatter,
    to_dataset,
)
from wronai.data.formats import BadRow
from wronai.data.sources import BadRowPolicy
from wronai.data.split import gather_rows
from wronai.data.stats import DataStats, PreparedData
from wronai.errors import DataError

logger = logging.getLogger(__name__)


def build_datasets(
    data_cfg: DataSection,
    tokenizer: Any,
    seed: int = 42,
    data_hook: DataHook | None = None,
    use_cache: bool = True,
    normalize: NormalizeSpec | None = None,
) -> PreparedData:
    """Read, clean (``normalize`` = polish.normalize), mix, format, tokenize, mask, check and (optionally) pack; cached on disk."""
    key = cache_key(data_cfg, tokenizer, seed, data_hook, normalize)
    cached = cache_root(data_cfg) / key
    if use_cache and (cached / "stats.json").exists():
        loaded = load_cached(cached)
        if loaded is not None:
            logger.info("data: using prepared data from cache %s", cached)
            return loaded
    policy = BadRowPolicy(on_bad_row=data_cfg.on_bad_row)
    stats = DataStats(cache_key=key)
    train_rows, eval_rows, source = gather_rows(data_cfg, policy, seed, normalize, stats)
    stats.rows_read = {"train": len(train_rows), "eval": len(eval_rows)}
    fmt = stats.format
    row_fn = make_row_formatter(fmt, data_cfg, tokenizer)
    encoder = make_encoder(fmt, data_cfg, tokenizer, row_fn)
    train, wheres = encode_rows(train_rows, row_fn, encoder, fmt, data_cfg, policy, stats, data_hook)
    evals, _ = encode_rows(eval_rows, row_fn, encoder, fmt, data_cfg, policy, stats, data_hook)
    if not train:
        raise DataError(
            f"data: no usable training examples in {source} (skipped: {dict(policy.skipped) or 'none'}) — check data.format/data.columns"
        )
    stats.skipped = dict(policy.skipped)
    stats.skipped_examples = dict(policy.first)
    stats.examples = {"train": len(train), "eval": len(evals)}
    length_stats(train, stats)
    if data_cfg.checks:
        rows_total = len(train_rows) + len(eval_rows)
        results = run_checks(data_cfg, tokenizer, fmt, row_fn, train, wheres, train_rows, policy, rows_total)
        stats.checks = checks.summarize(results)
        checks.enforce(results)
    prepared = assemble(train, evals, stats, data_cfg)
    if use_cache:
        save_cached(prepared, cached)
    return prepared


def assemble(
    train: list[dict[str, list[int]]],
    evals: list[dict[str, list[int]]],
    stats: DataStats,
    data_cfg: DataSection,
) -> PreparedData:
    """The datasets: training examples packed into rows when data.packing is on (counted in ``stats``); an
    undecided ``auto`` (the recipe decides it, ``data.auto``) packs nothing."""
    packed_rows = pack_examples(train, data_cfg.max_seq_length) if data_cfg.packing is True else None
    if packed_rows is not None:
        stats.packed_rows = len(packed_rows)
        stats.padding_fraction_packed = padding_fraction([len(r["input_ids"]) for r in packed_rows], 8)
    return PreparedData(
        train=to_dataset(packed_rows if packed_rows is not None else train),
        eval=to_dataset(evals) if evals else None,
        stats=stats,
        packed=packed_rows is not None,
    )


def run_checks(
    data_cfg: DataSection,
    tokenizer: Any,
    fmt: str,
    row_fn: RowFormatter,
    train: list[dict[str, list[int]]],
    wheres: list[str],
    train_rows: list[dict],
    policy: BadRowPolicy,
    rows_total: int,
) -> dict[str, str | None]:
    """The pre-flight checks of :mod:`wronai.data.checks` on the tokenized (not yet packed) training examples."""
    samples = []
    if fmt == "chat":
        for row in train_rows[:20]:
            try:
                samples.append(formats.normalize_messages(formats.rename_columns(row, data_cfg.columns)))
            except BadRow:
                continue
            if len(samples) == 3:
                break
    return {
        "eos": checks.check_eos(train, wheres, tokenizer, fmt, data_cfg.chat_template, data_cfg.add_eos),
        "chat_template": checks.check_chat_template(
            fmt, data_cfg.chat_template, tokenizer, samples, row_fn.chat_renderer
        ),
        "too_long": checks.check_too_long(
            policy.skipped.get("too_long", 0),
            rows_total,
            data_cfg.max_truncated_share,
            data_cfg.max_seq_length,
            policy.first.get("too_long"),
        ),
    }
