"""Polish tokenization, measured and trained: fertility statistics and a Polish byte-level BPE.

``tokenizer_stats(tokenizer, texts)`` measures how well a tokenizer fits Polish text:

- **fertility**: tokens per word. A word is a run of letters or digits (``ą``, ``ż``... included); each word
  counts the tokens whose character span overlaps it, in context, as the tokenizer cuts the running text;
- **characters per token** over the whole text (punctuation and spaces included);
- **split ≥3**: share of word occurrences cut into three or more tokens;
- **unknown / byte-fallback rate**: unknown tokens plus *byte pieces* (tokens that hold only part of a
  multi-byte UTF-8 character, e.g. one byte of ``ę``: byte-level BPE, or ``<0xC4>`` byte-fallback tokens);
- the **most fragmented frequent words**, ranked by occurrences × (pieces − 1): the tokens they cost.

``train_polish_tokenizer(texts, vocab_size)`` trains a byte-level BPE (nothing is ever unknown) with NFC
normalization and a Polish-aware pre-tokenizer (letters with diacritics stay inside one word, digits are
split one by one, punctuation is never glued to letters), wrapped as a Hugging Face fast tokenizer.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from wronai.errors import WronAIError

#: Pre-tokenizer pattern: a word (letters + combining marks) with an optional leading space, one digit,
#: a run of punctuation/symbols, or whitespace (GPT-2 style: the last space goes with the next word).
POLISH_SPLIT_PATTERN = r" ?[\p{L}\p{M}]+| ?\p{N}| ?[^\s\p{L}\p{M}\p{N}]+|\s+(?!\S)|\s+"
SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}  # as wronai.model.tiny (no torch import here)
_WORD = re.compile(r"[^\W_]+")
BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")  # a byte-fallback token: <0xC4>


@dataclass
class FragmentedWord:
    word: str
    count: int
    pieces: int
    split: list[str]

    @property
    def cost(self) -> int:
        return self.count * (self.pieces - 1)


@dataclass
class TokenizerStats:
    name: str
    vocab_size: int
    chars: int
    words: int
    tokens: int
    word_tokens: int
    split3_words: int
    unk_tokens: int
    byte_tokens: int
    fragmented: list[FragmentedWord] = field(default_factory=list)

    @property
    def fertility(self) -> float:
        return self.word_tokens / max(self.words, 1)

    @property
    def chars_per_token(self) -> float:
        return self.chars / max(self.tokens, 1)

    @property
    def split3_share(self) -> float:
        return self.split3_words / max(self.words, 1)

    @property
    def unk_rate(self) -> float:
        return (self.unk_tokens + self.byte_tokens) / max(self.tokens, 1)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            fertility=round(self.fertility, 4),
            chars_per_token=round(self.chars_per_token, 4),
            split3_share=round(self.split3_share, 4),
            unk_rate=round(self.unk_rate, 5),
        )
        return out


# --- loading --------------------------------------------------------------------------------------------


def load_tokenizer_dir(path: str | Path, what: str = "TOKENIZER") -> Any:
    """A fast tokenizer from a local directory, or a one-line WronAIError naming the argument."""
    from transformers import AutoTokenizer

    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise WronAIError(
            f"{what}: {directory} is not a directory — pass a local tokenizer or model directory"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WronAIError(
            f"{what}: {directory} holds no loadable tokenizer ({first}) — it needs tokenizer.json/tokenizer_config.json"
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise WronAIError(
            f"{what}: {directory} has only a slow tokenizer — save it with a tokenizer.json (fast tokenizer)"
        )
    return tokenizer


def repo_eval_files() -> list[Path]:
    """The bundled held-out Polish text (``data/eval_pl/*.txt`` of a source checkout), or []."""
    root = Path(__file__).resolve().parents[3]
    return sorted((root / "data" / "eval_pl").glob("*.txt"))


def resolve_data(files: list[str] | None, option: str = "--data") -> list[str]:
    """The given files (checked), or the bundled eval text when none are given."""
    if not files:
        found = repo_eval_files()
        if not found:
            raise WronAIError(
                f"{option}: no files given and data/eval_pl/ is not available here — pass {option} FILE..."
            )
        return [str(p) for p in found]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise WronAIError(f"{option}: file not found: {missing[0]} — fix the path")
    return list(files)


def read_texts(files: list[str]) -> list[str]:
    """Paragraphs of .txt files and string fields of .json/.jsonl rows (see ``wronai.model.tiny.iter_text``)."""
    from wronai.model.tiny import iter_text

    texts = list(iter_text(files))
    if not texts:
        raise WronAIError(
            f"--data: {', '.join(files)} hold no text — pass .txt/.jsonl files with Polish text"
        )
    return texts


# --- statistics -----------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: byte-level alphabet character -> byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def is_byte_level(tokenizer: Any) -> bool:
    """True when the tokenizer's decoder maps tokens through GPT-2's byte-level alphabet."""
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder")
    return '"ByteLevel"' in json.dumps(decoder)


def token_bytes(token: str) -> bytes | None:
    """The raw bytes of a byte-level token, or None when the string is not in the byte-level alphabet."""
    table = _byte_decoder()
    try:
        return bytes(table[c] for c in token)
    except KeyError:
        return None


def byte_piece_ids(tokenizer: Any) -> set[int]:
    """Ids of tokens that hold only part of a multi-byte UTF-8 character (byte-level or <0xNN> fallback)."""
    byte_level = is_byte_level(tokenizer)
    ids = set()
    for token, idx in tokenizer.get_vocab().items():
        if BYTE_FALLBACK.match(token):
            ids.add(idx)
        elif byte_level:
            raw = token_bytes(token)
            if raw is not None:
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    ids.add(idx)
    return ids


def tokenizer_stats(
    tokenizer: Any, texts: list[str], name: str = "tokenizer", top: int = 10, min_count: int = 2
) -> TokenizerStats:
    """Fertility, characters per token, split share, unknown/byte rate and the worst frequent words."""
    byte_ids = byte_piece_ids(tokenizer)
    unk_id = tokenizer.unk_token_id
    stats = TokenizerStats(name, len(tokenizer), 0, 0, 0, 0, 0, 0, 0)
    counts: Counter[str] = Counter()
    splits: dict[str, Counter[tuple[int, ...]]] = {}
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        stats.chars += len(text)
        stats.tokens += len(ids)
        stats.unk_tokens += sum(1 for i in ids if i == unk_id)
        stats.byte_tokens += sum(1 for i in ids if i in byte_ids)
        owner = [-1] * len(text)  # character -> index of the word it belongs to
        words = list(_WORD.finditer(text))
        for w, match in enumerate(words):
            owner[match.start() : match.end()] = [w] * (match.end() - match.start())
        pieces: list[list[int]] = [[] for _ in words]
        for idx, (start, end) in zip(ids, offsets):
            for w in sorted({owner[c] for c in range(start, min(end, len(text))) if owner[c] >= 0}):
                pieces[w].append(idx)
        for match, piece_ids in zip(words, pieces):
            word = match.group()
            stats.words += 1
            stats.word_tokens += len(piece_ids)
            stats.split3_words += len(piece_ids) >= 3
            counts[word] += 1
            splits.setdefault(word, Counter())[tuple(piece_ids)] += 1
    stats.fragmented = _most_fragmented(tokenizer, counts, splits, top, min_count)
    return stats


def _most_fragmented(
    tokenizer: Any, counts: Counter[str], splits: dict, top: int, min_count: int
) -> list[FragmentedWord]:
    found = []
    for word, count in counts.items():
        ids = splits[word].most_common(1)[0][0]
        if count >= min_count and len(ids) >= 3:
            found.append(
                FragmentedWord(word, count, len(ids), [tokenizer.decode([i]).strip() or "␣" for i in ids])
            )
    found.sort(key=lambda f: (-f.cost, -f.count, f.word))
    return found[:top]


def format_stats_table(all_stats: list[TokenizerStats], top: int = 5) -> str:
    """The statistics of several tokenizers side by side, then each one's most fragmented frequent words."""
    rows = [
        ("vocabulary size", [f"{s.vocab_size:,}" for s in all_stats]),
        ("words / characters", [f"{s.words:,} / {s.chars:,}" for s in all_stats]),
        ("tokens", [f"{s.tokens:,}" for s in all_stats]),
        ("fertility (tokens/word)", [f"{s.fertility:.3f}" for s in all_stats]),
        ("characters per token", [f"{s.chars_per_token:.3f}" for s in all_stats]),
        ("words split into >=3 pieces", [f"{100 * s.split3_share:.1f}%" for s in all_stats]),
        ("unknown / byte-fallback rate", [f"{100 * s.unk_rate:.2f}%" for s in all_stats]),
    ]
    base = all_stats[0]
    if len(all_stats) > 1:
        rows.append(
            (
                "fertility vs first",
                ["—"] + [f"{100 * (s.fertility / base.fertility - 1):+.1f}%" for s in all_stats[1:]],
            )
        )
    label_w = max(len(r[0]) for r in rows)
    widths = [max(len(s.name), *(len(r[1][i]) for r in rows)) for i, s in enumerate(all_stats)]
    lines = ["  ".join([" " * label_w, *(s.name.rjust(w) for s, w in zip(all_stats, widths))])]
    for label, cells in rows:
        lines.append("  ".join([label.ljust(label_w), *(c.rjust(w) for c, w in zip(cells, widths))]))
    for s in all_stats:
        if s.fragmented and top > 0:
            lines.append(f"\nmost fragmented frequent words — {s.name} (occurrences x pieces):")
            for f in s.fragmented[:top]:
                lines.append(f"  {f.word:<20} {f.count:>4} x {f.pieces}  {'|'.join(f.split)}")
    return "\n".join(lines) + "\n"


def column_names(paths: list[str]) -> list[str]:
    """Short, unique column names for tokenizer directories (the last path parts that tell them apart)."""
    parts = [Path(p).expanduser().resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


# --- training -------------------------------------------------------------------------------------------


def polish_pre_tokenizer() -> Any:
    """Split into words (diacritics inside), single digits and punctuation runs, then map to bytes."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(POLISH_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def train_polish_tokenizer(texts: list[str], vocab_size: int, min_frequency: int = 2) -> Any:
    """A Polish byte-level BPE fast tokenizer (NFC, Polish-aware pre-tokenization, no unknown tokens)."""
    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size <= floor:
        raise WronAIError(
            f"--vocab-size: {vocab_size} is too small — use more than {floor} (256 bytes + special tokens)"
        )
    if not texts:
        raise WronAIError("--data: no text to train on — pass .txt/.jsonl files with Polish text")
    from wronai.model.tiny import train_tokenizer

    return train_tokenizer(
        texts, vocab_size, pre_tokenizer=polish_pre_tokenizer(), min_frequency=min_frequency
    )
