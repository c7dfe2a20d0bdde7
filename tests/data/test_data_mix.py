"""data.weights: mixing several datasets in proportion (seeded), with replacement only when needed."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from pydantic import ValidationError

from conftest import write_jsonl
from wronai.config.sections.data import DataSection
from wronai.data.mix import mix_rows, sample, targets
from wronai.data.prepare import build_datasets

TARGET_CASES = [
    ([100, 100], [1, 1], 200, [100, 100]),
    ([100, 10], [0.5, 0.5], 110, [55, 55]),
    ([30, 30, 30], [1, 1, 1], 100, [34, 33, 33]),
    ([50, 50], [1, 0], 100, [100, 0]),
    ([10, 10], [0.7, 0.3], 10, [7, 3]),
]


@pytest.mark.parametrize(("sizes", "weights", "total", "expected"), TARGET_CASES)
def test_targets(sizes, weights, total, expected):
    assert targets(sizes, weights, total) == expected
    assert sum(expected) == total


SAMPLE_CASES = [
    (10, 4, {1}),  # fewer than the source has: each row at most once
    (10, 10, {1}),
    (4, 10, {2, 3}),  # more: every row twice, two rows a third time
    (3, 0, set()),
]


@pytest.mark.parametrize(("n", "target", "uses"), SAMPLE_CASES)
def test_sample_repeats_only_when_needed(n, target, uses):
    picked = sample(list(range(n)), target, random.Random(0))
    assert len(picked) == target
    assert set(Counter(picked).values()) == uses


def test_mix_rows_is_seeded_and_reports_replacement():
    a = [{"src": "a", "i": i} for i in range(90)]
    b = [{"src": "b", "i": i} for i in range(10)]
    mixed, report = mix_rows([a, b], [0.5, 0.5], ["a.jsonl", "b.jsonl"], seed=1)
    assert mixed == mix_rows([a, b], [0.5, 0.5], ["a.jsonl", "b.jsonl"], seed=1)[0]
    assert mixed != mix_rows([a, b], [0.5, 0.5], ["a.jsonl", "b.jsonl"], seed=2)[0]
    assert Counter(r["src"] for r in mixed) == {"a": 50, "b": 50}
    assert [r["with_replacement"] for r in report] == [False, True]
    assert report[1] == {
        "source": "b.jsonl",
        "rows": 10,
        "weight": 0.5,
        "sampled": 50,
        "share": 0.5,
        "with_replacement": True,
    }
    assert len({r["i"] for r in mixed if r["src"] == "a"}) == 50  # no row of a repeated


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"dataset_name": ["a.jsonl", "b.jsonl"], "weights": [1.0]}, "weights has 1 value"),
        ({"dataset_name": "a.jsonl", "weights": [0.5, 0.5]}, "lists 1 dataset"),
        ({"dataset_name": ["a.jsonl", "b.jsonl"], "weights": [1.0, -1.0]}, "positive sum"),
        ({"dataset_name": ["a.jsonl", "b.jsonl"], "weights": [0, 0]}, "positive sum"),
        ({"dataset_name": ["a.jsonl"], "weights": []}, "one weight per dataset"),
    ],
)
def test_weights_validated(kw, match):
    with pytest.raises(ValidationError, match=match):
        DataSection(**kw)


def _rows(tag: str, n: int) -> list[dict]:
    return [{"instruction": f"Pytanie {tag} {i}?", "output": f"Odpowiedź {tag} numer {i}."} for i in range(n)]


def test_build_datasets_mixes_by_weight(tmp_path, tiny_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", _rows("A", 40))
    b = write_jsonl(tmp_path / "b.jsonl", _rows("B", 8))
    cfg = DataSection(dataset_name=[str(a), str(b)], weights=[3, 1], max_seq_length=64, eval_fraction=0.25)
    prepared = build_datasets(cfg, tiny_tokenizer, use_cache=False)
    stats = prepared.stats
    # eval: 25% of each source held out before mixing (10 + 2); train mix: 30 + 6 rows -> 27 A, 9 B
    assert stats.examples == {"train": 36, "eval": 12}
    assert [(m["sampled"], m["rows"], m["with_replacement"]) for m in stats.mix] == [
        (27, 30, False),
        (9, 6, True),
    ]
    mix_lines = [x for x in stats.summary_lines() if x.startswith("mix:")]
    assert len(mix_lines) == 2 and "rows repeated" in mix_lines[1] and "rows repeated" not in mix_lines[0]
    # max_samples is the size of the mix
    small = build_datasets(cfg.model_copy(update={"max_samples": 8}), tiny_tokenizer, use_cache=False)
    assert [m["sampled"] for m in small.stats.mix] == [6, 2]


def test_without_weights_sources_are_concatenated(tmp_path, tiny_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", _rows("A", 5))
    b = write_jsonl(tmp_path / "b.jsonl", _rows("B", 3))
    prepared = build_datasets(
        DataSection(dataset_name=[str(a), str(b)], max_seq_length=64, eval_fraction=0.0),
        tiny_tokenizer,
        use_cache=False,
    )
    assert len(prepared.train) == 8 and prepared.stats.mix == []


@pytest.mark.parametrize(
    ("name", "expected"), [("a.jsonl", ["a.jsonl"]), (["a.jsonl", "b"], ["a.jsonl", "b"])]
)
def test_dataset_names_is_always_a_list(name, expected):
    assert DataSection(dataset_name=name).dataset_names == expected
