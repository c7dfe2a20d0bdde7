"""Row formats as pure functions: a raw row (dict) in, a list of text segments out.

Each segment is ``(text, trainable)``. Concatenated, the segments are exactly the text the model sees;
``trainable`` marks the answer parts whose tokens carry the loss (with ``train_on: answers``). A row that
cannot be used raises :class:`BadRow` naming the field and the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Segment = tuple[str, bool]

ALPACA_TEMPLATES = {
    "polish": "### Instrukcja:\n{instruction}\n\n{input_block}### Odpowiedź:\n",
    "english": "### Instruction:\n{instruction}\n\n{input_block}### Response:\n",
}
INPUT_BLOCKS = {"polish": "### Dane wejściowe:\n{input}\n\n", "english": "### Input:\n{input}\n\n"}
SYSTEM_BLOCK = "{system}\n\n"

# Named chat templates: (turn prefix by role, end of turn). The assistant's content *and* its end-of-turn
# marker are trained, so the model learns to stop; the prefix ("<|im_start|>assistant\n") is prompt.
CHAT_TEMPLATES: dict[str, dict[str, str]] = {
    "chatml": {
        "system": "<|im_start|>system\n",
        "user": "<|im_start|>user\n",
        "assistant": "<|im_start|>assistant\n",
        "end": "<|im_end|>\n",
    },
    "llama3": {
        "system": "<|start_header_id|>system<|end_header_id|>\n\n",
        "user": "<|start_header_id|>user<|end_header_id|>\n\n",
        "assistant": "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "end": "<|eot_id|>",
    },
    # Mistral closes every answer with the EOS token "</s>" (the tokenizer adds no second EOS after the last).
    "mistral": {"system": "", "user": "[INST] ", "assistant": "", "end": "</s>"},
}

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "bot": "assistant",
    "model": "assistant",
}

FORMAT_COLUMNS = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "completion": ("prompt", "completion"),
    "text": ("text",),
}


class BadRow(ValueError):
    """A row that cannot become a training example: ``field`` and ``reason`` say why."""

    def __init__(self, field: str, reason: str, code: str = "invalid") -> None:
        super().__init__(f"field `{field}`: {reason}")
        self.field = field
        self.reason = reason
        self.code = code


def detect_format(columns: list[str], text_column: str = "text") -> str | None:
    """The format implied by a dataset's column names, or None."""
    cols = set(columns)
    if "messages" in cols or "conversations" in cols:
        return "chat"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"prompt", "completion"} <= cols:
        return "completion"
    if text_column in cols:
        return "text"
    return None


def rename_columns(row: Mapping[str, Any], mapping: Mapping[str, str]) -> dict[str, Any]:
    """Apply ``data.columns`` (format name -> your column name) to one row."""
    if not mapping:
        return dict(row)
    out = dict(row)
    for canonical, actual in mapping.items():
        if actual in row:
            out[canonical] = row[actual]
    return out


def _required_text(row: Mapping[str, Any], field: str, allow_empty: bool = False) -> str:
    if field not in row or row[field] is None:
        raise BadRow(field, "missing", "missing_field")
    value = row[field]
    if not isinstance(value, str):
        raise BadRow(field, f"expected text, got {type(value).__name__}", "wrong_type")
    if not allow_empty and not value.strip():
        raise BadRow(field, "empty or whitespace only", "empty_field")
    return value


def _optional_text(row: Mapping[str, Any], field: str) -> str:
    value = row.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRow(field, f"expected text, got {type(value).__name__}", "wrong_type")
    return value


def format_text(row: Mapping[str, Any], text_column: str = "text") -> list[Segment]:
    return [(_required_text(row, text_column), True)]


def format_alpaca(row: Mapping[str, Any], template: str = "polish") -> list[Segment]:
    instruction = _required_text(row, "instruction")
    output = _required_text(row, "output")
    inp = _optional_text(row, "input").strip()
    system = _optional_text(row, "system").strip()
    if template in ALPACA_TEMPLATES:
        block = INPUT_BLOCKS[template].format(input=inp) if inp else ""
        prompt = ALPACA_TEMPLATES[template].format(instruction=instruction.strip(), input_block=block)
    else:
        prompt = template.format(instruction=instruction.strip(), input=inp)
    if system:
        prompt = SYSTEM_BLOCK.format(system=system) + prompt
    return [(prompt, False), (output.strip(), True)]


def format_completion(row: Mapping[str, Any]) -> list[Segment]:
    prompt = _required_text(row, "prompt")
    completion = _required_text(row, "completion")
    return [(prompt, False), (completion, True)]


def normalize_messages(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """OpenAI-style ``messages`` or ShareGPT ``conversations`` as a checked list of {role, content}."""
    field = "messages" if "messages" in row else "conversations"
    turns = row.get(field)
    if turns is None:
        raise BadRow("messages", "missing", "missing_field")
    if not isinstance(turns, list) or not turns:
        raise BadRow(field, "expected a non-empty list of messages", "wrong_type")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise BadRow(f"{field}[{i}]", f"expected an object, got {type(turn).__name__}", "wrong_type")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        role = SHAREGPT_ROLES.get(str(role).lower()) if role is not None else None
        if role is None:
            raise BadRow(
                f"{field}[{i}].role", f"unknown role {turn.get('role', turn.get('from'))!r}", "unknown_role"
            )
        if not isinstance(content, str):
            raise BadRow(f"{field}[{i}].content", "missing or not text", "wrong_type")
        if role == "assistant" and not content.strip():
            raise BadRow(f"{field}[{i}].content", "empty assistant answer", "empty_field")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow(field, "no assistant message to learn from", "no_answer")
    return messages


def format_chat(row: Mapping[str, Any], template: str = "chatml") -> list[Segment]:
    """Render messages with a named template; each assistant message + its end-of-turn is trainable."""
    if template not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}")
    parts = CHAT_TEMPLATES[template]
    segments: list[Segment] = []
    messages = normalize_messages(row)
    if template == "mistral":
        return _format_mistral(messages)
    for message in messages:
        role = message["role"]
        segments.append((parts[role], False))
        segments.append((message["content"] + parts["end"], role == "assistant"))
    return segments


def _format_mistral(messages: list[dict[str, str]]) -> list[Segment]:
    segments: list[Segment] = []
    system = ""
    for message in messages:
        if message["role"] == "system":
            system = message["content"].strip() + "\n\n"
        elif message["role"] == "user":
            segments.append((f"[INST] {system}{message['content'].strip()} [/INST]", False))
            system = ""
        else:
            segments.append((" " + message["content"].strip() + CHAT_TEMPLATES["mistral"]["end"], True))
    return segments


def formatter_for(
    fmt: str, *, text_column: str, prompt_template: str, chat_template: str
) -> Callable[[Mapping[str, Any]], list[Segment]]:
    """The row -> segments function for a format (chat_template here must be a named one)."""
    if fmt == "text":
        return lambda row: format_text(row, text_column)
    if fmt == "alpaca":
        return lambda row: format_alpaca(row, prompt_template)
    if fmt == "completion":
        return format_completion
    if fmt == "chat":
        return lambda row: format_chat(row, chat_template)
    raise ValueError(f"unknown format {fmt!r}")
