"""Provenance of a run: library versions, git revisions, command line and platform, saved beside its config."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from wronai.config.loader import dump_config
from wronai.config.schema import WronAIConfig
from wronai.rundir.files import CONFIG_FILE, PROVENANCE_FILE

LIBRARIES = (
    "wronai",
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "datasets",
    "accelerate",
    "tokenizers",
    "trl",
)


def library_versions() -> dict[str, str]:
    """Python's version and those of the installed ``LIBRARIES``."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def git_revision(path: Path) -> dict[str, Any] | None:
    """The commit and dirty flag of the git checkout holding ``path``, or None outside one."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=path, capture_output=True, text=True, timeout=5
        )
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``provenance.json`` holds: time, command line, versions, git revisions, platform (+ ``extra``)."""
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "versions": library_versions(),
        "git": {"wronai": git_revision(Path(__file__).resolve().parent), "cwd": git_revision(Path.cwd())},
        "platform": platform.platform(),
        **(extra or {}),
    }


def write_config_and_provenance(out: Path, config: WronAIConfig, extra: dict[str, Any] | None = None) -> None:
    """``wronai_config.yaml`` (the resolved config) and ``provenance.json`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(dump_config(config), encoding="utf-8")
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance(extra), indent=2, default=str), encoding="utf-8")
