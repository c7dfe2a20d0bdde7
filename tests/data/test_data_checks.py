"""Pre-flight data checks: each failing check triggers with its message; good data passes; `wronai data check`."""

from __future__ import annotations

import copy

import pytest
import yaml

from conftest import alpaca_rows, make_config_dict, write_jsonl
from wronai.cli import main
from wronai.config.sections.data import DataSection
from wronai.data import checks
from wronai.data.formats import BadRow
from wronai.data.prepare import build_datasets
from wronai.data.tokenize import IGNORE_INDEX, check_length
from wronai.errors import DataError

CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"Pytanie {i}?"},
            {"role": "assistant", "content": f"Odpowiedź {i}."},
        ]
    }
    for i in range(6)
]


def _cfg(path, **kw) -> DataSection:
    return DataSection(**{"dataset_name": str(path), "max_seq_length": 128, "eval_fraction": 0.0, **kw})


@pytest.fixture()
def chatml_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHATML_JINJA
    return tok


# --- passing data passes ------------------------------------------------------------------------------------------

PASSING = [
    pytest.param("alpaca", {}, False, id="alpaca"),
    pytest.param("chat", {"chat_template": "chatml"}, False, id="chat-named-no-tokenizer-template"),
    pytest.param("chat", {"chat_template": "auto"}, True, id="chat-tokenizer-template"),
    pytest.param("chat", {"chat_template": "chatml"}, True, id="chat-named-equal-to-tokenizer-template"),
    pytest.param("alpaca", {"train_on": "all"}, False, id="alpaca-train-on-all"),
]


@pytest.mark.parametrize(("fmt", "kw", "own_template"), PASSING)
def test_good_data_passes_every_check(tmp_path, tiny_tokenizer, chatml_tokenizer, fmt, kw, own_template):
    rows = alpaca_rows(10) if fmt == "alpaca" else CHAT_ROWS
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    tok = chatml_tokenizer if own_template else tiny_tokenizer
    prepared = build_datasets(_cfg(path, **kw), tok, use_cache=False)
    assert prepared.stats.checks == {"eos": "ok", "chat_template": "ok", "too_long": "ok"}
    assert "checks: eos ok, chat_template ok, too_long ok" in prepared.stats.summary_lines()


# --- eos --------------------------------------------------------------------------------------------------------------


def _examples(tok, path):
    prepared = build_datasets(_cfg(path, checks=False), tok, use_cache=False)
    return [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in prepared.train]


def test_eos_check_fails_when_eos_is_masked(tmp_path, tiny_tokenizer):
    examples = _examples(tiny_tokenizer, write_jsonl(tmp_path / "a.jsonl", alpaca_rows(6)))
    assert checks.check_eos(examples, ["a.jsonl:1"] * 6, tiny_tokenizer, "alpaca", "auto", True) is None
    examples[2]["labels"][-1] = IGNORE_INDEX  # the pad == eos bug: EOS label masked
    problem = checks.check_eos(
        examples, [f"a.jsonl:{i + 1}" for i in range(6)], tiny_tokenizer, "alpaca", "auto", True
    )
    assert problem.startswith("eos: 1 of 6 examples do not end their trained tokens with </s>")
    assert "first: a.jsonl:3" in problem and "not masked" in problem


def test_eos_check_fails_when_eos_is_missing(tmp_path, tiny_tokenizer):
    examples = _examples(tiny_tokenizer, write_jsonl(tmp_path / "a.jsonl", alpaca_rows(3)))
    for ex in examples:  # EOS never appended
        ex["input_ids"], ex["labels"] = ex["input_ids"][:-1], ex["labels"][:-1]
    problem = checks.check_eos(examples, ["x:1", "x:2", "x:3"], tiny_tokenizer, "alpaca", "auto", True)
    assert problem.startswith("eos: 3 of 3 examples") and "first: x:1" in problem


def test_eos_check_fails_without_an_eos_token(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.eos_token = None
    problem = checks.check_eos([], [], tok, "alpaca", "auto", True)
    assert problem.startswith("eos: the tokenizer has no EOS token") and "data.add_eos: false" in problem


@pytest.mark.parametrize(("fmt", "add_eos"), [("text", True), ("alpaca", False)])
def test_eos_check_not_applicable(tiny_tokenizer, fmt, add_eos):
    example = {"input_ids": [5, 6], "labels": [5, 6]}
    assert checks.check_eos([example], ["x:1"], tiny_tokenizer, fmt, "auto", add_eos) is None


def test_eos_check_accepts_the_tokenizer_templates_end_of_turn(tmp_path, chatml_tokenizer):
    examples = _examples(chatml_tokenizer, write_jsonl(tmp_path / "c.jsonl", CHAT_ROWS))
    assert all(
        ex["input_ids"][-1] != chatml_tokenizer.eos_token_id for ex in examples
    )  # ends with <|im_end|>\n
    assert checks.check_eos(examples, ["c:1"] * len(examples), chatml_tokenizer, "chat", "auto", True) is None


# --- chat template ------------------------------------------------------------------------------------------------


def test_chat_template_mismatch_fails(tmp_path, chatml_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", CHAT_ROWS)
    with pytest.raises(
        DataError, match=r"chat_template: data.chat_template llama3 renders conversations differently"
    ) as err:
        build_datasets(_cfg(path, chat_template="llama3"), chatml_tokenizer, use_cache=False)
    assert "set data.chat_template: auto" in str(err.value)
    # data.checks: false skips the checks
    assert (
        len(
            build_datasets(
                _cfg(path, chat_template="llama3", checks=False), chatml_tokenizer, use_cache=False
            ).train
        )
        == 6
    )


CHAT_TEMPLATE_CASES = [
    ("alpaca", "llama3", True, None),  # not chat: nothing to compare
    ("chat", "llama3", False, None),  # the tokenizer has no template of its own
    ("chat", "chatml", True, None),
    ("chat", "mistral", True, "chat_template: data.chat_template mistral"),
]


@pytest.mark.parametrize(("fmt", "named", "own", "expected"), CHAT_TEMPLATE_CASES)
def test_check_chat_template(tiny_tokenizer, chatml_tokenizer, fmt, named, own, expected):
    tok = chatml_tokenizer if own else tiny_tokenizer
    problem = checks.check_chat_template(fmt, named, tok, [checks.SAMPLE_CONVERSATION])
    assert problem is None if expected is None else problem.startswith(expected)


# --- too long ------------------------------------------------------------------------------------------------------

TOO_LONG_CASES = [
    (0, 100, 0.05, None),
    (5, 100, 0.05, None),
    (6, 100, 0.05, "too_long: 6 of 100 rows (6.0%)"),
    (1, 1, 1.0, None),
    (1, 10, 0.0, "too_long: 1 of 10 rows (10.0%)"),
]


@pytest.mark.parametrize(("n", "rows", "share", "expected"), TOO_LONG_CASES)
def test_check_too_long(n, rows, share, expected):
    problem = checks.check_too_long(n, rows, share, 64, "f.jsonl:3")
    assert (
        problem is None
        if expected is None
        else (problem.startswith(expected) and "first: f.jsonl:3" in problem)
    )


def test_too_many_long_rows_stop_preparation(tmp_path, tiny_tokenizer):
    rows = alpaca_rows(10)
    for row in rows[:3]:
        row["output"] = "Bardzo długa odpowiedź o historii Polski. " * 30
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(
        DataError, match=r"too_long: 3 of 10 rows \(30.0%\) are longer than data.max_seq_length=64"
    ) as err:
        build_datasets(_cfg(path, max_seq_length=64), tiny_tokenizer, use_cache=False)  # on_bad_row: error
    assert "long.jsonl:1" in str(err.value) and "raise data.max_truncated_share" in str(err.value)
    ok = build_datasets(
        _cfg(path, max_seq_length=64, on_bad_row="skip", max_truncated_share=0.5),
        tiny_tokenizer,
        use_cache=False,
    )
    assert ok.stats.checks["too_long"] == "ok" and len(ok.train) == 7


# --- no trainable tokens (per row) --------------------------------------------------------------------------------


def test_no_trainable_tokens_message():
    with pytest.raises(BadRow, match="no trainable tokens after masking") as err:
        check_length({"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX] * 3}, 16)
    assert err.value.code == "no_trainable_tokens" and "answer is empty" in err.value.reason


# --- wronai data check ----------------------------------------------------------------------------------------------


def _write_config(tmp_path, model_dir, data_path, **data) -> str:
    cfg = make_config_dict(
        model_dir, data_path, tmp_path / "out", data={"eval_fraction": 0.0, "checks": False, **data}
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return str(path)


def test_cli_data_check(tmp_path, tiny_model_dir, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", alpaca_rows(8))
    assert main(["data", "check", _write_config(tmp_path, tiny_model_dir, good)]) == 0
    out = capsys.readouterr().out
    assert "data checks passed" in out and "eos: ok" in out and "too_long: ok" in out

    rows = alpaca_rows(8)
    rows[0]["output"] = "Bardzo długa odpowiedź. " * 60
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    assert (
        main(
            [
                "data",
                "check",
                _write_config(tmp_path, tiny_model_dir, bad, on_bad_row="skip", max_seq_length=64),
            ]
        )
        == 2
    )
    assert "too_long: 1 of 8 rows" in capsys.readouterr().err
