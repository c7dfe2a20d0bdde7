"""`wronai report`, the model card and ThroughputMemoryCallback (tokens/s and memory in the training log)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import train_via_cli
from wronai.cli import main

STEPS = 16
BATCH = 4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    """A run with the callback registered through the config, as a user would do it."""
    root = tmp_path_factory.mktemp("reportrun")
    return train_via_cli(
        root, tiny_model_dir,
        training={"max_steps": STEPS, "eval_steps": 8, "save_strategy": "no", "per_device_train_batch_size": BATCH},
        extensions={"callbacks": ["wronai.train.throughput:ThroughputMemoryCallback"]},
    )  # fmt: skip


def test_callback_puts_throughput_and_memory_in_the_log_history(run_dir):
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    train_logs = [h for h in history if "loss" in h]
    assert len(train_logs) == STEPS
    for entry in train_logs:
        assert entry["tokens_per_second"] > 0 and entry["rss_mb"] > 50
        assert "cuda_max_memory_mb" not in entry or entry["cuda_max_memory_mb"] > 0
    seen = [h["tokens_seen"] for h in train_logs]
    assert seen == sorted(seen)
    stats = json.loads((run_dir / "data_stats.json").read_text())["lengths"]
    # every step trains BATCH examples: the non-pad token count lies between the shortest and longest rows
    assert STEPS * BATCH * stats["min"] <= seen[-1] <= STEPS * BATCH * stats["max"]
    assert not any("tokens_per_second" in h for h in history if "eval_loss" in h or "train_runtime" in h)


def test_token_counting_skips_padding_and_eval_passes():
    from wronai.train.throughput import ThroughputMemoryCallback, count_tokens

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert count_tokens({"input_ids": torch.zeros(2, 4), "attention_mask": mask}, (), 0) == 5
    packed = torch.tensor([[5, 6, 7, 8, 9, 0, 0], [5, 6, 0, 7, 0, 0, 0]])  # no mask: trailing padding only
    assert count_tokens({"input_ids": packed}, (), 0) == 5 + 4

    model = torch.nn.Linear(2, 2)
    callback = ThroughputMemoryCallback()
    callback.on_train_begin(
        None, None, None, model=model, processing_class=type("T", (), {"pad_token_id": 0})()
    )
    forward = model.forward
    model.forward = lambda input_ids=None, attention_mask=None: forward(torch.zeros(1, 2))
    model(input_ids=torch.ones(1, 3), attention_mask=torch.ones(1, 3))
    model.eval()
    model(input_ids=torch.ones(1, 3), attention_mask=torch.ones(1, 3))  # evaluation: not counted
    assert callback._tokens == 3
    callback.on_train_end(None, None, None)
    model.train()
    model(input_ids=torch.ones(1, 3), attention_mask=torch.ones(1, 3))
    assert callback._tokens == 3  # hook removed


def test_report_html_has_plots_config_data_and_samples(run_dir, capsys):
    assert main(["report", str(run_dir), "--max-new-tokens", "12"]) == 0
    assert "report.html" in capsys.readouterr().out
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 5  # loss, learning rate, throughput, memory, grad norm
    for stem in ("loss", "learning_rate", "throughput", "memory", "grad_norm"):
        assert (run_dir / f"report_{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "lora_alpha: 8.0" in page and "bnb_4bit_quant_type: nf4" in page  # the resolved config
    assert "trained tokens" in page and "alpaca" in page  # data_stats.json
    samples = json.loads((run_dir / "samples.json").read_text(encoding="utf-8"))
    assert len(samples) == 4 and all(s["prompt"] in page for s in samples)
    assert "Jaka jest stolica Polski?" in page
    assert "<script" not in page and "http://" not in page  # self-contained


def test_report_without_metrics_or_samples_still_reads_well(run_dir, tmp_path):
    import shutil

    from wronai.use.report import write_report

    bare = tmp_path / "bare"
    shutil.copytree(run_dir, bare)
    state = json.loads((bare / "trainer_state.json").read_text())
    for entry in state["log_history"]:
        for key in ("tokens_per_second", "tokens_seen", "rss_mb", "cuda_max_memory_mb"):
            entry.pop(key, None)
    (bare / "trainer_state.json").write_text(json.dumps(state))
    page = write_report(bare, samples=False).read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 3
    assert "ThroughputMemoryCallback" in page and "not generated" in page


def test_write_report_with_the_in_memory_model(run_dir, tmp_path):
    """What the pipeline does at the end of training: reuse the model it holds instead of loading it again."""
    import shutil

    from wronai.use.load import load_run
    from wronai.use.report import write_report

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    loaded = load_run(copy)
    loaded.model.train()
    loaded.tokenizer.padding_side = "right"
    write_report(copy, model=loaded.model, tokenizer=loaded.tokenizer, max_new_tokens=6)
    assert len(json.loads((copy / "samples.json").read_text())) == 4
    assert loaded.model.training and loaded.tokenizer.padding_side == "right"  # left as they were


def test_report_skips_in_process_samples_when_zero3_split_the_weights(run_dir, tmp_path):
    """Under ZeRO-3 rank 0 holds only its partition of each weight: generating alone would hang/crash the peers."""
    import shutil

    import torch

    from wronai.use.report import write_report

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "samples.json").unlink(missing_ok=True)
    model = torch.nn.Linear(2, 2)
    model.weight.ds_id = 0  # what deepspeed.zero.Init marks partitioned parameters with
    page = write_report(copy, model=model, tokenizer=object()).read_text(encoding="utf-8")
    assert not (copy / "samples.json").exists()
    assert "weights split by ZeRO-3" in page and f"wronai report {copy}" in page


@pytest.mark.slow  # a fresh interpreter: imports torch/transformers again
def test_model_card_front_matter_and_code_run_with_stock_peft(run_dir):
    main(["report", str(run_dir), "--no-samples"])
    card = (run_dir / "README.md").read_text(encoding="utf-8")
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "peft" and meta["language"] == ["pl"] and meta["base_model"]
    assert {"wronai", "lora", "qlora", "polish"} <= set(meta["tags"])
    for fragment in (
        "## Training data",
        "## Training procedure",
        "## Results",
        "r=4, alpha=8",
        "## How to use",
    ):
        assert fragment in card
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "from peft import PeftModel" in code and "### Instrukcja:" in code  # the run's own template
    guard = "import sys\nsys.modules['wronai'] = None  # importing WronAI would fail\n"
    result = subprocess.run([sys.executable, "-c", guard + code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_attach_puts_one_callback_first(run_dir):
    from wronai.config import load_config
    from wronai.recipe import Pipeline
    from wronai.train.throughput import ThroughputMemoryCallback, attach

    pipeline = Pipeline(
        load_config(run_dir.parent / "run.yaml")
    )  # lists the callback in extensions.callbacks
    trainer = pipeline.build_trainer()
    callback = attach(trainer)
    found = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ThroughputMemoryCallback)]
    assert found == [callback] and trainer.callback_handler.callbacks[0] is callback
