"""The WronAI recipe: setup → train → save. ``run(config)`` is what ``wronai train`` calls.

Each stage is one call into its package — model preparation (``wronai.model``), data (``wronai.data``), the
Trainer and its loop (``wronai.train``), the run directory (``wronai.rundir``) — and all branching lives
there. ``Pipeline`` exposes the same stages one by one for people who extend the pipeline from Python::

    p = Pipeline("configs/offline_demo.yaml")
    p.load_tokenizer(); p.load_model(); p.load_dataset()
    p.build_trainer(); p.train(); p.save_adapter(); p.evaluate(); p.save()
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wronai import data as data_stage
from wronai.config import WronAIConfig, load_config
from wronai.config.extensions import build_callbacks, load_object
from wronai.config.preflight import preflight
from wronai.data.auto import resolve_packing
from wronai.errors import ConfigError
from wronai.model.prepare import PreparedTokenizer, prepare_model, prepare_tokenizer
from wronai.rundir import saving
from wronai.rundir.files import AUTOTUNE_FILE
from wronai.runtime import distributed
from wronai.runtime.autotune import Decision, tune
from wronai.runtime.batch import BatchChoice, for_packed_rows
from wronai.runtime.batch import resolve as resolve_batch
from wronai.runtime.hardware import DevicePlan, plan_device, thread_settings, with_decided_optimizer
from wronai.runtime.heap import memory_settings
from wronai.train import faults
from wronai.train.resume import keep_decided, resolve_resume

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    output_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)


class Pipeline:
    """The recipe's stages as methods; each may be called on its own, in order (a missing one runs first).

    The process-wide settings the stages make (the CPU heap's thresholds and trimming hooks, from
    ``load_model``) last until ``close()`` — or the end of a ``with Pipeline(...) as p:`` block.
    """

    def __init__(
        self,
        config: WronAIConfig | str | Path,
        overrides: list[str] | None = None,
        *,
        resume: str | bool | None = None,
    ) -> None:
        cfg = config if isinstance(config, WronAIConfig) else load_config(config, overrides)
        self.plan: DevicePlan = plan_device(cfg.hardware, cfg.training, cfg.quantization, cfg.model)
        # the settings left to WronAI (`auto`), decided for this machine; the run saves the decided values
        cfg = with_decided_optimizer(cfg, self.plan)
        cfg, packing_notes = resolve_packing(cfg)
        # an auto batch is settled again once the data is packed (load_dataset: rows hold several examples)
        self.batch_auto = cfg.training.per_device_train_batch_size == "auto"
        self.config, batch = resolve_batch(cfg, self.plan.device)
        self.plan.notes += [*packing_notes, *batch.notes]
        self.resume = resume  # --resume: the checkpoint's timed choices are reused (load_model)
        self.decision: Decision | None = None  # the timed CPU choices (runtime.autotune), saved with the run
        self.packed_batch: BatchChoice | None = None  # the auto batch settled again for packed rows
        self.tokens: PreparedTokenizer | None = None
        self.tokenizer: Any = None
        self.model: Any = None
        self.data: data_stage.PreparedData | None = None
        self.trainer: Any = None
        self.metrics: dict[str, Any] = {}
        self.extra_callbacks: list[Any] = []  # added to the Trainer's, after the config's
        self.signals = faults.SignalState()
        self._zero3_load: Any = None  # ZeRO-3's loading context, alive until the Trainer exists
        self.adapter_dir: Path | None = None  # set by save_adapter
        self._settings = contextlib.ExitStack()  # process-wide settings of the stages, undone by close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Undo the process-wide settings the stages made (the heap's, see ``runtime.heap.memory_settings``)."""
        self._settings.close()

    def load_tokenizer(self) -> Any:
        self.tokens = prepare_tokenizer(self.config)
        self.tokenizer = self.tokens.tokenizer
        return self.tokenizer

    def load_model(self) -> Any:
        if self.tokens is None:
            self.load_tokenizer()
        assert self.tokens is not None
        checkpoint = resolve_resume(self.resume, self.config.training.output_dir) if self.resume else None
        self.plan, self.decision = tune(self.config, self.plan, checkpoint)
        self.model, self._zero3_load = prepare_model(self.config, self.plan, self.tokens)
        # the base model's size, as `wronai validate` reads it from config.json (PEFT counts 4-bit weights unpacked)
        trainable, parameters = self.model.get_nb_trainable_parameters()
        self._settings.enter_context(
            memory_settings(self.config.hardware, self.plan.device, parameters - trainable, self.model)
        )
        return self.model

    def load_dataset(self, data_hook: Any = None) -> data_stage.PreparedData:
        if self.tokenizer is None:
            self.load_tokenizer()
        spec = self.config.extensions.data_hook
        hook = data_hook or (load_object(spec, "extensions.data_hook") if spec else None)
        cfg = self.config
        self.data = data_stage.build_datasets(
            cfg.data, self.tokenizer, cfg.training.seed, hook, normalize=cfg.polish.normalize
        )
        for line in self.data.stats.summary_lines():
            logger.info("data: %s", line)
        if self.batch_auto and self.data.packed:
            self._batch_for_packed_rows(self.data.stats)
        return self.data

    def _batch_for_packed_rows(self, stats: Any) -> None:
        t = self.config.training
        choice = for_packed_rows(
            t.per_device_train_batch_size,
            t.gradient_accumulation_steps,
            stats.examples.get("train", 0),
            stats.packed_rows,
        )
        update = {
            "per_device_train_batch_size": choice.batch,
            "gradient_accumulation_steps": choice.accumulation,
        }
        self.config = self.config.model_copy(update={"training": t.model_copy(update=update)})
        self.batch_auto = False
        self.packed_batch = choice
        logger.info("%s", choice.reason)

    def build_trainer(self) -> Any:
        from wronai.train.callbacks import (
            StopOnSignalCallback,  # transformers' Trainer stack: only when training
        )
        from wronai.train.trainer import make_trainer

        if self.model is None:
            self.load_model()
        if self.data is None:
            self.load_dataset()
        callbacks = [
            StopOnSignalCallback(self.signals),
            *build_callbacks(self.config.extensions.callbacks),
            *self.extra_callbacks,
        ]
        self.trainer = make_trainer(self.config, self.plan, self.model, self.tokenizer, self.data, callbacks)
        if self.decision is not None:  # in every checkpoint: a resumed run computes as this one
            self.trainer.checkpoint_extras[AUTOTUNE_FILE] = self.decision.to_json()
        return self.trainer

    def train(self, resume: str | bool | None = None, force_resume: bool = False) -> dict[str, Any]:
        from wronai.train.loop import run_loop

        if self.trainer is None:
            self.build_trainer()
        self.metrics = run_loop(
            self.trainer, self.config, self.plan, self.signals, resume=resume, force_resume=force_resume
        )
        return self.metrics

    def save_adapter(self) -> Path:
        """The trained adapter, tokenizer, config and provenance — written as soon as the loop ends, before
        anything else can fail; ``save`` completes the run."""
        self.adapter_dir = saving.save_adapter(
            self.trainer, self.tokenizer, self.config, {"device_plan": self.plan.describe()}
        )
        if self.decision is not None and self.trainer.args.should_save:
            self.decision.save(self.adapter_dir)
        return self.adapter_dir

    def evaluate(self) -> dict[str, Any]:
        """The final evaluation's metrics (added to ``self.metrics``), when the run evaluates."""
        from wronai.train.trainer import final_eval_metrics

        if (
            self.data is not None
            and self.data.eval is not None
            and self.config.training.eval_strategy != "no"
        ):
            self.metrics.update(final_eval_metrics(self.trainer))
        return self.metrics

    def save(self) -> Path:
        """Everything a finished run holds: ``save_adapter``'s files, data stats, state and metrics."""
        assert self.data is not None and self.tokens is not None
        if self.trainer.args.should_save:  # rank 0 only
            saving.save_data_stats(self.config.training.output_dir, self.data.stats)
            saving.save_vocab_extension(self.config, self.tokens)
        return saving.save_run(
            self.trainer, self.tokenizer, self.config, self.metrics, {"device_plan": self.plan.describe()},
            with_adapter=self.adapter_dir is None,
        )  # fmt: skip


def run(
    config: WronAIConfig,
    *,
    resume: str | bool | None = None,
    overwrite: bool = False,
    force_resume: bool = False,
) -> RunResult:
    """The whole pipeline: check → set up (output dir, tokenizer, model, data, trainer) → train → save."""
    problems = preflight(config, in_this_process=True)
    if problems:
        raise ConfigError(problems)
    config = keep_decided(config, resume)  # a resumed run keeps the `auto` choices of the run it continues
    with Pipeline(config, resume=resume) as pipeline, thread_settings(config.hardware):
        setup(pipeline, resume=bool(resume), overwrite=overwrite)
        pipeline.train(resume=resume, force_resume=force_resume)
        out = save(pipeline)
        return RunResult(output_dir=out, metrics=pipeline.metrics)


def setup(pipeline: Pipeline, *, resume: bool, overwrite: bool) -> None:
    """Output dir, tokenizer, model, data and trainer — each written or built by rank 0 first under torchrun."""
    config = pipeline.config
    distributed.init_process_group(pipeline.plan.device)  # no-op unless launched by torchrun/accelerate
    with distributed.main_process_first():  # rank 0 clears/creates the output dir, then the others check it
        overwrite_here = overwrite and distributed.is_main_process()
        saving.check_output_dir(config.training.output_dir, overwrite=overwrite_here, resume=resume)
    for note in pipeline.plan.notes:
        logger.info("hardware: %s", note)
    logger.info("%s", distributed.describe_batch(config.training))
    with distributed.main_process_first():  # rank 0 builds a missing local model first; the others load it
        pipeline.load_tokenizer()
    pipeline.load_model()
    with distributed.main_process_first():  # rank 0 writes the prepared-data cache; the others read it
        pipeline.load_dataset()
    pipeline.build_trainer()


def save(pipeline: Pipeline) -> Path:
    """The adapter first (safe as soon as the loop ends), then the final evaluation, the run's files and the
    report; a failure after the adapter names where it is."""
    out = pipeline.save_adapter()
    try:
        pipeline.evaluate()
        pipeline.save()
    except BaseException:
        logger.error(
            "failed after training — the trained adapter, tokenizer and config are saved in %s "
            "(they load with PeftModel.from_pretrained, `wronai generate %s`); the final metrics are missing",
            out,
            out,
        )
        raise
    if pipeline.config.logging.report and pipeline.trainer.is_world_process_zero():
        _write_report(out, pipeline)
    return out


def _write_report(out: Path, pipeline: Pipeline) -> None:
    """The HTML report and model card; a failure here never fails a finished run."""
    from wronai.use.report import write_report

    try:
        write_report(
            out,
            model=pipeline.model,
            tokenizer=pipeline.tokenizer,
            samples=pipeline.config.logging.report_samples,
        )
    except Exception as err:
        logger.warning("report not written (%s) — run `wronai report %s`", err, out)
