"""Training and eval rows: read from the sources, cleaned (polish.normalize), mixed by data.weights and split."""

from __future__ import annotations

import random

from wronai.config.sections.data import DataSection
from wronai.config.sections.polish import NormalizeSpec
from wronai.data import formats, hygiene
from wronai.data.mix import mix_rows
from wronai.data.sources import BadRowPolicy, RawData, read_raw
from wronai.data.stats import DataStats
from wronai.errors import DataError


def gather_rows(
    data_cfg: DataSection, policy: BadRowPolicy, seed: int, normalize: NormalizeSpec | None, stats: DataStats
) -> tuple[list[dict], list[dict], str]:
    """Training and eval rows: read, cleaned (polish.normalize), mixed by data.weights and split; sets stats.format."""
    names = data_cfg.dataset_names
    if data_cfg.weights is None:
        sources = [read_raw(data_cfg.dataset_name, data_cfg.dataset_config, data_cfg.cache_dir, policy)]
    else:
        sources = [read_raw(name, data_cfg.dataset_config, data_cfg.cache_dir, policy) for name in names]
    for raw in sources:
        _require_train_split(raw, data_cfg)
    sample = next((s.splits[data_cfg.train_split] for s in sources if s.splits.get(data_cfg.train_split)), [])
    stats.format = resolve_format(data_cfg, sample)
    if normalize is not None and normalize.enabled:
        keys = [
            (i, split)
            for i, s in enumerate(sources)
            for split in sorted(s.splits, key=lambda k: k != data_cfg.train_split)
        ]
        cleaned, stats.hygiene = hygiene.clean_rows(
            [sources[i].splits[split] for i, split in keys],
            normalize,
            stats.format,
            data_cfg.columns,
            data_cfg.text_column,
        )
        for (i, split), rows in zip(keys, cleaned, strict=True):
            sources[i].splits[split] = rows
    if data_cfg.weights is None:
        train, evals = select_splits(sources[0], data_cfg, seed)
        return train, evals, sources[0].source
    parts = [split_rows(s, data_cfg, seed) for s in sources]
    train, stats.mix = mix_rows([t for t, _ in parts], data_cfg.weights, names, seed, data_cfg.max_samples)
    return train, [row for _, e in parts for row in e], ", ".join(names)


def select_splits(raw: RawData, data_cfg: DataSection, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and eval rows of one source, training rows capped at data.max_samples."""
    train, evals = split_rows(raw, data_cfg, seed)
    if data_cfg.max_samples:
        train = train[: data_cfg.max_samples]
    return train, evals


def _require_train_split(raw: RawData, data_cfg: DataSection) -> None:
    if data_cfg.train_split not in raw.splits:
        raise DataError(
            f"data.train_split: split {data_cfg.train_split!r} not found in {raw.source} — available: {', '.join(raw.splits) or 'none'}"
        )


def split_rows(raw: RawData, data_cfg: DataSection, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and eval rows of one source: the eval split, else a seeded eval_fraction of train held out."""
    _require_train_split(raw, data_cfg)
    train = raw.splits[data_cfg.train_split]
    if (
        data_cfg.eval_split
        and data_cfg.eval_split in raw.splits
        and data_cfg.eval_split != data_cfg.train_split
    ):
        evals = raw.splits[data_cfg.eval_split]
    elif data_cfg.eval_fraction > 0 and len(train) > 1:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(train) * data_cfg.eval_fraction))
        held = set(order[:n_eval])
        evals = [train[i] for i in sorted(held)]
        train = [row for i, row in enumerate(train) if i not in held]
    else:
        evals = []
    return train, evals


def resolve_format(data_cfg: DataSection, rows: list[dict]) -> str:
    """data.format, or with ``auto`` the format its columns show (of the first 100 rows)."""
    if data_cfg.format != "auto":
        return data_cfg.format
    columns = sorted(
        {
            k
            for row in rows[:100]
            for k in formats.rename_columns(row, data_cfg.columns)
            if not k.startswith("_")
        }
    )
    fmt = formats.detect_format(columns, data_cfg.text_column)
    if fmt is None:
        raise DataError(
            f"data.format: cannot tell the format from the columns [{', '.join(columns)}] — set data.format "
            "(text, alpaca, completion, chat) and map your columns with data.columns"
        )
    return fmt
