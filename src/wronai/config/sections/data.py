"""The `data` group: where the training data comes from and how rows become token sequences."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from wronai.config.sections.base import Section


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
    packing: bool | Literal["auto"] = Field(
        "auto",
        description="Pack several examples into each max_seq_length row (attention kept per example via position_ids; "
        "the loss equals the unpacked loss for every format). auto = on, except for models with their own modeling "
        "code (model.trust_remote_code), which may not keep packed examples apart; `wronai validate` prints the choice.",
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

    @property
    def dataset_names(self) -> list[str]:
        """dataset_name as a list: the one dataset, or each dataset to mix (dataset_name may be a string or a list)."""
        return self.dataset_name if isinstance(self.dataset_name, list) else [self.dataset_name]

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
            names = self.dataset_names
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
