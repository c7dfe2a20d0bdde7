"""Merging a LoRA run into a standalone model: full-precision base + adapter -> merge_and_unload -> safetensors.

The base is always loaded unquantized (merging into 4-bit weights would round the update away), the
embeddings are resized first when the run added tokens, and the result is saved with the run's tokenizer,
its config (so ``wronai generate``/``eval`` on the merged folder use the same prompt format) and a model card.
"""

from __future__ import annotations

import json
import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from wronai.errors import WronAIError
from wronai.rundir.files import ADAPTER_FILE, CONFIG_FILE, DATA_STATS_FILE, MERGE_INFO_FILE, MODEL_CONFIG_FILE
from wronai.rundir.locate import RunDir, locate_run
from wronai.use.load import load_tokenizer

logger = logging.getLogger(__name__)

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _torch_dtype(name: str, base_dir: str) -> Any:
    import torch

    if name == "auto":
        try:
            saved = json.loads((Path(base_dir) / MODEL_CONFIG_FILE).read_text())
            name = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(
                saved.get("dtype") or saved.get("torch_dtype"), "bf16"
            )
        except (OSError, ValueError):
            name = "bf16"
    if name not in DTYPES:
        raise WronAIError(
            f"--dtype {name}: use one of bf16, fp16, fp32 (or auto = the base checkpoint's dtype)"
        )
    return getattr(torch, DTYPES[name])


def load_merged(
    run: RunDir, dtype: Any, base_model: str | None = None, device: str = "cpu"
) -> tuple[Any, Any]:
    """(merged model, tokenizer): the base in ``dtype`` (never quantized) with the run's adapter merged in."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from wronai.model.embeddings import resize_embeddings
    from wronai.model.loading import from_pretrained_error

    if not run.is_adapter:
        raise WronAIError(
            f"{run.path}: no {ADAPTER_FILE} — merge needs a LoRA run directory (training.output_dir)"
        )
    name = base_model or run.base_name
    trust = bool(run.config and run.config.model.trust_remote_code)
    tokenizer = load_tokenizer(run)
    tokenizer.padding_side = "right"
    try:
        base = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, device_map={"": device}, trust_remote_code=trust
        )
    except (OSError, ValueError) as err:
        raise WronAIError(
            f"{from_pretrained_error('model', name, err)} (base of {run.path}; pass --base-model PATH if it moved)"
        ) from None
    embeddings: Any = base.get_input_embeddings()
    if embeddings.weight.shape[0] < len(tokenizer):
        resize_embeddings(base, len(tokenizer))
    model = PeftModel.from_pretrained(base, str(run.path))
    merged = model.merge_and_unload(safe_merge=True)
    merged.config.use_cache = True
    return merged, tokenizer


def merge_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "auto",
    base_model: str | None = None,
    overwrite: bool = False,
    device: str = "cpu",
) -> Path:
    """Write the merged model, tokenizer, config, merge info and model card to ``out_dir``."""
    from wronai.use.model_card import write_merged_card

    run = locate_run(run_dir)
    out = Path(out_dir)
    if out.resolve() == run.path.resolve():
        raise WronAIError(
            f"OUT_DIR {out} is the run directory — choose another folder, e.g. {run.path}/merged"
        )
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise WronAIError(
                f"OUT_DIR {out} is not empty — pass --overwrite to replace it, or choose another folder"
            )
        shutil.rmtree(out)
    torch_dtype = _torch_dtype(dtype, base_model or run.base_name)
    merged, tokenizer = load_merged(run, torch_dtype, base_model, device)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    if run.config is not None:
        shutil.copyfile(
            next(p for p in (run.path / CONFIG_FILE, run.path.parent / CONFIG_FILE) if p.is_file()),
            out / CONFIG_FILE,
        )
    for name in (DATA_STATS_FILE,):
        if (run.path / name).is_file():
            shutil.copyfile(run.path / name, out / name)
    info = {
        "source_run": str(run.path.resolve()),
        "base_model": base_model or run.base_name,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (out / MERGE_INFO_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
    write_merged_card(out, info)
    logger.info("merged %s into %s (%s) -> %s", run.path, info["base_model"], info["dtype"], out)
    return out
