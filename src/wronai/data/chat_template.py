"""Chat rendering with the tokenizer's own chat template, split into prompt and answer segments.

The template is a black box (Jinja), so the answer spans are found by rendering growing prefixes of the
conversation: for the i-th assistant message, the text rendered for ``messages[:i]`` with the generation
prompt is what precedes the answer, and the text for ``messages[:i+1]`` ends right after it (end-of-turn
marker included). This is exactly what ``apply_chat_template`` produces at inference time.
"""

from __future__ import annotations

from typing import Any

from wronai.data.formats import BadRow, Segment

_MISMATCH = (
    "the tokenizer's chat template does not render conversations prefix by prefix — "
    "set data.chat_template to chatml, llama3 or mistral"
)


class TokenizerChatRenderer:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def __call__(self, messages: list[dict[str, str]]) -> list[Segment]:
        segments: list[Segment] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            after = self.render(messages[: i + 1])
            if not before.startswith(done) or not after.startswith(before):
                raise BadRow("messages", _MISMATCH, "template_mismatch")
            segments.append((before[len(done) :], False))
            segments.append((after[len(before) :], True))
            done = after
        full = self.render(messages)
        if not full.startswith(done):
            raise BadRow("messages", _MISMATCH, "template_mismatch")
        if len(full) > len(done):
            segments.append((full[len(done) :], False))
        return segments
