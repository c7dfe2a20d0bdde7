"""Trainer callbacks: log throughput per step to a file, and stop early once the loss is low enough.

``extensions.callbacks`` takes a list of ``transformers.TrainerCallback`` subclasses (or zero-argument
factories returning one). WronAI instantiates each with no arguments, so settings come from defaults or
environment variables; from Python you can pass them to the constructor instead.

From the YAML config::

    extensions:
      callbacks:
        - "examples/custom_callback.py:ThroughputLogger"
        - "examples/custom_callback.py:StopBelowLoss"     # threshold: $WRONAI_STOP_LOSS, default 0.1

or on the command line (``--set`` values are YAML, so a list is written in brackets)::

    wronai train configs/offline_demo.yaml \\
        --set 'extensions.callbacks=[examples/custom_callback.py:ThroughputLogger]'

From Python, add instances to ``extra_callbacks`` before the Trainer is built::

    from wronai.recipe import Pipeline

    trainer = Pipeline("configs/offline_demo.yaml")
    logger_cb = ThroughputLogger()
    trainer.extra_callbacks += [logger_cb, StopBelowLoss(threshold=0.5)]
    trainer.train()               # builds tokenizer, model, data and the Trainer on first use
    trainer.save()
    print(logger_cb.steps)        # [1, 2, ...]

``ThroughputLogger`` writes one JSON line per log event to ``<output_dir>/throughput.jsonl``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger("examples.custom_callback")  # hook files get a generated __name__


class ThroughputLogger(TrainerCallback):
    """Logs loss, steps/s and tokens/s at every log event and keeps the optimizer steps seen in ``steps``.

    Tokens/s counts real (unpadded) tokens. The Trainer only counts them itself when
    ``include_num_input_tokens_seen`` is on, which WronAI does not set, so otherwise they are estimated as
    mean example length x batch size x gradient accumulation x processes (marked ``"estimated": true``).
    """

    def __init__(self, filename: str = "throughput.jsonl") -> None:
        self.filename = filename
        self.steps: list[int] = []
        self.records: list[dict[str, Any]] = []
        self.tokens_per_step = 0.0
        self._start = 0.0
        self._path: Path | None = None

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self._start = time.perf_counter()
        self._path = Path(args.output_dir) / self.filename
        dataset = getattr(train_dataloader, "dataset", None)
        has_lengths = dataset is not None and "length" in getattr(dataset, "column_names", [])
        lengths = list(dataset["length"]) if has_lengths else []  # WronAI's datasets carry a length column
        if lengths:
            per_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            self.tokens_per_step = sum(lengths) / len(lengths) * per_batch
        logger.info("ThroughputLogger: writing %s", self._path)

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        exact = state.num_input_tokens_seen > 0
        tokens = state.num_input_tokens_seen if exact else self.tokens_per_step * state.global_step
        record = {
            "step": state.global_step,
            "loss": logs["loss"],
            "elapsed_s": round(elapsed, 3),
            "steps_per_s": round(state.global_step / elapsed, 4),
            "tokens_per_s": round(tokens / elapsed, 1),
            "estimated": not exact,
        }
        self.records.append(record)
        logger.info(
            "step %d: loss %.4f, %.2f steps/s, %s%.0f tokens/s",
            record["step"], record["loss"], record["steps_per_s"], "≈" if not exact else "", record["tokens_per_s"],
        )  # fmt: skip
        if self._path is not None:
            with self._path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


class StopBelowLoss(TrainerCallback):
    """Stops training as soon as a logged training loss falls below ``threshold``.

    The threshold defaults to the environment variable ``WRONAI_STOP_LOSS`` (else 0.1). The checkpoint and
    final save happen as usual after the stop.
    """

    def __init__(self, threshold: float | None = None) -> None:
        if threshold is None:
            threshold = float(os.environ.get("WRONAI_STOP_LOSS", "0.1"))
        self.threshold = threshold
        self.stopped_at: int | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and loss < self.threshold and self.stopped_at is None:
            self.stopped_at = state.global_step
            control.should_training_stop = True
            logger.info(
                "StopBelowLoss: loss %.4f < %g at step %d — stopping", loss, self.threshold, state.global_step
            )
        return control
