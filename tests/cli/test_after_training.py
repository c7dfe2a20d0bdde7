"""The trained adapter is never lost: it is saved as soon as the loop ends, before the final evaluation;
an internal error prints one line naming the exception and the log file with its traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import alpaca_rows, make_config_dict, write_jsonl
from wronai.cli import main
from wronai.rundir.files import ERROR_LOG


def _config(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(40))
    raw = make_config_dict(tiny_model_dir, data, tmp_path / "out")
    raw["training"]["max_steps"] = 3
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path, tmp_path / "out"


def _failing_final_eval(seen: list):
    def final_eval(trainer):
        seen.append(sorted(p.name for p in Path(trainer.args.output_dir).iterdir()))
        raise RuntimeError("disk on fire\nsecond line")

    return final_eval


@pytest.mark.slow
def test_a_failure_after_the_loop_leaves_a_loadable_adapter(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config, out = _config(tmp_path, tiny_model_dir)
    seen: list = []
    monkeypatch.setattr("wronai.train.trainer.final_eval_metrics", _failing_final_eval(seen))
    assert main(["train", str(config)]) == 1
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr  # one line, the last
    assert "internal error RuntimeError: disk on fire" in errors[0] and str(out / ERROR_LOG) in errors[0]
    assert "second line" not in stderr and "Traceback" not in stderr
    assert f"failed after training — the trained adapter, tokenizer and config are saved in {out}" in stderr
    log = (out / ERROR_LOG).read_text(encoding="utf-8")
    assert "Traceback" in log and "disk on fire" in log and "final_eval" in log
    # written before the final evaluation ran: adapter, tokenizer, config
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "wronai_config.yaml",
    } <= set(seen[0])
    assert not (out / "train_results.json").exists()  # not a finished run: metrics are missing
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))
    assert sum(p.abs().sum() for n, p in model.named_parameters() if "lora_B" in n) > 0  # trained


@pytest.mark.slow
def test_debug_shows_the_raw_traceback(tmp_path, tiny_model_dir, monkeypatch):
    config, _ = _config(tmp_path, tiny_model_dir)
    monkeypatch.setattr("wronai.train.trainer.final_eval_metrics", _failing_final_eval([]))
    with pytest.raises(RuntimeError, match="disk on fire"):
        main(["train", str(config), "--debug"])


def test_an_internal_error_outside_a_run_goes_to_the_temporary_directory(tmp_path, monkeypatch, capsys):
    import tempfile

    from wronai.cli import config_docs

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(
        config_docs, "cmd_config_docs", lambda args: 1 / 0
    )  # main() builds the parser after this
    assert main(["config-docs"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ZeroDivisionError" in err and str(tmp_path / ERROR_LOG) in err
    assert "ZeroDivisionError" in (tmp_path / ERROR_LOG).read_text(encoding="utf-8")
