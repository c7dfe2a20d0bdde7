"""Local paths in a loaded config made absolute (config file's directory first), so it works from anywhere."""

from __future__ import annotations

from pathlib import Path

from wronai.config.schema import WronAIConfig


def resolve_paths(config: WronAIConfig, base_dir: Path) -> None:
    """Make local file paths absolute so the saved config works from anywhere; Hub ids stay as written."""
    model = config.model
    model.name = _resolve(model.name, base_dir)
    if model.create_if_missing is not None:
        spec = model.create_if_missing
        spec.tokenizer_data = [_resolve(p, base_dir) for p in spec.tokenizer_data]
        if not Path(model.name).is_absolute():
            model.name = str((Path.cwd() / model.name).resolve())
    if config.polish.extend_vocab is not None:
        config.polish.extend_vocab.data = [_resolve(p, base_dir) for p in config.polish.extend_vocab.data]
    if config.hardware.distributed_config:
        config.hardware.distributed_config = _resolve(config.hardware.distributed_config, base_dir)
    ext = config.extensions
    ext.tokenizer_hook = _resolve_hook(ext.tokenizer_hook, base_dir)
    ext.data_hook = _resolve_hook(ext.data_hook, base_dir)
    ext.callbacks = [h for h in (_resolve_hook(c, base_dir) for c in ext.callbacks) if h]
    names = config.data.dataset_name
    if isinstance(names, list):
        config.data.dataset_name = [_resolve(n, base_dir) for n in names]
    else:
        config.data.dataset_name = _resolve(names, base_dir)


def _resolve(path_text: str, base_dir: Path) -> str:
    """A path relative to the config file's directory if it exists there, else to the working directory."""
    p = Path(path_text).expanduser()
    if p.is_absolute():
        return str(p)
    for root in (base_dir, Path.cwd()):
        candidate = root / p
        if candidate.exists():
            return str(candidate.resolve())
    return path_text


def _resolve_hook(spec: str | None, base_dir: Path) -> str | None:
    """`file.py:name` hooks are resolved like other paths; `package.module:name` stays as written."""
    if spec is None:
        return None
    target, sep, attr = spec.rpartition(":")
    if sep and target.endswith(".py"):
        return f"{_resolve(target, base_dir)}:{attr}"
    return spec
