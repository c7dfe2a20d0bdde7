"""Packing and collation: whole examples per row, positions restart, and the packed loss equals the unpacked one."""

from __future__ import annotations

import random

import pytest
import torch

from wronai.data.collate import PackedCollator, PaddingCollator, pack_examples, padding_fraction
from wronai.data.formats import format_alpaca
from wronai.data.tokenize import IGNORE_INDEX, ExampleTokenizer


def _synthetic(lengths: list[int]) -> list[dict[str, list[int]]]:
    """Examples whose token ids say which example and position they are (k*1000 + j)."""
    out = []
    for k, n in enumerate(lengths):
        ids = [k * 1000 + j for j in range(n)]
        labels = [IGNORE_INDEX if j < n // 3 else t for j, t in enumerate(ids)]
        out.append({"input_ids": ids, "labels": labels})
    return out


def _split_row(row):
    """A packed row cut back into its examples at every position 0."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    return [
        {k: row[k][a:b] for k in ("input_ids", "labels", "position_ids")}
        for a, b in zip(starts, starts[1:], strict=False)
    ]


_rng = random.Random(0)
LENGTH_CASES = [
    pytest.param([5, 5, 5, 5], 10, id="pairs"),
    pytest.param([10, 10, 10], 10, id="exactly-full"),
    pytest.param([1, 2, 3, 4, 5, 6, 7, 8, 9], 10, id="ascending"),
    pytest.param([9, 1, 8, 2, 7, 3, 6, 4], 10, id="complements"),
    pytest.param([1] * 7, 3, id="tiny"),
    pytest.param([_rng.randint(1, 64) for _ in range(60)], 64, id="random"),
    pytest.param([4] * 50 + [60, 64, 63], 64, id="long-tail"),
]


@pytest.mark.parametrize(("lengths", "max_len"), LENGTH_CASES)
def test_pack_examples_invariants(lengths, max_len):
    examples = _synthetic(lengths)
    rows = pack_examples(examples, max_len)
    assert rows == pack_examples(examples, max_len)  # deterministic
    assert all(len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"]) <= max_len for r in rows)
    seen = []
    for row in rows:
        for part in _split_row(row):
            k = part["input_ids"][0] // 1000
            original = examples[k]
            assert part["input_ids"] == original["input_ids"]  # whole, never split
            assert part["position_ids"] == list(range(len(original["input_ids"])))
            assert part["labels"] == [IGNORE_INDEX, *original["labels"][1:]]
            seen.append(k)
    assert sorted(seen) == list(range(len(examples)))  # every example exactly once
    assert len(rows) >= -(-sum(lengths) // max_len)


@pytest.mark.parametrize(
    ("lengths", "max_len", "n_rows"),
    [([5] * 8, 10, 4), ([9, 1, 8, 2, 7, 3], 10, 3), ([10] * 3, 10, 3), ([3] * 9, 10, 3)],
)
def test_pack_examples_best_fit_row_count(lengths, max_len, n_rows):
    assert len(pack_examples(_synthetic(lengths), max_len)) == n_rows


def test_padding_fraction_lower_when_packed():
    rng = random.Random(1)
    lengths = [rng.randint(8, 24) for _ in range(120)] + [rng.randint(200, 256) for _ in range(8)]
    rng.shuffle(lengths)
    rows = pack_examples(_synthetic(lengths), 256)
    unpacked = padding_fraction(lengths, 8)
    packed = padding_fraction([len(r["input_ids"]) for r in rows], 8)
    assert unpacked > 0.5
    assert packed < unpacked / 4, (packed, unpacked)
    assert padding_fraction([7, 7, 7], 8) == 0.0
    assert padding_fraction([2, 4], 2) == pytest.approx(0.25)


@pytest.mark.parametrize("multiple", [None, 8])
def test_padding_collator_pads_labels_by_position_even_when_pad_is_eos(multiple):
    eos = 1
    features = [
        {"input_ids": [5, 6, 7, eos], "labels": [IGNORE_INDEX, 6, 7, eos]},
        {"input_ids": [9, eos], "labels": [9, eos]},
    ]
    batch = PaddingCollator(pad_token_id=eos, pad_to_multiple_of=multiple)(features)
    width = 8 if multiple else 4
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert all(t.shape == (2, width) and t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"][1].tolist() == [9, eos] + [eos] * (width - 2)
    assert batch["labels"][1].tolist() == [9, eos] + [IGNORE_INDEX] * (
        width - 2
    )  # the real EOS stays trained
    assert batch["labels"][0].tolist()[:4] == [IGNORE_INDEX, 6, 7, eos]
    assert batch["attention_mask"][1].tolist() == [1, 1] + [0] * (width - 2)


def test_packed_collator_shapes_and_padding_block():
    rows = pack_examples(_synthetic([3, 2, 4]), 5)
    batch = PackedCollator(pad_token_id=1, pad_to_multiple_of=4)(rows)
    assert set(batch) == {
        "input_ids",
        "labels",
        "position_ids",
    }  # no attention_mask: the mask comes from positions
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (len(rows), 8)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["position_ids"][i].tolist() == row["position_ids"] + list(range(8 - n))
        assert batch["labels"][i, n:].eq(IGNORE_INDEX).all()
        assert batch["input_ids"][i, n:].eq(1).all()


# --- loss equivalence with a real model -------------------------------------------------------------------------


def _summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


@pytest.fixture(scope="module")
def packed_setup(tiny_model_dir, tiny_tokenizer):
    from conftest import alpaca_rows

    encoder = ExampleTokenizer(tiny_tokenizer, 128)
    examples = encoder.encode([format_alpaca(r) for r in alpaca_rows(12)])
    rows = pack_examples(examples, 128)
    assert len(rows) < len(examples) and any(len(_split_row(r)) >= 3 for r in rows)
    return examples, rows


def _model(tiny_model_dir, attn):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn)
    # sharpen the random weights so attention to other examples (cross-talk) would visibly change the loss
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2 if "embed" in name else 0.15)
    model.config.use_cache = False
    return model.eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(tiny_model_dir, tiny_tokenizer, packed_setup, attn):
    examples, rows = packed_setup
    model = _model(tiny_model_dir, attn)
    with torch.no_grad():
        unpacked = sum(
            _summed_loss(model(input_ids=torch.tensor([e["input_ids"]])).logits, torch.tensor([e["labels"]]))
            for e in examples
        )
        n_trained = sum(sum(x != IGNORE_INDEX for x in e["labels"][1:]) for e in examples)

        packed_batch = PackedCollator(pad_token_id=tiny_tokenizer.pad_token_id)(rows)
        packed = _summed_loss(
            model(input_ids=packed_batch["input_ids"], position_ids=packed_batch["position_ids"]).logits,
            packed_batch["labels"],
        )
        assert int((packed_batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == n_trained
        assert packed.item() == pytest.approx(unpacked.item(), rel=1e-4)

        padded_batch = PaddingCollator(pad_token_id=tiny_tokenizer.pad_token_id)(examples)
        padded = _summed_loss(
            model(**{k: v for k, v in padded_batch.items() if k != "labels"}).logits, padded_batch["labels"]
        )
        assert padded.item() == pytest.approx(unpacked.item(), rel=1e-4)

        # negative control: a full attention mask lets packed examples attend to each other
        crosstalk = _summed_loss(
            model(
                input_ids=packed_batch["input_ids"],
                position_ids=packed_batch["position_ids"],
                attention_mask=torch.ones_like(packed_batch["input_ids"]),
            ).logits,
            packed_batch["labels"],
        )
        assert abs(crosstalk.item() - unpacked.item()) > 1e-3 * abs(
            unpacked.item()
        )  # 10x the tolerance above
