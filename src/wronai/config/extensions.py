"""Loading user code named in the config as `package.module:name` or `path/to/file.py:name`."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from wronai.errors import WronAIError


def load_object(spec: str, key: str) -> Any:
    """Import the object a hook spec names; errors name the config key and the fix."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise WronAIError(
            f"{key}: {spec!r} is not an import path — write package.module:function or file.py:function"
        )
    if target.endswith(".py"):
        path = Path(target)
        if not path.exists():
            raise WronAIError(f"{key}: file {path} not found — fix the path in {spec!r}")
        module_name = f"wronai_user_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(module_name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise WronAIError(f"{key}: cannot import {path}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module
            try:
                loader_spec.loader.exec_module(module)
            except Exception as err:
                sys.modules.pop(module_name, None)
                raise WronAIError(f"{key}: importing {path} failed: {type(err).__name__}: {err}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise WronAIError(
                f"{key}: cannot import module {target!r} ({err}) — is it installed or on PYTHONPATH?"
            ) from None
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise WronAIError(f"{key}: {target} has no attribute {attr!r} — check the name after ':'") from None
    if not callable(obj):
        raise WronAIError(f"{key}: {spec} is not callable")
    return obj


def build_callbacks(specs: list[str]) -> list[Any]:
    """Instantiate TrainerCallback classes (or call factories) named in `extensions.callbacks`."""
    from transformers import TrainerCallback

    callbacks = []
    for i, spec in enumerate(specs):
        key = f"extensions.callbacks[{i}]"
        obj = load_object(spec, key)
        try:
            callback = obj()  # a TrainerCallback subclass, or a factory returning an instance
        except Exception as err:
            raise WronAIError(
                f"{key}: creating {spec} failed ({type(err).__name__}: {err}) — it must be constructible without arguments"
            ) from None
        if not isinstance(callback, TrainerCallback):
            raise WronAIError(
                f"extensions.callbacks[{i}]: {spec} gave a {type(callback).__name__}, not a transformers.TrainerCallback — subclass TrainerCallback"
            )
        callbacks.append(callback)
    return callbacks
