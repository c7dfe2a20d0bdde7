"""Crash-safe checkpoints: written to a staging folder, sealed with a manifest, renamed into place.

A checkpoint is *complete* only when ``wronai_checkpoint.json`` (the manifest, written last) is present and
every file it lists exists with the recorded size. transformers' Trainer writes its checkpoint as usual, but
into the staging folder ``.tmp-checkpoint-N/checkpoint-N`` (``wronai.train.trainer.GuardedTrainer`` points the
Trainer's output folder there while it saves); the staging folder sits in the output directory, so the final
``rename`` to ``checkpoint-N`` is atomic on one filesystem. All ranks write into it, then after a barrier the
main process seals and renames it, and the others wait at a second barrier. A process killed at any moment
leaves either the previous complete checkpoints untouched plus a stale staging folder (removed at the next
start), or the new complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from wronai.rundir.files import CHECKPOINT_MANIFEST, CHECKPOINT_PREFIX, STAGING_PREFIX, WEIGHT_FILES

logger = logging.getLogger(__name__)

_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def staging_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"{STAGING_PREFIX}{step}"


def final_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"{CHECKPOINT_PREFIX}{step}"


def staged_checkpoint(staging: Path, step: int) -> Path:
    """The checkpoint the Trainer writes inside ``staging`` (the staging folder is its output folder)."""
    return final_dir(staging, step)


def write_manifest(folder: Path, step: int) -> None:
    """List every file with its size, fsync them, then write the manifest (the completeness marker)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == CHECKPOINT_MANIFEST:
            continue
        files[rel] = path.stat().st_size
        _fsync(path)
    tmp = folder / (CHECKPOINT_MANIFEST + ".part")
    tmp.write_text(json.dumps({"step": step, "files": files}, indent=1), encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, folder / CHECKPOINT_MANIFEST)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def seal_and_publish(staging: Path, final: Path, step: int) -> Path:
    """Main process only: manifest, then atomic rename of the staged checkpoint to ``checkpoint-N``; the
    emptied staging folder is removed (a kill before that leaves it to ``remove_stale_staging``)."""
    written = staged_checkpoint(staging, step)
    write_manifest(written, step)
    if final.exists():  # a checkpoint of the same step from an earlier, interrupted attempt
        shutil.rmtree(final)
    os.replace(written, final)
    _fsync(final.parent)
    shutil.rmtree(staging, ignore_errors=True)
    return final


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None when it is."""
    manifest = path / CHECKPOINT_MANIFEST
    if not manifest.is_file():
        return "no completeness manifest (the save did not finish)"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable manifest"
    for rel, size in files.items():
        target = path / rel
        if not target.is_file():
            return f"{rel} is missing"
        if target.stat().st_size != size:
            return f"{rel} is truncated ({target.stat().st_size} of {size} bytes)"
    if not any((path / w).is_file() for w in WEIGHT_FILES):
        return "no weights"
    return None


def is_complete(path: Path) -> bool:
    return checkpoint_problem(path) is None


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    root = Path(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def last_complete(run_dir: str | Path) -> Path | None:
    """The highest-step complete checkpoint; incomplete ones are skipped with a warning."""
    for _, path in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("skipping incomplete checkpoint %s: %s", path, problem)
    return None


def remove_stale_staging(run_dir: str | Path) -> list[Path]:
    """Delete staging folders left by a killed save (call on the main process before training)."""
    root = Path(run_dir)
    removed = []
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(STAGING_PREFIX) and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    for path in removed:
        logger.info("removed an unfinished checkpoint save: %s", path)
    return removed


def rotate(run_dir: str | Path, limit: int | None, best: str | Path | None) -> list[Path]:
    """Keep the newest ``limit`` complete checkpoints plus the best one; never delete the newest complete one.

    Incomplete checkpoint folders older than the newest complete one are removed too (they can never be
    resumed from); newer incomplete ones are left alone (a save may be in progress elsewhere).
    """
    if not limit:
        return []
    checkpoints = list_checkpoints(run_dir)
    complete = [(s, p) for s, p in checkpoints if is_complete(p)]
    if not complete:
        return []
    newest_step = complete[-1][0]
    keep = {p.resolve() for _, p in complete[-limit:]}
    keep.add(complete[-1][1].resolve())
    if best:
        keep.add(Path(best).resolve())
    removed = []
    for step, path in checkpoints:
        if path.resolve() in keep or step > newest_step:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
