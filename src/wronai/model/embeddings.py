"""Embedding rows for new tokens: the matrices grown to the tokenizer, new rows at the mean of the old ones."""

from __future__ import annotations

import logging
from typing import Any

import torch

from wronai.runtime.sharding import full_shape, gathered_for_update

logger = logging.getLogger(__name__)


def resize_embeddings(model: Any, vocab_size: int) -> list[int]:
    """Grow the embedding matrices to ``vocab_size``; new rows start at the mean of the old ones."""
    old = full_shape(model.get_input_embeddings().weight)[0]  # ZeRO-3 keeps only a partition on each rank
    if vocab_size <= old:
        return []
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            if emb is not None and full_shape(emb.weight)[0] == vocab_size:
                with gathered_for_update([emb.weight]):
                    emb.weight[old:] = emb.weight[:old].float().mean(dim=0).to(emb.weight.dtype)
    logger.info("resized embeddings from %d to %d rows (new rows = mean of existing)", old, vocab_size)
    return list(range(old, vocab_size))


def embedding_module_names(model: Any) -> list[str]:
    """Names (last path component) of the input embedding and, if untied, the output head."""
    names = []
    input_emb = model.get_input_embeddings()
    output_emb = model.get_output_embeddings()
    for module_name, module in model.named_modules():
        if module is input_emb or (
            output_emb is not None and module is output_emb and output_emb.weight is not input_emb.weight
        ):
            names.append(module_name.split(".")[-1])
    return names
