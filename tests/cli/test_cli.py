"""The command line end to end: help, validate, train (real 4-bit QLoRA on CPU), refusals, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, make_config_dict, write_jsonl
from wronai.cli import main

RUN_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "wronai_config.yaml",
    "provenance.json",
    "trainer_state.json",
    "train_results.json",
    "all_results.json",
    "data_stats.json",
}


def write_config(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "command", [[], ["train"], ["validate"], ["init-model"], ["data", "preview"], ["data", "prepare"]]
)
def test_help_is_complete(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: wronai" in out
    if command == ["train"]:
        for flag in ("--set", "--resume", "--overwrite", "config"):
            assert flag in out


def test_validate_prints_resolved_config_and_device_plan(capsys):
    assert main(["validate", str(REPO / "configs" / "default.yaml")]) == 0
    out = capsys.readouterr().out
    assert "# resolved config" in out and "# device plan" in out
    assert "device: cpu" in out
    assert "optimizer: adamw_8bit" in out  # paged_adamw_8bit unpaged on CPU
    assert "note: training.optim=paged_adamw_8bit: paging is for GPU memory" in out
    assert "note: autotune: not timed here — config.json of speakleash/" in out  # validate never downloads
    assert "return_freed_memory: auto ->" not in out  # decided once the model is here, not guessed
    assert "hardware.return_freed_memory: auto: decided by `wronai train` once the model is loaded" in out


BAD_RUNS = [
    (["--set", "lora.rnak=4"], "unknown key `lora.rnak`"),
    (["--set", "training.learning_rate=abc"], "'abc' is not a number"),
    (
        ["--set", "data.dataset_name=/nonexistent/file.jsonl"],
        "data.dataset_name: file /nonexistent/file.jsonl not found",
    ),
    (
        ["--set", "model.name=/nonexistent/model"],
        "model.name: local directory /nonexistent/model does not exist",
    ),
    (["--set", "extensions.data_hook=no_such_module_xyz:fn"], "extensions.data_hook: cannot import module"),
    (["--set", "extensions.callbacks=[missing_file.py:Cb]"], "extensions.callbacks[0]: file"),
    (["--set", "data.dataset_name=/etc/hostname"], "unsupported extension"),
]


@pytest.mark.parametrize(("extra", "fragment"), BAD_RUNS, ids=[b[1][:30] for b in BAD_RUNS])
@pytest.mark.parametrize("command", ["train", "validate"])
def test_bad_input_is_one_line_no_traceback(
    tmp_path, tiny_model_dir, alpaca_file, capsys, command, extra, fragment
):
    cfg = write_config(tmp_path, make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "out"))
    code = main([command, str(cfg), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert fragment in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_missing_config_file(capsys, tmp_path):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_bad_data_row_names_file_and_line(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(
        '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": ""}\n', encoding="utf-8"
    )
    cfg = write_config(tmp_path, make_config_dict(tiny_model_dir, data, tmp_path / "out"))
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: field `output`: empty or whitespace only" in err
    assert "data.on_bad_row: skip" in err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    """One real 4-bit QLoRA training run through the CLI, shared by the tests below."""
    from conftest import alpaca_rows

    root = tmp_path_factory.mktemp("run")
    data = write_jsonl(root / "train.jsonl", alpaca_rows(60))
    raw = make_config_dict(
        tiny_model_dir, data, root / "out", training={"max_steps": 12, "save_steps": 4, "eval_steps": 4}
    )
    raw["data"]["cache_dir"] = str(root / "cache")
    cfg = write_config(root, raw)
    code = main(["train", str(cfg)])
    assert code == 0
    return root, cfg, root / "out"


def test_train_writes_the_documented_files(finished_run):
    _, _, out = finished_run
    names = {p.name for p in out.iterdir()}
    assert names >= RUN_FILES, RUN_FILES - names
    assert {"checkpoint-8", "checkpoint-12"} <= names  # save_total_limit=3 keeps the newest
    saved = yaml.safe_load((out / "wronai_config.yaml").read_text())
    assert saved["quantization"]["load_in_4bit"] is True
    prov = json.loads((out / "provenance.json").read_text())
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= set(prov["versions"])
    assert "git" in prov and "device_plan" in prov


def test_training_loss_falls_and_eval_runs(finished_run):
    _, _, out = finished_run
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) >= 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert any("eval_loss" in h for h in history)
    results = json.loads((out / "train_results.json").read_text())
    assert results["train_loss"] > 0


def test_quantized_training_used_4bit_layers(finished_run, tiny_model_dir):
    from wronai.config import load_config
    from wronai.recipe import Pipeline

    _, cfg, _ = finished_run
    trainer = Pipeline(load_config(cfg))
    model = trainer.load_model()
    import bitsandbytes as bnb

    kinds = {type(m).__name__ for m in model.modules()}
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()), kinds
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_adapter_loads_with_stock_peft_and_generates(finished_run, tiny_model_dir):
    code = f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
out = {str(finished_run[2])!r}
tok = AutoTokenizer.from_pretrained(out)
base = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r})
model = PeftModel.from_pretrained(base, out).eval()
ids = tok("### Instrukcja:\\nNapisz zdanie o mieście Kraków.\\n\\n### Odpowiedź:\\n", return_tensors="pt")
gen = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
assert gen.shape[1] > ids["input_ids"].shape[1]
lora = [n for n, _ in model.named_parameters() if "lora_B" in n]
assert lora and any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
print("OK", tok.decode(gen[0][ids["input_ids"].shape[1]:]))
"""
    # a fresh interpreter that never imports wronai
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("OK")


def test_finished_run_is_not_overwritten(finished_run, capsys):
    _, cfg, out = finished_run
    before = (out / "adapter_model.safetensors").read_bytes()
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "already holds a finished run" in err and "--overwrite" in err
    assert (out / "adapter_model.safetensors").read_bytes() == before


def test_resume_continues_from_last_complete_checkpoint(tmp_path, finished_run, tiny_model_dir):
    root, cfg, out = finished_run
    raw = yaml.safe_load(cfg.read_text())
    raw["training"]["output_dir"] = str(tmp_path / "resumed")
    raw["training"]["max_steps"] = 12
    # copy a checkpoint from the finished run and make the newest one incomplete
    import shutil

    shutil.copytree(out / "checkpoint-8", tmp_path / "resumed" / "checkpoint-8")
    broken = tmp_path / "resumed" / "checkpoint-12"
    broken.mkdir()
    (broken / "adapter_model.safetensors").write_bytes(b"partial")
    cfg2 = write_config(tmp_path, raw)
    assert main(["train", str(cfg2), "--resume"]) == 0
    resumed = json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())["log_history"]
    original = json.loads((out / "trainer_state.json").read_text())["log_history"]
    after = {h["step"]: h["loss"] for h in resumed if "loss" in h and h["step"] > 8}
    reference = {h["step"]: h["loss"] for h in original if "loss" in h and h["step"] > 8}
    # continued at step 9 with model, optimizer, scheduler and data position restored: same losses as
    # the uninterrupted run (a restart from scratch or from the wrong data position would differ)
    assert sorted(after) == [9, 10, 11, 12]
    assert after == pytest.approx(reference, rel=1e-5)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, tiny_model_dir, alpaca_file, capsys):
    cfg = write_config(tmp_path, make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "empty"))
    assert main(["train", str(cfg), "--resume"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_classic_entry_point_script(tmp_path, tiny_model_dir, alpaca_file):
    raw = make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "classic", training={"max_steps": 2})
    cfg = write_config(tmp_path, raw)
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "WRONAI_CACHE_DIR": str(tmp_path / "c")},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "classic" / "adapter_model.safetensors").exists()


def test_python_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "wronai", "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout.startswith("wronai ")


def test_the_earlier_name_of_the_pipeline_still_imports():
    import wronai
    from wronai.recipe import Pipeline

    assert wronai.WronAITrainer is Pipeline is wronai.Pipeline


def test_the_command_table_loads_no_heavy_library():
    """`wronai --help` and argument errors stay instant: building the parser imports no ML library (each
    command imports what it needs when it runs)."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom wronai.cli.app import build_parser\nbuild_parser()\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'peft', 'pydantic') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_minimal_config_leaves_every_speed_setting_to_wronai(capsys):
    """configs/examples/minimal.yaml writes down no speed setting; validate shows each automatic choice."""
    from pathlib import Path

    config = Path(__file__).resolve().parents[2] / "configs" / "examples" / "minimal.yaml"
    assert main(["validate", str(config), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "note: data.packing: auto -> on (" in out
    assert "note: training.per_device_train_batch_size: auto -> 8, gradient_accumulation_steps -> 2 (" in out


def _minimal_local(tmp_path, tiny_model_dir, alpaca_file) -> Path:
    """A config that leaves packing and the batch to WronAI, on the local tiny model (autotune can read it)."""
    raw = make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "out")
    raw["data"].pop("packing", None)
    for key in (
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "bf16",
        "fp16",
        "gradient_checkpointing",
    ):
        raw["training"].pop(key, None)
    raw.setdefault("hardware", {}).pop("autotune", None)
    return write_config(tmp_path, raw)


def test_validate_shows_the_autotuned_plan_and_the_packed_row_rule(
    tmp_path, tiny_model_dir, alpaca_file, capsys
):
    """The plan validate prints is the one `wronai train` runs: the timed CPU choices are in it (--no-autotune:
    the planner's values), and an auto batch of packed rows says how it is settled once the data is packed."""
    from wronai.runtime.hardware import cpu_supports_bf16

    cfg = _minimal_local(tmp_path, tiny_model_dir, alpaca_file)
    assert main(["validate", str(cfg), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "note: LoRA layers: " in out and "(timed" in out  # autotune's reasons
    assert "note: autotune: timed now to show it" in out
    assert "data packed -> settled again once the data is packed: 16 examples per optimizer step kept" in out
    if cpu_supports_bf16():
        assert "note: precision: " in out
    # the choices train makes once the model is loaded, from config.json, as train logs them
    assert "note: training.gradient_checkpointing: auto -> off (activations ≈ " in out
    assert (
        "note: hardware.return_freed_memory: auto -> off (" in out
        and "M parameters, under the 0.5B" in out
        and "(a model of " in out
    )
    assert main(["validate", str(cfg), "--quiet", "--no-autotune"]) == 0
    plain = capsys.readouterr().out
    assert "(timed" not in plain and "mixed precision: fp32" in plain


def test_validate_shows_no_load_time_choice_the_config_made_itself(
    tmp_path, tiny_model_dir, alpaca_file, capsys
):
    raw = make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "out")
    raw["training"]["gradient_checkpointing"] = True
    raw.setdefault("hardware", {})["return_freed_memory"] = "on"
    assert main(["validate", str(write_config(tmp_path, raw)), "--quiet", "--no-autotune"]) == 0
    out = capsys.readouterr().out
    assert "gradient_checkpointing: auto" not in out and "return_freed_memory: auto" not in out


def test_validate_data_shows_the_batch_of_packed_rows(tmp_path, tiny_model_dir, alpaca_file, capsys):
    cfg = _minimal_local(tmp_path, tiny_model_dir, alpaca_file)
    assert main(["validate", str(cfg), "--quiet", "--no-autotune", "--data"]) == 0
    out = capsys.readouterr().out
    assert "# data\n  format: alpaca; examples: train " in out
    assert "gradient_accumulation_steps -> " in out and "for packed rows (" in out
    assert "settled again once the data is packed" not in out  # the rule is replaced by what it decided


def test_a_closed_output_pipe_is_not_an_error(tmp_path, tiny_model_dir, alpaca_file, monkeypatch, capsys):
    """`wronai validate ... | head -1`: the reader closes the pipe; exit 141 as a shell reports it, no error."""

    class ClosedPipe:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            pass

    cfg = _minimal_local(tmp_path, tiny_model_dir, alpaca_file)
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["validate", str(cfg), "--no-autotune"]) == 141
    err = capsys.readouterr().err
    assert "error" not in err and "Traceback" not in err


def test_validate_with_every_cpu_choice_written_says_nothing_was_left_untimed(
    tmp_path, tiny_model_dir, alpaca_file, capsys
):
    """Written choices leave autotune nothing to time (a fixed decision): no 'not timed here' note."""
    raw = yaml.safe_load(_minimal_local(tmp_path, tiny_model_dir, alpaca_file).read_text(encoding="utf-8"))
    raw["training"]["bf16"] = False
    raw["hardware"]["fused_lora"] = "on"
    raw["quantization"]["dequantize_chunk_mib"] = 2
    assert main(["validate", str(write_config(tmp_path, raw)), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "mixed precision: fp32" in out and "not timed" not in out and "timed now" not in out


def test_validate_and_train_count_the_same_parameters(tmp_path, tiny_model_dir, alpaca_file, monkeypatch):
    """return_freed_memory: auto is decided from the model's size: validate reads it from config.json, the run
    from the loaded model (base weights, the adapter not counted) — the same number."""
    from wronai.config import load_config
    from wronai.recipe import Pipeline
    from wronai.runtime import heap

    counts = []
    note = heap.freed_memory_note
    monkeypatch.setattr(heap, "freed_memory_note", lambda h, d, p: counts.append(p) or note(h, d, p))
    cfg = _minimal_local(tmp_path, tiny_model_dir, alpaca_file)
    assert main(["validate", str(cfg), "--quiet", "--no-autotune"]) == 0
    with Pipeline(load_config(cfg)) as pipeline:
        pipeline.load_model()
    assert len(counts) == 2 and counts[0] == counts[1] > 0
