"""Build a small Llama-architecture base model locally: no Hub, no download.

The offline demo and the tests need a real causal LM with a real tokenizer. This trains a byte-level BPE
tokenizer (NFC-normalized, so Polish diacritics round-trip and nothing is ever unknown) on local text,
creates a randomly initialised ``LlamaForCausalLM`` and, optionally, pre-trains it for a few steps so it
is not pure noise. The result is an ordinary Hugging Face model directory that ``from_pretrained`` loads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from wronai.config.sections.model import TinyModelSpec
from wronai.errors import WronAIError

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def iter_text(paths: list[str]) -> Iterator[str]:
    """Yield text from .txt files (paragraphs) and from string fields of .json/.jsonl rows."""
    for name in paths:
        path = Path(name)
        if not path.exists():
            raise WronAIError(
                f"model.create_if_missing.tokenizer_data: file not found: {path} — fix the path"
            )
        if path.suffix in (".jsonl", ".json"):
            text = path.read_text(encoding="utf-8")
            rows = (
                json.loads(text)
                if path.suffix == ".json"
                else [json.loads(x) for x in text.splitlines() if x.strip()]
            )
            for row in rows:
                yield from _strings(row)
        else:
            for para in path.read_text(encoding="utf-8").split("\n\n"):
                if para.strip():
                    yield para.strip()


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        if value.strip():
            yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def train_tokenizer(texts: list[str], vocab_size: int, pre_tokenizer=None, min_frequency: int = 0):
    """A byte-level BPE fast tokenizer with NFC normalization and no unknown tokens.

    ``pre_tokenizer`` defaults to plain byte-level splitting (GPT-2 style); `wronai tokenizer train` passes a
    Polish-aware one.
    """
    from transformers import PreTrainedTokenizerFast

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.model_max_length = 1_000_000
    return fast


def build_tiny_model(spec: TinyModelSpec, out_dir: str | Path) -> Path:
    """Create tokenizer + random (optionally briefly pre-trained) Llama model in ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    texts = list(iter_text(spec.tokenizer_data))
    if not texts:
        raise WronAIError(
            "model.create_if_missing.tokenizer_data holds no text — point it at .txt/.jsonl files with text"
        )
    torch.manual_seed(spec.seed)
    tokenizer = train_tokenizer(texts, spec.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    if spec.pretrain_steps:
        _pretrain(model, tokenizer, texts, spec)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    logger.info(
        "built a %.1fM-parameter Llama model and a %d-token tokenizer in %s", n / 1e6, len(tokenizer), out
    )
    return out


def _pretrain(
    model, tokenizer, texts: list[str], spec: TinyModelSpec, seq_len: int = 128, batch: int = 8
) -> None:
    """A few full-weight steps of next-token prediction on the given text."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
    usable = (len(ids) // seq_len) * seq_len
    if usable < seq_len:
        return
    blocks = torch.tensor(ids[:usable]).view(-1, seq_len)
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(spec.pretrain_steps):
        rows = blocks[torch.randint(len(blocks), (min(batch, len(blocks)),), generator=gen)]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % 50 == 0 or step == spec.pretrain_steps - 1:
            logger.info(
                "base-model pre-training step %d/%d: loss %.3f", step + 1, spec.pretrain_steps, loss.item()
            )
    model.eval()
