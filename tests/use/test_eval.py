"""`wronai eval`: the rebuilt eval split, data files in any format, base vs tuned perplexity, eval.json."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import yaml

from conftest import POLISH_TEXT, alpaca_rows, train_via_cli, write_jsonl
from wronai.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    """30 steps at lr 5e-3 on the city sentences, evaluated once by the Trainer at the last step."""
    root = tmp_path_factory.mktemp("evalrun")
    return train_via_cli(
        root, tiny_model_dir,
        training={"max_steps": 30, "eval_steps": 30, "save_strategy": "no", "logging_steps": 10},
    )  # fmt: skip


def test_eval_split_tuned_beats_base_and_matches_the_trainer(run_dir, capsys):
    assert main(["eval", str(run_dir), "--base"]) == 0
    out = capsys.readouterr().out
    assert "eval split: 6 examples" in out
    line = next(line for line in out.splitlines() if line.startswith("base ppl"))
    assert "→ tuned ppl" in line
    [result] = json.loads((run_dir / "eval.json").read_text())["results"]
    base, tuned = result["scores"]["base"], result["scores"]["tuned"]
    assert tuned["perplexity"] < 0.8 * base["perplexity"], result
    assert math.isclose(tuned["perplexity"], math.exp(tuned["loss"]), rel_tol=1e-9)
    assert result["quantization"].startswith("4bit") and result["tokens"] > 0
    # same split, template and masking as in training: equal to the Trainer's own eval loss (one eval batch)
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    trainer_eval = [h["eval_loss"] for h in history if "eval_loss" in h][-1]
    assert tuned["loss"] == pytest.approx(trainer_eval, rel=1e-4)


def test_eval_on_files_of_any_format_and_on_a_plain_model(run_dir, tiny_model_dir, tmp_path, capsys):
    text = tmp_path / "held_out.txt"
    text.write_text("\n\n".join(POLISH_TEXT), encoding="utf-8")
    alpaca = write_jsonl(tmp_path / "valid.jsonl", alpaca_rows(12))
    assert main(["eval", str(run_dir), "--data", str(alpaca), "--base", "--batch-size", "3"]) == 0
    assert main(["eval", str(run_dir), "--data", str(text), "--limit", "4"]) == 0
    out = capsys.readouterr().out
    results = {r["data"]: r for r in json.loads((run_dir / "eval.json").read_text())["results"]}
    on_alpaca = results[str(alpaca)]["scores"]
    assert on_alpaca["tuned"]["perplexity"] < on_alpaca["base"]["perplexity"]  # the training distribution
    assert results[str(text)]["examples"] == 4 and "tuned" in results[str(text)]["scores"]
    # raw text is scored on every token; alpaca rows only on the answers
    assert results[str(text)]["tokens"] > 4 * 8
    assert "tuned ppl" in out

    report = tmp_path / "base_eval.json"
    assert main(["eval", str(tiny_model_dir), "--data", str(alpaca), "--out", str(report)]) == 0
    assert "model ppl" in capsys.readouterr().out
    [plain] = json.loads(report.read_text())["results"]
    # the plain model is the untuned base: close to the 4-bit base score of the same rows
    assert plain["scores"]["model"]["perplexity"] == pytest.approx(on_alpaca["base"]["perplexity"], rel=0.05)


def test_eval_problems_are_one_line(run_dir, tmp_path, capsys):
    assert main(["eval", str(run_dir), "--data", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "--data:" in err and "not found" in err and "Traceback" not in err

    no_split = tmp_path / "no_split"
    shutil.copytree(run_dir, no_split)
    cfg = yaml.safe_load((no_split / "wronai_config.yaml").read_text())
    cfg["data"]["eval_fraction"] = 0.0
    (no_split / "wronai_config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    assert main(["eval", str(no_split)]) == 2
    err = capsys.readouterr().err
    assert "has no eval split" in err and "--data FILE" in err


def test_eval_results_reach_the_model_card(run_dir, capsys):
    from wronai.use.model_card import write_run_card

    card = write_run_card(run_dir)
    assert main(["eval", str(run_dir), "--base"]) == 0  # refreshes a WronAI card
    text = card.read_text(encoding="utf-8")
    assert "| eval split | 6 |" in text and "base ppl" in text
