"""The typed configuration: one model per YAML group, a help string per field.

The descriptions here are the reference documentation: ``docs/configuration.md`` is generated from them
(``wronai config-docs``) and a test keeps the two in sync.
"""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
_DTYPE_ALIASES = {
    "fp32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "float": "float32",
}


def _normalize_dtype(value: Any) -> Any:
    if isinstance(value, str):
        value = value.strip().lower().removeprefix("torch.")
        return _DTYPE_ALIASES.get(value, value)
    return value


# The values an unquoted YAML `no`/`off`/`false` stands for in a field whose choices include one, first match wins.
OFF_WORDS = ("no", "none", "off")


def annotation_parts(annotation: Any) -> tuple[Any, ...]:
    """The members of a union (``str | None`` -> (str, NoneType)); a plain annotation is its own only member."""
    if get_origin(annotation) in (Union, types.UnionType):
        return get_args(annotation)
    return (annotation,)


def _choices(annotation: Any) -> tuple[set[str], set[str]]:
    """The string Literal choices of a field: (choices of the value itself, choices of its list items)."""
    own: set[str] = set()
    items: set[str] = set()
    for part in annotation_parts(annotation):
        target = own
        if get_origin(part) is list:
            part, target = get_args(part)[0], items
        for member in annotation_parts(part):
            if get_origin(member) is Literal:
                target.update(a for a in get_args(member) if isinstance(a, str))
    return own, items


def switch_words(annotation: Any) -> tuple[str | None, str | None]:
    """What YAML's false and true stand for in a field of this type: its off choice and its `on` choice.

    YAML 1.1 reads an unquoted no/off/false (yes/on/true) as a boolean, so ``eval_strategy: no`` arrives as
    False. Where the field's choices (or its list items' choices) include no, none or off (on), that boolean
    can only mean that choice. Fields that take a boolean themselves get (None, None): there it is the value.
    """
    if bool in annotation_parts(annotation):
        return None, None
    own, items = _choices(annotation)
    words = own | items
    off = next((w for w in OFF_WORDS if w in words), None)
    return off, "on" if "on" in words else None


class Section(BaseModel):
    """Base for every group: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @field_validator("*", mode="before")
    @classmethod
    def _yaml_switch(cls, value: Any, info: ValidationInfo) -> Any:
        """`eval_strategy: no` (YAML: False) means 'no'; `fused_lora: on` (True) means 'on' — see switch_words."""
        if info.field_name is None or not isinstance(value, (bool, list)):
            return value
        annotation = cls.model_fields[info.field_name].annotation
        off, on = switch_words(annotation)
        if off is None and on is None:
            return value

        def word(item: Any) -> Any:
            if item is False and off is not None:
                return off
            if item is True and on is not None:
                return on
            return item

        if isinstance(value, list):
            return [word(item) for item in value]
        mapped = word(value)
        own, _ = _choices(annotation)
        return [mapped] if mapped is not value and mapped not in own else mapped  # `report_to: no`


class TinyModelSpec(Section):
    """A small Llama-architecture model built locally (tokenizer trained on your text, random weights).

    Used by the offline demo and the tests: it makes the whole pipeline runnable without the Hub.
    """

    tokenizer_data: list[str] = Field(
        description="Text/JSONL files the byte-level BPE tokenizer is trained on (paths relative to the config file's directory are resolved against it)."
    )
    vocab_size: int = Field(2000, ge=300, le=256000, description="Tokenizer vocabulary size.")
    hidden_size: int = Field(128, ge=8, description="Model width.")
    intermediate_size: int = Field(352, ge=8, description="MLP width.")
    num_hidden_layers: int = Field(4, ge=1, description="Number of transformer blocks.")
    num_attention_heads: int = Field(4, ge=1, description="Attention heads (must divide hidden_size).")
    num_key_value_heads: int = Field(2, ge=1, description="Key/value heads (grouped-query attention).")
    max_position_embeddings: int = Field(1024, ge=16, description="Longest sequence the model accepts.")
    pretrain_steps: int = Field(
        0,
        ge=0,
        description="Optional quick full-weight pre-training steps on `tokenizer_data` so the base model is not pure noise (0 = random weights).",
    )
    seed: int = Field(0, description="Seed for weights and tokenizer training.")

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelSpec:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads} "
                "— pick a head count that divides hidden_size"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by num_key_value_heads="
                f"{self.num_key_value_heads} — pick a divisor"
            )
        return self


class ModelConfig(Section):
    """The base model: where it comes from and how it is loaded."""

    name: str = Field(
        description="Hugging Face Hub id (`org/name`) or a local directory holding config.json and weights."
    )
    revision: str | None = Field(
        None, description="Hub branch, tag or commit to load (ignored for local directories)."
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow the model repository's own Python code to run (needed by some architectures; only for repos you trust).",
    )
    torch_dtype: DTypeName = Field(
        "auto",
        description="dtype for the non-quantized weights: auto (bfloat16 where the hardware supports it, else float32), float32, bfloat16, float16.",
    )
    device_map: str | dict[str, Any] | None = Field(
        "auto",
        description="Where the weights go: `auto` (WronAI picks the device from the hardware plan), `cpu`, `cuda`, `mps`, or an explicit accelerate device map.",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto",
        description="Attention kernel: auto (flash_attention_2 when installed on CUDA, else sdpa; packed rows then attend "
        "per example, at per-example cost), sdpa (packed rows: one block-diagonal mask per row), eager, flash_attention_2.",
    )
    create_if_missing: TinyModelSpec | None = Field(
        None,
        description="If `name` is a local path that does not exist yet, build a small local model there first (offline demo and tests).",
    )

    _normalize = field_validator("torch_dtype", mode="before")(_normalize_dtype)


class LoraSection(Section):
    """LoRA adapter settings (PEFT)."""

    r: int = Field(16, ge=1, le=4096, description="LoRA rank: size of the low-rank update. 8–64 is typical.")
    lora_alpha: float = Field(
        32, gt=0, description="LoRA scaling numerator; the update is scaled by lora_alpha / r."
    )
    lora_dropout: float = Field(
        0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input during training."
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        "none", description="Which biases are trained: none, all, lora_only."
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names that get adapters (e.g. [q_proj, v_proj]) or `all-linear` for every linear layer except the output head.",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Extra modules trained in full and saved with the adapter (e.g. embed_tokens, lm_head).",
    )
    use_rslora: bool = Field(False, description="Rank-stabilized LoRA scaling (lora_alpha / sqrt(r)).")
    task_type: Literal["CAUSAL_LM"] = Field(
        "CAUSAL_LM", description="PEFT task type; WronAI trains causal language models only."
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_module_as_list(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "all-linear":
            return [value]
        return value


class QuantizationSection(Section):
    """bitsandbytes quantization of the frozen base weights (QLoRA = 4-bit NF4 + LoRA)."""

    load_in_4bit: bool = Field(True, description="Store the frozen base weights in 4 bits (QLoRA).")
    load_in_8bit: bool = Field(
        False, description="Store the frozen base weights in 8 bits (LLM.int8). Exclusive with load_in_4bit."
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type: nf4 (NormalFloat, QLoRA default) or fp4."
    )
    bnb_4bit_use_double_quant: bool = Field(
        True, description="Quantize the quantization constants too (saves ~0.4 bit/parameter)."
    )
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16",
        description="dtype the 4-bit weights are dequantized to for matmuls (float32 where bf16 is not supported).",
    )
    keep_embeddings_dtype: bool = Field(
        True,
        description="With 4-bit: keep the frozen input embedding and output head in the checkpoint's 16-bit dtype, "
        "computing their outputs in the compute dtype (same numbers), instead of float32 copies as PEFT's "
        "k-bit preparation makes — half their memory (~250 MiB on a 1B model with a 32k vocabulary). Needs "
        "model.torch_dtype: auto; off under FSDP/ZeRO-3. false = PEFT's float32 upcast.",
    )
    dequantize_chunk_mib: int = Field(
        2,
        ge=0,
        description="CPU, 4-bit: dequantize each frozen weight this many MiB of rows at a time inside its matmul "
        "(forward and backward) instead of whole, as bitsandbytes does — same numbers, a smaller peak (a 1B "
        "model's largest layer is 46 MB in float32, a 7B model's 235 MB). 0 = whole weights. GPUs use "
        "bitsandbytes' kernels.",
    )

    _normalize = field_validator("bnb_4bit_compute_dtype", mode="before")(_normalize_dtype)

    @model_validator(mode="after")
    def _one_mode(self) -> QuantizationSection:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are both true — set one of them to false")
        return self

    @property
    def enabled(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit


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
    per_device_train_batch_size: int = Field(1, ge=1, description="Rows per device per forward pass.")
    per_device_eval_batch_size: int = Field(
        1, ge=1, description="Rows per device per evaluation forward pass."
    )
    gradient_accumulation_steps: int = Field(16, ge=1, description="Forward passes per optimizer step.")
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
        "adamw_torch",
        description="Optimizer (transformers names), e.g. adamw_torch, paged_adamw_8bit, paged_adamw_32bit. 8-bit (bitsandbytes) optimizers also run on CPU (paged_* becomes the unpaged one there: paging is for GPU memory); on MPS WronAI uses adamw_torch and says so.",
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
        if value not in names:
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


class DataSection(Section):
    """Where the training data comes from and how rows become token sequences."""

    dataset_name: str | list[str] = Field(
        description="Hub dataset id, or local file(s)/directory: .json, .jsonl, .csv, .parquet, .txt (relative paths resolve against the config file's directory, then the working directory)."
    )
    dataset_config: str | None = Field(None, description="Hub dataset configuration (subset) name.")
    train_split: str = Field("train", description="Split used for training.")
    eval_split: str | None = Field(
        "validation",
        description="Split used for evaluation; if the dataset has no such split, eval_fraction of train is held out.",
    )
    eval_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Share of training rows held out (seeded) for evaluation when eval_split does not exist; 0 = no eval.",
    )
    format: Literal["auto", "text", "alpaca", "completion", "chat"] = Field(
        "auto",
        description="Row format: text (raw text), alpaca (instruction/input/output), completion (prompt/completion), chat (messages); auto detects from the columns.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Rename your columns to the format's names, e.g. {instruction: pytanie, output: odpowiedz}.",
    )
    text_column: str = Field("text", description="Column holding raw text (format text).")
    prompt_template: Literal["polish", "english"] | str = Field(
        "polish",
        description="Alpaca prompt template: polish, english, or your own string with {instruction} and {input} placeholders (the answer follows it).",
    )
    chat_template: Literal["auto", "chatml", "llama3", "mistral"] = Field(
        "auto",
        description="Chat rendering: auto (tokenizer's own template if it has one, else chatml), chatml, llama3, mistral.",
    )
    train_on: Literal["answers", "all"] = Field(
        "answers",
        description="Compute the loss on answer tokens only (answers) or on every token (all). Raw text always trains on all.",
    )
    add_eos: bool = Field(
        True,
        description="Append the tokenizer's EOS token to each answer/document so the model learns to stop.",
    )
    max_seq_length: int = Field(
        2048, ge=8, description="Longest token sequence; raw text is split into chunks of this length."
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error",
        description="A malformed or empty row, or one with no trained token: error (stop, naming file, row and field) or skip "
        "(count it and go on). Rows longer than max_seq_length are dropped and counted either way (data.max_truncated_share "
        "stops the run when too many are).",
    )
    packing: bool = Field(
        False,
        description="Pack several examples into each max_seq_length row (attention kept per example via position_ids).",
    )
    max_samples: int | None = Field(
        None, ge=1, description="Use only the first N training rows (quick experiments)."
    )
    preprocessing_num_workers: int | None = Field(
        None, ge=1, description="Processes for tokenization; null = 1."
    )
    cache_dir: str | None = Field(
        None, description="Where datasets caches downloads and tokenized data; null = datasets' default."
    )
    weights: list[float] | None = Field(
        None,
        description="Mix several datasets: one weight per dataset_name entry; training rows are sampled (seeded) in proportion, "
        "repeating rows only where a weight asks for more rows than a dataset has; the mix has as many rows as all datasets together "
        "(or max_samples). null = use every row once.",
    )
    checks: bool = Field(
        True,
        description="Pre-flight checks before the first step: EOS/end-of-turn trained at the end of each answer, chat template equal to "
        "the tokenizer's, share of too-long rows; a failed check stops with the reason (see `wronai data check`).",
    )
    max_truncated_share: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="With checks: stop when more than this share of rows were dropped as longer than max_seq_length (too-long "
        "rows are dropped and counted by default; the summary and data_stats.json show how many).",
    )

    @field_validator("weights")
    @classmethod
    def _weights_valid(cls, value: list[float] | None) -> list[float] | None:
        if value is not None:
            if not value:
                raise ValueError("weights must list one weight per dataset — or be null")
            if any(w < 0 for w in value) or sum(value) <= 0:
                raise ValueError(f"weights {value} must be ≥ 0 with a positive sum, e.g. [0.7, 0.3]")
        return value

    @model_validator(mode="after")
    def _weights_match_datasets(self) -> DataSection:
        if self.weights is not None:
            names = self.dataset_name if isinstance(self.dataset_name, list) else [self.dataset_name]
            if len(self.weights) != len(names):
                raise ValueError(
                    f"weights has {len(self.weights)} value(s) but dataset_name lists {len(names)} dataset(s) — give one weight per dataset"
                )
        return self

    @field_validator("prompt_template")
    @classmethod
    def _template_has_instruction(cls, value: str) -> str:
        if value not in ("polish", "english") and "{instruction}" not in value:
            raise ValueError("a custom prompt_template must contain {instruction} — or use polish/english")
        return value


DEFAULT_POLISH_TOKENS = [
    "<polish>", "</polish>", "<formal>", "</formal>", "<informal>", "</informal>",
    "<question>", "</question>", "<answer>", "</answer>",
]  # fmt: skip


class ExtendVocabSpec(Section):
    """Extend the base tokenizer with frequent Polish pieces learned from your text (see `wronai tokenizer extend`)."""

    data: list[str] = Field(description="Polish text files (.txt/.jsonl) the new tokens are chosen from.")
    add: int = Field(ge=1, le=100000, description="How many new tokens to add.")


class NormalizeSpec(Section):
    """Polish text hygiene applied to every row before tokenization (counted in the data report)."""

    enabled: bool = Field(False, description="Turn text hygiene on.")
    nfc: bool = Field(
        True, description="Unicode NFC: a letter plus a combining accent becomes one character (ą, not a + ̨)."
    )
    quotes: bool = Field(True, description="Unify typographic quotes („ ” “ « » ‘ ’ ...) to quote_style.")
    quote_style: Literal["straight", "polish"] = Field(
        "straight",
        description="straight: \" and '; polish: double quotes as „…” (opening/closing by position), single quotes kept.",
    )
    dashes: bool = Field(
        True, description="Unify dashes (– — ― ‒) to dash_style and minus/hyphen variants (− ‐ ‑) to -."
    )
    dash_style: Literal["en", "hyphen"] = Field(
        "en", description="en: every dash becomes – (półpauza); hyphen: every dash becomes -."
    )
    spaces: bool = Field(
        True,
        description="No-break/thin/odd spaces to plain spaces, zero-width characters and soft hyphens removed, repeated spaces "
        "collapsed (indentation kept), trailing spaces and 3+ blank lines removed, text trimmed.",
    )
    dedupe: Literal["exact", "near", "none"] = Field(
        "exact",
        description="Drop repeated rows: exact (same normalized text), near (also ≥ near_threshold similar), none.",
    )
    near_threshold: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="With dedupe: near, the Jaccard similarity of word-anchored shingles at which rows are duplicates.",
    )
    min_chars: int = Field(
        0, ge=0, description="Drop rows whose text (all fields together) is shorter than this; 0 = keep all."
    )
    language: Literal["pl"] | None = Field(
        None,
        description="pl: drop rows that are clearly not Polish (no Polish letters or stop words); rows under 20 letters are kept.",
    )

    @field_validator("language", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class PolishSection(Section):
    """Polish-language options."""

    add_polish_tokens: bool = Field(
        False,
        description="Add `special_tokens` to the tokenizer; embeddings are resized and the new rows are trained and saved with the adapter.",
    )
    special_tokens: list[str] = Field(
        default_factory=lambda: list(DEFAULT_POLISH_TOKENS),
        description="Tokens added when add_polish_tokens is true.",
    )
    tokenizer_vocab_size: int = Field(
        32000, ge=256, description="Vocabulary size for Polish tokenizers trained by WronAI."
    )
    extend_vocab: ExtendVocabSpec | None = Field(
        None,
        description="Add `add` Polish tokens chosen on `data` to the tokenizer before training; their embeddings start as the mean of the base pieces and are trained and saved with the adapter.",
    )
    normalize: NormalizeSpec = Field(
        default_factory=NormalizeSpec,
        description="Text hygiene before tokenization: NFC, quotes, dashes, spaces, duplicate/short/non-Polish rows (off by default).",
    )


class LoggingSection(Section):
    """Console, TensorBoard and Weights & Biases logging."""

    report_to: list[Literal["none", "tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"],  # type: ignore[arg-type]
        description="Trackers: tensorboard, wandb, or none (a list or a single name).",
    )
    wandb_project: str = Field("wronai", description="W&B project name.")
    wandb_run_name: str = Field(
        "wronai-{timestamp}", description="Run name; `{timestamp}` becomes YYYYmmdd-HHMMSS."
    )
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto",
        description="auto = online when an API key is configured, else offline (never a login prompt).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Console log level.")
    logging_dir: str | None = Field(None, description="TensorBoard/W&B directory; null = <output_dir>/logs.")
    report: bool = Field(
        True,
        description="Write report.html (loss, learning rate, throughput, memory plots), PNGs and a model card at the end of training.",
    )
    report_samples: bool = Field(
        True, description="Include answers generated for a few fixed Polish prompts in the report."
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_as_list(cls, value: Any) -> Any:
        if value is None:
            return ["none"]
        return [value] if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class HardwareSection(Section):
    """Device choice and memory/dataloader settings."""

    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="auto = CUDA if present, else Apple MPS, else CPU."
    )
    max_memory: str | dict[str, str] | None = Field(
        None,
        description="Memory cap per device for loading, e.g. `7GiB` (each GPU) or {0: 7GiB, cpu: 30GiB}. (Old: max_memory_mb.)",
    )
    cpu_offload: bool = Field(
        False, description="Let layers that do not fit on the GPU stay on the CPU in fp32 (slow; 8-bit only)."
    )
    dataloader_num_workers: int = Field(0, ge=0, description="Background processes loading batches.")
    pin_memory: bool | None = Field(
        None, description="Pin host memory for faster GPU copies; null = on for CUDA, off elsewhere."
    )
    num_threads: int | None = Field(
        None, ge=1, description="CPU threads for PyTorch; null = PyTorch's default (all cores)."
    )
    return_freed_memory: Literal["auto", "on", "off"] = Field(
        "auto",
        description="CPU runs on Linux (glibc): on = give freed memory back to the OS instead of keeping it in the C heap — "
        "buffers of 4 MiB and more are mapped and unmapped (mallopt M_MMAP_THRESHOLD), and between decoder layers "
        "(forward and backward) the heap's free pages are handed back once RSS grew by 16 MiB (malloc_trim). Lowers "
        "the training peak of a 1.1B QLoRA run by ~20% (benchmarks/memory_qlora.py) for some page faults per step. "
        "off = keep freed buffers (up to 32 MiB each, heap top not trimmed) for the next step: no page faults to "
        "touch a step's activations again, a few % more peak RSS. auto = on for CPU runs of models with at least "
        "0.5B parameters, off below.",
    )
    fused_lora: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Compute each LoRA layer (frozen base weight + adapter) in one fused step instead of PEFT's chain "
        "of modules: the base matmul, then the adapter added in place (addmm), no copy of the base output, one "
        "autograd node — the same numbers and the same saved adapter, ~7% less time per CPU step "
        "(docs/benchmarks.md). PEFT's own forward still runs what it does not cover (DoRA, several active "
        "adapters, trained biases, mixed dtypes, autocast). auto = on for CPU runs without FSDP/ZeRO-3; on = "
        "also on GPUs (not measured there).",
    )
    distributed: Literal["none", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"] = Field(
        "none",
        description="Multi-process strategy under `wronai train --nproc N` / torchrun: none (plain DDP when launched with several processes), ddp, fsdp (shards 4-bit weights; CUDA only), deepspeed_zero2, deepspeed_zero3 (CUDA or CPU; needs deepspeed). See docs/distributed.md.",
    )
    distributed_config: str | None = Field(
        None,
        description="Path to an accelerate config YAML (distributed_type FSDP/DEEPSPEED/MULTI_GPU) or a DeepSpeed JSON; used when distributed is none, and its fsdp_config / DeepSpeed settings replace WronAI's defaults.",
    )

    @field_validator("max_memory", mode="before")
    @classmethod
    def _keys_as_str(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
        return value


class ExtensionsSection(Section):
    """Your own code, plugged in by import path `package.module:name` (files next to the config work too)."""

    tokenizer_hook: str | None = Field(
        None,
        description="Function(tokenizer, config) -> tokenizer, applied right after the tokenizer is loaded.",
    )
    data_hook: str | None = Field(
        None,
        description="Function(row: dict) -> dict | None, applied to each raw row before formatting; return None to drop the row (counted).",
    )
    callbacks: list[str] = Field(
        default_factory=list,
        description="transformers TrainerCallback classes (or factories) added to the Trainer.",
    )


class WronAIConfig(Section):
    """A whole WronAI run."""

    model: ModelConfig
    lora: LoraSection = Field(default_factory=LoraSection)
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    data: DataSection
    polish: PolishSection = Field(default_factory=PolishSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    hardware: HardwareSection = Field(default_factory=HardwareSection)
    extensions: ExtensionsSection = Field(default_factory=ExtensionsSection)
