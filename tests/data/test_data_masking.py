"""Token-level loss masking: labels are -100 exactly on prompt tokens and equal input_ids on answer tokens.

Expectations are computed independently of ``label_tokens``: by tokenizing the prompt alone, by decoding the
runs of trained tokens back to text, or by each token's own character offsets.
"""

from __future__ import annotations

import copy

import pytest

from wronai.data.chat_template import TokenizerChatRenderer
from wronai.data.formats import BadRow, format_alpaca, format_chat, format_completion
from wronai.data.tokenize import IGNORE_INDEX, ExampleTokenizer, check_length, chunk

CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _runs(ids, labels):
    """Maximal runs of trained tokens (label != -100) as lists of ids."""
    runs, current = [], []
    for tid, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == tid
            current.append(tid)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


ALPACA_ROWS = [
    {"instruction": "Podaj stolicę Polski.", "output": "Warszawa jest stolicą Polski."},
    {
        "instruction": "Napisz zdanie o mieście Kraków.",
        "input": "Kontekst numer 3.",
        "output": "Kraków leży nad Wisłą.",
    },
    {
        "instruction": "Zażółć gęślą jaźń?",
        "output": "Tak — to zdanie zawiera wszystkie polskie znaki.",
        "system": "Bądź miły.",
    },
]


@pytest.mark.parametrize("row", ALPACA_ROWS)
@pytest.mark.parametrize("template", ["polish", "english"])
def test_alpaca_labels_token_by_token(tiny_tokenizer, row, template):
    tok = tiny_tokenizer
    segments = format_alpaca(row, template)
    prompt, answer = segments[0][0], segments[1][0]
    example = ExampleTokenizer(tok, 512).encode([segments])[0]
    ids, labels = example["input_ids"], example["labels"]

    prompt_ids = tok(prompt)["input_ids"]
    answer_ids = tok(prompt + answer)["input_ids"][len(prompt_ids) :]
    assert ids[: len(prompt_ids)] == prompt_ids  # the prompt ends in "\n": no token crosses the boundary
    expected = [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [tok.eos_token_id]
    assert labels == expected
    assert ids == prompt_ids + answer_ids + [tok.eos_token_id]
    assert tok.decode(answer_ids) == answer


def test_eos_appended_and_trained_only_after_answer(tiny_tokenizer):
    tok = tiny_tokenizer
    segs = format_completion({"prompt": "Stolica Polski to", "completion": " Warszawa."})
    with_eos = ExampleTokenizer(tok, 512).encode([segs])[0]
    without = ExampleTokenizer(tok, 512, add_eos=False).encode([segs])[0]
    assert with_eos["input_ids"] == without["input_ids"] + [tok.eos_token_id]
    assert with_eos["labels"][-1] == tok.eos_token_id
    assert without["input_ids"][-1] != tok.eos_token_id
    # a trailing prompt segment (conversation ending in a user turn) gets no EOS
    tail = ExampleTokenizer(tok, 512).encode([[*segs, ("\nPytanie dalej", False)]])[0]
    assert tail["input_ids"][-1] != tok.eos_token_id


def test_bos_from_special_tokens_is_never_trained(tiny_tokenizer):
    from tokenizers import processors

    tok = copy.deepcopy(tiny_tokenizer)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    segs = [("", False), ("Warszawa jest stolicą Polski.", True)]  # the answer starts at character 0
    example = ExampleTokenizer(tok, 512).encode([segs])[0]
    assert example["input_ids"][0] == tok.bos_token_id
    assert example["labels"][0] == IGNORE_INDEX
    assert all(label != IGNORE_INDEX for label in example["labels"][1:])


def test_train_on_all(tiny_tokenizer):
    segs = format_alpaca(ALPACA_ROWS[1])
    example = ExampleTokenizer(tiny_tokenizer, 512, train_on="all").encode([segs])[0]
    assert example["labels"] == example["input_ids"]
    assert example["input_ids"][-1] == tiny_tokenizer.eos_token_id


MESSAGES = [
    {"role": "system", "content": "Odpowiadaj krótko."},
    {"role": "user", "content": "Gdzie leży Kraków?"},
    {"role": "assistant", "content": "Kraków leży nad Wisłą."},
    {"role": "user", "content": "A Gdańsk?"},
    {"role": "assistant", "content": "Gdańsk jest portem nad Morzem Bałtyckim."},
    {"role": "user", "content": "Dziękuję."},
    {"role": "assistant", "content": "Proszę bardzo."},
]


@pytest.mark.parametrize(
    ("template", "answers"),
    [
        ("chatml", [m["content"] + "<|im_end|>\n" for m in MESSAGES if m["role"] == "assistant"]),
        ("llama3", [m["content"] + "<|eot_id|>" for m in MESSAGES if m["role"] == "assistant"]),
    ],
)
def test_multi_turn_chat_every_assistant_turn_trained(tiny_tokenizer, template, answers):
    tok = tiny_tokenizer
    segments = format_chat({"messages": MESSAGES}, template)
    example = ExampleTokenizer(tok, 1024).encode([segments])[0]
    runs = _runs(example["input_ids"], example["labels"])
    assert [tok.decode(r) for r in runs] == answers[:-1] + [answers[-1] + tok.eos_token]
    untrained = tok.decode(
        [t for t, lab in zip(example["input_ids"], example["labels"], strict=True) if lab == IGNORE_INDEX]
    )
    for m in MESSAGES:
        if m["role"] != "assistant":
            assert m["content"] in untrained
    assert "Wisłą" not in untrained


def test_mistral_closes_every_answer_with_one_eos(tiny_tokenizer):
    tok = tiny_tokenizer  # its EOS is "</s>", as Mistral's
    segments = format_chat({"messages": MESSAGES}, "mistral")
    example = ExampleTokenizer(tok, 1024).encode([segments])[0]
    ids, labels = example["input_ids"], example["labels"]
    eos_positions = [i for i, t in enumerate(ids) if t == tok.eos_token_id]
    assert len(eos_positions) == 3  # one per assistant turn, none doubled at the end
    assert eos_positions[-1] == len(ids) - 1
    assert all(labels[i] == tok.eos_token_id for i in eos_positions)
    runs = _runs(ids, labels)
    assert [tok.decode(r) for r in runs] == [
        " " + m["content"] + "</s>" for m in MESSAGES if m["role"] == "assistant"
    ]


@pytest.fixture(scope="module")
def merging_tokenizer():
    """A BPE tokenizer whose merges make " Warszawa" one token, so a prompt ending in "War" merges with the answer."""
    from wronai.model.tiny import train_tokenizer

    texts = ["Miasto: Warszawa"] * 200 + ["Miasto: Kraków", "Zażółć gęślą jaźń"] * 20
    return train_tokenizer(texts, vocab_size=300)


def test_token_merging_across_prompt_answer_boundary_carries_loss(merging_tokenizer):
    tok = merging_tokenizer
    prompt, answer = "Miasto: War", "szawa"
    enc = tok(prompt + answer, return_offsets_mapping=True)
    boundary = len(prompt)
    straddling = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < boundary < e]
    assert len(straddling) == 1, "the test tokenizer must merge across the boundary"
    assert tok.convert_ids_to_tokens(enc["input_ids"][straddling[0]]) == "ĠWarszawa"

    example = ExampleTokenizer(tok, 64).encode([format_completion({"prompt": prompt, "completion": answer})])[
        0
    ]
    labels = example["labels"]
    for i, (_, e) in enumerate(enc["offset_mapping"]):
        if e <= boundary:
            assert labels[i] == IGNORE_INDEX
        else:  # the merged token and everything after it carry the loss
            assert labels[i] == example["input_ids"][i]
    assert labels[straddling[0]] != IGNORE_INDEX
    assert labels[-1] == tok.eos_token_id


def test_tokenizer_chat_renderer_matches_apply_chat_template(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHATML_JINJA
    renderer = TokenizerChatRenderer(tok)
    for messages in (MESSAGES, MESSAGES[:-1]):  # ending on an assistant turn and on a user turn
        segments = renderer(messages)
        assert "".join(text for text, _ in segments) == tok.apply_chat_template(messages, tokenize=False)
        answers = [m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant"]
        assert [text for text, trainable in segments if trainable] == answers
        example = ExampleTokenizer(tok, 1024, add_eos=False, add_special_tokens=False).encode([segments])[0]
        runs = _runs(example["input_ids"], example["labels"])
        assert [tok.decode(r) for r in runs] == answers
    assert segments[-1] == ("<|im_start|>user\nDziękuję.<|im_end|>\n", False)


def test_tokenizer_chat_renderer_rejects_non_prefix_template(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    # renders the last message differently from earlier ones: prefixes do not line up
    tok.chat_template = (
        "{% for m in messages %}{% if loop.last %}[LAST]{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(BadRow) as info:
        TokenizerChatRenderer(tok)(MESSAGES[1:3])
    assert info.value.code == "template_mismatch"


@pytest.mark.parametrize(
    ("example", "code"),
    [
        ({"input_ids": list(range(9)), "labels": list(range(9))}, "too_long"),
        ({"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX] * 3}, "no_trainable_tokens"),
        ({"input_ids": list(range(8)), "labels": list(range(8))}, None),
    ],
)
def test_check_length(example, code):
    if code is None:
        check_length(example, 8)
        return
    with pytest.raises(BadRow) as info:
        check_length(example, 8)
    assert info.value.code == code


@pytest.mark.parametrize(("n", "size"), [(10, 4), (8, 4), (3, 4), (1, 1)])
def test_chunk_keeps_every_token(n, size):
    example = {"input_ids": list(range(n)), "labels": list(range(100, 100 + n))}
    pieces = chunk(example, size)
    assert all(0 < len(p["input_ids"]) <= size for p in pieces)
    assert [t for p in pieces for t in p["input_ids"]] == example["input_ids"]
    assert [t for p in pieces for t in p["labels"]] == example["labels"]
