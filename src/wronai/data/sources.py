"""Reading raw rows: local JSON/JSONL/CSV/Parquet/text files (one or many, or a directory) and Hub datasets.

Local rows carry ``_file`` and ``_row`` (1-based line number for JSONL and text, data row number for
CSV/JSON/Parquet) so every later error can name where the bad row came from. Broken JSON lines and invalid
UTF-8 are bad rows like any other: reported precisely, or skipped and counted.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wronai.errors import DataError

logger = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
SPLIT_ALIASES = {
    "train": ("train",),
    "validation": ("validation", "valid", "val", "eval", "dev"),
    "test": ("test",),
}


@dataclass
class RawData:
    """Rows per split plus the skipped-row counts of reading them."""

    splits: dict[str, list[dict[str, Any]]]
    skipped: Counter = field(default_factory=Counter)
    source: str = ""


@dataclass
class BadRowPolicy:
    on_bad_row: str  # error | skip
    skipped: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    def handle(self, where: str, field_name: str, reason: str, code: str) -> None:
        """A malformed row: stop naming it (``on_bad_row: error``) or count it and go on (``skip``)."""
        if self.on_bad_row == "error":
            raise DataError(
                f"{where}: field `{field_name}`: {reason} — fix the row, or set data.on_bad_row: skip to skip "
                "such rows (they are counted)"
            )
        self.count(where, field_name, reason, code)

    def count(self, where: str, field_name: str, reason: str, code: str) -> None:
        """A row dropped whatever ``on_bad_row`` says (too long for max_seq_length): counted, the first kept."""
        self.skipped[code] += 1
        self.first.setdefault(code, f"{where}: field `{field_name}`: {reason}")


def is_local(name: str) -> bool:
    return Path(name).expanduser().exists()


def local_files(name: str) -> list[Path]:
    path = Path(name).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise DataError(
                f"data.dataset_name: directory {path} holds no {'/'.join(LOCAL_SUFFIXES)} files — add data files or fix the path"
            )
        return files
    if path.suffix not in LOCAL_SUFFIXES:
        raise DataError(
            f"data.dataset_name: {path} has an unsupported extension {path.suffix!r} — use one of {', '.join(LOCAL_SUFFIXES)}"
        )
    return [path]


def split_of(path: Path) -> str:
    """The split a file belongs to by its name (train.jsonl, validation.csv, ...); default train."""
    stem = path.stem.lower()
    for split, aliases in SPLIT_ALIASES.items():
        if stem in aliases or any(stem.endswith(f"_{a}") or stem.endswith(f"-{a}") for a in aliases):
            return split
    return "train"


def read_local(names: list[str], policy: BadRowPolicy) -> RawData:
    splits: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        files = local_files(name)
        by_dir = Path(name).expanduser().is_dir()
        for path in files:
            split = split_of(path) if by_dir else "train"
            splits.setdefault(split, []).extend(read_file(path, policy))
    return RawData(splits=splits, skipped=policy.skipped, source=", ".join(names))


def read_file(path: Path, policy: BadRowPolicy) -> list[dict[str, Any]]:
    """All rows of one local file, each with ``_file`` and ``_row``."""
    if path.suffix == ".jsonl":
        return _read_jsonl(path, policy)
    if path.suffix == ".json":
        return _read_json(path, policy)
    if path.suffix == ".txt":
        return _read_text(path, policy)
    return _read_table(path)


def _lines(path: Path, policy: BadRowPolicy) -> list[tuple[int, str]]:
    """Decoded lines with their 1-based numbers; a UTF-8 byte-order mark on line 1 is dropped."""
    out = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                out.append((number, raw.decode("utf-8-sig" if number == 1 else "utf-8")))
            except UnicodeDecodeError as err:
                policy.handle(
                    f"{path}:{number}", "(line)", f"invalid UTF-8 at byte {err.start}", "invalid_utf8"
                )
    return out


def _read_jsonl(path: Path, policy: BadRowPolicy) -> list[dict[str, Any]]:
    return _parse_json_lines(path, _lines(path, policy), policy)


def _parse_json_lines(path: Path, lines: list[tuple[int, str]], policy: BadRowPolicy) -> list[dict[str, Any]]:
    rows = []
    for number, line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            policy.handle(
                f"{path}:{number}", "(line)", f"broken JSON ({err.msg} at column {err.colno})", "broken_json"
            )
            continue
        if not isinstance(row, dict):
            policy.handle(
                f"{path}:{number}",
                "(line)",
                f"expected a JSON object, got {type(row).__name__}",
                "wrong_type",
            )
            continue
        row["_file"], row["_row"] = str(path), number
        rows.append(row)
    return rows


def _read_json(path: Path, policy: BadRowPolicy) -> list[dict[str, Any]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: invalid UTF-8 at byte {err.start} — re-save the file as UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if "\n{" in text or text.lstrip().startswith("{"):
            # JSON Lines saved with a .json extension
            return _parse_json_lines(path, list(enumerate(text.splitlines(), start=1)), policy)
        raise DataError(f"{path}:{err.lineno}: broken JSON ({err.msg}) — fix the file") from None
    if isinstance(data, dict):
        for key in ("data", "rows", "train", "examples"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows (or JSON Lines) — got {type(data).__name__}")
    rows = []
    for number, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            policy.handle(
                f"{path} row {number}", "(row)", f"expected an object, got {type(row).__name__}", "wrong_type"
            )
            continue
        row = dict(row)
        row["_file"], row["_row"] = str(path), number
        rows.append(row)
    return rows


def _read_text(path: Path, policy: BadRowPolicy) -> list[dict[str, Any]]:
    """Documents are separated by blank lines; ``_row`` is the document's first line number."""
    rows: list[dict[str, Any]] = []
    current: list[str] = []
    start = 0
    for number, line in [*_lines(path, policy), (-1, "")]:
        if line.strip():
            if not current:
                start = number
            current.append(line.rstrip("\r\n"))
        elif current:
            rows.append({"text": "\n".join(current), "_file": str(path), "_row": start})
            current = []
    return rows


def _read_table(path: Path) -> list[dict[str, Any]]:
    try:
        if path.suffix == ".csv":
            import pandas as pd

            # every cell as text: an answer "42" stays "42" (not int), "NA"/"null" stay words, empty cells are ""
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
            rows = frame.to_dict(orient="records")
            first = 2  # row 1 is the header
        else:
            import datasets

            rows = datasets.Dataset.from_parquet(str(path), keep_in_memory=True).to_list()
            first = 1
    except Exception as err:  # pandas/pyarrow raise many types for corrupt files
        text = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise DataError(f"{path}: cannot read {path.suffix} file ({text}) — check the file") from None
    for number, row in enumerate(rows, start=first):
        row["_file"], row["_row"] = str(path), number
    return rows


def read_hub(name: str, config: str | None, cache_dir: str | None) -> RawData:
    import datasets

    try:
        dd = datasets.load_dataset(name, config, cache_dir=cache_dir)
    except Exception as err:  # the datasets library raises many error types for a missing/unreachable dataset
        text = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise DataError(
            f"data.dataset_name: {name!r} is not a local file or directory and could not be loaded from the Hub ({text}) — "
            "fix the path, or check the dataset id and your network"
        ) from None
    splits = {}
    for split, ds in dd.items():
        rows = ds.to_list()
        for number, row in enumerate(rows, start=1):
            row["_file"], row["_row"] = f"{name}[{split}]", number
        splits[split] = rows
    return RawData(splits=splits, source=name)


def read_raw(
    names: str | list[str], config: str | None, cache_dir: str | None, policy: BadRowPolicy
) -> RawData:
    """Local files/dirs and Hub ids, merged split by split."""
    names = [names] if isinstance(names, str) else list(names)
    merged = RawData(splits={}, skipped=policy.skipped, source=", ".join(names))
    for name in names:
        part = read_local([name], policy) if is_local(name) else read_hub(name, config, cache_dir)
        for split, rows in part.splits.items():
            merged.splits.setdefault(split, []).extend(rows)
    return merged
