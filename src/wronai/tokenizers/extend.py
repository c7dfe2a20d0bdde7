"""Extend an existing BPE tokenizer with the Polish tokens that save the most tokens on your text.

How tokens are chosen (``choose_new_tokens``): the data is cut exactly as the base tokenizer cuts it
(normalizer, pre-tokenizer, BPE), then BPE training *continues* from the base vocabulary: the adjacent pair
of tokens that occurs most often inside a word becomes a new token, the data is re-cut, and so on, greedily,
``add`` times. A pair's score is its frequency = the number of tokens it saves on the data. Pairs whose
concatenation is already a base token are skipped, so new tokens never duplicate existing ones.

How they are added (``extend_tokenizer``): each new token goes into the BPE vocabulary with a new id after
all existing ids, and its merge is appended after the base merges. The base merges keep priority, so the
base tokenization is computed first and the new merges only join its pieces: text is still cut into
byte-level (or byte-fallback) tokens, nothing becomes unknown, decode(encode(text)) == text still holds,
and every new token is a sequence of base tokens (``NewToken.base_ids``).

How the model learns them (``init_new_embeddings``): each new token's input and output embedding rows start
as the mean of the rows of its base pieces, so the model's predictions barely change before training.
"""

from __future__ import annotations

import heapq
import json
import logging
import re
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from wronai.errors import WronAIError
from wronai.rundir.files import EXTENSION_FILE
from wronai.tokenizers.polish import BYTE_FALLBACK

logger = logging.getLogger(__name__)

_WORD_START = re.compile(r"(?<=[^▁])(?=▁)")


@dataclass
class NewToken:
    """One added token: its id and vocabulary string, its text, the base ids it replaces, its data count."""

    id: int
    token: str
    text: str
    base_ids: list[int]
    count: int
    merge: tuple[str, str]


def _bpe_model(tokenizer: Any, what: str) -> dict[str, Any]:
    if not getattr(tokenizer, "is_fast", False):
        raise WronAIError(
            f"{what}: a fast tokenizer (tokenizer.json) is needed to extend the vocabulary — save one first"
        )
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    if model.get("type") != "BPE":
        raise WronAIError(
            f"{what}: its tokenizer model is {model.get('type')}, not BPE — vocabulary extension supports BPE "
            "tokenizers (Llama, Mistral, Qwen, GPT-style); use polish.add_polish_tokens for whole special tokens"
        )
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise WronAIError(
            f"{what}: BPE with subword prefixes/suffixes is not supported — use a GPT/Llama-style BPE tokenizer"
        )
    return state


def _units(tokenizer: Any, texts: Sequence[str]) -> Counter[str]:
    """Pre-tokenized units of the text (what the BPE model sees), with their counts.

    SentencePiece-style tokenizers (Llama, Mistral) hand whole sentences to the BPE with spaces as ``▁``;
    they are cut into words before each ``▁`` that follows another character, so no new token ever spans
    two words (SentencePiece's own pieces never do either).
    """
    backend = tokenizer.backend_tokenizer
    units: Counter[str] = Counter()
    for text in texts:
        normalized = backend.normalizer.normalize_str(text) if backend.normalizer else text
        pieces = (
            [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]
            if backend.pre_tokenizer
            else [normalized]
        )
        for piece in pieces:
            units.update(w for w in _WORD_START.split(piece) if w)
    return units


def choose_new_tokens(
    tokenizer: Any, texts: Sequence[str], add: int, min_count: int = 2, what: str = "BASE"
) -> list[NewToken]:
    """The ``add`` merges of base pieces that save the most tokens on ``texts`` (ids not yet assigned: -1)."""
    state = _bpe_model(tokenizer, what)
    vocab: dict[str, int] = tokenizer.get_vocab()
    words = _Words(tokenizer, texts, _blocked_tokens(tokenizer, state, vocab))
    heap = [(-c, pair) for pair, c in words.pair_count.items()]
    heapq.heapify(heap)
    pieces: dict[str, list[int]] = {}
    chosen: list[NewToken] = []
    while heap and len(chosen) < add:
        neg, pair = heapq.heappop(heap)
        current = words.pair_count.get(pair, 0)
        if -neg != current:  # a stale entry: the pair's count changed since it was pushed
            if current > 0:
                heapq.heappush(heap, (-current, pair))
            continue
        if current < min_count:
            break
        merged = pair[0] + pair[1]
        if merged in vocab or merged in pieces:
            continue  # already a token: never duplicate one
        base_ids = [
            *pieces.get(pair[0], [vocab.get(pair[0], -1)]),
            *pieces.get(pair[1], [vocab.get(pair[1], -1)]),
        ]
        pieces[merged] = base_ids
        saved = words.merge(pair, merged, heap)
        chosen.append(NewToken(-1, merged, tokenizer.decode(base_ids), base_ids, saved, pair))
    if len(chosen) < add:
        logger.warning(
            "only %d of the requested %d tokens occur at least %d times in the data",
            len(chosen),
            add,
            min_count,
        )
    return chosen


def _blocked_tokens(tokenizer: Any, state: dict[str, Any], vocab: dict[str, int]) -> set[str]:
    """Tokens no new token may contain: byte-fallback pieces, special and added tokens, the unknown token."""
    blocked = (
        {t for t in vocab if BYTE_FALLBACK.match(t)}
        | set(tokenizer.all_special_tokens)
        | set(tokenizer.get_added_vocab())
    )
    if state["model"].get("unk_token"):
        blocked.add(state["model"]["unk_token"])
    return blocked


class _Words:
    """The data's words cut into base tokens, with their counts, and every adjacent pair's count (pairs with a
    blocked token are not counted) and the words it occurs in."""

    def __init__(self, tokenizer: Any, texts: Sequence[str], blocked: set[str]) -> None:
        model = tokenizer.backend_tokenizer.model
        self.words: list[list[str]] = []
        self.freqs: list[int] = []
        for unit, count in _units(tokenizer, texts).items():
            symbols = [t.value for t in model.tokenize(unit)]
            if len(symbols) > 1:
                self.words.append(symbols)
                self.freqs.append(count)
        self.blocked = blocked
        self.pair_count: Counter[tuple[str, str]] = Counter()
        self.where: dict[tuple[str, str], set[int]] = defaultdict(set)
        for w in range(len(self.words)):
            self._count(w, +1)

    def _count(self, w: int, sign: int) -> None:
        symbols = self.words[w]
        for pair in zip(symbols, symbols[1:]):
            if pair[0] in self.blocked or pair[1] in self.blocked:
                continue
            self.pair_count[pair] += sign * self.freqs[w]
            if sign > 0:
                self.where[pair].add(w)

    def merge(self, pair: tuple[str, str], merged: str, heap: list[tuple[int, tuple[str, str]]]) -> int:
        """Join ``pair`` into ``merged`` in every word, push the changed pairs' counts onto ``heap``; returns
        the tokens this removes from the data (overlapping pairs such as "..." count once)."""
        saved = 0
        for w in sorted(self.where.pop(pair, ())):
            self._count(w, -1)
            before = len(self.words[w])
            self.words[w] = _merge(self.words[w], pair, merged)
            saved += (before - len(self.words[w])) * self.freqs[w]
            self._count(w, +1)
            for p in zip(self.words[w], self.words[w][1:]):
                if self.pair_count.get(p, 0) > 0:
                    heapq.heappush(heap, (-self.pair_count[p], p))
        return saved


def _merge(symbols: list[str], pair: tuple[str, str], merged: str) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == pair[0] and symbols[i + 1] == pair[1]:
            out.append(merged)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def extend_tokenizer(
    tokenizer: Any, new_tokens: list[NewToken], what: str = "BASE"
) -> tuple[Any, list[NewToken]]:
    """A new tokenizer (same class and settings) whose BPE also knows ``new_tokens``; returns it and the ids."""
    from transformers import AutoTokenizer

    state = _bpe_model(tokenizer, what)
    model = state["model"]
    vocab, merges = model["vocab"], model["merges"]
    next_id = max([*vocab.values(), *(t["id"] for t in state["added_tokens"]), len(tokenizer) - 1]) + 1
    as_string = bool(merges) and isinstance(merges[0], str)
    placed = []
    for offset, new in enumerate(new_tokens):
        if new.token in vocab:
            raise WronAIError(
                f"{what}: token {new.token!r} is already in the vocabulary — choose new tokens on this tokenizer"
            )
        vocab[new.token] = next_id + offset
        merges.append(" ".join(new.merge) if as_string else list(new.merge))
        placed.append(
            NewToken(next_id + offset, new.token, new.text, list(new.base_ids), new.count, new.merge)
        )
    with tempfile.TemporaryDirectory(prefix="wronai-extend-") as tmp:
        tokenizer.save_pretrained(tmp)
        Path(tmp, "tokenizer.json").write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")
        extended = AutoTokenizer.from_pretrained(tmp)
    extended.padding_side = tokenizer.padding_side
    extended.model_max_length = tokenizer.model_max_length
    if tokenizer.pad_token is not None:
        extended.pad_token = tokenizer.pad_token
    check = extended.convert_tokens_to_ids([t.token for t in placed])
    if check != [t.id for t in placed]:
        raise RuntimeError("the extended tokenizer did not keep the new token ids")  # a bug, not a user error
    return extended, placed


def extend_with_data(
    tokenizer: Any, texts: Sequence[str], add: int, what: str = "BASE"
) -> tuple[Any, list[NewToken]]:
    """Choose ``add`` tokens on ``texts`` and return (extended tokenizer, new tokens with ids)."""
    chosen = choose_new_tokens(tokenizer, texts, add, what=what)
    extended, placed = extend_tokenizer(tokenizer, chosen, what=what)
    logger.info(
        "extended the tokenizer with %d tokens (ids %d..%d)",
        len(placed),
        placed[0].id if placed else 0,
        placed[-1].id if placed else 0,
    )
    return extended, placed


def apply_extend_vocab(tokenizer: Any, spec: Any) -> tuple[Any, list[NewToken], dict[int, list[int]]]:
    """``polish.extend_vocab`` for the pipeline: (extended tokenizer, new tokens, {new id: base piece ids}).

    ``spec`` is an ``ExtendVocabSpec`` (``data``: text files, ``add``: how many tokens). Call it on the
    loaded tokenizer, then ``init_new_embeddings(model, tokenizer, new_tokens)`` on the resized base model.
    """
    from wronai.model.tiny import iter_text

    missing = [f for f in spec.data if not Path(f).is_file()]
    if missing:
        raise WronAIError(
            f"polish.extend_vocab.data: file not found: {missing[0]} — fix the path (relative to the config file)"
        )
    texts = list(iter_text(spec.data))
    if not texts:
        raise WronAIError(
            "polish.extend_vocab.data holds no text — point it at .txt/.jsonl files with Polish text"
        )
    extended, placed = extend_with_data(tokenizer, texts, spec.add, what="polish.extend_vocab")
    return extended, placed, {t.id: list(t.base_ids) for t in placed}


def save_extension(
    tokenizer: Any, new_tokens: list[NewToken], out_dir: str | Path, base: str, data: list[str]
) -> Path:
    """Save the extended tokenizer and ``wronai_extension.json`` (new tokens and their base token ids)."""
    tokenizer.save_pretrained(str(out_dir))
    return write_extension_file(out_dir, new_tokens, base, data, len(tokenizer))


def write_extension_file(
    out_dir: str | Path, new_tokens: list[NewToken], base: str, data: list[str], vocab_size: int
) -> Path:
    """Write ``wronai_extension.json``: the base, the data, and each new token with its base token ids."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "base": str(base),
        "data": [str(d) for d in data],
        "added": len(new_tokens),
        "vocab_size": vocab_size,
        "tokens": [asdict(t) for t in new_tokens],
    }
    (out / EXTENSION_FILE).write_text(json.dumps(record, ensure_ascii=False, indent=1), encoding="utf-8")
    return out


def init_new_embeddings(
    model: Any, base_tokenizer: Any, new_tokens: Sequence[NewToken], method: str = "mean", seed: int = 0
) -> list[int]:
    """Set each new token's input and output embedding rows; returns the new ids.

    ``method="mean"`` (the default): the mean of the rows of the base pieces the base tokenizer used for the
    token (``NewToken.base_ids``; recomputed with ``base_tokenizer`` from ``NewToken.text`` when empty).
    ``method="random"`` draws rows with the existing rows' standard deviation; it exists for comparison.
    The embedding matrices grow when they are smaller than the largest new id.
    """
    if method not in ("mean", "random"):
        raise ValueError(f"method must be 'mean' or 'random', not {method!r}")
    if not new_tokens:
        return []
    ids = [t.id for t in new_tokens]
    need = max(ids) + 1
    if model.get_input_embeddings().weight.shape[0] < need:
        model.resize_token_embeddings(need, mean_resizing=False)
    n_base = min(len(base_tokenizer), min(ids))  # rows below the first new id belong to the base vocabulary
    pieces = []
    for t in new_tokens:
        base_ids = list(t.base_ids) or base_tokenizer(t.text, add_special_tokens=False)["input_ids"]
        if not base_ids or any(i < 0 or i >= n_base for i in base_ids):
            raise ValueError(f"new token {t.token!r}: base ids {base_ids} are not ids of the base tokenizer")
        pieces.append(base_ids)
    gen = torch.Generator().manual_seed(seed)
    index = torch.tensor(ids)
    with torch.no_grad():
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            if emb is None:
                continue
            weight = emb.weight
            if method == "mean":
                rows = torch.stack([weight[p].float().mean(dim=0) for p in pieces])
            else:
                std = weight[:n_base].float().std().item()
                rows = torch.randn(len(ids), weight.shape[1], generator=gen) * std
            weight[index] = rows.to(weight.dtype).to(weight.device)
    logger.info("initialised %d new embedding rows (%s of base pieces)", len(ids), method)
    return ids
