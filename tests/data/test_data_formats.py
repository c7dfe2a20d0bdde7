"""Row formats as pure functions: exact rendered text, trainable flags, format detection and bad rows."""

from __future__ import annotations

import pytest

from wronai.data.formats import (
    BadRow,
    detect_format,
    format_alpaca,
    format_chat,
    format_completion,
    format_text,
    formatter_for,
    normalize_messages,
    rename_columns,
)


def _text(segments):
    return "".join(text for text, _ in segments)


def _answers(segments):
    return [text for text, trainable in segments if trainable]


ALPACA_CASES = [
    pytest.param(
        {"instruction": "Podaj stolicę Polski.", "output": "Warszawa."},
        "polish",
        "### Instrukcja:\nPodaj stolicę Polski.\n\n### Odpowiedź:\n",
        id="polish-no-input",
    ),
    pytest.param(
        {"instruction": " Przetłumacz. ", "input": "dog", "output": " pies \n"},
        "polish",
        "### Instrukcja:\nPrzetłumacz.\n\n### Dane wejściowe:\ndog\n\n### Odpowiedź:\n",
        id="polish-input-stripped",
    ),
    pytest.param(
        {"instruction": "Translate.", "input": "pies", "output": "dog"},
        "english",
        "### Instruction:\nTranslate.\n\n### Input:\npies\n\n### Response:\n",
        id="english-input",
    ),
    pytest.param(
        {"instruction": "Translate.", "input": "   ", "output": "dog"},
        "english",
        "### Instruction:\nTranslate.\n\n### Response:\n",
        id="english-whitespace-input-is-no-input",
    ),
    pytest.param(
        {"instruction": "Policz.", "input": "2+2", "output": "4", "system": "Jesteś kalkulatorem."},
        "polish",
        "Jesteś kalkulatorem.\n\n### Instrukcja:\nPolicz.\n\n### Dane wejściowe:\n2+2\n\n### Odpowiedź:\n",
        id="polish-system",
    ),
    pytest.param(
        {"instruction": "Policz.", "input": "2+2", "output": "4"},
        "Q: {instruction} [{input}]\nA: ",
        "Q: Policz. [2+2]\nA: ",
        id="custom-template",
    ),
    pytest.param(
        {"instruction": "Policz.", "output": "4", "input": None},
        "Q: {instruction}|{input}|A:",
        "Q: Policz.||A:",
        id="custom-template-null-input",
    ),
]


@pytest.mark.parametrize(("row", "template", "prompt"), ALPACA_CASES)
def test_alpaca_prompt_and_answer(row, template, prompt):
    segments = format_alpaca(row, template)
    assert segments == [(prompt, False), (row["output"].strip(), True)]


def test_completion_keeps_text_verbatim():
    row = {"prompt": "Stolica Polski to", "completion": " Warszawa."}
    assert format_completion(row) == [("Stolica Polski to", False), (" Warszawa.", True)]


def test_text_is_one_trainable_segment():
    assert format_text({"body": "Zażółć gęślą jaźń."}, "body") == [("Zażółć gęślą jaźń.", True)]


MULTI_TURN = [
    {"role": "system", "content": "Mów po polsku."},
    {"role": "user", "content": "Cześć!"},
    {"role": "assistant", "content": "Dzień dobry."},
    {"role": "user", "content": "Jak się masz?"},
    {"role": "assistant", "content": "Dobrze, dziękuję."},
]
SHAREGPT = [
    {"from": t["role"].replace("user", "human").replace("assistant", "gpt"), "value": t["content"]}
    for t in MULTI_TURN
]


CHAT_CASES = [
    pytest.param(
        "chatml",
        "<|im_start|>system\nMów po polsku.<|im_end|>\n<|im_start|>user\nCześć!<|im_end|>\n"
        "<|im_start|>assistant\nDzień dobry.<|im_end|>\n<|im_start|>user\nJak się masz?<|im_end|>\n"
        "<|im_start|>assistant\nDobrze, dziękuję.<|im_end|>\n",
        ["Dzień dobry.<|im_end|>\n", "Dobrze, dziękuję.<|im_end|>\n"],
        id="chatml",
    ),
    pytest.param(
        "llama3",
        "<|start_header_id|>system<|end_header_id|>\n\nMów po polsku.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nCześć!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nDzień dobry.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nJak się masz?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nDobrze, dziękuję.<|eot_id|>",
        ["Dzień dobry.<|eot_id|>", "Dobrze, dziękuję.<|eot_id|>"],
        id="llama3",
    ),
    pytest.param(
        "mistral",
        "[INST] Mów po polsku.\n\nCześć! [/INST] Dzień dobry.</s>[INST] Jak się masz? [/INST] Dobrze, dziękuję.</s>",
        [" Dzień dobry.</s>", " Dobrze, dziękuję.</s>"],
        id="mistral",
    ),
]


@pytest.mark.parametrize(("template", "expected", "answers"), CHAT_CASES)
@pytest.mark.parametrize("field", ["messages", "conversations"])
def test_chat_templates_multi_turn(template, expected, answers, field):
    row = {field: MULTI_TURN if field == "messages" else SHAREGPT}
    segments = format_chat(row, template)
    assert _text(segments) == expected
    assert _answers(segments) == answers
    # system and user content is never trainable
    for text, trainable in segments:
        if "Cześć" in text or "Mów po polsku" in text or "Jak się masz" in text:
            assert not trainable


def test_unknown_named_chat_template():
    with pytest.raises(ValueError, match="unknown chat template"):
        format_chat({"messages": MULTI_TURN}, "vicuna")


@pytest.mark.parametrize(
    ("turn", "role"),
    [({"from": "human", "value": "x"}, "user"), ({"from": "gpt", "value": "x"}, "assistant"), ({"from": "bot", "value": "x"}, "assistant"),
     ({"role": "USER", "content": "x"}, "user"), ({"role": "model", "content": "x"}, "assistant"), ({"from": "system", "value": "x"}, "system")],
)  # fmt: skip
def test_sharegpt_roles_normalized(turn, role):
    messages = normalize_messages({"conversations": [turn, {"from": "gpt", "value": "ok"}]})
    assert messages[0] == {"role": role, "content": "x"}


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["messages"], "chat"),
        (["conversations", "id"], "chat"),
        (["instruction", "input", "output"], "alpaca"),
        (["instruction", "output"], "alpaca"),
        (["instruction", "input"], None),
        (["prompt", "completion"], "completion"),
        (["prompt"], None),
        (["text", "meta"], "text"),
        (["content"], None),
        (["messages", "text"], "chat"),
        (["instruction", "output", "text"], "alpaca"),
    ],
)
def test_detect_format(columns, expected):
    assert detect_format(columns) == expected


def test_detect_format_custom_text_column():
    assert detect_format(["body"], text_column="body") == "text"
    assert detect_format(["body"]) is None


@pytest.mark.parametrize(
    ("row", "mapping", "expected"),
    [
        ({"pytanie": "a", "odpowiedz": "b"}, {"instruction": "pytanie", "output": "odpowiedz"},
         {"pytanie": "a", "odpowiedz": "b", "instruction": "a", "output": "b"}),
        ({"q": "a"}, {}, {"q": "a"}),
        ({"q": "a"}, {"instruction": "missing_column"}, {"q": "a"}),
    ],
)  # fmt: skip
def test_rename_columns(row, mapping, expected):
    out = rename_columns(row, mapping)
    assert out == expected
    assert out is not row


def test_rename_columns_feeds_formatter():
    row = rename_columns({"pytanie": "Ile to 2+2?", "odp": "4"}, {"instruction": "pytanie", "output": "odp"})
    assert _answers(format_alpaca(row)) == ["4"]


BAD_ROWS = [
    pytest.param("alpaca", {"output": "x"}, "instruction", "missing_field", id="alpaca-missing-instruction"),
    pytest.param("alpaca", {"instruction": "x", "output": None}, "output", "missing_field", id="alpaca-null-output"),
    pytest.param("alpaca", {"instruction": "x", "output": ""}, "output", "empty_field", id="alpaca-empty-output"),
    pytest.param("alpaca", {"instruction": "x", "output": " \n\t"}, "output", "empty_field", id="alpaca-whitespace-output"),
    pytest.param("alpaca", {"instruction": "x", "output": 42}, "output", "wrong_type", id="alpaca-int-output"),
    pytest.param("alpaca", {"instruction": ["x"], "output": "y"}, "instruction", "wrong_type", id="alpaca-list-instruction"),
    pytest.param("alpaca", {"instruction": "x", "output": "y", "input": 3}, "input", "wrong_type", id="alpaca-int-input"),
    pytest.param("alpaca", {"instruction": "x", "output": "y", "system": {}}, "system", "wrong_type", id="alpaca-dict-system"),
    pytest.param("completion", {"prompt": "x"}, "completion", "missing_field", id="completion-missing"),
    pytest.param("completion", {"prompt": "x", "completion": "  "}, "completion", "empty_field", id="completion-empty"),
    pytest.param("completion", {"prompt": 1, "completion": "y"}, "prompt", "wrong_type", id="completion-int-prompt"),
    pytest.param("text", {"text": ""}, "text", "empty_field", id="text-empty"),
    pytest.param("text", {"other": "x"}, "text", "missing_field", id="text-missing"),
    pytest.param("text", {"text": 3.5}, "text", "wrong_type", id="text-float"),
    pytest.param("chat", {"id": 1}, "messages", "missing_field", id="chat-missing"),
    pytest.param("chat", {"messages": []}, "messages", "wrong_type", id="chat-empty-list"),
    pytest.param("chat", {"messages": "hi"}, "messages", "wrong_type", id="chat-string"),
    pytest.param("chat", {"messages": ["hi"]}, "messages[0]", "wrong_type", id="chat-turn-not-object"),
    pytest.param("chat", {"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]},
                 "messages[0].role", "unknown_role", id="chat-unknown-role"),
    pytest.param("chat", {"messages": [{"content": "x"}]}, "messages[0].role", "unknown_role", id="chat-no-role"),
    pytest.param("chat", {"conversations": [{"from": "alien", "value": "x"}]}, "conversations[0].role", "unknown_role",
                 id="sharegpt-unknown-role"),
    pytest.param("chat", {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]},
                 "messages[0].content", "wrong_type", id="chat-int-content"),
    pytest.param("chat", {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]},
                 "messages[1].content", "empty_field", id="chat-empty-answer"),
    pytest.param("chat", {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}]},
                 "messages", "no_answer", id="chat-no-assistant"),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "row", "field", "code"), BAD_ROWS)
def test_bad_rows(fmt, row, field, code):
    fn = formatter_for(fmt, text_column="text", prompt_template="polish", chat_template="chatml")
    with pytest.raises(BadRow) as info:
        fn(row)
    assert info.value.code == code
    assert info.value.field == field
    assert f"`{field}`" in str(info.value)


def test_formatter_for_unknown_format():
    with pytest.raises(ValueError, match="unknown format"):
        formatter_for("xml", text_column="text", prompt_template="polish", chat_template="chatml")
