"""Using a finished run: load base + adapter, build prompts the way the run was trained, generate.

The prompt format is never specified again by hand: it comes from the run's saved config
(``wronai_config.yaml``: ``data.prompt_template`` / ``data.chat_template``) and the data format the run
resolved (``data_stats.json``), and is rendered by the same functions the data stage trained with::

    run = load_run("runs/offline-demo")
    prompt = run.prompt.single("Jaka jest stolica Polski?")
    [answer] = generate(run, [prompt], GenerationOptions(temperature=0))
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from wronai.config.schema import DataSection, ModelConfig
from wronai.data import formats
from wronai.errors import WronAIError
from wronai.rundir.locate import RunDir, locate_run

logger = logging.getLogger(__name__)

__all__ = [
    "GenerationOptions",
    "LoadedRun",
    "Prompt",
    "PromptFormat",
    "generate",
    "load_run",
]


@dataclass
class LoadedRun:
    dir: RunDir
    model: Any
    tokenizer: Any
    prompt: PromptFormat
    quantization: str  # e.g. 4bit-nf4 or none

    @property
    def path(self) -> Path:
        return self.dir.path


def quiet_third_party() -> None:
    """For the CLI: no weight-loading progress bars or library deprecation warnings between answers."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def load_tokenizer(run: RunDir) -> Any:
    from transformers import AutoTokenizer

    from wronai.model.tokenizer import set_pad_token

    trust = bool(run.config and run.config.model.trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(run.tokenizer_dir), trust_remote_code=trust)
    except (OSError, ValueError) as err:
        raise WronAIError(
            f"{run.tokenizer_dir}: cannot load the tokenizer ({str(err).splitlines()[0]}) — is the run complete?"
        ) from None
    set_pad_token(tokenizer)
    tokenizer.padding_side = "left"  # generation pads on the left so every row ends at its prompt
    return tokenizer


def load_run(
    path: str | Path,
    *,
    base_model: str | None = None,
    quantize: bool = True,
    device: str | None = None,
    dtype: Any = None,
) -> LoadedRun:
    """Load a run for inference: base (4-bit when the run was 4-bit and bitsandbytes works) + adapter.

    ``quantize=False`` loads the base in full precision; ``dtype`` (a torch dtype) forces the weights' dtype.
    """
    from wronai.config.schema import HardwareSection, QuantizationSection, TrainingSection
    from wronai.model.embeddings import resize_embeddings
    from wronai.runtime.hardware import plan_device

    run = locate_run(path)
    tokenizer = load_tokenizer(run)
    cfg = run.config
    name = base_model or run.base_name
    model_cfg = (cfg.model if cfg else ModelConfig(name=name)).model_copy(
        update={"name": name, "create_if_missing": None}
    )
    if not run.is_adapter:
        model_cfg = model_cfg.model_copy(update={"name": str(run.path)})
    hardware = (cfg.hardware if cfg else HardwareSection()).model_copy(
        update={"device": device} if device else {}
    )
    quant = (
        cfg.quantization if (cfg and run.is_adapter and quantize) else QuantizationSection(load_in_4bit=False)
    )
    plan = plan_device(hardware, cfg.training if cfg else TrainingSection(), quant, model_cfg)
    if dtype is not None:
        plan = dataclasses.replace(plan, model_dtype=dtype, compute_dtype=dtype)
    model = _load_base(model_cfg, quant, hardware, plan, run)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        resize_embeddings(model, len(tokenizer))  # tokens added in training: rows restored by the adapter
    if run.is_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(run.path))
    model.config.use_cache = True
    model.eval()
    if getattr(model, "is_loaded_in_4bit", False) and plan.device == "cpu":  # inference only: checked packing
        from wronai.kernels.bnb import allow_checked_packed_format

        logger.info("%s", allow_checked_packed_format(model))
    is_quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    quantized = plan.quantization if is_quantized else "none"
    logger.info(
        "loaded %s%s (%s, weights %s)",
        name,
        " + adapter" if run.is_adapter else "",
        quantized,
        plan.model_dtype,
    )
    return LoadedRun(
        run,
        model,
        tokenizer,
        PromptFormat.for_run(run.data_format, cfg.data if cfg else None, tokenizer),
        quantized,
    )


def _load_base(model_cfg: ModelConfig, quant: Any, hardware: Any, plan: Any, run: RunDir) -> Any:
    from wronai.model import loading

    where = f" (the base model of {run.path}; pass --base-model PATH if it moved)" if run.is_adapter else ""
    try:
        return loading.load_base_model(model_cfg, quant, hardware, plan)
    except WronAIError as err:
        raise WronAIError(f"{err}{where}") from None
    except (ImportError, RuntimeError) as err:
        if plan.quantization == "none":
            raise
        logger.warning(
            "4-bit loading failed (%s) — loading the base in full precision", str(err).splitlines()[0]
        )
        return loading.load_base_model(
            model_cfg, quant, hardware, dataclasses.replace(plan, quantization="none")
        )


# ----------------------------------------------------------------------------------------------- prompts


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


# ----------------------------------------------------------------------------------------------- generation


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


def _stop_criteria(tokenizer: Any, stop_strings: list[str], prompt_len: int) -> Any:
    import torch
    from transformers import StoppingCriteria

    longest = max(len(s) for s in stop_strings)

    class StopOnStrings(StoppingCriteria):
        """Per-row stop when the generated text so far contains an end-of-turn marker."""

        def __call__(self, input_ids, scores, **kwargs):
            done = []
            for row in input_ids:
                tail = tokenizer.decode(row[prompt_len:][-(longest + 8) :], skip_special_tokens=False)
                done.append(any(s in tail for s in stop_strings))
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StopOnStrings()


def _cut(text: str, stop_strings: list[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut]


def make_streamer(tokenizer: Any, stream: TextIO, stop_strings: list[str]) -> Any:
    """A transformers ``TextStreamer`` writing to ``stream`` that hides end-of-turn markers and what follows."""
    from transformers import TextStreamer

    class StopAwareStreamer(TextStreamer):
        def __init__(self) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.pending = ""
            self.stopped = False
            self.written = ""

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if self.stopped:
                return
            self.pending += text
            cut = _cut(self.pending, stop_strings) if stop_strings else self.pending
            if len(cut) < len(self.pending):
                self.stopped = True
                self._emit(cut)
                self.pending = ""
            else:
                # keep back a tail that could still grow into a stop string
                keep = max(
                    (k for s in stop_strings for k in range(1, len(s)) if self.pending.endswith(s[:k])),
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
                stream.write(text)
                stream.flush()

    return StopAwareStreamer()


def generate(
    run: LoadedRun,
    prompts: list[Prompt],
    options: GenerationOptions | None = None,
    *,
    stream: TextIO | None = None,
    batch_size: int = 8,
) -> list[str]:
    """Answers for ``prompts`` (batched, left-padded). With ``stream``, tokens are written as they come (one prompt)."""
    import torch
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
            StoppingCriteriaList([_stop_criteria(tokenizer, stops, enc["input_ids"].shape[1])])
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
