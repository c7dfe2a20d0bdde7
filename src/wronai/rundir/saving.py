"""Saving a run: adapter, tokenizer, resolved config, provenance, trainer state and metrics.

Everything lands at the top level of ``training.output_dir`` in formats stock code reads:
``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), output_dir)`` loads the adapter.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from wronai.config.schema import WronAIConfig
from wronai.errors import OutputExistsError, WronAIError
from wronai.rundir.files import (
    DATA_STATS_FILE,
    FINISHED_MARKER,
    WRITE_PROBE_PREFIX,
)
from wronai.rundir.provenance import write_config_and_provenance

logger = logging.getLogger(__name__)


def check_output_dir(output_dir: str | Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse to overwrite a finished run unless asked to; make sure the directory is writable."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise WronAIError(f"training.output_dir: {out} is a file — choose a directory path")
    if (out / FINISHED_MARKER).exists() and not (overwrite or resume):
        raise OutputExistsError(
            f"training.output_dir: {out} already holds a finished run — pass --overwrite to replace it, "
            "--resume to continue it, or set another training.output_dir"
        )
    if overwrite and out.exists():
        logger.warning("--overwrite: removing the previous run in %s", out)
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f"{WRITE_PROBE_PREFIX}{os.getpid()}"  # ranks probe side by side
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise WronAIError(
            f"training.output_dir: cannot write to {out} ({err.strerror}) — fix permissions or choose another directory"
        ) from None


def save_adapter(
    trainer: Any, tokenizer: Any, config: WronAIConfig, extra: dict[str, Any] | None = None
) -> Path:
    """The trained adapter, tokenizer, resolved config and provenance, in the output dir."""
    out = Path(config.training.output_dir)
    trainer.save_model(str(out))  # every rank: FSDP/DeepSpeed gather the shards inside
    if trainer.args.should_save:  # rank 0 only; save_state/save_metrics check that themselves
        tokenizer.save_pretrained(str(out))
        write_config_and_provenance(out, config, extra)
    logger.info("saved the trained adapter, tokenizer and config to %s", out)
    return out


def save_run(
    trainer: Any,
    tokenizer: Any,
    config: WronAIConfig,
    metrics: dict[str, Any],
    extra: dict[str, Any] | None = None,
    *,
    with_adapter: bool = True,
) -> Path:
    """Write the final adapter, tokenizer, config, provenance, state and metrics to the output dir.

    ``with_adapter=False``: ``save_adapter`` already wrote those four (``wronai train`` calls it as soon as
    the loop ends); only the state and metrics are added.
    """
    out = Path(config.training.output_dir)
    if with_adapter:
        save_adapter(trainer, tokenizer, config, extra)
    trainer.save_state()  # trainer_state.json with the full log history
    trainer.save_metrics("train", metrics)  # train_results.json (+ all_results.json); written last = finished
    logger.info("saved adapter, tokenizer, config and metrics to %s", out)
    return out


def save_data_stats(output_dir: str | Path, stats: Any) -> None:
    """``data_stats.json``: what the data stage kept, dropped and measured (the report reads it)."""
    (Path(output_dir) / DATA_STATS_FILE).write_text(json.dumps(stats.__dict__, indent=2), encoding="utf-8")


def save_vocab_extension(config: WronAIConfig, tokens: Any) -> None:
    """The tokens ``polish.extend_vocab`` added (``tokens``: the model stage's PreparedTokenizer), if any."""
    spec = config.polish.extend_vocab
    if tokens.vocab_tokens and spec is not None:
        from wronai.tokenizers.extend import write_extension_file

        write_extension_file(
            config.training.output_dir,
            tokens.vocab_tokens,
            config.model.name,
            spec.data,
            len(tokens.tokenizer),
        )
