"""The Trainer: transformers' own loop, with sealed checkpoints and a guarded step, over the prepared data."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Sampler
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from wronai.config import WronAIConfig, dump_config
from wronai.config.sections.training import TrainingSection
from wronai.data.collate import PackedCollator, PaddingCollator
from wronai.errors import WronAIError
from wronai.kernels.cross_entropy import usable_head
from wronai.model.attention import enable_packed_attention
from wronai.rundir.files import CONFIG_FILE
from wronai.runtime import distributed
from wronai.runtime.environ import environment
from wronai.runtime.hardware import DevicePlan
from wronai.train import checkpointing, monitoring, throughput
from wronai.train.arguments import build_training_arguments
from wronai.train.callbacks import ConsoleLogCallback, QuietProgressCallback
from wronai.train.faults import GradientGuard
from wronai.train.last_layer import last_layer_parts, last_layer_problem
from wronai.train.loss import fused_loss_problem, output_head, trained_positions_loss

logger = logging.getLogger(__name__)


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


class GuardedTrainer(Trainer):
    """transformers' Trainer with atomic, manifest-sealed checkpoints, a guarded optimizer step, the loss at
    trained positions only, and a per-epoch seeded length-grouped order (exact resume).

    A module-level class in a module only the training stage imports: ``from transformers import Trainer``
    loads the Trainer's whole stack (accelerate, datasets, the integrations) — seconds — which `wronai
    validate`, `plan` and `data` never need; the recipe imports this module when it builds the trainer.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.gradient_guard: Any = None  # faults.GradientGuard, set by build_trainer
        self.trained_logits_only = False  # logits only at trained positions (wronai.train.loss)
        # head and loss in one step (hardware.fused_cross_entropy); checked against the stock loss first
        self.fused_cross_entropy = False
        self._fused_loss_checked = False
        # the last decoder layer's position-wise parts, run at trained positions only
        # (hardware.last_layer_trained_only, wronai.train.last_layer); checked against the stock loss first
        self.last_layer_parts: list[torch.nn.Module] = []
        self._last_layer_checked = False
        # length_multiple: the head sees a multiple of this many positions; set by build_trainer
        self.shape_multiple: int | None = None
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
        if self.fused_cross_entropy and not self._fused_loss_checked:
            self._check_fused_loss(model, inputs)
        if self.last_layer_parts and not self._last_layer_checked:
            self._check_last_layer(model, inputs)
        scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        loss = trained_positions_loss(
            model,
            inputs,
            num_items_in_batch if scaled else None,
            multiple=self.shape_multiple,
            fused=self.fused_cross_entropy,
            last_layer=self.last_layer_parts,
        )
        if scaled and self.args.average_tokens_across_devices:  # as Trainer.compute_loss does
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return loss

    def _check_fused_loss(self, model: Any, inputs: dict[str, Any]) -> None:
        """Once, on the first batch: the fused loss against the stock one (``fused_loss_problem``), on the
        model under PEFT's and the wrappers' forwards (no token counted, no reducer involved) in the run's
        autocast; on a mismatch the run keeps the stock loss, with one warning."""
        self._fused_loss_checked = True
        inner = getattr(model, "module", model)
        base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
        with self.accelerator.autocast():
            problem = fused_loss_problem(base, inputs, self.shape_multiple)
        if problem is None:
            logger.info(
                "cross-entropy: output head and loss in one fused step (hardware.fused_cross_entropy)"
            )
            return
        self.fused_cross_entropy = False
        logger.warning(
            "cross-entropy: fused loss off — %s; using the head's logits (hardware.fused_cross_entropy)",
            problem,
        )

    def _check_last_layer(self, model: Any, inputs: dict[str, Any]) -> None:
        """Once, on the first batch: the loss and gradients with the last layer's position-wise parts on
        trained rows against the stock forward's (``last_layer_problem``), in the run's autocast; on a
        mismatch the run computes the last layer at every position, with one warning."""
        self._last_layer_checked = True
        inner = getattr(model, "module", model)
        with self.accelerator.autocast():
            problem = last_layer_problem(inner, inputs, self.last_layer_parts)
        if problem is None:
            logger.info(
                "last decoder layer: query/output projections and MLP at trained positions only "
                "(hardware.last_layer_trained_only)"
            )
            return
        self.last_layer_parts = []
        logger.warning(
            "last decoder layer: computed at every position — %s (hardware.last_layer_trained_only)", problem
        )

    def _get_train_sampler(self, *args: Any, **kwargs: Any):
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
        distributed.barrier()
        self._staging_root = staging
        try:
            super()._save_checkpoint(model, trial)
            distributed.barrier()
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
        distributed.barrier()
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


def build_trainer(
    model: Any,
    tokenizer: Any,
    args: Any,
    prepared: Any,
    callbacks: list[Any],
    training: TrainingSection | None = None,
    *,
    per_example_attention: bool = True,
    fused_cross_entropy: bool = False,
    last_layer_trained_only: bool = False,
    shared_prefix: bool = False,
    native_attention: str = "off",
):
    """A Hugging Face Trainer (crash-safe checkpoints, gradient guard) over the prepared data.
    ``fused_cross_entropy``: the head and the loss in one step where the loss is at trained positions;
    ``last_layer_trained_only``: the last decoder layer's position-wise parts at those positions only;
    ``shared_prefix``: packed batches compute their examples' common prompt start once (per-example attention only);
    ``native_attention``: hardware.native_attention as the plan resolved it (auto | on | off)."""
    multiple = length_multiple(args)
    if prepared.packed:  # attention per example instead of a block-diagonal mask over the whole row
        collator: Any = PackedCollator(
            pad_token_id=tokenizer.pad_token_id,
            pad_to_multiple_of=multiple,
            with_boundaries=per_example_attention and enable_packed_attention(model, native_attention),
            share_prefix=shared_prefix,
        )
    else:
        if per_example_attention and multiple:  # no boundaries: sdpa with the mask, in fp32 on the CPU
            enable_packed_attention(model)  # (the compiled kernel needs the boundaries: not built here)
        collator = PaddingCollator(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=multiple)
    if shared_prefix and not getattr(collator, "with_boundaries", False):
        logger.info(
            "packed batches: no shared prompt start — it needs data.packing and per-example attention "
            "(model.attn_implementation: auto on an sdpa model) (hardware.shared_prefix)"
        )
    trainer = GuardedTrainer(
        model=model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=callbacks,
    )
    head = output_head(model)
    trainer.trained_logits_only = (training is None or training.trained_logits_only) and head is not None
    if fused_cross_entropy and trainer.trained_logits_only:
        trainer.fused_cross_entropy = usable_head(head)
        if not trainer.fused_cross_entropy:
            logger.info(
                "cross-entropy: the output head is a %s, which the fused loss does not compute — the head's "
                "logits are used (hardware.fused_cross_entropy)",
                type(head).__name__,
            )
    if last_layer_trained_only and trainer.trained_logits_only:
        parts, why = last_layer_parts(model)
        trainer.last_layer_parts = parts
        if why:
            logger.info(
                "last decoder layer: computed at every position — %s (hardware.last_layer_trained_only)", why
            )
    trainer.shape_multiple = multiple
    trainer.gradient_guard = GradientGuard(
        training.on_nan if training else "stop", training.max_consecutive_nan_steps if training else 5
    )
    if trainer.callback_handler.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(QuietProgressCallback())
    return trainer


# bf16/fp16 CPU runs: batch lengths and the head's positions are a multiple of this
CPU_HALF_LENGTH_MULTIPLE = 64


def length_multiple(args: Any) -> int | None:
    """The length batches are padded to a multiple of, and the number of positions the output head sees
    (``wronai.train.loss.bucketed``): ``CPU_HALF_LENGTH_MULTIPLE`` for bf16/fp16 autocast on a CPU, else none
    (dynamic padding to the longest row, exactly the trained positions).

    On a CPU every new bf16 matmul shape leaves a oneDNN kernel and its buffers cached in the C heap for
    good, so batches of every length from 1 to ``max_seq_length`` (unpacked rows, the eval split, the last
    packed rows) would grow RSS batch after batch; rounded up to a multiple of 64, a run sees at most
    ``max_seq_length / 64`` lengths per batch size. Pad positions carry label -100 and are masked (or, in
    packed rows, their own block), so the loss is unchanged.
    """
    half = bool(getattr(args, "bf16", False) or getattr(args, "fp16", False))
    return CPU_HALF_LENGTH_MULTIPLE if half and args.device.type == "cpu" else None


def final_eval_metrics(trainer: Any) -> dict[str, float]:
    """Eval metrics at the last step: reused from the log when the loop just evaluated, else computed."""
    state = trainer.state
    for entry in reversed(state.log_history):
        if "eval_loss" in entry:
            if entry.get("step") == state.global_step:
                return {k: v for k, v in entry.items() if k.startswith("eval_")}
            break
    return {k: v for k, v in trainer.evaluate().items() if k.startswith("eval_")}


def make_trainer(
    config: WronAIConfig, plan: DevicePlan, model: Any, tokenizer: Any, data: Any, callbacks: list[Any]
) -> GuardedTrainer:
    """The run's Trainer: arguments for the installed transformers, the console line, ``callbacks``, the
    config in every checkpoint, tokens/s and memory in every log line (for the report)."""
    out = config.training.output_dir
    args = build_training_arguments(
        config.training, config.hardware, plan,
        report_to=monitoring.resolve_report_to(config.logging, out), run_name=monitoring.run_name(config.logging),
        has_eval=data.eval is not None,
    )  # fmt: skip
    with environment(monitoring.tracker_environment(config.logging, out)):  # TensorBoard reads it now
        trainer = build_trainer(
            model, tokenizer, args, data, [ConsoleLogCallback(), *callbacks], config.training,
            per_example_attention=config.model.attn_implementation == "auto",
            fused_cross_entropy=plan.fused_cross_entropy, last_layer_trained_only=plan.last_layer_trained_only,
            shared_prefix=plan.shared_prefix, native_attention=plan.native_attention,
        )  # fmt: skip
    trainer.checkpoint_extras = {CONFIG_FILE: dump_config(config)}
    throughput.attach(trainer)
    return trainer
