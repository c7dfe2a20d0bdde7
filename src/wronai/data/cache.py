"""The prepared-data cache: where it lives, the key that covers everything the result depends on, save and load.

The key covers the data files' content, the tokenizer, the data config, the seed, WronAI's data code and the
source of a custom data hook, so changing any of them prepares the data again.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from wronai.config.sections.data import DataSection
from wronai.config.sections.polish import NormalizeSpec
from wronai.data.sources import is_local, local_files
from wronai.data.stats import DataStats, PreparedData

logger = logging.getLogger(__name__)


def cache_root(data_cfg: DataSection) -> Path:
    """Where prepared data is cached: data.cache_dir, else $WRONAI_CACHE_DIR (default ~/.cache/wronai) / prepared."""
    if data_cfg.cache_dir:
        return Path(data_cfg.cache_dir).expanduser()
    return Path(os.environ.get("WRONAI_CACHE_DIR", Path.home() / ".cache" / "wronai")) / "prepared"


def file_digest(path: Path, h: Any) -> None:
    """Feed a file's bytes to the hash ``h`` in 1 MiB blocks."""
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of the tokenizer: its vocabulary/model, special tokens, pad/EOS tokens and chat template."""
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
    """The cache key: the data config, polish.normalize (when on), the seed, the local files' content, the
    tokenizer, WronAI's data code (every module of this package) and the data hook."""
    h = hashlib.sha256()
    cfg = data_cfg.model_dump(mode="json", exclude={"preprocessing_num_workers", "cache_dir"})
    h.update(json.dumps(cfg, sort_keys=True).encode())
    if normalize is not None and normalize.enabled:  # polish.normalize; its settings matter only when enabled
        h.update(json.dumps(normalize.model_dump(mode="json"), sort_keys=True).encode())
    h.update(str(seed).encode())
    for name in data_cfg.dataset_names:
        if is_local(name):
            for path in local_files(name):
                h.update(str(path).encode())
                file_digest(path, h)
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


def save_cached(prepared: PreparedData, target: Path) -> None:
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


def load_cached(path: Path) -> PreparedData | None:
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
