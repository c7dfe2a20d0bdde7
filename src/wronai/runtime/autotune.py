"""Autotune: the CPU choices the device plan cannot know in advance, timed once, fixed and logged.

On a CPU, whether bf16 autocast beats fp32 (native bf16 only: AVX512-BF16/AMX; emulated bf16 is never timed),
whether the fused LoRA step beats PEFT's modules and whether 4-bit weights are faster dequantized in row
slices or whole depends on the CPU and on the model's shapes. ``decide`` times forward + backward of one
decoder layer's projections of the model (``wronai.runtime.autotune_layer``: built in-process from its
config.json, 4-bit or dense as the plan says, LoRA of the run's rank) for each open choice, one after the
other — precision, then LoRA layers, then row slices, each starting from what was chosen before; the two
candidates of a choice take turns, the fastest call of each counts — within a time budget (a layer step too
large for it keeps fewer of its rows, then fewer tokens), and keeps the plan's value unless the other is
faster by more than ``MARGIN``. On a machine other processes keep busy the timings are theirs as much as
ours: a choice then mostly keeps the plan's value.

The result is a ``Decision``: the values, the timings, one readable line per choice (``reasons``) and where it
came from (``source``: timed, fixed, resumed). It is saved in the run directory and its checkpoints
(``AUTOTUNE_FILE``) and ``resolve`` reads it back on resume instead of timing again, so a resumed run
computes exactly as before. ``apply`` gives the device plan with the decision in it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wronai.rundir.files import AUTOTUNE_FILE
from wronai.runtime.autotune_layer import Candidate, LayerShapes, TimedLayer, size_name
from wronai.runtime.hardware import DevicePlan, with_compute_note

logger = logging.getLogger(__name__)

MARGIN = 0.03  # the other candidate must be this much faster to replace the plan's value (timing noise)
MAX_TOKENS = 2048  # tokens of the timed layer step, at most
MIN_TOKENS = 128  # a layer step too large for the budget is cut to this many tokens at the least ...
MIN_FRACTION = 1 / 16  # ... after its rows, to this share of them (the matmuls' input widths stay)
ROUNDS = (3, 8)  # a choice's two candidates are timed in turn, this many rounds planned / at most (the
# first call of a shape sets up its kernels; taking turns shares a busy machine's slow moments between them)
OVERHEAD = 1.5  # a 4-bit layer step's time over its matmuls' at the fp32 rate (dequantization, LoRA)
SOURCES = ("timed", "fixed", "resumed")
QUESTIONS = ("precision", "fused_lora", "row_slices")  # in the order they are decided


@dataclass
class Decision:
    """What autotune chose, why, and from where."""

    precision: str  # bf16 | fp16 | fp32
    fused_lora: bool
    dequantize_chunk_bytes: int
    timings_ms: dict[str, float] = field(default_factory=dict)  # candidate label -> ms per layer step
    reasons: list[str] = field(default_factory=list)  # one line per choice
    source: str = "fixed"  # timed | fixed | resumed
    tokens: int = 0  # tokens of the timed layer step (0 = nothing timed)
    rows_fraction: float = 1.0  # share of each projection's rows the timed layer had
    seconds: float = 0.0  # how long deciding took

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Decision:
        """The decision ``to_json`` wrote; ValueError when the text is not one."""
        try:
            raw = json.loads(text)
            decision = cls(**raw)
        except (TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"not an autotune decision: {err}") from None
        if decision.precision not in ("bf16", "fp16", "fp32") or decision.source not in SOURCES:
            raise ValueError(
                f"not an autotune decision: precision {decision.precision!r}, source {decision.source!r}"
            )
        if not isinstance(decision.fused_lora, bool) or not isinstance(decision.dequantize_chunk_bytes, int):
            raise ValueError("not an autotune decision: fused_lora/dequantize_chunk_bytes of the wrong type")
        return decision

    def save(self, run_dir: str | Path) -> Path:
        """Write ``AUTOTUNE_FILE`` into ``run_dir`` (a run directory or a checkpoint); returns its path."""
        path = Path(run_dir) / AUTOTUNE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path


def load(path: str | Path) -> Decision | None:
    """The decision in ``path`` (the file, or a directory holding ``AUTOTUNE_FILE``); None when there is none
    or it does not read (with a warning)."""
    path = Path(path)
    if path.is_dir():
        path = path / AUTOTUNE_FILE
    if not path.is_file():
        return None
    try:
        return Decision.from_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        logger.warning("autotune: %s does not read (%s) — ignored", path, err)
        return None


def open_choices(config: Any) -> dict[str, bool]:
    """Which choices a WronAI config leaves open (``decide``'s keyword arguments): precision when neither
    training.bf16 nor training.fp16 is written, LoRA layers when hardware.fused_lora is auto, row slices when
    quantization.dequantize_chunk_mib is not written."""
    return {
        "precision_open": not ({"bf16", "fp16"} & config.training.model_fields_set),
        "fused_lora_open": config.hardware.fused_lora == "auto",
        "row_slices_open": "dequantize_chunk_mib" not in config.quantization.model_fields_set,
    }


def _time_candidate(layer: TimedLayer, candidate: Candidate, tokens: int, seconds: float) -> float:
    """ms per forward + backward of the layer as ``candidate`` (the one timing function)."""
    return layer.step_ms(candidate, tokens, seconds)


def _fixed_reason(
    question: str, plan: DevicePlan, shapes: LayerShapes, current: Candidate, opened: dict[str, bool]
) -> str | None:
    """Why ``question`` is not timed for this plan (None = it is open)."""
    if question == "precision":
        name = _precision_name(plan.precision)
        if plan.cpu is None or not plan.cpu.native_bf16:
            cap = plan.cpu.onednn_cap if plan.cpu is not None else None
            where = f"oneDNN capped at {cap}" if cap else "no native bf16 on this CPU"
            return f"precision: {name} (fixed: {where} — emulated bf16 is never timed)"
        if not opened["precision_open"] or plan.precision not in ("bf16", "fp32"):
            return f"precision: {name} (fixed by the config: training.bf16/fp16)"
        return None
    if question == "fused_lora":
        from wronai.kernels.fused_lora import peft_version_supported

        name = _lora_name(plan.fused_lora)
        if not opened["fused_lora_open"] or not plan.fused_lora or not peft_version_supported():
            return f"LoRA layers: {name} (fixed: hardware.fused_lora, or no fused step for this run)"
        return None
    if not plan.quantization.startswith("4bit"):
        return "4-bit weights: none (no row slices to choose)"
    if shapes.kept(current.dtype, current.keep_bytes):
        size = shapes.layers * shapes.parameters() * current.dtype.itemsize / 2**20
        return (
            f"4-bit weights: kept dequantized ({size:.1f} MiB in {_precision_name(current.precision).split()[0]} "
            f"over {shapes.layers} layers, within quantization.keep_dequantized_mib — no row slices)"
        )
    chunk = plan.dequantize_chunk_bytes
    if not opened["row_slices_open"] or not chunk:
        return f"4-bit weights: {_slices_name(chunk)} (fixed by quantization.dequantize_chunk_mib)"
    if shapes.largest_weight() * current.dtype.itemsize <= chunk:
        return f"4-bit weights: dequantized whole (no weight exceeds {size_name(chunk)} — nothing to slice)"
    return None


def _alternative(question: str, current: Candidate) -> Candidate:
    if question == "precision":
        return dataclasses.replace(current, precision="fp32" if current.precision == "bf16" else "bf16")
    if question == "fused_lora":
        return dataclasses.replace(current, fused_lora=not current.fused_lora)
    return dataclasses.replace(current, chunk_bytes=0)


def _precision_name(precision: str) -> str:
    return {"bf16": "bf16 autocast", "fp16": "fp16 autocast"}.get(precision, "fp32")


def _lora_name(fused: bool) -> str:
    return "fused base + adapter step" if fused else "PEFT's modules"


def _slices_name(chunk_bytes: int) -> str:
    return f"dequantized in {size_name(chunk_bytes)} row slices" if chunk_bytes else "dequantized whole"


def _name(question: str, candidate: Candidate) -> str:
    if question == "precision":
        return _precision_name(candidate.precision)
    if question == "fused_lora":
        return _lora_name(candidate.fused_lora)
    return _slices_name(candidate.chunk_bytes)


_TOPIC = {"precision": "precision", "fused_lora": "LoRA layers", "row_slices": "4-bit weights"}


def _fp32_rate() -> float:
    """FLOP/s of a 256 x 1024 x 1024 float32 product here (the fastest of three)."""
    a, b = torch.randn(256, 1024), torch.randn(1024, 1024)
    best = float("inf")
    for _ in range(3):
        tick = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - tick)
    return 2 * 256 * 1024 * 1024 / max(best, 1e-9)


def _size(shapes: LayerShapes, most: int, per_call: float) -> tuple[int, float, float]:
    """Tokens and share of the rows of the timed layer step, so that one call takes about ``per_call``
    seconds (rows first, down to ``MIN_FRACTION``, then tokens); with the estimated seconds per call."""
    per_token = OVERHEAD * 4 * shapes.parameters() / _fp32_rate()  # forward + input gradient, fp32
    fraction = min(1.0, max(MIN_FRACTION, per_call / (per_token * most)))
    tokens = int(min(most, max(MIN_TOKENS, per_call / (per_token * fraction) // 64 * 64)))
    return tokens, fraction, per_token * fraction * tokens


class _Timer:
    """Times pairs of candidates in turns until a deadline: each pair gets an equal share of what is left,
    and none starts without room for one round (the slowest call so far, else the estimate)."""

    def __init__(self, layer: TimedLayer, deadline: float, pairs: int, tokens: int, estimate: float) -> None:
        self.layer, self.deadline, self.left = layer, deadline, pairs
        self.tokens, self.call = tokens, estimate
        self.timings: dict[str, float] = {}  # candidate label -> its fastest call (ms)

    def compare(self, first: Candidate, second: Candidate) -> tuple[float, float] | None:
        """ms per layer step of each: their fastest calls, timed in turns (None: no room in the budget)."""
        begin = time.perf_counter()
        share = (self.deadline - begin) / max(self.left, 1)
        self.left -= 1
        if 2 * self.call > self.deadline - begin:
            return None
        best = [float("inf"), float("inf")]
        rounds = 0
        while rounds == 0 or (rounds < ROUNDS[1] and time.perf_counter() - begin < share):
            for i, candidate in enumerate((first, second)):
                best[i] = min(best[i], _time_candidate(self.layer, candidate, self.tokens, 0.0))
            rounds += 1
        for candidate, ms in zip((first, second), best):
            self.timings[candidate.label()] = min(ms, self.timings.get(candidate.label(), ms))
        self.call = max(self.call, max(best) / 1000)
        return best[0], best[1]


def decide(
    model_config: dict[str, Any],
    plan: DevicePlan,
    *,
    tokens_per_step: int,
    lora_r: int,
    budget_s: float = 1.5,
    precision_open: bool = False,
    fused_lora_open: bool = True,
    row_slices_open: bool = True,
) -> Decision:
    """Time the open choices of a CPU run on one decoder layer of the model and pick the faster of each.

    ``*_open``: what the config leaves to WronAI (``open_choices``); the plan's own limits apply on top (no
    native bf16, no fused step under sharding, no 4-bit). Nothing open, not a CPU, or a config.json without
    layer sizes: the plan's values, source "fixed". The timing stops at ``budget_s`` (after building the
    layer, tenths of a second): a choice it has no room for keeps the plan's value.
    """
    _import_libraries(plan)  # transformers, through PEFT: seconds, which a run spends anyway, not the budget
    start = time.perf_counter()
    current = Candidate(
        plan.precision, plan.fused_lora, plan.dequantize_chunk_bytes, plan.keep_dequantized_bytes
    )
    shapes = LayerShapes.from_config(model_config)
    opened = {
        "precision_open": precision_open,
        "fused_lora_open": fused_lora_open,
        "row_slices_open": row_slices_open,
    }
    if plan.device != "cpu" or shapes is None:
        why = "not a CPU run" if plan.device != "cpu" else "config.json has no decoder-layer sizes"
        return _result(current, [f"autotune: nothing timed ({why}) — the device plan as it is"], start)
    reasons: list[str] = []
    fixed = {q: _fixed_reason(q, plan, shapes, current, opened) for q in QUESTIONS}
    if all(fixed.values()):
        return _result(current, [r for r in fixed.values() if r], start)
    pairs = sum(r is None for r in fixed.values())
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        most = max(1, min(tokens_per_step, MAX_TOKENS))
        tokens, fraction, estimate = _size(shapes, most, budget_s * 0.8 / (2 * ROUNDS[0] * pairs))
        layer = TimedLayer(shapes, plan.quantization.startswith("4bit"), lora_r, fraction)
        timer = _Timer(layer, time.perf_counter() + budget_s, pairs, tokens, estimate)
        step = f"per layer step of {tokens} tokens" + (
            f", {fraction:.2g} of its rows" if fraction < 1 else ""
        )
        for question in QUESTIONS:
            reason = _fixed_reason(question, plan, shapes, current, opened)  # after the choices before it
            if reason is not None:
                reasons.append(reason)
                continue
            current, line = _choose(timer, question, current, step)
            reasons.append(line)
    decision = _result(current, reasons, start, timer.timings, tokens, fraction)
    logger.info("autotune: %d candidates timed in %.2f s", len(timer.timings), decision.seconds)
    return decision


def _import_libraries(plan: DevicePlan) -> None:
    if plan.device == "cpu":
        import peft  # noqa: F401

        if plan.quantization.startswith("4bit"):
            import bitsandbytes  # noqa: F401


def _choose(timer: _Timer, question: str, current: Candidate, step: str) -> tuple[Candidate, str]:
    """Time ``current`` and its alternative for ``question``; the faster (``MARGIN``) and its reason."""
    other = _alternative(question, current)
    timed = timer.compare(current, other)
    topic = _TOPIC[question]
    if timed is None:
        return current, f"{topic}: {_name(question, current)} (not timed: over the autotune budget)"
    ours, theirs = timed
    if theirs < ours * (1 - MARGIN):
        chosen, loser, fast, slow = other, current, theirs, ours
    else:
        chosen, loser, fast, slow = current, other, ours, theirs
    kept = theirs < ours  # faster, but within the margin
    line = (
        f"{topic}: {_name(question, chosen)} — {fast:.3g} ms vs {slow:.3g} ms {_name(question, loser)} "
        f"{step} (timed"
        + (f"; within {MARGIN:.0%}, the plan's value kept)" if chosen is current and kept else ")")
    )
    return chosen, line


def _result(
    chosen: Candidate,
    reasons: list[str],
    start: float,
    timings: dict[str, float] | None = None,
    tokens: int = 0,
    fraction: float = 1.0,
) -> Decision:
    decision = Decision(
        precision=chosen.precision,
        fused_lora=chosen.fused_lora,
        dequantize_chunk_bytes=chosen.chunk_bytes,
        timings_ms={k: round(v, 3) for k, v in (timings or {}).items()},
        reasons=reasons,
        source="timed" if timings else "fixed",
        tokens=tokens,
        rows_fraction=round(fraction, 4),
        seconds=round(time.perf_counter() - start, 3),
    )
    for line in reasons:
        logger.info("autotune: %s", line)
    return decision


def resolve(
    model_config: dict[str, Any], plan: DevicePlan, checkpoint_dir: str | Path | None, **kwargs: Any
) -> Decision:
    """The decision a resumed run took (``AUTOTUNE_FILE`` in the checkpoint, else in its run directory),
    source "resumed", never timed again; without one, ``decide(model_config, plan, **kwargs)``."""
    if checkpoint_dir is not None:
        for where in (Path(checkpoint_dir), Path(checkpoint_dir).parent):
            found = load(where)
            if found is not None:
                line = f"autotune: resumed from {where / AUTOTUNE_FILE} — not timed again"
                logger.info(line)
                kept = [r for r in found.reasons if not r.startswith("autotune: resumed from")]
                return dataclasses.replace(found, source="resumed", reasons=[line, *kept])
    return decide(model_config, plan, **kwargs)


def apply(plan: DevicePlan, decision: Decision, *, dtype_follows_precision: bool = False) -> DevicePlan:
    """A copy of ``plan`` with the decision's precision, compute dtype (CPU: bf16 under bf16, else float32),
    fused LoRA and row-slice size, and its reasons added to the notes; ``plan`` itself is unchanged.

    ``dtype_follows_precision``: model.torch_dtype is auto, so the weights dtype follows the precision too
    (bf16 weights under bf16, as ``plan_device`` gives them)."""
    compute = plan.compute_dtype
    if plan.device == "cpu":
        compute = torch.bfloat16 if decision.precision == "bf16" else torch.float32
    model_dtype = plan.model_dtype
    if dtype_follows_precision and decision.precision != plan.precision:
        model_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(decision.precision, torch.float32)
    return dataclasses.replace(
        plan,
        precision=decision.precision,
        compute_dtype=compute,
        model_dtype=model_dtype,
        fused_lora=decision.fused_lora,
        dequantize_chunk_bytes=decision.dequantize_chunk_bytes,
        notes=[*plan.notes, *decision.reasons],
    )


def tune(
    config: Any, plan: DevicePlan, checkpoint_dir: str | Path | None, *, local_only: bool = False
) -> tuple[DevicePlan, Decision | None]:
    """The plan with the open CPU choices decided for ``config``'s model (``hardware.autotune``), and the
    decision to save with the run; the plan unchanged (and None) off a CPU, in a multi-process run (ranks
    would time apart), with autotune off or when the model's shapes are unknown (``local_only``: when its
    config.json is not on this machine — `wronai validate` does not download)."""
    from wronai.errors import WronAIError
    from wronai.runtime.distributed import world
    from wronai.runtime.memory import read_model_config

    if plan.device != "cpu" or not config.hardware.autotune or world().is_distributed:
        return plan, None
    try:
        model_config = read_model_config(config, local_only=local_only)
    except (WronAIError, OSError, ValueError):
        return plan, None
    rows = config.training.per_device_train_batch_size
    decision = resolve(
        model_config, plan, checkpoint_dir, tokens_per_step=rows * config.data.max_seq_length,
        lora_r=config.lora.r, **open_choices(config),
    )  # fmt: skip
    tuned = apply(plan, decision, dtype_follows_precision=config.model.torch_dtype == "auto")
    return with_compute_note(tuned, config.quantization), decision
