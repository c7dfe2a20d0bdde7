"""The `polish` group: Polish tokens, vocabulary extension and text hygiene (`polish.normalize`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from wronai.config.sections.base import Section

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
