"""build_datasets end to end: every format, text chunking, eval split, max_samples, packing, cache and data hook."""

from __future__ import annotations

import copy
import json

import pytest

from conftest import POLISH_TEXT, alpaca_rows, write_jsonl
from wronai.config.sections.data import DataSection
from wronai.data import cache, split
from wronai.data.prepare import build_datasets
from wronai.data.tokenize import IGNORE_INDEX
from wronai.errors import DataError

CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _cfg(path, **kw) -> DataSection:
    return DataSection(**{"dataset_name": str(path), "max_seq_length": 128, "eval_fraction": 0.0, **kw})


def _trained_text(tok, example) -> str:
    return tok.decode(
        [t for t, lab in zip(example["input_ids"], example["labels"], strict=True) if lab != IGNORE_INDEX]
    )


def test_text_chunking_drops_nothing(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    long_doc = " ".join(POLISH_TEXT * 3)
    short_doc = POLISH_TEXT[0]
    path = tmp_path / "corpus.txt"
    path.write_text(long_doc + "\n\n" + short_doc + "\n", encoding="utf-8")
    expected_long = tok(long_doc)["input_ids"] + [tok.eos_token_id]
    expected_short = tok(short_doc)["input_ids"] + [tok.eos_token_id]
    size = 32
    assert len(expected_long) > 3 * size and len(expected_long) % size > 1

    prepared = build_datasets(_cfg(path, max_seq_length=size), tok, use_cache=False)
    train = prepared.train
    assert prepared.stats.format == "text"
    assert prepared.stats.chunked_documents == 1
    assert all(n <= size for n in train["length"])
    assert len(train) == -(-len(expected_long) // size) + 1
    assert [t for ids in train["input_ids"] for t in ids] == expected_long + expected_short
    assert train["labels"] == train["input_ids"]  # raw text trains on every token


FORMAT_CASES = [
    pytest.param(
        "alpaca",
        [{"instruction": f"Pytanie {i}?", "input": "" if i % 2 else "Kontekst.", "output": f"Odpowiedź numer {i}."} for i in range(6)],
        {},
        lambda r: f"Odpowiedź numer {r}." + "</s>",
        id="alpaca",
    ),
    pytest.param(
        "completion",
        [{"prompt": f"Miasto numer {i} to", "completion": f" Kraków {i}."} for i in range(6)],
        {},
        lambda r: f" Kraków {r}." + "</s>",
        id="completion",
    ),
    pytest.param(
        "chat",
        [{"messages": [{"role": "user", "content": f"Cześć {i}"}, {"role": "assistant", "content": f"Dzień dobry {i}."}]} for i in range(6)],
        {"chat_template": "chatml"},
        lambda r: f"Dzień dobry {r}.<|im_end|>\n</s>",
        id="chat-chatml",
    ),
    pytest.param(
        "chat",
        [{"conversations": [{"from": "human", "value": f"Cześć {i}"}, {"from": "gpt", "value": f"Dzień dobry {i}."}]} for i in range(6)],
        {"chat_template": "llama3"},
        lambda r: f"Dzień dobry {r}.<|eot_id|></s>",
        id="chat-sharegpt-llama3",
    ),
    pytest.param(
        "alpaca",
        [{"pytanie": f"Pytanie {i}?", "odp": f"Odpowiedź numer {i}."} for i in range(6)],
        {"columns": {"instruction": "pytanie", "output": "odp"}},
        lambda r: f"Odpowiedź numer {r}." + "</s>",
        id="alpaca-renamed-columns",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "rows", "extra", "answer"), FORMAT_CASES)
def test_each_format_end_to_end(tmp_path, tiny_tokenizer, fmt, rows, extra, answer):
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    prepared = build_datasets(_cfg(path, **extra), tiny_tokenizer, use_cache=False)
    assert prepared.stats.format == fmt
    assert len(prepared.train) == len(rows) and prepared.eval is None
    for i, example in enumerate(prepared.train):
        assert example["labels"][0] == IGNORE_INDEX  # the prompt is masked
        assert _trained_text(tiny_tokenizer, example) == answer(i)
    stats = prepared.stats
    assert 0 < stats.trainable_tokens < stats.total_tokens == sum(prepared.train["length"])


def test_chat_with_the_tokenizers_own_template(tmp_path, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHATML_JINJA
    rows = [
        {"messages": [{"role": "user", "content": "Cześć"}, {"role": "assistant", "content": "Dzień dobry."}]}
    ]
    prepared = build_datasets(_cfg(write_jsonl(tmp_path / "c.jsonl", rows)), tok, use_cache=False)
    example = prepared.train[0]
    # the template already ends the turn: no extra EOS, no added special tokens
    assert tok.decode(example["input_ids"]) == tok.apply_chat_template(rows[0]["messages"], tokenize=False)
    assert _trained_text(tok, example) == "Dzień dobry.<|im_end|>\n"


def _ids(ds):
    return [tuple(x) for x in ds["input_ids"]]


def test_eval_split_is_seeded_and_disjoint(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(40))
    cfg = _cfg(path, eval_fraction=0.2)
    a = build_datasets(cfg, tiny_tokenizer, seed=1, use_cache=False)
    b = build_datasets(cfg, tiny_tokenizer, seed=1, use_cache=False)
    c = build_datasets(cfg, tiny_tokenizer, seed=2, use_cache=False)
    assert len(a.eval) == 8 and len(a.train) == 32
    assert _ids(a.eval) == _ids(b.eval) and _ids(a.train) == _ids(b.train)
    assert _ids(a.eval) != _ids(c.eval)
    all_rows = build_datasets(_cfg(path), tiny_tokenizer, use_cache=False)
    assert sorted(_ids(a.train) + _ids(a.eval)) == sorted(_ids(all_rows.train))


def test_eval_split_file_wins_over_fraction(tmp_path, tiny_tokenizer):
    write_jsonl(tmp_path / "d" / "train.jsonl", alpaca_rows(10))
    write_jsonl(tmp_path / "d" / "validation.jsonl", alpaca_rows(3))
    prepared = build_datasets(_cfg(tmp_path / "d", eval_fraction=0.5), tiny_tokenizer, use_cache=False)
    assert (len(prepared.train), len(prepared.eval)) == (10, 3)
    assert prepared.stats.rows_read == {"train": 10, "eval": 3}


def test_max_samples(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(40))
    prepared = build_datasets(_cfg(path, max_samples=7, eval_fraction=0.1), tiny_tokenizer, use_cache=False)
    assert len(prepared.train) == 7 and len(prepared.eval) == 4


def test_packing_through_build_datasets(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(40))
    plain = build_datasets(_cfg(path), tiny_tokenizer, use_cache=False)
    packed = build_datasets(_cfg(path, packing=True), tiny_tokenizer, use_cache=False)
    assert packed.packed and not plain.packed
    assert "position_ids" in packed.train.column_names
    assert len(packed.train) == packed.stats.packed_rows < len(plain.train)
    assert all(n <= 128 for n in packed.train["length"])
    assert sum(packed.train["length"]) == sum(plain.train["length"])
    assert packed.stats.padding_fraction_packed < packed.stats.padding_fraction_unpacked
    assert any("packed" in line for line in packed.stats.summary_lines())


def test_data_hook_drops_and_edits_rows(tmp_path, tiny_tokenizer):
    rows = alpaca_rows(20)
    path = write_jsonl(tmp_path / "a.jsonl", rows)

    def hook(row):
        assert "_file" not in row  # the hook sees the user's columns only
        if "Kraków" in row["output"]:
            return None
        return {**row, "output": row["output"].upper()}

    prepared = build_datasets(_cfg(path, max_seq_length=512), tiny_tokenizer, data_hook=hook, use_cache=False)
    dropped = sum("Kraków" in r["output"] for r in rows)
    assert dropped == 2
    assert prepared.stats.dropped_by_hook == dropped
    assert len(prepared.train) == len(rows) - dropped
    assert _trained_text(tiny_tokenizer, prepared.train[0]) == rows[0]["output"].upper() + "</s>"
    assert any("data_hook: 2" in line for line in prepared.stats.summary_lines())


@pytest.mark.parametrize(
    ("cfg_kw", "match"),
    [
        ({"train_split": "nope"}, "split 'nope' not found"),
        ({"format": "auto", "text_column": "body"}, "cannot tell the format"),
    ],
)
def test_config_errors(tmp_path, tiny_tokenizer, cfg_kw, match):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DataError, match=match):
        build_datasets(_cfg(path, **cfg_kw), tiny_tokenizer, use_cache=False)


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "x.jsonl", [{"instruction": "a", "output": " "}])
    with pytest.raises(DataError, match="no usable training examples"):
        build_datasets(_cfg(path, on_bad_row="skip"), tiny_tokenizer, use_cache=False)


# --- the on-disk cache --------------------------------------------------------------------------------------------


@pytest.fixture()
def count_reads(monkeypatch):
    calls = []
    real = split.read_raw

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(split, "read_raw", counting)
    return calls


def _change_file(path, cfg, tok):
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    rows[0]["output"] = "Zmieniona odpowiedź."
    write_jsonl(path, rows)
    return cfg, tok


def _change_config(path, cfg, tok):
    return cfg.model_copy(update={"prompt_template": "english"}), tok


def _change_tokenizer(path, cfg, tok):
    other = copy.deepcopy(tok)
    other.add_tokens(["<nowy_token>"])
    return cfg, other


def _change_chat_template(path, cfg, tok):
    other = copy.deepcopy(tok)
    other.chat_template = CHATML_JINJA
    return cfg, other


def test_cache_hit_returns_the_same_data(tmp_path, tiny_tokenizer, count_reads, cache_dir):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(20))
    cfg = _cfg(path, eval_fraction=0.2, packing=True)
    first = build_datasets(cfg, tiny_tokenizer)
    second = build_datasets(cfg, tiny_tokenizer)
    assert len(count_reads) == 1  # the second call never read the data
    assert (cache_dir / "prepared" / first.stats.cache_key / "stats.json").exists()
    assert second.stats == first.stats and second.packed
    assert second.train["input_ids"] == first.train["input_ids"]
    assert second.train["position_ids"] == first.train["position_ids"]
    assert second.eval["labels"] == first.eval["labels"]
    build_datasets(cfg, tiny_tokenizer, use_cache=False)
    assert len(count_reads) == 2


@pytest.mark.parametrize("change", [_change_file, _change_config, _change_tokenizer, _change_chat_template])
def test_cache_invalidated(tmp_path, tiny_tokenizer, count_reads, change):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(10))
    cfg = _cfg(path)
    first = build_datasets(cfg, tiny_tokenizer)
    cfg2, tok2 = change(path, cfg, tiny_tokenizer)
    second = build_datasets(cfg2, tok2)
    assert len(count_reads) == 2
    assert second.stats.cache_key != first.stats.cache_key
    build_datasets(cfg2, tok2)
    assert len(count_reads) == 2  # and the new result is cached in turn


def test_cache_key_ignores_worker_count(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(4))
    a = cache.cache_key(_cfg(path), tiny_tokenizer, 42, None)
    assert a == cache.cache_key(_cfg(path, preprocessing_num_workers=4), tiny_tokenizer, 42, None)
    assert a != cache.cache_key(_cfg(path), tiny_tokenizer, 43, None)
    assert a != cache.cache_key(_cfg(path), tiny_tokenizer, 42, lambda row: row)
