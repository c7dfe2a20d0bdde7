"""Polish tokenization tools: the statistics, the Polish BPE trainer and `wronai tokenizer ...` on the CLI."""

from __future__ import annotations

import json
import unicodedata

import pytest

from conftest import REPO
from wronai.cli import main
from wronai.errors import WronAIError
from wronai.tokenizers.polish import (
    load_tokenizer_dir,
    read_texts,
    repo_eval_files,
    resolve_data,
    tokenizer_stats,
    train_polish_tokenizer,
)

SAMPLE = [
    str(REPO / "data" / "sample_pl" / name) for name in ("corpus.txt", "instructions.jsonl", "chat.jsonl")
]
DIACRITICS = "Zażółć gęślą jaźń! ŻÓŁTA ĆMA, źdźbło, łódź i 1473 r. — „Się” ąęłńóśźż ĄĘŁŃÓŚŹŻ."


@pytest.fixture(scope="module")
def polish_dir(tmp_path_factory):
    """A 1,200-token Polish BPE trained on the bundled sample data, saved like a Hub tokenizer."""
    out = tmp_path_factory.mktemp("pl-bpe")
    assert main(["tokenizer", "train", "--data", *SAMPLE, "--vocab-size", "1200", "--out", str(out)]) == 0
    return out


def test_trained_tokenizer_round_trips_polish_and_loads_with_autotokenizer(polish_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(polish_dir)
    assert len(tok) == 1200 and tok.is_fast
    texts = [
        DIACRITICS,
        "żółw\n\n  dwa  spacje\ti tab",
        "emoji 🙂 i znaki spoza alfabetu: ß, 漢字, ŋ",
        *read_texts(resolve_data(None)),
    ]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.unk_token_id not in ids  # byte-level: nothing is ever unknown
    # NFC normalization: composed and decomposed input give the same tokens
    decomposed = unicodedata.normalize("NFD", "gęślą jaźń")
    assert tok(decomposed)["input_ids"] == tok("gęślą jaźń")["input_ids"]


def test_trained_tokenizer_pre_tokenizes_the_polish_way(polish_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(polish_dir)
    pieces = [tok.decode([i]) for i in tok("W 2024 roku, się: żółć!", add_special_tokens=False)["input_ids"]]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == [" 2", "0", "2", "4"]  # digits one by one
    for piece in pieces:  # punctuation is never glued to letters
        assert not (any(c.isalpha() for c in piece) and any(c in ",:!" for c in piece)), pieces
    assert len(tok.tokenize(" się")) == 1  # frequent words with diacritics are whole tokens
    assert tok.backend_tokenizer.normalizer.normalize_str("e\u0328") == "ę"


def test_stats_count_byte_pieces_fertility_and_splits(tmp_path):
    ascii_only = train_polish_tokenizer(["zolw " * 50, "abc def ghi " * 20], vocab_size=300)
    stats = tokenizer_stats(ascii_only, ["żółw"], "ascii")
    # ż, ó and ł are 2 bytes each and unknown to this tokenizer: 6 single-byte pieces + "w"
    assert (stats.words, stats.tokens, stats.byte_tokens, stats.unk_tokens) == (1, 7, 6, 0)
    assert stats.fertility == 7 and stats.split3_share == 1.0
    assert stats.unk_rate == pytest.approx(6 / 7) and stats.chars_per_token == pytest.approx(4 / 7)
    many = tokenizer_stats(ascii_only, ["żółw żółw i ala", "żółw"], "ascii", min_count=2)
    assert [f.word for f in many.fragmented] == ["żółw"] and many.fragmented[0].count == 3


def test_stats_cli_table_and_json_side_by_side(polish_dir, tiny_model_dir, capsys):
    assert repo_eval_files(), "data/eval_pl/*.txt is the default --data"
    assert main(["tokenizer", "stats", str(tiny_model_dir), str(polish_dir), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [p.rsplit("/", 1)[-1] for p in payload["data"]] == [
        "colloquial.txt",
        "literary.txt",
        "news.txt",
        "technical.txt",
    ]
    tiny, polish = payload["tokenizers"]
    assert tiny["words"] == polish["words"] > 2000
    for row in (tiny, polish):
        assert row["fertility"] >= 1 and row["chars_per_token"] > 1 and 0 <= row["unk_rate"] < 0.05
    assert polish["fertility"] < tiny["fertility"]  # 1,200 Polish tokens beat the 500-token fixture tokenizer
    assert (
        main(["tokenizer", "stats", str(tiny_model_dir), str(polish_dir), "--data", SAMPLE[0], "--top", "3"])
        == 0
    )
    table = capsys.readouterr().out
    for label in (
        "fertility (tokens/word)",
        "characters per token",
        "words split into >=3 pieces",
        "unknown / byte-fallback rate",
    ):
        assert label in table
    assert "most fragmented frequent words" in table and "fertility vs first" in table


def test_extend_cli_writes_tokenizer_and_extension_record(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    out = tmp_path / "ext"
    assert (
        main(
            [
                "tokenizer",
                "extend",
                str(tiny_model_dir),
                "--data",
                *SAMPLE[:2],
                "--add",
                "40",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "added 40 tokens" in capsys.readouterr().out
    base, ext = AutoTokenizer.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(out)
    record = json.loads((out / "wronai_extension.json").read_text(encoding="utf-8"))
    assert (
        record["added"] == len(record["tokens"]) == 40 and record["vocab_size"] == len(ext) == len(base) + 40
    )
    for row in record["tokens"]:
        assert row["token"] not in base.get_vocab() and ext.convert_tokens_to_ids(row["token"]) == row["id"]
        assert "".join(base.convert_ids_to_tokens(row["base_ids"])) == row["token"]
        assert base.decode(row["base_ids"]) == row["text"] and len(row["base_ids"]) >= 2
    assert ext.decode(ext(DIACRITICS)["input_ids"]) == DIACRITICS


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["stats", "/nonexistent/tok"], "TOKENIZER: /nonexistent/tok is not a directory"),
        (["stats", "{model}", "--data", "/nonexistent/x.txt"], "--data: file not found: /nonexistent/x.txt"),
        (
            ["train", "--data", SAMPLE[0], "--vocab-size", "200", "--out", "{tmp}/t"],
            "--vocab-size: 200 is too small",
        ),
        (["extend", "{model}", "--data", SAMPLE[0], "--add", "0", "--out", "{tmp}/e"], "--add: 0"),
        (["extend", "{tmp}", "--data", SAMPLE[0], "--add", "5", "--out", "{tmp}/e"], "BASE: "),
    ],
    ids=[
        "stats-missing-dir",
        "stats-missing-data",
        "train-small-vocab",
        "extend-zero",
        "extend-not-a-tokenizer",
    ],
)
def test_bad_input_is_one_line(argv, fragment, tiny_model_dir, tmp_path, capsys):
    argv = [a.format(model=tiny_model_dir, tmp=tmp_path) for a in argv]
    assert main(["tokenizer", *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_extend_refuses_non_bpe_tokenizers(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from tokenizers import Tokenizer, models, pre_tokenizers
    from wronai.tokenizers.extend import choose_new_tokens

    word_level = Tokenizer(models.WordLevel({"<unk>": 0, "ala": 1, "ma": 2}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>").save_pretrained(tmp_path)
    with pytest.raises(WronAIError, match="not BPE"):
        choose_new_tokens(load_tokenizer_dir(tmp_path), ["ala ma kota"], 5)
