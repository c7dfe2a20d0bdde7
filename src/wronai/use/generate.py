"""Generating with a loaded run: sampling options, end-of-turn stops, streaming, batches and chat sessions.

Only the commands that generate import it (it loads transformers)::

run = load_run("runs/offline-demo")
prompt = run.prompt.single("Jaka jest stolica Polski?")
[answer] = generate(run, [prompt], GenerationOptions(temperature=0))
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

import torch
from transformers import StoppingCriteria, TextStreamer

from wronai.errors import WronAIError
from wronai.use.prompts import Prompt

if TYPE_CHECKING:
    from wronai.use.load import LoadedRun

logger = logging.getLogger(__name__)

__all__ = ["ChatSession", "GenerationOptions", "generate", "make_streamer"]


@dataclass
class GenerationOptions:
    """Sampling settings; temperature 0 means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1
    seed: int | None = None

    def check(self) -> GenerationOptions:
        if self.max_new_tokens < 1:
            raise WronAIError(f"--max-new-tokens {self.max_new_tokens}: must be at least 1")
        if self.temperature < 0:
            raise WronAIError(f"--temperature {self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise WronAIError(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise WronAIError(f"--top-k {self.top_k}: must be >= 0 (0 = off)")
        if self.repetition_penalty <= 0:
            raise WronAIError(f"--repetition-penalty {self.repetition_penalty}: must be > 0 (1 = off)")
        return self

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.temperature == 0:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs


class StopOnStrings(StoppingCriteria):
    """Per-row stop when the generated text so far contains an end-of-turn marker."""

    def __init__(self, tokenizer: Any, stop_strings: list[str], prompt_len: int) -> None:
        self.tokenizer, self.stop_strings, self.prompt_len = tokenizer, stop_strings, prompt_len
        self.longest = max(len(s) for s in stop_strings)

    def __call__(self, input_ids, scores, **kwargs):
        done = []
        for row in input_ids:
            tail = self.tokenizer.decode(
                row[self.prompt_len :][-(self.longest + 8) :], skip_special_tokens=False
            )
            done.append(any(s in tail for s in self.stop_strings))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _cut(text: str, stop_strings: list[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut]


class StopAwareStreamer(TextStreamer):
    """A transformers ``TextStreamer`` writing to ``stream`` that hides end-of-turn markers and what follows."""

    def __init__(self, tokenizer: Any, stream: TextIO, stop_strings: list[str]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stream, self.stop_strings = stream, stop_strings
        self.pending = ""
        self.stopped = False
        self.written = ""

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self.stopped:
            return
        self.pending += text
        cut = _cut(self.pending, self.stop_strings) if self.stop_strings else self.pending
        if len(cut) < len(self.pending):
            self.stopped = True
            self._emit(cut)
            self.pending = ""
        else:
            # keep back a tail that could still grow into a stop string
            keep = max(
                (k for s in self.stop_strings for k in range(1, len(s)) if self.pending.endswith(s[:k])),
                default=0,
            )
            self._emit(self.pending[: len(self.pending) - keep])
            self.pending = self.pending[len(self.pending) - keep :]
        if stream_end:
            self._emit(self.pending)
            self.pending = ""

    def _emit(self, text: str) -> None:
        if not self.written:
            text = text.lstrip()  # the answer's leading space belongs to the template, not the reply
        if text:
            self.written += text
            self.stream.write(text)
            self.stream.flush()


def make_streamer(tokenizer: Any, stream: TextIO, stop_strings: list[str]) -> StopAwareStreamer:
    """The streamer of ``generate``: ``stream`` gets the answer as it is generated, without end-of-turn markers."""
    return StopAwareStreamer(tokenizer, stream, stop_strings)


def generate(
    run: LoadedRun,
    prompts: list[Prompt],
    options: GenerationOptions | None = None,
    *,
    stream: TextIO | None = None,
    batch_size: int = 8,
) -> list[str]:
    """Answers for ``prompts`` (batched, left-padded). With ``stream``, tokens are written as they come (one prompt)."""
    from transformers import StoppingCriteriaList

    options = (options or GenerationOptions()).check()
    if stream is not None and len(prompts) != 1:
        raise ValueError("streaming needs exactly one prompt")
    if options.seed is not None:
        torch.manual_seed(options.seed)
    tokenizer, model = run.tokenizer, run.model
    stops = run.prompt.stop_strings
    eos_ids = _eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        part = prompts[start : start + batch_size]
        texts = [p.text for p in part]
        enc = tokenizer(
            texts, return_tensors="pt", padding=True, add_special_tokens=part[0].add_special_tokens
        ).to(device)
        kwargs = options.generate_kwargs()
        criteria = (
            StoppingCriteriaList([StopOnStrings(tokenizer, stops, enc["input_ids"].shape[1])])
            if stops
            else None
        )
        streamer = make_streamer(tokenizer, stream, stops) if stream is not None else None
        out = model.generate(
            **enc, **kwargs, stopping_criteria=criteria, streamer=streamer,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids or None,
        )  # fmt: skip
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            for i, tok in enumerate(row):
                if tok in eos_ids:
                    row = row[:i]
                    break
            answers.append(_cut(tokenizer.decode(row, skip_special_tokens=True), stops).strip())
    return answers


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


class ChatSession:
    """Multi-turn history rendered with the run's own format; the oldest turns go when the context fills up."""

    def __init__(self, run: LoadedRun, options: GenerationOptions | None = None, system: str = "") -> None:
        self.run = run
        self.options = (options or GenerationOptions()).check()
        self.system = system
        self.history: list[dict[str, str]] = []
        cfg = run.dir.config
        limit = cfg.data.max_seq_length if cfg else getattr(run.model.config, "max_position_embeddings", 2048)
        self.max_prompt_tokens = max(16, limit - self.options.max_new_tokens)

    def reset(self) -> None:
        self.history = []

    def messages(self, message: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.history, {"role": "user", "content": message}]

    def prompt_for(self, message: str) -> Prompt:
        while True:
            prompt = self.run.prompt.conversation(self.messages(message))
            n = len(
                self.run.tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens)["input_ids"]
            )
            if n <= self.max_prompt_tokens or not self.history:
                return prompt
            logger.info("chat: dropping the oldest turn (%d prompt tokens > %d)", n, self.max_prompt_tokens)
            self.history = self.history[2:]

    def reply(self, message: str, stream: TextIO | None = None) -> str:
        prompt = self.prompt_for(message)
        [answer] = generate(self.run, [prompt], self.options, stream=stream)
        self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
        return answer
