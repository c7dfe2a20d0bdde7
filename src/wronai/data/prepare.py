"""The data stage: raw rows -> formatted segments -> tokenized, masked, checked (and packed) datasets.

``build_datasets(data_cfg, tokenizer, seed)`` is the one entry point. Results are cached on disk under a
key that covers the data files' content, the tokenizer, the data config, the seed, WronAI's data code and
the source of a custom data hook, so changing any of them prepares the data again.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import random
import shutil
import statistics
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wronai.config.schema import DataSection, NormalizeSpec
from wronai.data import checks, formats, hygiene
from wronai.data.collate import pack_examples, padding_fraction
from wronai.data.formats import BadRow, Segment
from wronai.data.mix import mix_rows
from wronai.data.sources import BadRowPolicy, RawData, read_raw
from wronai.data.tokenize import IGNORE_INDEX, ExampleTokenizer, check_length, chunk
from wronai.errors import DataError

logger = logging.getLogger(__name__)

DataHook = Callable[[dict[str, Any]], "dict[str, Any] | None"]
_ENCODE_BATCH = 1000


@dataclass
class DataStats:
    format: str = ""
    rows_read: dict[str, int] = field(default_factory=dict)
    examples: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, str] = field(default_factory=dict)
    dropped_by_hook: int = 0
    chunked_documents: int = 0
    lengths: dict[str, float] = field(default_factory=dict)
    trainable_tokens: int = 0
    total_tokens: int = 0
    packed_rows: int = 0
    padding_fraction_unpacked: float = 0.0
    padding_fraction_packed: float | None = None
    hygiene: dict[str, int] = field(default_factory=dict)
    mix: list[dict[str, Any]] = field(default_factory=list)
    checks: dict[str, str] = field(default_factory=dict)
    cache_key: str = ""

    def summary_lines(self) -> list[str]:
        lines = [
            f"format: {self.format}; examples: "
            + ", ".join(f"{k} {v}" for k, v in self.examples.items())
            + f" (rows read: {', '.join(f'{k} {v}' for k, v in self.rows_read.items())})",
            "tokens per example: " + ", ".join(f"{k} {v:g}" for k, v in self.lengths.items()),
            f"trainable tokens: {self.trainable_tokens} of {self.total_tokens} "
            f"({100 * self.trainable_tokens / max(self.total_tokens, 1):.1f}%)",
        ]
        if self.hygiene:
            h = self.hygiene
            steps = [
                f"{k.replace('_', ' ')} {h[k]}"
                for k in ("normalized", "too_short", "not_polish", "exact_duplicates", "near_duplicates")
                if h.get(k)
            ]
            lines.append(
                f"hygiene: {h.get('rows_in', 0)} rows in, {h.get('rows_out', 0)} kept"
                + (f" ({', '.join(steps)})" if steps else "")
            )
        for m in self.mix:
            repeated = ", rows repeated (with replacement)" if m["with_replacement"] else ""
            lines.append(
                f"mix: {m['source']}: weight {m['weight']:g}, {m['sampled']} of {m['rows']} rows ({100 * m['share']:.1f}%){repeated}"
            )
        if self.skipped:
            lines.append("skipped rows: " + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())))
        if self.dropped_by_hook:
            lines.append(f"rows dropped by extensions.data_hook: {self.dropped_by_hook}")
        if self.chunked_documents:
            lines.append(f"long documents split into max_seq_length chunks: {self.chunked_documents}")
        pad = f"padding fraction (batches in order): {100 * self.padding_fraction_unpacked:.1f}% unpacked"
        if self.padding_fraction_packed is not None:
            pad += f", {100 * self.padding_fraction_packed:.1f}% packed ({self.packed_rows} rows)"
        lines.append(pad)
        if self.checks:
            lines.append(
                "checks: "
                + ", ".join(f"{k} {'ok' if v == 'ok' else 'FAILED'}" for k, v in self.checks.items())
            )
        return lines


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset
    eval: Any | None
    stats: DataStats
    packed: bool


def cache_root(data_cfg: DataSection) -> Path:
    if data_cfg.cache_dir:
        return Path(data_cfg.cache_dir).expanduser()
    return Path(os.environ.get("WRONAI_CACHE_DIR", Path.home() / ".cache" / "wronai")) / "prepared"


def _file_digest(path: Path, h: Any) -> None:
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(
        backend.to_str().encode()
        if backend is not None
        else repr(sorted(tokenizer.get_vocab().items())).encode()
    )
    h.update(repr(tokenizer.all_special_tokens).encode())
    h.update(
        repr((tokenizer.pad_token, tokenizer.eos_token, getattr(tokenizer, "chat_template", None))).encode()
    )
    return h.hexdigest()[:16]


def cache_key(
    data_cfg: DataSection,
    tokenizer: Any,
    seed: int,
    data_hook: Callable | None,
    normalize: NormalizeSpec | None = None,
) -> str:
    from wronai.data.sources import is_local, local_files

    h = hashlib.sha256()
    cfg = data_cfg.model_dump(mode="json", exclude={"preprocessing_num_workers", "cache_dir"})
    h.update(json.dumps(cfg, sort_keys=True).encode())
    if normalize is not None and normalize.enabled:  # polish.normalize; its settings matter only when enabled
        h.update(json.dumps(normalize.model_dump(mode="json"), sort_keys=True).encode())
    h.update(str(seed).encode())
    names = data_cfg.dataset_name if isinstance(data_cfg.dataset_name, list) else [data_cfg.dataset_name]
    for name in names:
        if is_local(name):
            for path in local_files(name):
                h.update(str(path).encode())
                _file_digest(path, h)
    h.update(tokenizer_fingerprint(tokenizer).encode())
    code_dir = Path(__file__).parent
    for source in sorted(code_dir.glob("*.py")):
        h.update(source.read_bytes())
    if data_hook is not None:
        h.update(hook_fingerprint(data_hook).encode())
    return h.hexdigest()[:20]


def hook_fingerprint(hook: Callable) -> str:
    """What a data hook's behaviour depends on: its whole source file, defaults, closure and partial args."""
    h = hashlib.sha256()
    func = hook
    while isinstance(func, functools.partial):
        h.update(repr((func.args, sorted(func.keywords.items()))).encode())
        func = func.func
    try:
        source_file = inspect.getsourcefile(func)
        h.update(Path(source_file).read_bytes() if source_file else inspect.getsource(func).encode())
    except (OSError, TypeError):
        h.update(getattr(func, "__qualname__", type(func).__name__).encode())
    h.update(getattr(func, "__qualname__", "").encode())
    h.update(repr(getattr(func, "__defaults__", None)).encode())
    h.update(repr(getattr(func, "__kwdefaults__", None)).encode())
    for cell in getattr(func, "__closure__", None) or ():
        try:
            h.update(repr(cell.cell_contents).encode())
        except ValueError:  # an empty cell
            continue
    return h.hexdigest()


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
        loaded = _load_cached(cached)
        if loaded is not None:
            logger.info("data: using prepared data from cache %s", cached)
            return loaded
    policy = BadRowPolicy(on_bad_row=data_cfg.on_bad_row)
    stats = DataStats(cache_key=key)
    train_rows, eval_rows, source = gather_rows(data_cfg, policy, seed, normalize, stats)
    stats.rows_read = {"train": len(train_rows), "eval": len(eval_rows)}
    fmt = stats.format
    row_fn = make_row_formatter(fmt, data_cfg, tokenizer)
    own_template = row_fn.chat_renderer is not None  # the template already holds BOS and end-of-turn tokens
    encoder = ExampleTokenizer(
        tokenizer,
        data_cfg.max_seq_length,
        "all" if fmt == "text" else data_cfg.train_on,
        add_eos=data_cfg.add_eos and not own_template,
        add_special_tokens=not own_template,
    )
    train, wheres = _process(train_rows, row_fn, encoder, fmt, data_cfg, policy, stats, data_hook)
    evals, _ = _process(eval_rows, row_fn, encoder, fmt, data_cfg, policy, stats, data_hook)
    if not train:
        raise DataError(
            f"data: no usable training examples in {source} (skipped: {dict(policy.skipped) or 'none'}) — check data.format/data.columns"
        )
    stats.skipped = dict(policy.skipped)
    stats.skipped_examples = dict(policy.first)
    stats.examples = {"train": len(train), "eval": len(evals)}
    _length_stats(train, stats)
    if data_cfg.checks:
        results = run_checks(
            data_cfg,
            tokenizer,
            fmt,
            row_fn,
            train,
            wheres,
            train_rows,
            policy,
            len(train_rows) + len(eval_rows),
        )
        stats.checks = checks.summarize(results)
        checks.enforce(results)
    packed_rows = pack_examples(train, data_cfg.max_seq_length) if data_cfg.packing else None
    if packed_rows is not None:
        stats.packed_rows = len(packed_rows)
        stats.padding_fraction_packed = padding_fraction([len(r["input_ids"]) for r in packed_rows], 8)
    prepared = PreparedData(
        train=_to_dataset(packed_rows if packed_rows is not None else train),
        eval=_to_dataset(evals) if evals else None,
        stats=stats,
        packed=packed_rows is not None,
    )
    if use_cache:
        _save_cached(prepared, cached)
    return prepared


def gather_rows(
    data_cfg: DataSection, policy: BadRowPolicy, seed: int, normalize: NormalizeSpec | None, stats: DataStats
) -> tuple[list[dict], list[dict], str]:
    """Training and eval rows: read, cleaned (polish.normalize), mixed by data.weights and split; sets stats.format."""
    names = data_cfg.dataset_name if isinstance(data_cfg.dataset_name, list) else [data_cfg.dataset_name]
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
    renderer = None
    if fmt == "chat" and data_cfg.chat_template == "auto" and getattr(tokenizer, "chat_template", None):
        from wronai.data.chat_template import TokenizerChatRenderer

        renderer = TokenizerChatRenderer(tokenizer)
    return RowFormatter(fmt, data_cfg, renderer)


def _where(row: Mapping[str, Any]) -> str:
    return f"{row.get('_file', '?')}:{row.get('_row', '?')}"


def _process(
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
        batches, _encode_all(encoder, batches, data_cfg.preprocessing_num_workers), strict=True
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


def _encode_all(
    encoder: ExampleTokenizer, batches: list[list[tuple[dict, list[Segment]]]], workers: int | None
):
    """Tokenize batches in order; with data.preprocessing_num_workers > 1, in that many processes."""
    segment_batches = [[segs for _, segs in part] for part in batches]
    if not workers or workers < 2 or len(batches) < 2:
        return [encoder.encode(b) for b in segment_batches]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(min(workers, len(batches))) as pool:
        return pool.map(encoder.encode, segment_batches)


def _length_stats(examples: list[dict[str, list[int]]], stats: DataStats) -> None:
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


def _to_dataset(examples: list[dict[str, list[int]]]):
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


def _save_cached(prepared: PreparedData, target: Path) -> None:
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        prepared.train.save_to_disk(str(tmp / "train"))
        if prepared.eval is not None:
            prepared.eval.save_to_disk(str(tmp / "eval"))
        (tmp / "stats.json").write_text(
            json.dumps({"packed": prepared.packed, **asdict(prepared.stats)}, indent=2)
        )
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except OSError as err:
        logger.warning(
            "data: could not write the prepared-data cache at %s (%s) — continuing without it", target, err
        )
        shutil.rmtree(tmp, ignore_errors=True)


def _load_cached(path: Path) -> PreparedData | None:
    import datasets

    try:
        meta = json.loads((path / "stats.json").read_text())
        packed = meta.pop("packed")
        stats = DataStats(**meta)
        train = datasets.load_from_disk(str(path / "train"))
        evals = datasets.load_from_disk(str(path / "eval")) if (path / "eval").exists() else None
    except (OSError, ValueError, TypeError) as err:
        logger.warning("data: ignoring unreadable cache %s (%s)", path, err)
        return None
    return PreparedData(train=train, eval=evals, stats=stats, packed=packed)
