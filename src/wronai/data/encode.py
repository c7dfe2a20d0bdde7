"""Rows to training examples: format each row into segments, tokenize and mask them, drop or chunk what is too long.

Also the length statistics of the examples and the conversion to a ``datasets.Dataset``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from typing import Any

from wronai.config.sections.data import DataSection
from wronai.data import formats
from wronai.data.chat_template import TokenizerChatRenderer
from wronai.data.collate import padding_fraction
from wronai.data.formats import BadRow, Segment
from wronai.data.sources import BadRowPolicy
from wronai.data.stats import DataStats
from wronai.data.tokenize import IGNORE_INDEX, ExampleTokenizer, check_length, chunk

DataHook = Callable[[dict[str, Any]], "dict[str, Any] | None"]
_ENCODE_BATCH = 1000


class RowFormatter:
    """Column mapping + format function for one row (a class, so it pickles for worker processes)."""

    def __init__(
        self, fmt: str, data_cfg: DataSection, chat_renderer: Callable[[list[dict]], list[Segment]] | None
    ) -> None:
        self.fmt = fmt
        self.columns = dict(data_cfg.columns)
        self.text_column = data_cfg.text_column
        self.prompt_template = data_cfg.prompt_template
        self.chat_template = data_cfg.chat_template if data_cfg.chat_template != "auto" else "chatml"
        self.chat_renderer = chat_renderer

    def __call__(self, row: Mapping[str, Any]) -> list[Segment]:
        row = formats.rename_columns(row, self.columns)
        if self.fmt == "chat" and self.chat_renderer is not None:
            return self.chat_renderer(formats.normalize_messages(row))
        fn = formats.formatter_for(
            self.fmt,
            text_column=self.text_column,
            prompt_template=self.prompt_template,
            chat_template=self.chat_template,
        )
        return fn(row)


def make_row_formatter(fmt: str, data_cfg: DataSection, tokenizer: Any) -> RowFormatter:
    """The row formatter; chat rows use the tokenizer's own chat template when data.chat_template is auto and it has one."""
    renderer = None
    if fmt == "chat" and data_cfg.chat_template == "auto" and getattr(tokenizer, "chat_template", None):
        renderer = TokenizerChatRenderer(tokenizer)
    return RowFormatter(fmt, data_cfg, renderer)


def make_encoder(fmt: str, data_cfg: DataSection, tokenizer: Any, row_fn: RowFormatter) -> ExampleTokenizer:
    """The tokenizer and masker of the format's segments (raw text trains every token)."""
    own_template = row_fn.chat_renderer is not None  # the template already holds BOS and end-of-turn tokens
    return ExampleTokenizer(
        tokenizer,
        data_cfg.max_seq_length,
        "all" if fmt == "text" else data_cfg.train_on,
        add_eos=data_cfg.add_eos and not own_template,
        add_special_tokens=not own_template,
    )


def _where(row: Mapping[str, Any]) -> str:
    return f"{row.get('_file', '?')}:{row.get('_row', '?')}"


def encode_rows(
    rows: list[dict],
    row_fn: RowFormatter,
    encoder: ExampleTokenizer,
    fmt: str,
    data_cfg: DataSection,
    policy: BadRowPolicy,
    stats: DataStats,
    data_hook: DataHook | None,
) -> tuple[list[dict[str, list[int]]], list[str]]:
    """Examples of the rows, and where each came from (file:row) for the checks' messages."""
    kept: list[tuple[dict, list[Segment]]] = []
    for row in rows:
        if data_hook is not None:
            hooked = data_hook({k: v for k, v in row.items() if not k.startswith("_")})
            if hooked is None:
                stats.dropped_by_hook += 1
                continue
            row = {**hooked, "_file": row.get("_file"), "_row": row.get("_row")}
        try:
            kept.append((row, row_fn(row)))
        except BadRow as bad:
            policy.handle(_where(row), bad.field, bad.reason, bad.code)
    examples: list[dict[str, list[int]]] = []
    wheres: list[str] = []
    batches = [kept[i : i + _ENCODE_BATCH] for i in range(0, len(kept), _ENCODE_BATCH)]
    for part, encoded in zip(
        batches, encode_all(encoder, batches, data_cfg.preprocessing_num_workers), strict=True
    ):
        for (row, _), example in zip(part, encoded, strict=True):
            if fmt == "text" and len(example["input_ids"]) > data_cfg.max_seq_length:
                stats.chunked_documents += 1
                pieces = [c for c in chunk(example, data_cfg.max_seq_length) if len(c["input_ids"]) > 1]
                examples.extend(pieces)
                wheres.extend([_where(row)] * len(pieces))
                continue
            try:
                check_length(example, data_cfg.max_seq_length)
            except BadRow as bad:  # too long: dropped and counted (data.max_truncated_share guards the share)
                drop = policy.count if bad.code == "too_long" else policy.handle
                drop(_where(row), bad.field, bad.reason, bad.code)
                continue
            examples.append(example)
            wheres.append(_where(row))
    return examples, wheres


def encode_all(
    encoder: ExampleTokenizer, batches: list[list[tuple[dict, list[Segment]]]], workers: int | None
):
    """Tokenize batches in order; with data.preprocessing_num_workers > 1, in that many processes."""
    segment_batches = [[segs for _, segs in part] for part in batches]
    if not workers or workers < 2 or len(batches) < 2:
        return [encoder.encode(b) for b in segment_batches]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(min(workers, len(batches))) as pool:
        return pool.map(encoder.encode, segment_batches)


def length_stats(examples: list[dict[str, list[int]]], stats: DataStats) -> None:
    lengths = sorted(len(e["input_ids"]) for e in examples)
    stats.lengths = {
        "min": lengths[0],
        "median": statistics.median(lengths),
        "p95": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))],
        "max": lengths[-1],
    }
    stats.total_tokens = sum(lengths)
    stats.trainable_tokens = sum(len(e["labels"]) - e["labels"].count(IGNORE_INDEX) for e in examples)
    stats.padding_fraction_unpacked = padding_fraction([len(e["input_ids"]) for e in examples], 8)


def to_dataset(examples: list[dict[str, list[int]]]):
    """A datasets.Dataset of int64 list columns plus ``length``, built straight as Arrow arrays (no type inference)."""
    import itertools

    import datasets
    import numpy as np
    import pyarrow as pa

    columns = {}
    for key in examples[0]:
        lengths = np.fromiter((len(e[key]) for e in examples), dtype=np.int64, count=len(examples))
        offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter(
            itertools.chain.from_iterable(e[key] for e in examples), dtype=np.int64, count=int(offsets[-1])
        )
        columns[key] = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values)).cast(
            pa.list_(pa.int64())
        )
        if key == "input_ids":
            length = pa.array(lengths)
    columns["length"] = length
    return datasets.Dataset(pa.table(columns))
