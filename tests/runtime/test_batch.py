"""``training.per_device_train_batch_size: auto``: rows per forward from the tokens target and the memory
plan; the effective batch (rows per optimizer step) kept; explicit settings never changed."""

from __future__ import annotations

import pytest

from wronai.runtime.batch import DEFAULT_EFFECTIVE_BATCH, TOKENS_PER_FORWARD, choose


def test_explicit_batch_and_accumulation_are_used_as_written():
    assert (choose(3, 5, seq=512, device="cpu").batch, choose(3, 5, seq=512, device="cpu").accumulation) == (
        3,
        5,
    )
    assert choose(3, 5, seq=512, device="cpu").reason == ""  # nothing decided, nothing printed


def test_explicit_batch_keeps_the_accumulation_configs_always_had():
    choice = choose(4, "auto", seq=512, device="cpu")
    assert (choice.batch, choice.accumulation) == (4, 16)


@pytest.mark.parametrize(
    ("seq", "device", "batch"),
    [
        (512, "cpu", 8),
        (256, "cpu", 16),
        (1024, "cpu", 4),
        (8192, "cpu", 1),
        (2048, "cuda", 8),
        (512, "cuda", 16),
    ],
)
def test_auto_fills_the_tokens_target_and_keeps_the_effective_batch(seq, device, batch):
    choice = choose("auto", "auto", seq=seq, device=device)
    assert choice.batch == batch
    assert choice.batch * choice.accumulation == DEFAULT_EFFECTIVE_BATCH
    assert choice.batch * seq <= max(TOKENS_PER_FORWARD[device], seq)
    assert "auto -> " in choice.reason and "effective batch 16" in choice.reason


def test_auto_keeps_an_explicit_accumulation_as_the_effective_batch():
    choice = choose("auto", 12, seq=256, device="cpu")  # 12 rows per step: batch must divide it
    assert choice.batch * choice.accumulation == 12 and choice.batch == 4


def test_auto_stops_where_the_activations_would_not_fit():
    choice = choose("auto", "auto", seq=256, device="cpu", fits=lambda b: b <= 2)
    assert (choice.batch, choice.accumulation) == (2, 8)
    assert "would not fit the free memory" in choice.reason


def test_resolve_replaces_auto_in_a_copy_and_reads_the_model_shape(tiny_model_dir, alpaca_file, tmp_path):
    from conftest import make_config_dict
    from wronai.config import load_config
    from wronai.runtime.batch import resolve

    raw = make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "out", data={"max_seq_length": 256})
    raw["training"].pop("per_device_train_batch_size", None)
    raw["training"].pop("gradient_accumulation_steps", None)
    config = load_config(data=raw)
    assert config.training.per_device_train_batch_size == "auto"
    resolved, choice = resolve(config, "cpu")
    assert config.training.per_device_train_batch_size == "auto"  # the input is unchanged
    assert (resolved.training.per_device_train_batch_size, resolved.training.gradient_accumulation_steps) == (
        16,
        1,
    )
    assert choice.reason


def test_a_resumed_run_keeps_the_batch_its_first_run_decided(
    tiny_model_dir, alpaca_file, tmp_path, monkeypatch
):
    """Another machine (or more free memory) may decide another batch; a resumed run must not: it takes the
    values saved with the checkpoint for every setting it leaves to `auto`, and keeps explicit ones."""
    import yaml

    from conftest import make_config_dict
    from wronai.config import load_config
    from wronai.train import resume as resume_module

    checkpoint = tmp_path / "out" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    saved = {
        "training": {
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 8,
            "optim": "adamw_torch",
        },
        "data": {"packing": True},
    }
    (checkpoint / "wronai_config.yaml").write_text(yaml.safe_dump(saved), encoding="utf-8")
    monkeypatch.setattr(resume_module, "resolve_resume", lambda resume, output_dir: checkpoint)
    raw = make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "out")
    raw["training"]["per_device_train_batch_size"] = "auto"
    raw["training"]["gradient_accumulation_steps"] = 4  # explicit: never replaced
    config = load_config(data=raw)
    kept = resume_module.keep_decided(config, True)
    assert (kept.training.per_device_train_batch_size, kept.training.gradient_accumulation_steps) == (2, 4)
    assert (
        config.training.optim == "auto" and kept.training.optim == "adamw_torch"
    )  # a run of the old default
    assert resume_module.keep_decided(config, None) is config  # no resume: nothing read


def test_packed_rows_count_examples_toward_the_effective_batch():
    from wronai.runtime.batch import for_packed_rows

    choice = for_packed_rows(8, 2, examples=1000, rows=200)  # 5 examples per packed row, 16 examples per step
    assert (choice.batch, choice.accumulation) == (3, 1) and "16 examples" in choice.reason
    assert (
        for_packed_rows(8, 2, examples=300, rows=300).batch,
        for_packed_rows(8, 2, examples=300, rows=300).accumulation,
    ) == (8, 2)
