"""Prompts in a run's own format: rendered by the data stage's functions up to where the answer starts.

The prompt format is never specified again by hand: it comes from the run's saved config
(``wronai_config.yaml``: ``data.prompt_template`` / ``data.chat_template``) and the data format the run
resolved (``data_stats.json``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from wronai.config.sections.data import DataSection
from wronai.data import formats
from wronai.errors import WronAIError

logger = logging.getLogger(__name__)

__all__ = ["HISTORY_LABELS", "POLISH_LABELS", "Prompt", "PromptFormat"]


@dataclass(frozen=True)
class Prompt:
    text: str
    add_special_tokens: bool = True  # False when a chat template already holds BOS and the like


HISTORY_LABELS = {"english": ("User", "Assistant")}
POLISH_LABELS = ("Użytkownik", "Asystent")


class PromptFormat:
    """Renders prompts exactly as the run's training examples were rendered, up to where the answer starts."""

    def __init__(self, fmt: str, data_cfg: DataSection | None, tokenizer: Any) -> None:
        self.fmt = fmt  # alpaca | chat | completion | text | raw
        self.tokenizer = tokenizer
        self.template = data_cfg.prompt_template if data_cfg else "polish"
        chat = data_cfg.chat_template if data_cfg else "auto"
        self.own_chat_template = (
            fmt == "chat" and chat == "auto" and bool(getattr(tokenizer, "chat_template", None))
        )
        self.chat_name = "chatml" if chat == "auto" else chat
        self.stop_strings = self._stop_strings()

    @classmethod
    def for_run(cls, fmt: str | None, data_cfg: DataSection | None, tokenizer: Any) -> PromptFormat:
        if fmt is None:
            logger.info("the run's data format is unknown (no data_stats.json) — prompts are sent as written")
        return cls(fmt or "raw", data_cfg, tokenizer)

    def describe(self) -> str:
        if self.fmt == "alpaca":
            name = self.template if self.template in formats.ALPACA_TEMPLATES else "custom"
            return f"alpaca prompt template ({name})"
        if self.fmt == "chat":
            return (
                "chat template (the tokenizer's own)"
                if self.own_chat_template
                else f"chat template ({self.chat_name})"
            )
        return f"{self.fmt} format (prompt sent as written)"

    def single(self, text: str, *, input: str = "", system: str = "") -> Prompt:
        """One instruction/question (``input`` = the alpaca input block, ``system`` = a system message)."""
        if not text.strip():
            raise WronAIError(
                "the prompt is empty — pass some text with --prompt (or a non-empty line in --prompts-file)"
            )
        if self.fmt == "alpaca":
            row = {"instruction": text, "input": input, "system": system, "output": "."}
            return Prompt(formats.format_alpaca(row, self.template)[0][0])
        if self.fmt == "chat":
            messages = [{"role": "system", "content": system}] if system else []
            return self.conversation(
                [*messages, {"role": "user", "content": text if not input else f"{text}\n\n{input}"}]
            )
        return Prompt(text if not input else f"{text}\n{input}")

    def conversation(self, messages: list[dict[str, str]]) -> Prompt:
        """A multi-turn history ending with the user's message, rendered for the next answer."""
        if self.fmt == "chat":
            if self.own_chat_template:
                text = self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
                return Prompt(text, add_special_tokens=False)
            probe = {"messages": [*messages, {"role": "assistant", "content": "x"}]}
            segments = formats.format_chat(probe, self.chat_name)
            return Prompt("".join(text for text, _ in segments[:-1]))
        system = "\n".join(m["content"] for m in messages if m["role"] == "system")
        turns = [m for m in messages if m["role"] != "system"]
        last = turns[-1]["content"]
        if self.fmt == "alpaca":
            user, bot = HISTORY_LABELS.get(self.template, POLISH_LABELS)
            history = "\n".join(
                f"{user if m['role'] == 'user' else bot}: {m['content'].strip()}" for m in turns[:-1]
            )
            return self.single(last, input=history, system=system)
        return Prompt("\n\n".join(m["content"] for m in turns))

    def _stop_strings(self) -> list[str]:
        """End-of-turn markers the model learned to emit (generation stops there; they are not shown)."""
        if self.fmt != "chat":
            return []
        if not self.own_chat_template:
            end = formats.CHAT_TEMPLATES[self.chat_name]["end"].strip()
        else:
            probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ANSWER_END_PROBE"}]
            try:
                rendered = self.tokenizer.apply_chat_template(probe, tokenize=False)
            except Exception:  # a template that rejects this probe simply gets no stop string
                return []
            end = rendered.split("ANSWER_END_PROBE", 1)[-1].strip()
        eos = self.tokenizer.eos_token or ""
        return [end] if end and end != eos else []
