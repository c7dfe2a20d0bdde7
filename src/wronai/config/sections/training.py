"""The `training` group: the training loop (mapped onto Hugging Face `TrainingArguments`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from wronai.config.sections.base import Section

IntervalName = Literal["no", "steps", "epoch"]


class TrainingSection(Section):
    """The training loop (mapped onto Hugging Face `TrainingArguments` for the installed version)."""

    output_dir: str = Field("runs/wronai", description="Where checkpoints and the final adapter are written.")
    num_train_epochs: float = Field(
        3.0, gt=0, description="Passes over the training data (ignored when max_steps > 0)."
    )
    max_steps: int = Field(
        -1, ge=-1, description="Stop after this many optimizer steps; -1 = use num_train_epochs."
    )
    per_device_train_batch_size: PositiveInt | Literal["auto"] = Field(
        "auto",
        description="Rows per device per forward pass. auto = the largest power of two that divides the effective "
        "batch (rows per optimizer step: gradient_accumulation_steps when set, else 16), keeps batch × "
        "data.max_seq_length within 4096 tokens on a CPU (16384 on CUDA) and whose activations fit the free memory "
        "without recomputation; gradient_accumulation_steps then = effective batch / batch. `wronai validate` "
        "prints the choice.",
    )
    per_device_eval_batch_size: int = Field(
        1, ge=1, description="Rows per device per evaluation forward pass."
    )
    gradient_accumulation_steps: PositiveInt | Literal["auto"] = Field(
        "auto",
        description="Forward passes per optimizer step. auto = 16 with an explicit per_device_train_batch_size (as "
        "before), else effective batch / the batch auto chose.",
    )
    warmup_steps: int = Field(
        0, ge=0, description="Linear learning-rate warmup in optimizer steps (exclusive with warmup_ratio)."
    )
    warmup_ratio: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Linear warmup as a fraction of all steps (exclusive with warmup_steps).",
    )
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate of the LoRA parameters.")
    lr_scheduler_type: str = Field(
        "cosine",
        description="Scheduler: linear, cosine, constant, constant_with_warmup, ... (transformers names).",
    )
    optim: str = Field(
        "auto",
        description="Optimizer (transformers names), e.g. adamw_torch, adamw_torch_fused, paged_adamw_8bit, paged_adamw_32bit. auto = adamw_torch_fused (AdamW in one fused kernel per parameter; transformers' own default) on CPUs and CUDA, adamw_torch on MPS. 8-bit (bitsandbytes) optimizers also run on CPU (paged_* becomes the unpaged one there: paging is for GPU memory); on MPS WronAI uses adamw_torch and says so.",
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm (0 disables clipping).")
    fp16: bool = Field(
        False, description="float16 mixed precision (CUDA only; on CPU replaced by bf16 or fp32)."
    )
    bf16: bool = Field(
        False, description="bfloat16 mixed precision (CUDA with bf16 support, or CPUs with AVX512-BF16/AMX)."
    )
    logging_strategy: IntervalName = Field(
        "steps",
        description="When to log loss and learning rate: no, steps (every logging_steps), epoch. no = no loss "
        "history (trainer_state.json, the report and TensorBoard stay empty).",
    )
    logging_steps: int = Field(10, ge=1, description="Log loss and learning rate every N optimizer steps.")
    logging_first_step: bool = Field(True, description="Also log the very first step.")
    eval_strategy: IntervalName = Field(
        "steps", description="When to evaluate: no, steps, epoch. (Old name: evaluation_strategy.)"
    )
    eval_steps: int = Field(500, ge=1, description="Evaluate every N optimizer steps (eval_strategy=steps).")
    save_strategy: IntervalName = Field("steps", description="When to write checkpoints: no, steps, epoch.")
    save_steps: int = Field(
        500, ge=1, description="Checkpoint every N optimizer steps (save_strategy=steps)."
    )
    save_total_limit: int | None = Field(
        3, ge=1, description="Keep at most N checkpoints (the best one is always kept); null = keep all."
    )
    load_best_model_at_end: bool = Field(
        False, description="Reload the best checkpoint (by metric_for_best_model) before the final save."
    )
    metric_for_best_model: str = Field("eval_loss", description="Metric that defines the best checkpoint.")
    greater_is_better: bool | None = Field(
        None, description="Whether a larger metric is better; null = inferred (false for *loss)."
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Recompute activations in the backward pass: less memory, ~30% more compute. auto = only where "
        "memory needs it: off while the activations of a step without it (estimated from the model's shape, "
        "batch and data.max_seq_length) take at most half of the memory free after loading the model "
        "(RAM on a CPU, shared by the processes of one machine; the process's GPU's free memory on CUDA), else on for "
        "as few decoder layers as make them fit (every N-th layer, see checkpoint_every_n_layers).",
    )
    checkpoint_every_n_layers: int = Field(
        1,
        ge=1,
        description="With gradient_checkpointing: true, recompute only every N-th decoder layer (layers 0, N, 2N, …); "
        "the others keep their activations — less recomputation for more memory. 1 = every layer. auto picks N "
        "itself (the fewest recomputed layers whose activations fit).",
    )
    group_by_length: bool = Field(
        True,
        description="Batch rows of similar length together to cut padding. (transformers 5: train_sampling_strategy=group_by_length.)",
    )
    trained_logits_only: bool = Field(
        True,
        description="Compute output logits only where a token is trained (answers, not prompts): the same loss with "
        "less compute and memory, most for large vocabularies. false = logits at every position (stock forward).",
    )
    seed: int = Field(42, description="Seed for model init, data shuffling and the train/eval split.")
    data_seed: int | None = Field(None, description="Separate seed for data sampling; null = seed.")
    dataloader_drop_last: bool = Field(False, description="Drop the last incomplete batch.")
    on_nan: Literal["stop", "skip_step"] = Field(
        "stop",
        description="A non-finite loss/gradient: stop (keep the last good checkpoint) or skip_step (drop that update and go on).",
    )
    max_consecutive_nan_steps: int = Field(
        5, ge=1, description="With on_nan: skip_step, stop after this many bad steps in a row."
    )
    ignore_data_skip: bool = Field(
        False,
        description="On resume, restart the data from the beginning instead of skipping what was seen (not exact; for debugging).",
    )

    @field_validator("lr_scheduler_type")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        from transformers.trainer_utils import SchedulerType

        names = [s.value for s in SchedulerType]
        if value not in names:
            raise ValueError(f"unknown scheduler {value!r} — use one of: {', '.join(names)}")
        return value

    @field_validator("optim")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        from transformers.training_args import OptimizerNames

        names = [o.value for o in OptimizerNames]
        if value != "auto" and value not in names:
            import difflib

            close = [n for n in names if n.startswith(value)][:3] or difflib.get_close_matches(
                value, names, n=3
            )
            hint = f"did you mean {', '.join(close)}?" if close else "see transformers' OptimizerNames"
            raise ValueError(f"unknown optimizer {value!r} — {hint}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainingSection:
        if self.fp16 and self.bf16:
            raise ValueError("fp16 and bf16 are both true — set one of them to false")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("warmup_steps and warmup_ratio are both set — keep one and set the other to 0")
        if self.load_best_model_at_end:
            if self.eval_strategy == "no":
                raise ValueError(
                    "load_best_model_at_end needs evaluation — set eval_strategy to steps or epoch"
                )
            if self.eval_strategy != self.save_strategy:
                raise ValueError(
                    f"load_best_model_at_end needs save_strategy == eval_strategy (got {self.save_strategy!r} and "
                    f"{self.eval_strategy!r}) — make them equal"
                )
            if self.save_strategy == "steps" and self.save_steps % self.eval_steps:
                raise ValueError(
                    f"load_best_model_at_end needs save_steps ({self.save_steps}) to be a multiple of eval_steps "
                    f"({self.eval_steps}) — e.g. set save_steps: {self.eval_steps}"
                )
        return self
