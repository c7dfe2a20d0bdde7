"""Pre-flight checks on the prepared data, before the first training step (``data.checks``).

Each check returns None when it passes, or one line naming the problem, the first offending row and the fix:

- ``eos``: every instruction/chat example's last trained token is EOS or the template's end-of-turn marker
  (so the model learns to stop; catches a masked or missing EOS, e.g. the pad == eos bug);
- ``chat_template``: the conversation text trained on equals what ``tokenizer.apply_chat_template`` renders
  for inference (a named data.chat_template that differs from the tokenizer's own template fails);
- ``too_long``: at most ``data.max_truncated_share`` of rows were dropped as longer than max_seq_length.

Rows without trainable tokens are rejected row by row while tokenizing (see ``tokenize.check_length``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from wronai.data import formats
from wronai.data.tokenize import IGNORE_INDEX
from wronai.errors import DataError

logger = logging.getLogger(__name__)

KNOWN_END_MARKERS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<end_of_turn>",
    "<|end|>",
    "<|endoftext|>",
    "</s>",
    "<|end_of_text|>",
)
SAMPLE_CONVERSATION = [
    {"role": "user", "content": "Jaka jest stolica Polski?"},
    {"role": "assistant", "content": "Stolicą Polski jest Warszawa."},
]


def end_markers(tokenizer: Any, fmt: str, chat_template: str) -> list[str]:
    """Texts an answer may end with: EOS, the named template's end of turn, end markers of the tokenizer's template."""
    markers = [tokenizer.eos_token] if tokenizer.eos_token else []
    if fmt == "chat":
        if chat_template in formats.CHAT_TEMPLATES:
            markers.append(formats.CHAT_TEMPLATES[chat_template]["end"].strip())
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, str):
            markers.extend(m for m in KNOWN_END_MARKERS if m in own)
    return [m for m in dict.fromkeys(markers) if m]


def last_trained(labels: Sequence[int]) -> int | None:
    """Index of the last token that carries the loss, or None."""
    for k in range(len(labels) - 1, -1, -1):
        if labels[k] != IGNORE_INDEX:
            return k
    return None


def ends_with_marker(
    tokenizer: Any, example: Mapping[str, Sequence[int]], marker_ids: set[int], markers: list[str]
) -> bool:
    """Is the last trained token a marker (or the trained text's end, trailing whitespace aside, a marker)?"""
    labels = example["labels"]
    k = last_trained(labels)
    if k is None:
        return False
    if labels[k] in marker_ids:
        return True
    tail = [t for t in labels[max(0, k - 15) : k + 1] if t != IGNORE_INDEX]
    text = tokenizer.decode(tail, skip_special_tokens=False).rstrip()
    return any(text.endswith(m) for m in markers)


def check_eos(
    examples: Sequence[Mapping[str, Sequence[int]]],
    wheres: Sequence[str],
    tokenizer: Any,
    fmt: str,
    chat_template: str,
    add_eos: bool,
) -> str | None:
    """Instruction and chat examples must end their trained part with EOS or the end-of-turn marker."""
    if fmt == "text" or not add_eos:
        return None
    own_template = fmt == "chat" and chat_template == "auto" and getattr(tokenizer, "chat_template", None)
    if tokenizer.eos_token_id is None and not own_template:
        return "eos: the tokenizer has no EOS token, so answers cannot end with one — set eos_token with extensions.tokenizer_hook, or data.add_eos: false"
    named = chat_template if chat_template != "auto" else ("chatml" if not own_template else "auto")
    markers = end_markers(tokenizer, fmt, named)
    if own_template:  # the tokenizer's own template may close a turn with any of its special tokens
        skip = {
            tokenizer.bos_token,
            tokenizer.unk_token,
            tokenizer.pad_token if tokenizer.pad_token != tokenizer.eos_token else None,
        }
        markers += [t for t in tokenizer.all_special_tokens if t not in skip and t not in markers]
    marker_ids = {tokenizer.convert_tokens_to_ids(m) for m in markers} - {tokenizer.unk_token_id, None}
    bad = [i for i, ex in enumerate(examples) if not ends_with_marker(tokenizer, ex, marker_ids, markers)]
    if not bad:
        return None
    first = examples[bad[0]]
    k = last_trained(first["labels"])
    last = (
        "none (every token is masked)"
        if k is None
        else repr(tokenizer.decode([first["input_ids"][k]], skip_special_tokens=False))
    )
    return (
        f"eos: {len(bad)} of {len(examples)} examples do not end their trained tokens with {' or '.join(markers) or 'EOS'} "
        f"(first: {wheres[bad[0]] if bad[0] < len(wheres) else f'example {bad[0]}'}, last trained token {last}) — the model would not "
        "learn to stop; make sure the EOS/end-of-turn token is not masked (pad == eos with label masking by token id) and data.add_eos is on"
    )


def _render_named(messages: list[dict[str, str]], template: str) -> str:
    return "".join(text for text, _ in formats.format_chat({"messages": messages}, template))


def check_chat_template(
    fmt: str, chat_template: str, tokenizer: Any, samples: list[list[dict[str, str]]], renderer: Any = None
) -> str | None:
    """The conversation text trained on must be what ``apply_chat_template`` gives at inference."""
    own = getattr(tokenizer, "chat_template", None)
    if fmt != "chat" or not own:
        return None
    conversations = samples[:3] or [SAMPLE_CONVERSATION]
    for messages in conversations:
        try:
            expected = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as err:  # Jinja templates raise anything (e.g. "system role not supported")
            logger.warning(
                "data: check chat_template skipped — the tokenizer's template cannot render a sample (%s)",
                err,
            )
            return None
        bos = tokenizer.bos_token or ""
        if bos and expected.startswith(bos):
            expected = expected[len(bos) :]
        if chat_template == "auto":
            trained = "".join(text for text, _ in renderer(messages)) if renderer is not None else expected
            if bos and trained.startswith(bos):
                trained = trained[len(bos) :]
        else:
            trained = _render_named(messages, chat_template)
        if trained != expected:
            return (
                f"chat_template: data.chat_template {chat_template} renders conversations differently from the tokenizer's own chat "
                f"template, which apply_chat_template uses at inference (trained {trained[:60]!r}..., inference {expected[:60]!r}...) "
                "— set data.chat_template: auto to train on the tokenizer's template"
            )
    return None


def check_too_long(
    too_long: int, rows: int, max_share: float, max_seq_length: int, first: str | None
) -> str | None:
    """At most ``max_share`` of rows may be dropped for being longer than max_seq_length."""
    share = too_long / max(rows, 1)
    if share <= max_share:
        return None
    where = f" (first: {first})" if first else ""
    return (
        f"too_long: {too_long} of {rows} rows ({100 * share:.1f}%) are longer than data.max_seq_length={max_seq_length} and were "
        f"dropped{where}, more than data.max_truncated_share={max_share:g} — raise data.max_seq_length, shorten the rows, "
        "or raise data.max_truncated_share"
    )


def summarize(results: Mapping[str, str | None]) -> dict[str, str]:
    return {name: "ok" if problem is None else problem for name, problem in results.items()}


def enforce(results: Mapping[str, str | None]) -> None:
    """Raise one DataError listing every failed check (one line each)."""
    problems = [p for p in results.values() if p is not None]
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise DataError(
            f"data checks failed ({len(problems)}):\n{lines}\n(run `wronai data check CONFIG` to repeat them; data.checks: false skips them)"
        )
