"""The training loop: `TrainingArguments` for the installed transformers version, and the `Trainer`.

transformers 5 renamed or removed several arguments the classic WronAI configs use (`evaluation_strategy`,
`warmup_ratio`, `group_by_length`, `logging_dir`); ``build_training_arguments`` reads the installed
signature and passes each setting under the name this version takes.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Sampler

from wronai.config.schema import HardwareSection, TrainingSection
from wronai.errors import WronAIError
from wronai.runtime.hardware import DevicePlan

logger = logging.getLogger(__name__)


def _accepted() -> set[str]:
    from transformers import TrainingArguments

    return set(inspect.signature(TrainingArguments.__init__).parameters)


def training_arguments_kwargs(
    training: TrainingSection,
    hardware: HardwareSection,
    plan: DevicePlan,
    *,
    report_to: list[str],
    run_name: str,
    has_eval: bool,
    accepted: set[str] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``TrainingArguments``, named as the installed version expects."""
    accepted = accepted if accepted is not None else _accepted()
    eval_strategy = training.eval_strategy if has_eval else "no"
    kwargs: dict[str, Any] = {
        "output_dir": training.output_dir,
        "num_train_epochs": training.num_train_epochs,
        "max_steps": training.max_steps,
        "per_device_train_batch_size": training.per_device_train_batch_size,
        "per_device_eval_batch_size": training.per_device_eval_batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "learning_rate": training.learning_rate,
        "lr_scheduler_type": training.lr_scheduler_type,
        "optim": plan.optimizer,
        "weight_decay": training.weight_decay,
        "max_grad_norm": training.max_grad_norm,
        "bf16": plan.bf16,
        "fp16": plan.fp16,
        "logging_strategy": training.logging_strategy,
        "logging_steps": training.logging_steps,
        "logging_first_step": training.logging_first_step,
        "save_strategy": training.save_strategy,
        "save_steps": training.save_steps,
        "eval_steps": training.eval_steps,
        "save_total_limit": training.save_total_limit,
        "load_best_model_at_end": training.load_best_model_at_end and has_eval,
        "metric_for_best_model": training.metric_for_best_model,
        "greater_is_better": training.greater_is_better,
        "seed": training.seed,
        "data_seed": training.data_seed,
        "dataloader_drop_last": training.dataloader_drop_last,
        "dataloader_num_workers": hardware.dataloader_num_workers,
        "dataloader_pin_memory": plan.pin_memory,
        "remove_unused_columns": False,  # WronAI's collators pick the columns themselves
        "label_names": ["labels"],
        "report_to": report_to,
        "run_name": run_name,
        "use_cpu": plan.device == "cpu",
        "disable_tqdm": False,
        "ignore_data_skip": training.ignore_data_skip,
    }
    kwargs["eval_strategy" if "eval_strategy" in accepted else "evaluation_strategy"] = eval_strategy
    # enabled by WronAI on the model (non-reentrant) before the adapter is added; the Trainer must not redo it
    # (transformers 5 renamed the argument; the old name is deprecated there)
    kwargs[
        "activation_checkpointing" if "activation_checkpointing" in accepted else "gradient_checkpointing"
    ] = False
    if training.warmup_ratio:
        if "warmup_ratio" in accepted:
            kwargs["warmup_ratio"] = training.warmup_ratio
        else:
            kwargs["warmup_steps"] = float(
                training.warmup_ratio
            )  # transformers 5: a float in [0, 1) is a ratio
    else:
        kwargs["warmup_steps"] = training.warmup_steps
    if training.group_by_length:  # transformers 5: train_sampling_strategy replaced group_by_length
        if "train_sampling_strategy" in accepted and "group_by_length" not in accepted:
            kwargs["train_sampling_strategy"] = "group_by_length"
        else:
            kwargs["group_by_length"] = True
    if "use_cache" in accepted:
        kwargs["use_cache"] = False
    from wronai.runtime import distributed

    kwargs.update(
        distributed.training_kwargs(hardware, plan.device)
    )  # ddp_backend, fsdp/fsdp_config, deepspeed
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:  # never dropped silently: the setting would not apply
        raise WronAIError(unaccepted_arguments_message(unknown))
    return kwargs


def unaccepted_arguments_message(keys: list[str]) -> str:
    """One line: which arguments the installed transformers refuses, and the fix."""
    from importlib import metadata

    try:
        version = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        version = "(version unknown)"
    names = ", ".join(f"`{k}`" for k in keys)
    return (
        f"TrainingArguments: the installed transformers {version} does not accept {names} — install the "
        "tested version (constraints.txt: `make install`, or pip install -c constraints.txt transformers)"
    )


def build_training_arguments(
    training: TrainingSection,
    hardware: HardwareSection,
    plan: DevicePlan,
    *,
    report_to: list[str],
    run_name: str,
    has_eval: bool,
):
    from transformers import TrainingArguments

    return TrainingArguments(
        **training_arguments_kwargs(
            training, hardware, plan, report_to=report_to, run_name=run_name, has_eval=has_eval
        )
    )


def build_trainer(
    model: Any,
    tokenizer: Any,
    args: Any,
    prepared: Any,
    callbacks: list[Any],
    training: TrainingSection | None = None,
    *,
    per_example_attention: bool = True,
):
    """A Hugging Face Trainer (crash-safe checkpoints, gradient guard) over the prepared data."""
    from transformers.trainer_callback import ProgressCallback

    from wronai.data.collate import PackedCollator, PaddingCollator
    from wronai.train.faults import GradientGuard
    from wronai.train.monitoring import make_progress_callback

    if prepared.packed:  # attention per example instead of a block-diagonal mask over the whole row
        from wronai.model.attention import enable_packed_attention

        collator: Any = PackedCollator(
            pad_token_id=tokenizer.pad_token_id,
            with_boundaries=per_example_attention and enable_packed_attention(model),
        )
    else:
        collator = PaddingCollator(pad_token_id=tokenizer.pad_token_id)
    trainer = make_trainer_class()(
        model=model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=callbacks,
    )
    from wronai.train.loss import output_head

    trainer.trained_logits_only = (training is None or training.trained_logits_only) and output_head(
        model
    ) is not None
    trainer.gradient_guard = GradientGuard(
        training.on_nan if training else "stop", training.max_consecutive_nan_steps if training else 5
    )
    if trainer.callback_handler.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(make_progress_callback())
    return trainer


class EpochSeededSampler(Sampler):
    """Draws ``sampler``'s shuffle from a generator seeded with ``seed + epoch`` instead of the global RNG.

    transformers' ``LengthGroupedSampler`` (``training.group_by_length``) shuffles with the global torch RNG
    when it has no generator, so an epoch's order depends on everything that drew from that RNG earlier
    (dropout, earlier epochs). A run resumed mid-epoch starts with a freshly seeded RNG and fast-forwards
    through a *different* order: it trains on other rows than the run it continues. Seeded per epoch (as
    accelerate's ``SeedableRandomSampler`` does for plain shuffling), the order is a function of the seed and
    the epoch only — the same in the resumed run and on every rank. The Trainer calls ``set_epoch`` (via
    accelerate's data loader) at the start of each epoch, the resumed one included.
    """

    def __init__(self, sampler: Any, seed: int) -> None:
        self.sampler = sampler
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        self.sampler.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(self.sampler)


@functools.cache
def make_trainer_class() -> type:
    """transformers' Trainer with atomic, manifest-sealed checkpoints and a guarded optimizer step.

    Built on first use rather than at module level: ``from transformers import Trainer`` loads the
    Trainer's whole stack (accelerate, datasets, the integrations) — seconds — and ``wronai.train.trainer`` is
    imported by every command that reads a config (``wronai validate``, ``wronai plan``, ``wronai data ...``
    import ``wronai.recipe``), most of which never train. Cached: one class, so ``isinstance`` works.
    """
    from transformers import Trainer
    from transformers.trainer import TRAINER_STATE_NAME

    from wronai.train import checkpointing

    class WronAIHFTrainer(Trainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.gradient_guard: Any = None  # reliability.GradientGuard, set by build_trainer
            self.trained_logits_only = False  # logits only at trained positions (wronai.train.loss)
            self.checkpoint_extras: dict[str, str] = {}  # file name -> text, in every checkpoint (the config)
            self._staging_root: Path | None = None  # where super()._save_checkpoint writes, while it runs
            super().__init__(*args, **kwargs)

        def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any):
            if isinstance(resume_from_checkpoint, (str, os.PathLike)) and self.gradient_guard is not None:
                self.gradient_guard.load(Path(resume_from_checkpoint))  # the Trainer restores the rest
            return super().train(resume_from_checkpoint, *args, **kwargs)

        def create_optimizer(self, *args: Any, **kwargs: Any):
            optimizer = super().create_optimizer(*args, **kwargs)
            if self.gradient_guard is not None and not getattr(optimizer, "_wronai_guarded", False):
                self.gradient_guard.attach(optimizer)
                setattr(optimizer, "_wronai_guarded", True)  # noqa: B010
            return optimizer

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ):
            if (
                return_outputs
                or not self.trained_logits_only
                or "labels" not in inputs
                or self.label_smoother
                or self.compute_loss_func
            ):
                return super().compute_loss(
                    model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
                )
            from wronai.train.loss import trained_positions_loss

            scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
            loss = trained_positions_loss(model, inputs, num_items_in_batch if scaled else None)
            if scaled and self.args.average_tokens_across_devices:  # as Trainer.compute_loss does
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            return loss

        def _get_train_sampler(self, *args: Any, **kwargs: Any):
            from transformers.trainer_pt_utils import LengthGroupedSampler

            sampler = super()._get_train_sampler(*args, **kwargs)
            if isinstance(sampler, LengthGroupedSampler) and sampler.generator is None:
                seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
                return EpochSeededSampler(sampler, seed)
            return sampler

        def training_step(self, *args: Any, **kwargs: Any):
            if self.gradient_guard is not None:
                self.gradient_guard.global_step = self.state.global_step
            return super().training_step(*args, **kwargs)

        def _get_output_dir(self, trial: Any) -> str:
            if self._staging_root is not None:  # inside _save_checkpoint: the Trainer writes into staging
                return str(self._staging_root)
            return super()._get_output_dir(trial)

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            """transformers' own checkpoint save, pointed at a staging folder, then sealed and renamed.

            ``super()._save_checkpoint`` writes ``<run>/.tmp-checkpoint-N/checkpoint-N`` (``_get_output_dir``
            returns the staging folder meanwhile); all ranks write there (RNG states, shards). After a barrier
            the main process adds the extras, corrects the best checkpoint's path, writes the manifest and
            renames the folder to ``<run>/checkpoint-N``; then it rotates (the Trainer's own rotation saw only
            the staging folder).
            """
            run_dir = Path(super()._get_output_dir(trial))
            step = self.state.global_step
            staging = checkpointing.staging_dir(run_dir, step)
            final = checkpointing.final_dir(run_dir, step)
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            self._barrier()
            self._staging_root = staging
            try:
                super()._save_checkpoint(model, trial)
                self._barrier()
                # on every rank: load_best_model_at_end reads it on each
                best_moved = self._point_best_at_published(run_dir, final)
                if self.args.should_save:
                    written = checkpointing.staged_checkpoint(staging, step)
                    for name, text in self.checkpoint_extras.items():
                        (written / name).write_text(text, encoding="utf-8")
                    if self.gradient_guard is not None:  # skipped-step counts (equal on all ranks)
                        self.gradient_guard.save(written)
                    if best_moved:  # the state written by the Trainer names the staging folder
                        self.state.save_to_json(str(written / TRAINER_STATE_NAME))
                    checkpointing.seal_and_publish(staging, final, step)
            except OSError as err:
                if self.args.should_save:
                    shutil.rmtree(staging, ignore_errors=True)
                previous = checkpointing.last_complete(run_dir)
                raise WronAIError(
                    f"could not write checkpoint {final} ({err.strerror or err}) — the previous checkpoint "
                    f"{previous or '(none)'} is intact; free disk space or fix permissions, then resume with --resume"
                ) from None
            finally:
                self._staging_root = None
            self._barrier()
            if self.args.should_save:
                checkpointing.rotate(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)

        def _point_best_at_published(self, run_dir: Path, final: Path) -> bool:
            """The Trainer looked for the best checkpoint in the staging folder: name its published path."""
            if not self.state.best_global_step:
                return False
            best = checkpointing.final_dir(run_dir, self.state.best_global_step)
            if (best == final or best.is_dir()) and self.state.best_model_checkpoint != str(best):
                self.state.best_model_checkpoint = str(best)
                return True
            return False

        def _barrier(self) -> None:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()

    return WronAIHFTrainer


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The highest-step *complete* checkpoint (transformers' get_last_checkpoint does not check)."""
    from wronai.train import checkpointing

    return checkpointing.last_complete(output_dir)


def set_tensorboard_dir(logging_dir: str | None, output_dir: str) -> None:
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(logging_dir or Path(output_dir) / "logs"))
