"""Autotune: the faster candidate is taken, bf16 only with native support, the budget holds, resume reads back."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from wronai.runtime import autotune
from wronai.runtime.autotune_layer import Candidate, LayerShapes, TimedLayer
from wronai.runtime.hardware import CpuCapability, DevicePlan

# one decoder layer small enough to time in milliseconds; its largest weight (128 x 64) is 32 KiB in float32, 16 KiB in bf16
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}
CHUNK = 8 * 2**10


def cpu_plan(native_bf16: bool = True, quantization: str = "4bit-nf4", **fields) -> DevicePlan:
    plan = DevicePlan(
        device="cpu",
        device_name="test",
        precision="fp32",
        model_dtype=torch.float32,
        quantization=quantization,
        compute_dtype=torch.float32,
        optimizer="adamw_torch",
        attn_implementation="sdpa",
        pin_memory=False,
        notes=["a planner note"],
        dequantize_chunk_bytes=CHUNK if quantization.startswith("4bit") else 0,
        fused_lora=True,
        cpu=CpuCapability(native_bf16, ("amx_bf16",) if native_bf16 else (), "AVX512", "no"),
    )
    return dataclasses.replace(plan, **fields)


def fake_timing(factors: dict[str, float], seen: list[Candidate] | None = None):
    """A timing function: 100 ms, times ``factors`` for bf16 / fused / row slices; records what it timed."""

    def timing(layer, candidate: Candidate, tokens: int, seconds: float) -> float:
        if seen is not None:
            seen.append(candidate)
        ms = 100.0
        ms *= factors["bf16"] if candidate.precision == "bf16" else 1.0
        ms *= factors["fused"] if candidate.fused_lora else 1.0
        ms *= factors["slices"] if candidate.chunk_bytes else 1.0
        return ms

    return timing


OPEN = {"precision_open": True, "fused_lora_open": True, "row_slices_open": True}


@pytest.mark.parametrize("faster", [0.5, 2.0])
def test_the_faster_candidate_is_chosen(monkeypatch, faster):
    # every alternative to the plan's value (fp32, fused, slices) is `faster` times as long: 0.5 -> taken
    monkeypatch.setattr(
        autotune, "_time_candidate", fake_timing({"bf16": faster, "fused": 1 / faster, "slices": 1 / faster})
    )
    decision = autotune.decide(TINY, cpu_plan(), tokens_per_step=256, lora_r=4, budget_s=100, **OPEN)
    taken = faster < 1
    assert decision.source == "timed"
    assert decision.precision == ("bf16" if taken else "fp32")
    assert decision.fused_lora is (not taken)
    assert decision.dequantize_chunk_bytes == (0 if taken else CHUNK)
    assert len(decision.reasons) == 3 and all("(timed)" in line for line in decision.reasons)
    assert decision.reasons[0].startswith(
        "precision: " + ("bf16 autocast — 200 ms vs 400 ms fp32" if taken else "fp32 — 25 ms vs 50 ms bf16")
    )
    assert len(decision.timings_ms) == 4  # the plan's values, then one alternative per choice


def test_within_the_margin_the_plan_value_stays(monkeypatch):
    monkeypatch.setattr(autotune, "_time_candidate", fake_timing({"bf16": 0.99, "fused": 1.0, "slices": 1.0}))
    decision = autotune.decide(TINY, cpu_plan(), tokens_per_step=256, lora_r=4, budget_s=100, **OPEN)
    assert decision.precision == "fp32" and "within 3%" in decision.reasons[0]


def test_bf16_is_never_timed_or_chosen_without_native_bf16(monkeypatch):
    seen: list[Candidate] = []
    monkeypatch.setattr(
        autotune, "_time_candidate", fake_timing({"bf16": 0.01, "fused": 1.0, "slices": 1.0}, seen)
    )
    decision = autotune.decide(TINY, cpu_plan(native_bf16=False), tokens_per_step=256, lora_r=4, **OPEN)
    assert seen and all(c.precision == "fp32" for c in seen)
    assert decision.precision == "fp32" and "no native bf16" in decision.reasons[0]


def test_a_capped_onednn_is_named_as_why_bf16_is_not_timed(monkeypatch):
    monkeypatch.setattr(autotune, "_time_candidate", fake_timing({"bf16": 0.01, "fused": 1.0, "slices": 1.0}))
    plan = cpu_plan(native_bf16=False)
    plan.cpu = CpuCapability(False, ("avx512_bf16",), "AVX2", "no", "AVX2")
    decision = autotune.decide(TINY, plan, tokens_per_step=256, lora_r=4, **OPEN)
    assert decision.precision == "fp32" and "oneDNN capped at AVX2" in decision.reasons[0]


def test_closed_choices_are_not_timed(monkeypatch):
    def boom(*args):
        raise AssertionError("timed a closed choice")

    monkeypatch.setattr(autotune, "_time_candidate", boom)
    closed = {"precision_open": False, "fused_lora_open": False, "row_slices_open": False}
    decision = autotune.decide(TINY, cpu_plan(), tokens_per_step=256, lora_r=4, **closed)
    assert decision.source == "fixed" and (decision.precision, decision.fused_lora) == ("fp32", True)
    assert decision.dequantize_chunk_bytes == CHUNK and len(decision.reasons) == 3
    gpu = dataclasses.replace(cpu_plan(), device="cuda", cpu=None)
    assert autotune.decide(TINY, gpu, tokens_per_step=256, lora_r=4, **OPEN).source == "fixed"
    assert (
        autotune.decide({"vocab_size": 10}, cpu_plan(), tokens_per_step=256, lora_r=4, **OPEN).source
        == "fixed"
    )


def test_a_weight_under_the_slice_size_is_not_timed_for_slices(monkeypatch):
    seen: list[Candidate] = []
    monkeypatch.setattr(
        autotune, "_time_candidate", fake_timing({"bf16": 1.0, "fused": 1.0, "slices": 0.1}, seen)
    )
    plan = cpu_plan(dequantize_chunk_bytes=2**20)
    decision = autotune.decide(TINY, plan, tokens_per_step=256, lora_r=4, **OPEN)
    assert all(c.chunk_bytes == 2**20 for c in seen) and "nothing to slice" in decision.reasons[2]


def test_real_timing_stays_within_the_budget(monkeypatch):
    import peft  # noqa: F401  (imports are not the budget's: a run has them anyway)

    measured = autotune._time_candidate
    spans: list[tuple[float, float]] = []

    def spy(*args):
        begin = time.perf_counter()
        try:
            return measured(*args)
        finally:
            spans.append((begin, time.perf_counter()))

    monkeypatch.setattr(autotune, "_time_candidate", spy)
    budget = 0.3
    decision = autotune.decide(TINY, cpu_plan(), tokens_per_step=4096, lora_r=4, budget_s=budget, **OPEN)
    rounds = [(spans[i][0], spans[i + 1][1]) for i in range(0, len(spans), 2)]  # a candidate pair each
    first = rounds[0][0]
    assert all(begin < first + budget for begin, _ in rounds)  # no round of calls starts past the budget ...
    longest = max(end - begin for begin, end in rounds)
    assert rounds[-1][1] - first < budget + longest  # ... so the timing ends within it + one round
    assert 0 < decision.tokens <= 2048 and decision.timings_ms


@pytest.mark.parametrize("quantization", ["4bit-nf4", "none"])
def test_real_decide_gives_a_consistent_decision(quantization):
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    plan = cpu_plan(quantization=quantization)
    decision = autotune.decide(TINY, plan, tokens_per_step=512, lora_r=4, budget_s=1.0, **OPEN)
    assert torch.equal(rng, torch.get_rng_state()) and torch.get_num_threads() == threads
    assert not torch.is_autocast_enabled("cpu")
    assert (
        decision.source == "timed" and decision.precision in ("bf16", "fp32") and len(decision.reasons) == 3
    )
    chosen = Candidate(decision.precision, decision.fused_lora, decision.dequantize_chunk_bytes)
    assert chosen.label() in decision.timings_ms and all(ms > 0 for ms in decision.timings_ms.values())
    assert autotune.Decision.from_json(decision.to_json()) == decision


def test_the_timed_layer_is_what_runs():
    from wronai.kernels.bnb import RowSlicedLinear4bit
    from wronai.kernels.fused_lora import fused_call_count

    layer = TimedLayer(LayerShapes.from_config(TINY), four_bit=True, lora_r=4)
    # q, o (16 KiB), gate, up, down (32 KiB) exceed 8 KiB
    assert layer.configure(Candidate("fp32", True, CHUNK)) == 5
    assert layer.step_ms(Candidate("fp32", True, CHUNK), 32, 0.0) > 0  # one call
    assert fused_call_count(layer.model) == 7
    bases = [m.get_base_layer() for m in layer.lora_layers()]
    assert sum(type(b) is RowSlicedLinear4bit for b in bases) == 5
    layer.configure(Candidate("bf16", False, 0))
    assert not any(isinstance(b, RowSlicedLinear4bit) or "chunk_bytes" in vars(b) for b in bases)
    assert all(b.compute_dtype == torch.bfloat16 for b in bases)


def test_a_repeated_4bit_weight_dequantizes_to_repeated_rows():
    import bitsandbytes.functional as bnbf

    from wronai.kernels.bnb import synthetic_linear4bit

    layer = synthetic_linear4bit(128, 300, torch.Generator().manual_seed(0))  # 128 template rows, repeated
    weight = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert weight.shape == (300, 128)
    torch.testing.assert_close(weight[128:256], weight[:128], rtol=0, atol=0)
    torch.testing.assert_close(weight[256:], weight[:44], rtol=0, atol=0)
    assert 0.01 < float(weight.std()) < 0.04


def test_save_and_load_round_trip(tmp_path):
    decision = autotune.Decision(
        "bf16", False, 0, {"a": 1.5}, ["precision: bf16 autocast"], "timed", 512, 0.9
    )
    path = decision.save(tmp_path / "run")
    assert path.name == autotune.AUTOTUNE_FILE
    assert autotune.load(path) == decision and autotune.load(tmp_path / "run") == decision
    assert autotune.load(tmp_path / "elsewhere") is None
    path.write_text('{"precision": "int3"}')
    assert autotune.load(path) is None


def test_resume_reads_the_decision_back_without_timing(monkeypatch, tmp_path):
    def boom(*args):
        raise AssertionError("a resumed run was timed again")

    monkeypatch.setattr(autotune, "_time_candidate", boom)
    saved = autotune.Decision("bf16", False, 0, {"a": 1.0}, ["precision: bf16 autocast"], "timed", 256, 1.0)
    run = tmp_path / "run"
    checkpoint = run / "checkpoint-10"
    checkpoint.mkdir(parents=True)
    for holder in (checkpoint, run):  # the checkpoint's own file, else the run directory's
        saved.save(holder)
        resumed = autotune.resolve(TINY, cpu_plan(), checkpoint, tokens_per_step=256, lora_r=4, **OPEN)
        assert resumed.source == "resumed"
        assert (resumed.precision, resumed.fused_lora, resumed.dequantize_chunk_bytes) == ("bf16", False, 0)
        assert resumed.reasons[1:] == saved.reasons and "resumed from" in resumed.reasons[0]
        (holder / autotune.AUTOTUNE_FILE).unlink()
    monkeypatch.setattr(autotune, "_time_candidate", fake_timing({"bf16": 0.5, "fused": 1.0, "slices": 1.0}))
    fresh = autotune.resolve(TINY, cpu_plan(), checkpoint, tokens_per_step=256, lora_r=4, **OPEN)
    assert fresh.source == "timed" and fresh.precision == "bf16"


def test_apply_returns_a_changed_copy():
    plan = cpu_plan()
    decision = autotune.Decision("bf16", False, 0, {}, ["precision: bf16 autocast (timed)"], "timed")
    applied = autotune.apply(plan, decision, dtype_follows_precision=True)
    assert (applied.precision, applied.compute_dtype, applied.model_dtype) == (
        "bf16",
        torch.bfloat16,
        torch.bfloat16,
    )
    assert (applied.fused_lora, applied.dequantize_chunk_bytes) == (False, 0)
    assert applied.notes == ["a planner note", "precision: bf16 autocast (timed)"]
    assert (plan.precision, plan.compute_dtype, plan.fused_lora, plan.dequantize_chunk_bytes) == (
        "fp32",
        torch.float32,
        True,
        CHUNK,
    )
    assert plan.notes == ["a planner note"]
    assert autotune.apply(plan, decision).model_dtype == torch.float32  # weights dtype as the config set it


def test_open_choices_follow_what_the_config_writes():
    from wronai.config import load_config

    base = {"model": {"name": "org/m"}, "data": {"dataset_name": "org/d"}}
    assert autotune.open_choices(load_config(data=base)) == OPEN
    written = load_config(data={**base, "training": {"bf16": False}, "hardware": {"fused_lora": "on"},
                                "quantization": {"dequantize_chunk_mib": 2}})  # fmt: skip
    assert not any(autotune.open_choices(written).values())


@pytest.mark.parametrize(("written", "note"), [("bfloat16", False), ("float32", True), (None, False)])
def test_tune_says_the_compute_dtype_it_leaves(monkeypatch, written, note):
    """A planned fp32 run that autotune moves to bf16 computes 4-bit layers in bf16: the plan's note on a
    written bnb_4bit_compute_dtype is made again for that (gone for bfloat16, there for float32)."""
    from wronai.config import load_config
    from wronai.runtime import memory
    from wronai.runtime.hardware import COMPUTE_KEY, with_compute_note

    quantization = {"bnb_4bit_compute_dtype": written} if written else {}
    config = load_config(
        data={"model": {"name": "org/m"}, "data": {"dataset_name": "org/d"}, "quantization": quantization}
    )
    planned = with_compute_note(cpu_plan(), config.quantization)  # fp32, as plan_device makes it
    assert any(n.startswith(COMPUTE_KEY) for n in planned.notes) == (written == "bfloat16")
    decision = autotune.Decision("bf16", True, 0, {}, ["precision: bf16 autocast (timed)"], "timed")
    monkeypatch.setattr(memory, "read_model_config", lambda config, local_only=False: dict(TINY))
    monkeypatch.setattr(autotune, "resolve", lambda *args, **kwargs: decision)
    tuned, got = autotune.tune(config, planned, None)
    assert got is decision and tuned.compute_dtype == torch.bfloat16
    left = [n for n in tuned.notes if n.startswith(COMPUTE_KEY)]
    assert left == (["quantization.bnb_4bit_compute_dtype=float32: on cpu 4-bit layers compute in the "
                     "mixed-precision dtype — using bfloat16"] if note else [])  # fmt: skip


def test_kept_weights_are_not_timed_for_slices_and_are_what_is_timed(monkeypatch):
    from wronai.kernels.dequantized import DequantizedLinear4bit

    seen: list[Candidate] = []
    monkeypatch.setattr(
        autotune, "_time_candidate", fake_timing({"bf16": 1.0, "fused": 1.0, "slices": 0.1}, seen)
    )
    shapes = LayerShapes.from_config({**TINY, "num_hidden_layers": 3})
    weights = 3 * shapes.parameters() * 4  # float32, the plan's precision
    decision = autotune.decide(
        {**TINY, "num_hidden_layers": 3}, cpu_plan(keep_dequantized_bytes=weights), tokens_per_step=256,
        lora_r=4, **OPEN,
    )  # fmt: skip
    assert "kept dequantized" in decision.reasons[2] and "3 layers" in decision.reasons[2]
    assert all(c.keep_bytes == weights for c in seen) and decision.dequantize_chunk_bytes == CHUNK
    one_less = autotune.decide(
        {**TINY, "num_hidden_layers": 3}, cpu_plan(keep_dequantized_bytes=weights - 1), tokens_per_step=256,
        lora_r=4, **OPEN,
    )  # fmt: skip
    assert "kept dequantized" not in one_less.reasons[2] and "(timed" in one_less.reasons[2]  # slices timed
    layer = TimedLayer(shapes, four_bit=True, lora_r=4)
    bases = [m.get_base_layer() for m in layer.lora_layers()]
    assert layer.configure(Candidate("fp32", True, CHUNK, weights)) == 0
    assert all(type(b) is DequantizedLinear4bit for b in bases)
    assert layer.step_ms(Candidate("fp32", True, CHUNK, weights), 32, 0.0) > 0
    assert all(b._kept is not None for b in bases)  # the fused step used the kept weights
    layer.configure(Candidate("bf16", True, CHUNK, weights))  # bf16 weights take half: still kept
    assert all(type(b) is DequantizedLinear4bit for b in bases)
    layer.configure(Candidate("fp32", True, CHUNK, weights - 1))
    assert not any(isinstance(b, DequantizedLinear4bit) or "_kept" in vars(b) for b in bases)
