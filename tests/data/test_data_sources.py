"""Reading local files (every suffix, many files, split directories) and bad input: precise errors or counted skips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_jsonl
from wronai.config.sections.data import DataSection
from wronai.data.prepare import build_datasets
from wronai.data.sources import BadRowPolicy, read_raw, split_of
from wronai.errors import DataError

ROWS = [
    {"instruction": "Podaj stolicę Polski.", "output": "Warszawa"},
    {"instruction": "Ile to 2+2?", "output": "4"},
    {"instruction": "Powiedz NA.", "output": "NA"},
]


def _write(path: Path, kind: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "jsonl":
        write_jsonl(path, ROWS)
    elif kind == "json":
        path.write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    elif kind == "json-dict":
        path.write_text(json.dumps({"data": ROWS}, ensure_ascii=False), encoding="utf-8")
    elif kind == "json-lines":
        write_jsonl(path, ROWS)
    elif kind == "jsonl-bom-crlf":
        path.write_bytes(
            b"\xef\xbb\xbf" + "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in ROWS).encode()
        )
    elif kind == "csv":
        lines = ["instruction,output"] + [f'"{r["instruction"]}",{r["output"]}' for r in ROWS]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif kind == "parquet":
        import datasets

        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    return path


@pytest.mark.parametrize(
    ("kind", "suffix", "row_numbers"),
    [
        ("jsonl", ".jsonl", [1, 2, 3]),
        ("json", ".json", [1, 2, 3]),
        ("json-dict", ".json", [1, 2, 3]),
        ("json-lines", ".json", [1, 2, 3]),
        ("jsonl-bom-crlf", ".jsonl", [1, 2, 3]),
        ("csv", ".csv", [2, 3, 4]),
        ("parquet", ".parquet", [1, 2, 3]),
    ],
)
def test_read_each_local_format(tmp_path, kind, suffix, row_numbers):
    path = _write(tmp_path / f"data{suffix}", kind)
    raw = read_raw(str(path), None, None, BadRowPolicy("error"))
    assert list(raw.splits) == ["train"]
    rows = raw.splits["train"]
    # values stay text: "4" is not turned into an int, "NA" is not turned into a missing value
    assert [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows] == ROWS
    assert [r["_row"] for r in rows] == row_numbers
    assert {r["_file"] for r in rows} == {str(path)}
    assert not raw.skipped


def test_read_text_documents_and_first_line_numbers(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(
        "\ufeffPierwszy akapit,\r\ndruga linia.\r\n\r\n\r\nDrugi akapit.\r\n\r\nTrzeci\n".encode()
    )
    rows = read_raw(str(path), None, None, BadRowPolicy("error")).splits["train"]
    assert [r["text"] for r in rows] == ["Pierwszy akapit,\ndruga linia.", "Drugi akapit.", "Trzeci"]
    assert [r["_row"] for r in rows] == [1, 5, 7]


def test_several_files_are_concatenated(tmp_path):
    a = _write(tmp_path / "a.jsonl", "jsonl")
    b = _write(tmp_path / "b.csv", "csv")
    raw = read_raw([str(a), str(b)], None, None, BadRowPolicy("error"))
    assert list(raw.splits) == ["train"]
    assert [r["_file"] for r in raw.splits["train"]] == [str(a)] * 3 + [str(b)] * 3


def test_directory_split_detection(tmp_path):
    d = tmp_path / "ds"
    write_jsonl(d / "train.jsonl", ROWS)
    write_jsonl(d / "validation.jsonl", ROWS[:1])
    write_jsonl(d / "extra" / "more_test.jsonl", ROWS[:2])
    (d / "README.md").write_text("ignored")
    raw = read_raw(str(d), None, None, BadRowPolicy("error"))
    assert {k: len(v) for k, v in raw.splits.items()} == {"train": 3, "validation": 1, "test": 2}


@pytest.mark.parametrize(
    ("name", "split"),
    [("train.jsonl", "train"), ("validation.csv", "validation"), ("val.json", "validation"), ("dev.jsonl", "validation"),
     ("my_eval.parquet", "validation"), ("pl-test.txt", "test"), ("data.jsonl", "train"), ("interval.jsonl", "train")],
)  # fmt: skip
def test_split_of(name, split):
    assert split_of(Path(name)) == split


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        (lambda p: p / "missing.xml", "unsupported extension"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "holds no"),
        (
            lambda p: (p / "broken.json").write_text('[{"a": 1},') and p / "broken.json",
            "broken.json:1: broken JSON",
        ),
        (lambda p: (p / "scalar.json").write_text("3") and p / "scalar.json", "expected a JSON list"),
        (lambda p: (p / "bad.json").write_bytes(b'[{"a": "\xff"}]') and p / "bad.json", "invalid UTF-8"),
        (
            lambda p: (p / "bad.parquet").write_bytes(b"not parquet") and p / "bad.parquet",
            "cannot read .parquet",
        ),
    ],
)
def test_unreadable_sources(tmp_path, setup, match):
    path = setup(tmp_path)
    if path.suffix == ".xml":
        path.write_text("<x/>")
    with pytest.raises(DataError, match=match):
        read_raw(str(path), None, None, BadRowPolicy("skip"))


def test_unknown_hub_dataset_offline_is_a_data_error():
    with pytest.raises(DataError, match="could not be loaded from the Hub"):
        read_raw("wronai-test/no-such-dataset", None, None, BadRowPolicy("error"))


# --- bad rows through the whole data stage -----------------------------------------------------------------------

GOOD = json.dumps(
    {"instruction": "Podaj stolicę Polski.", "output": "Warszawa."}, ensure_ascii=False
).encode()
TOO_LONG = json.dumps(
    {"instruction": "Opowiedz.", "output": "Warszawa jest stolicą Polski. " * 40}, ensure_ascii=False
).encode()

BAD_LINES = [
    pytest.param(b'{"instruction": "x", "output": ', "broken_json", "(line)", id="broken-json"),
    pytest.param(b'{"instruction": "\xff\xfe", "output": "y"}', "invalid_utf8", "(line)", id="invalid-utf8"),
    pytest.param(b'["instruction", "output"]', "wrong_type", "(line)", id="not-an-object"),
    pytest.param(b'{"instruction": "x", "output": 5}', "wrong_type", "output", id="wrong-type"),
    pytest.param(b'{"instruction": "x", "output": "   "}', "empty_field", "output", id="empty-answer"),
    pytest.param(b'{"output": "y"}', "missing_field", "instruction", id="missing-field"),
]


def _cfg(path: Path, **kw) -> DataSection:
    values = {"dataset_name": str(path), "max_seq_length": 64, "eval_fraction": 0.0, **kw}
    return DataSection(**values)


@pytest.mark.parametrize(("line", "code", "field"), BAD_LINES)
def test_bad_row_error_names_file_line_and_field(tmp_path, tiny_tokenizer, line, code, field):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join([GOOD, GOOD, line, GOOD]) + b"\n")
    with pytest.raises(DataError) as info:
        build_datasets(_cfg(path), tiny_tokenizer, use_cache=False)
    message = str(info.value)
    assert f"{path}:3:" in message
    assert f"`{field}`" in message
    assert "on_bad_row: skip" in message


def test_bad_row_in_csv_names_data_row(tmp_path, tiny_tokenizer):
    path = tmp_path / "rows.csv"
    path.write_text("instruction,output\nPytanie,Odpowiedź\nPytanie,\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:3: field `output`: empty"):
        build_datasets(_cfg(path), tiny_tokenizer, use_cache=False)


def test_a_too_long_row_is_dropped_and_counted_by_default(tmp_path, tiny_tokenizer):
    """One row over max_seq_length in 25 (4%, under max_truncated_share 5%): the run goes on without it."""
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join([GOOD] * 12 + [TOO_LONG] + [GOOD] * 12) + b"\n")
    prepared = build_datasets(_cfg(path), tiny_tokenizer, use_cache=False)  # on_bad_row: error (default)
    assert prepared.stats.skipped == {"too_long": 1} and len(prepared.train) == 24
    assert f"{path}:13:" in prepared.stats.skipped_examples["too_long"]
    assert "skipped rows: too_long 1" in prepared.stats.summary_lines()


def test_bad_rows_skipped_and_counted(tmp_path, tiny_tokenizer):
    lines = [GOOD, TOO_LONG, GOOD]
    for param in BAD_LINES:
        lines += [param.values[0], GOOD]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n\n")
    # 1 too-long row of 12 is over the default max_truncated_share (5%): allow it here (tests/test_data_checks.py covers the check)
    prepared = build_datasets(
        _cfg(path, on_bad_row="skip", max_truncated_share=0.2), tiny_tokenizer, use_cache=False
    )
    stats = prepared.stats
    expected = {
        "broken_json": 1,
        "invalid_utf8": 1,
        "wrong_type": 2,
        "empty_field": 1,
        "missing_field": 1,
        "too_long": 1,
    }
    assert stats.skipped == expected
    assert set(stats.skipped_examples) == set(expected)
    assert str(path) in stats.skipped_examples["too_long"]
    kept = sum(stats.examples.values())
    assert kept == len(prepared.train) == len(BAD_LINES) + 2
    # no row disappears uncounted: every non-blank line is kept or skipped
    assert len([x for x in lines if x.strip()]) == kept + sum(stats.skipped.values())
    assert any("skipped rows" in line for line in stats.summary_lines())


def test_json_list_non_object_rows_skipped(tmp_path, tiny_tokenizer):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([ROWS[0], "oops", 3, ROWS[1]]), encoding="utf-8")
    prepared = build_datasets(_cfg(path, on_bad_row="skip"), tiny_tokenizer, use_cache=False)
    assert prepared.stats.skipped == {"wrong_type": 2}
    assert prepared.stats.examples["train"] == 2
    with pytest.raises(DataError, match=r"rows\.json row 2: field `\(row\)`"):
        build_datasets(_cfg(path), tiny_tokenizer, use_cache=False)


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_json_file_holding_json_lines_counts_non_objects(tmp_path, tiny_tokenizer, policy):
    path = tmp_path / "rows.json"
    path.write_text(
        json.dumps(ROWS[0]) + "\n[1, 2]\n" + json.dumps(ROWS[1]) + "\n{broken\n", encoding="utf-8"
    )
    if policy == "error":
        with pytest.raises(DataError, match=r"rows\.json:2: field `\(line\)`: expected a JSON object"):
            build_datasets(_cfg(path), tiny_tokenizer, use_cache=False)
        return
    prepared = build_datasets(_cfg(path, on_bad_row="skip"), tiny_tokenizer, use_cache=False)
    assert prepared.stats.skipped == {"wrong_type": 1, "broken_json": 1}
    assert prepared.stats.examples["train"] == 2
