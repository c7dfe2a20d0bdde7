"""polish.normalize: each normalization step, row text per format, language check, exact/near dedupe, counts."""

from __future__ import annotations

import json
import random

import pytest

from conftest import alpaca_rows, write_jsonl
from wronai.config.sections.data import DataSection
from wronai.config.sections.polish import NormalizeSpec
from wronai.data import cache, dedupe, filters, hygiene, normalize
from wronai.data.prepare import build_datasets


def _norm(**kw) -> normalize.TextNormalizer:
    return normalize.TextNormalizer(NormalizeSpec(enabled=True, **kw))


ALL_OFF = {"nfc": False, "quotes": False, "dashes": False, "spaces": False}

NORMALIZE_CASES = [
    # (settings on top of ALL_OFF, input, expected)
    ({"nfc": True}, "za\u0328b", "ząb"),
    ({"nfc": True}, "ząb", "ząb"),
    ({}, "za\u0328b „x”", "za\u0328b „x”"),  # every step off: unchanged
    ({"quotes": True}, "„Tak” i “nie” i «może» i ‚raz’", '"Tak" i "nie" i "może" i \'raz\''),
    ({"quotes": True}, "don’t", "don't"),
    ({"quotes": True, "quote_style": "polish"}, 'Powiedział "tak" i "nie".', "Powiedział „tak” i „nie”."),
    ({"quotes": True, "quote_style": "polish"}, "“Dobrze” – odparł", "„Dobrze” – odparł"),
    ({"quotes": True, "quote_style": "polish"}, '("a")', "(„a”)"),
    ({"dashes": True}, "Warszawa — stolica", "Warszawa – stolica"),
    ({"dashes": True}, "a ― b ‒ c", "a – b – c"),
    ({"dashes": True}, "−5 i x‐y i a‑b", "-5 i x-y i a-b"),
    ({"dashes": True, "dash_style": "hyphen"}, "Warszawa — stolica – miasto", "Warszawa - stolica - miasto"),
    ({"spaces": True}, "10\u00a0zł i 5\u202fkm", "10 zł i 5 km"),
    ({"spaces": True}, "za\u200bżółć ge\u00adśla", "zażółć gęśla".replace("ę", "e")),
    ({"spaces": True}, "dużo    spacji  tu", "dużo spacji tu"),
    (
        {"spaces": True},
        "kod:\n    if x:\n        y  =  1",
        "kod:\n    if x:\n        y = 1",
    ),  # indentation kept
    ({"spaces": True}, "koniec   \nlinii \n", "koniec\nlinii"),
    ({"spaces": True}, "a\r\nb\rc", "a\nb\nc"),
    ({"spaces": True}, "a\n\n\n\n\nb", "a\n\nb"),
    ({"spaces": True}, "  obcięte  ", "obcięte"),
]


@pytest.mark.parametrize(("settings", "text", "expected"), NORMALIZE_CASES)
def test_normalize_steps(settings, text, expected):
    assert _norm(**{**ALL_OFF, **settings})(text) == expected


def test_normalize_all_steps_together():
    text = "  „Zaz\u0307ółć”\u00a0—  gęślą   jaźń  "
    assert _norm()(text) == '"Zażółć" – gęślą jaźń'


def test_normalize_row_walks_messages_and_keeps_bookkeeping():
    row = {
        "messages": [
            {"role": "user", "content": "Pytanie  „x”"},
            {"from": "gpt", "value": "Tak\u00a0—  tak"},
        ],
        "_file": "a  b.jsonl",
        "_row": 3,
        "score": 1.5,
    }
    out = normalize.normalize_row(row, _norm())
    assert out["messages"] == [
        {"role": "user", "content": 'Pytanie "x"'},
        {"from": "gpt", "value": "Tak – tak"},
    ]
    assert out["_file"] == "a  b.jsonl" and out["_row"] == 3 and out["score"] == 1.5
    assert row["messages"][0]["content"] == "Pytanie  „x”"  # the input row is not modified


ROW_TEXT_CASES = [
    ("alpaca", {"instruction": "Pyt", "input": "", "output": "Odp", "id": "x"}, {}, "Pyt\nOdp"),
    (
        "alpaca",
        {"pytanie": "Pyt", "odpowiedz": "Odp"},
        {"instruction": "pytanie", "output": "odpowiedz"},
        "Pyt\nOdp",
    ),
    ("completion", {"prompt": "A", "completion": "B"}, {}, "A\nB"),
    ("text", {"text": "Ala ma kota."}, {}, "Ala ma kota."),
    (
        "chat",
        {"messages": [{"role": "user", "content": "Hej"}, {"role": "assistant", "content": "Cześć"}]},
        {},
        "Hej\nCześć",
    ),
    ("chat", {"conversations": [{"from": "human", "value": "Hej"}]}, {}, "Hej"),
    ("chat", {"messages": "zepsute"}, {}, ""),
    ("alpaca", {"instruction": 5}, {}, ""),
]


@pytest.mark.parametrize(("fmt", "row", "columns", "expected"), ROW_TEXT_CASES)
def test_row_text(fmt, row, columns, expected):
    assert filters.row_text(row, fmt, columns) == expected


LANGUAGE_CASES = [
    ("Warszawa jest stolicą Polski i największym miastem w kraju.", True),
    ("To jest bardzo dobry pomysl, ale nie wiem czy sie uda w tym roku.", True),  # Polish without diacritics
    ("The quick brown fox jumps over the lazy dog and runs into the forest.", False),
    ("Das ist ein sehr gutes Beispiel für die Übersetzung der Wörter.", False),
    ("Tohle je velmi dobrý nápad, ale nevím, jestli se to podaří příště.", False),  # Czech
    ("Москва является столицей России и крупнейшим городом страны.", False),
    ("Napisz funkcję w Pythonie.\ndef f(x):\n    return x + 1", True),
    (
        "Opisz zabytki: Mazury (pytanie 114).\nMazury posiadaja wiele ciekawych legend.",
        True,
    ),  # no signal either way: kept
    ("Hola amigo, como estas? Muy bien, gracias por preguntar.", True),  # no evidence against Polish: kept
    ("OK, dzięki!", None),  # too short to judge: kept
    ("12345 678", None),
]


@pytest.mark.parametrize(("text", "expected"), LANGUAGE_CASES)
def test_language_check(text, expected):
    assert filters.is_polish(text) is expected


@pytest.mark.parametrize(
    ("threshold", "expected"), [(0.9, (8, 8)), (0.8, (16, 4)), (0.5, (32, 2)), (1.0, (1, 64))]
)
def test_lsh_bands(threshold, expected):
    assert dedupe.lsh_bands(threshold) == expected


def test_signatures_are_deterministic_and_dense():
    texts = ["Ala ma kota", "ala  ma kota", "Zupełnie inny tekst o czymś", "x"]
    a, b = dedupe.minhash_signatures(texts), dedupe.minhash_signatures(list(texts))
    assert (a == b).all() and (a != dedupe._EMPTY).all()
    assert (a[0] == a[1]).all()  # case and spacing do not matter
    assert (a[0] == a[2]).mean() < 0.2


DEDUPE_CASES = [
    ("none", ["a b c", "a b c"], [None, None]),
    ("exact", ["Ala ma kota.", "Ala ma kota.", "Ala ma psa."], [None, "exact", None]),
    ("exact", ["  ", "  ", ""], [None, None, None]),  # blank texts are left to the format check
    ("near", ["Ala ma kota.", "Ala ma kota.", "Ala ma psa."], [None, "exact", None]),
]


@pytest.mark.parametrize(("mode", "texts", "expected"), DEDUPE_CASES)
def test_duplicate_flags_small(mode, texts, expected):
    assert dedupe.duplicate_flags(texts, mode) == expected


def _sentence(rng: random.Random, vocab: list[str], n: int = 40) -> str:
    return " ".join(rng.choice(vocab) for _ in range(n))


def test_near_dedupe_finds_edits_and_keeps_distinct_rows():
    rng = random.Random(0)
    vocab = sorted(
        {
            "".join(rng.choice("abcdefghijklmnoprstuwyząęółżź") for _ in range(rng.randint(3, 9)))
            for _ in range(3000)
        }
    )
    texts = [_sentence(rng, vocab) for _ in range(2000)]
    near = {}
    for i in range(0, 2000, 20):  # append a word: 2-4 of ~40 shingles change (Jaccard ≈ 0.85)
        near[i + 1] = texts[i] + " " + rng.choice(vocab)
    for j, text in near.items():
        texts[j] = text
    flags = dedupe.duplicate_flags(texts, "near", threshold=0.8)
    flagged = {i for i, f in enumerate(flags) if f == "near"}
    assert flagged == set(near)
    assert dedupe.duplicate_flags(texts, "exact") == [None] * len(texts)


def test_near_dedupe_is_transitive_first_row_kept():
    base = (
        "Kraków leży nad Wisłą a na Wawelu stoi zamek królewski z piękną katedrą i dzwonem Zygmunta od wieków "
        "oraz wieloma zabytkami które każdego roku odwiedzają turyści z całego świata"
    )
    texts = [
        base,
        base + " dziś",
        base + " dziś też",
        "Zupełnie inne zdanie o Gdańsku nad morzem i porcie z żurawiem",
    ]
    # Jaccard: 0~1 0.84, 1~2 0.85, 0~2 0.82 — at 0.83 text 2 joins text 0's group through text 1
    assert dedupe.duplicate_flags(texts, "near", threshold=0.83) == [None, "near", "near", None]
    assert dedupe.duplicate_flags(texts, "near", threshold=0.9) == [None, None, None, None]


def test_clean_rows_counts_each_step_and_dedupes_across_groups():
    spec = NormalizeSpec(enabled=True, dedupe="exact", min_chars=10, language="pl")
    train = [
        {"instruction": "Opisz  Kraków.", "output": "Kraków leży nad Wisłą i jest pięknym miastem."},
        {
            "instruction": "Opisz Kraków.",
            "output": "Kraków leży nad Wisłą i jest pięknym miastem.",
        },  # duplicate once normalized
        {"instruction": "Hi", "output": "ok"},  # too short
        {
            "instruction": "Describe London.",
            "output": "London is the capital of England and a very big city.",
        },  # not Polish
        {"instruction": "Opisz Gdańsk.", "output": "Gdańsk jest portem nad Morzem Bałtyckim."},
    ]
    evals = [
        {"instruction": "Opisz Gdańsk.", "output": "Gdańsk jest portem nad Morzem Bałtyckim."}
    ]  # repeats a train row
    (kept_train, kept_eval), counts = hygiene.clean_rows([train, evals], spec, "alpaca")
    assert [r["instruction"] for r in kept_train] == ["Opisz Kraków.", "Opisz Gdańsk."]
    assert kept_eval == []
    assert counts == {
        "rows_in": 6,
        "normalized": 1,
        "too_short": 1,
        "not_polish": 1,
        "exact_duplicates": 2,
        "rows_out": 2,
    }


def _cfg(path, **kw) -> DataSection:
    return DataSection(**{"dataset_name": str(path), "max_seq_length": 128, "eval_fraction": 0.0, **kw})


def test_build_datasets_applies_hygiene_and_reports_it(tmp_path, tiny_tokenizer, cache_dir):
    rows = alpaca_rows(12)
    rows.append(dict(rows[0]))  # exact duplicate
    rows.append(
        {**rows[1], "output": rows[1]["output"].replace(" ", "\u00a0")}
    )  # duplicate after normalization
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    spec = NormalizeSpec(enabled=True)
    prepared = build_datasets(_cfg(path), tiny_tokenizer, normalize=spec)
    stats = prepared.stats
    assert stats.hygiene["exact_duplicates"] == 2 and stats.hygiene["rows_out"] == 12
    assert len(prepared.train) == 12
    line = next(x for x in stats.summary_lines() if x.startswith("hygiene:"))
    assert "14 rows in, 12 kept" in line and "exact duplicates 2" in line
    saved = json.loads(next(cache_dir.rglob("stats.json")).read_text())
    assert saved["hygiene"]["exact_duplicates"] == 2
    # without polish.normalize nothing is removed
    assert len(build_datasets(_cfg(path), tiny_tokenizer, use_cache=False).train) == 14


def test_normalize_settings_enter_the_cache_key(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(4))
    cfg = _cfg(path)
    off = cache.cache_key(cfg, tiny_tokenizer, 42, None)
    assert cache.cache_key(cfg, tiny_tokenizer, 42, None, NormalizeSpec()) == off
    assert (
        cache.cache_key(cfg, tiny_tokenizer, 42, None, NormalizeSpec(min_chars=5)) == off
    )  # disabled: settings unused
    on = cache.cache_key(cfg, tiny_tokenizer, 42, None, NormalizeSpec(enabled=True))
    assert on != off
    assert cache.cache_key(cfg, tiny_tokenizer, 42, None, NormalizeSpec(enabled=True, dedupe="near")) != on
