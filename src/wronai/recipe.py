"""The WronAI recipe: config -> tokenizer -> model -> data -> trainer -> save, on one screen.

``run(config)`` is what ``wronai train`` calls. ``WronAITrainer`` exposes the same stages one by one for
people who extend the pipeline from Python::

    t = WronAITrainer("configs/offline_demo.yaml")
    t.load_tokenizer(); t.load_model(); t.load_dataset()
    t.train(); t.save_adapter(); t.evaluate(); t.save()
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wronai import data as data_stage
from wronai.config import WronAIConfig, dump_config, load_config
from wronai.config.extensions import build_callbacks, load_object
from wronai.errors import ConfigError, WronAIError
from wronai.model import loading
from wronai.rundir import saving
from wronai.runtime import distributed
from wronai.runtime.hardware import DevicePlan, apply_thread_settings, plan_device
from wronai.runtime.heap import apply_memory_settings, release_free_memory
from wronai.train import checkpointing, faults, monitoring, throughput, trainer

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    output_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)


class WronAITrainer:
    """The pipeline's stages as methods; each may be called on its own, in order."""

    def __init__(self, config: WronAIConfig | str | Path, overrides: list[str] | None = None) -> None:
        self.config = config if isinstance(config, WronAIConfig) else self.load_config(config, overrides)
        self.plan: DevicePlan = plan_device(
            self.config.hardware, self.config.training, self.config.quantization, self.config.model
        )
        self.tokenizer: Any = None
        self.new_token_ids: list[int] = []
        self.model: Any = None
        self.data: data_stage.PreparedData | None = None
        self.trainer: Any = None
        self.metrics: dict[str, Any] = {}
        self.extra_callbacks: list[Any] = []
        self.signals = faults.SignalState()
        self.base_tokenizer: Any = None  # the tokenizer before polish.extend_vocab
        self.vocab_tokens: list[Any] = []  # tokens added by polish.extend_vocab
        # HfDeepSpeedConfig while a ZeRO-3 model loads (distributed.prepare_for_sharded_load)
        self._zero3_load: Any = None
        self.adapter_dir: Path | None = None  # set by save_adapter

    @staticmethod
    def load_config(path: str | Path, overrides: list[str] | None = None) -> WronAIConfig:
        return load_config(path, overrides)

    def load_tokenizer(self):
        tokenizer, self.new_token_ids = loading.load_tokenizer(self.config.model, self.config.polish)
        if self.config.polish.extend_vocab is not None:
            from wronai.tokenizers.extend import apply_extend_vocab

            self.base_tokenizer = tokenizer
            tokenizer, self.vocab_tokens, _ = apply_extend_vocab(tokenizer, self.config.polish.extend_vocab)
        hook = self.config.extensions.tokenizer_hook
        if hook:
            before = len(tokenizer)
            tokenizer = load_object(hook, "extensions.tokenizer_hook")(tokenizer, self.config)
            if tokenizer is None:
                raise WronAIError("extensions.tokenizer_hook returned None — it must return the tokenizer")
            loading.set_pad_token(tokenizer)
            self.new_token_ids = sorted({*self.new_token_ids, *range(before, len(tokenizer))})
        self.tokenizer = tokenizer
        return tokenizer

    def load_model(self):
        if self.tokenizer is None:
            self.load_tokenizer()
        from transformers import set_seed

        set_seed(self.config.training.seed)  # LoRA's random init happens before the Trainer seeds anything
        # ZeRO-3: load each weight straight into its partition; kept alive until the Trainer exists
        self._zero3_load = distributed.prepare_for_sharded_load(
            self.config.hardware, self.plan, self.config.training
        )
        try:
            base = loading.load_base_model(
                self.config.model, self.config.quantization, self.config.hardware, self.plan
            )
        except Exception as err:
            if faults.is_out_of_memory(err):
                raise WronAIError(faults.oom_message("loading the model", self.config)) from None
            raise
        # rows past the old embedding matrix, plus added tokens that fit into spare rows (e.g. Qwen's padding rows)
        new_ids = sorted({*self.new_token_ids, *loading.resize_embeddings(base, len(self.tokenizer))})
        if self.vocab_tokens:  # polish.extend_vocab: each new row = mean of its base pieces' rows
            from wronai.tokenizers.extend import init_new_embeddings

            init_new_embeddings(base, self.base_tokenizer, self.vocab_tokens)
            new_ids = sorted({*new_ids, *(t.id for t in self.vocab_tokens)})
        self.model = loading.apply_lora(
            base, self.config.lora, new_ids, self._gradient_checkpointing(base),
            keep_embeddings=self.plan.keep_embeddings, dequantize_chunk_bytes=self.plan.dequantize_chunk_bytes,
            fused_lora=self.plan.fused_lora, autocast=self.plan.autocast_dtype,
        )  # fmt: skip
        _, parameters = self.model.get_nb_trainable_parameters()  # PEFT counts 4-bit weights unpacked
        apply_memory_settings(self.config.hardware, self.plan.device, parameters, self.model)
        return self.model

    def _gradient_checkpointing(self, base: Any) -> int:
        """Every how many decoder layers to recompute (0 = none): training.gradient_checkpointing, with auto
        decided from the loaded model and the free memory, and training.checkpoint_every_n_layers."""
        training = self.config.training
        if training.gradient_checkpointing != "auto":
            return training.checkpoint_every_n_layers if training.gradient_checkpointing else 0
        from wronai.runtime.activation_checkpointing import auto_gradient_checkpointing, auto_note

        every, what, why = auto_gradient_checkpointing(self.config, base.config.to_dict(), self.plan.device)
        note = auto_note(what, why)
        logger.info(note)
        self.plan.notes.append(note)
        return every

    def load_dataset(self, data_hook: Any = None):
        if self.tokenizer is None:
            self.load_tokenizer()
        hook_spec = self.config.extensions.data_hook
        hook = data_hook or (load_object(hook_spec, "extensions.data_hook") if hook_spec else None)
        self.data = data_stage.build_datasets(
            self.config.data,
            self.tokenizer,
            self.config.training.seed,
            hook,
            normalize=self.config.polish.normalize,
        )
        for line in self.data.stats.summary_lines():
            logger.info("data: %s", line)
        return self.data

    def build_trainer(self):
        cfg = self.config
        if self.model is None:
            self.load_model()
        if self.data is None:
            self.load_dataset()
        assert self.data is not None
        report_to = monitoring.resolve_report_to(cfg.logging, cfg.training.output_dir)
        trainer.set_tensorboard_dir(cfg.logging.logging_dir, cfg.training.output_dir)
        args = trainer.build_training_arguments(
            cfg.training, cfg.hardware, self.plan,
            report_to=report_to, run_name=monitoring.run_name(cfg.logging), has_eval=self.data.eval is not None,
        )  # fmt: skip
        callbacks = [
            monitoring.make_console_callback(),
            faults.make_stop_callback(self.signals),
            *build_callbacks(cfg.extensions.callbacks),
            *self.extra_callbacks,
        ]
        self.trainer = trainer.build_trainer(
            self.model, self.tokenizer, args, self.data, callbacks, cfg.training,
            per_example_attention=cfg.model.attn_implementation == "auto",
        )  # fmt: skip
        self.trainer.checkpoint_extras = {saving.CONFIG_FILE: dump_config(cfg)}
        throughput.attach(self.trainer)  # tokens/s and memory in every log line (for the report)
        return self.trainer

    def train(self, resume: str | bool | None = None, force_resume: bool = False) -> dict[str, Any]:
        if self.trainer is None:
            self.build_trainer()
        output_dir = self.config.training.output_dir
        if self.trainer.args.should_save:
            checkpointing.remove_stale_staging(output_dir)
        checkpoint = resolve_resume(resume, output_dir)
        if checkpoint is not None and not force_resume:
            check_resume_config(checkpoint, self.config)
        self.signals.install()
        try:
            result = self.trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except Exception as err:
            if faults.is_out_of_memory(err):
                raise WronAIError(
                    faults.oom_message("training", self.config, _count_params(self.model))
                ) from None
            raise
        finally:
            self.signals.uninstall()
            if self.plan.device == "cpu":  # the heap kept the activations for reuse between steps
                release_free_memory()
        if self.signals.received:
            last = checkpointing.last_complete(output_dir)
            raise faults.TrainingInterrupted(
                f"stopped by {self.signals.received} at step {self.trainer.state.global_step}; checkpoint {last} written — "
                "continue with: wronai train CONFIG --resume"
            )
        self.metrics = dict(result.metrics)
        guard = getattr(self.trainer, "gradient_guard", None)
        if guard is not None and guard.skipped:
            self.metrics["skipped_nonfinite_steps"] = guard.skipped
        return self.metrics

    def evaluate(self) -> dict[str, Any]:
        """The final evaluation's metrics (added to ``self.metrics``), when the run evaluates."""
        if (
            self.data is not None
            and self.data.eval is not None
            and self.config.training.eval_strategy != "no"
        ):
            self.metrics.update(final_eval_metrics(self.trainer))
        return self.metrics

    def save_adapter(self) -> Path:
        """The trained adapter, tokenizer, config and provenance — written as soon as the loop ends, before
        anything else can fail; ``save`` completes the run."""
        self.adapter_dir = saving.save_adapter(
            self.trainer, self.tokenizer, self.config, {"device_plan": self.plan.describe()}
        )
        return self.adapter_dir

    def save(self) -> Path:
        """Everything a finished run holds: ``save_adapter``'s files, data stats, state and metrics."""
        assert self.data is not None
        out = Path(self.config.training.output_dir)
        if self.trainer.args.should_save:  # rank 0 only
            (out / "data_stats.json").write_text(
                json.dumps(self.data.stats.__dict__, indent=2), encoding="utf-8"
            )
        spec = self.config.polish.extend_vocab
        if self.vocab_tokens and spec is not None:
            from wronai.tokenizers.extend import write_extension_file

            write_extension_file(
                out, self.vocab_tokens, self.config.model.name, spec.data, len(self.tokenizer)
            )
        return saving.save_run(
            self.trainer, self.tokenizer, self.config, self.metrics, {"device_plan": self.plan.describe()},
            with_adapter=self.adapter_dir is None,
        )  # fmt: skip


def _count_params(model: Any) -> int | None:
    try:
        return sum(p.numel() for p in model.parameters())
    except (AttributeError, TypeError):
        return None


def check_resume_config(checkpoint: Path, config: WronAIConfig) -> None:
    """Refuse to resume with a config that would change the results (use --force-resume to override)."""
    saved_file = checkpoint / saving.CONFIG_FILE
    if not saved_file.is_file():
        saved_file = checkpoint.parent / saving.CONFIG_FILE
    if not saved_file.is_file():
        logger.warning(
            "--resume: %s has no saved config to compare with — resuming without the check", checkpoint
        )
        return
    saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
    differences = faults.resume_differences(saved, config.model_dump(mode="json"))
    if differences:
        raise ConfigError(
            [
                *differences,
                "resuming would not reproduce the run — restore these values, or pass --force-resume to resume anyway",
            ],
            f"--resume {checkpoint}",
        )


def final_eval_metrics(trainer: Any) -> dict[str, float]:
    """Eval metrics at the last step: reused from the log when the loop just evaluated, else computed."""
    state = trainer.state
    for entry in reversed(state.log_history):
        if "eval_loss" in entry:
            if entry.get("step") == state.global_step:
                return {k: v for k, v in entry.items() if k.startswith("eval_")}
            break
    return {k: v for k, v in trainer.evaluate().items() if k.startswith("eval_")}


def resolve_resume(resume: str | bool | None, output_dir: str) -> Path | None:
    """`--resume` alone: the last complete checkpoint in output_dir; `--resume PATH`: that checkpoint."""
    if not resume:
        return None
    if resume is True or resume == "latest":
        found = trainer.last_complete_checkpoint(output_dir)
        if found is None:
            raise WronAIError(
                f"--resume: no complete checkpoint in {output_dir} — train without --resume, or pass a checkpoint path"
            )
        logger.info("resuming from %s", found)
        return found
    path = Path(str(resume))
    if not path.is_dir():
        raise WronAIError(
            f"--resume: {path} is not a checkpoint directory — pass a checkpoint-N folder or --resume alone"
        )
    problem = checkpointing.checkpoint_problem(path)
    if problem is not None:
        raise WronAIError(
            f"--resume: {path} is not a complete checkpoint ({problem}) — choose an earlier checkpoint or --resume alone"
        )
    return path


def _is_trainer_callback(cls: type) -> bool:
    from transformers import TrainerCallback

    return issubclass(cls, TrainerCallback)


def preflight(config: WronAIConfig) -> list[str]:
    """Problems that can be found without loading a model: paths, hooks, trackers. One line each."""
    from wronai.data.sources import LOCAL_SUFFIXES, is_local, local_files

    problems: list[str] = []
    name = config.model.name
    if not Path(name).exists() and config.model.create_if_missing is None and loading._looks_like_path(name):
        problems.append(
            f"model.name: local directory {name} does not exist — fix the path, or use a Hub id like org/name"
        )
    names = (
        config.data.dataset_name if isinstance(config.data.dataset_name, list) else [config.data.dataset_name]
    )
    for item in names:
        if is_local(item):
            try:
                local_files(item)
            except WronAIError as err:
                problems.append(str(err))
        elif item.endswith(LOCAL_SUFFIXES) or item.startswith((".", "/", "~")):
            problems.append(
                f"data.dataset_name: file {item} not found — fix the path (relative paths resolve against the config file's directory, then the working directory)"
            )
    if config.polish.extend_vocab is not None:
        for item in config.polish.extend_vocab.data:
            if not Path(item).is_file():
                problems.append(f"polish.extend_vocab.data: file {item} not found — fix the path")
    hooks = [
        ("extensions.tokenizer_hook", config.extensions.tokenizer_hook),
        ("extensions.data_hook", config.extensions.data_hook),
    ]
    hooks += [(f"extensions.callbacks[{i}]", spec) for i, spec in enumerate(config.extensions.callbacks)]
    for key, spec in hooks:
        if spec:
            try:
                obj = load_object(spec, key)
            except WronAIError as err:
                problems.append(str(err))
                continue
            if (
                key.startswith("extensions.callbacks")
                and isinstance(obj, type)
                and not _is_trainer_callback(obj)
            ):
                problems.append(
                    f"{key}: {spec} is not a transformers.TrainerCallback — subclass TrainerCallback"
                )
    try:
        monitoring.check_trackers(config.logging)
    except WronAIError as err:
        problems.append(str(err))
    device = plan_device(config.hardware, config.training, config.quantization, config.model).device
    problems += distributed.preflight_problems(config, device)  # FSDP/DeepSpeed need CUDA (+ deepspeed)
    return problems


def run(
    config: WronAIConfig,
    *,
    resume: str | bool | None = None,
    overwrite: bool = False,
    force_resume: bool = False,
) -> RunResult:
    """The whole pipeline, one builder per stage."""
    problems = preflight(config)
    if config.hardware.distributed == "fsdp" and not distributed.world().is_distributed:
        problems.append(
            "hardware.distributed: fsdp shards the model across processes and this is one — run with "
            "`wronai train CONFIG --nproc N` (N GPUs), or set hardware.distributed: none"
        )
    if problems:
        raise ConfigError(problems)
    pipeline = WronAITrainer(config)
    distributed.init_process_group(pipeline.plan.device)  # no-op unless launched by torchrun/accelerate
    with distributed.main_process_first():  # rank 0 clears/creates the output dir, then the others check it
        saving.check_output_dir(
            config.training.output_dir,
            overwrite=overwrite and distributed.is_main_process(),
            resume=bool(resume),
        )
    for note in pipeline.plan.notes:
        logger.info("hardware: %s", note)
    apply_thread_settings(config.hardware)
    with distributed.main_process_first():  # rank 0 builds a missing local model first; the others load it
        pipeline.load_tokenizer()
    pipeline.load_model()
    with distributed.main_process_first():  # rank 0 writes the prepared-data cache; the others read it
        pipeline.load_dataset()
    pipeline.build_trainer()
    pipeline.train(resume=resume, force_resume=force_resume)
    out = pipeline.save_adapter()
    try:
        metrics = pipeline.evaluate()
        pipeline.save()
    except BaseException:
        logger.error(
            "failed after training — the trained adapter, tokenizer and config are saved in %s "
            "(they load with PeftModel.from_pretrained, `wronai generate %s`); the final metrics are missing",
            out,
            out,
        )
        raise
    if config.logging.report and pipeline.trainer.is_world_process_zero():
        try:
            from wronai.use.report import write_report

            write_report(
                out, model=pipeline.model, tokenizer=pipeline.tokenizer, samples=config.logging.report_samples
            )
        except Exception as err:  # the report must never fail a finished run
            logger.warning("report not written (%s) — run `wronai report %s`", err, out)
    return RunResult(output_dir=out, metrics=metrics)
