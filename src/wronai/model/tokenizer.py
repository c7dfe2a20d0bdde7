"""The run's tokenizer: loaded from the base model, with a pad token and the Polish special tokens added."""

from __future__ import annotations

import logging
from typing import Any

from wronai.config.sections.model import ModelConfig
from wronai.config.sections.polish import PolishSection
from wronai.errors import WronAIError
from wronai.model.loading import ensure_model_available, from_pretrained_error

logger = logging.getLogger(__name__)


def load_tokenizer(model_cfg: ModelConfig, polish_cfg: PolishSection) -> tuple[Any, list[int]]:
    """Load the tokenizer, set a pad token, add Polish special tokens. Returns (tokenizer, ids of added tokens)."""
    from transformers import AutoTokenizer

    ensure_model_available(model_cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_cfg.name, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise from_pretrained_error("tokenizer", model_cfg.name, err) from None
    added: list[int] = []
    if polish_cfg.add_polish_tokens:
        fresh = [t for t in polish_cfg.special_tokens if t not in tokenizer.get_vocab()]
        if fresh:
            tokenizer.add_special_tokens(
                {"additional_special_tokens": fresh}, replace_extra_special_tokens=False
            )
            added = [int(tokenizer.convert_tokens_to_ids(token)) for token in fresh]  # type: ignore[arg-type]  # one token → one id
            logger.info("added %d Polish special tokens: %s", len(fresh), " ".join(fresh))
    set_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    return tokenizer, added


def set_pad_token(tokenizer: Any) -> None:
    """Give the tokenizer a pad token without hurting the EOS label.

    Prefers an existing unknown token; falls back to EOS. WronAI's collators pad labels with -100 by
    position, never by token id, so even pad == eos keeps the EOS at the end of each answer trained.
    """
    if tokenizer.pad_token is not None:
        return
    if tokenizer.unk_token is not None and tokenizer.unk_token != tokenizer.eos_token:
        tokenizer.pad_token = tokenizer.unk_token
        logger.info("tokenizer has no pad token — using %s (unk) for padding", tokenizer.unk_token)
    elif tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info(
            "tokenizer has no pad token — using EOS for padding (labels are masked by position, EOS still trained)"
        )
    else:
        raise WronAIError(
            "the tokenizer has no pad, unk or eos token — set one with extensions.tokenizer_hook"
        )
