"""Extension points (tokenizer hook, data hook, callbacks), exercised with the files in examples/.

Each hook is shown to take effect both when named in the config (``load_config(data=...)`` + ``run``) and
when plugged in from Python (``Pipeline``), and bad hook specs fail as a ``WronAIError`` naming the
config key. Training runs are 1–2 optimizer steps on the tiny model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, alpaca_rows, make_config_dict, write_jsonl
from wronai.config import load_config
from wronai.config.extensions import build_callbacks, load_object
from wronai.errors import WronAIError
from wronai.recipe import Pipeline, run

TOKENIZER_HOOK = "examples/custom_tokenization.py:add_domain_tokens"
DATA_HOOK = "examples/custom_data_processing.py:data_hook"
THROUGHPUT = "examples/custom_callback.py:ThroughputLogger"
STOP_BELOW = "examples/custom_callback.py:StopBelowLoss"

QUOTED = [
    (
        "Podaj pierwsze słowa „Pana Tadeusza”.",
        "Epopeja zaczyna się od słów „Litwo! Ojczyzno moja!” i jest arcydziełem.",
    ),
    (
        "Jak nazywa się hymn Polski?",
        "Hymn Polski to „Mazurek Dąbrowskiego”, napisany przez Józefa Wybickiego.",
    ),
    ("Zacytuj przysłowie.", "Stare przysłowie mówi: „Gdzie kucharek sześć, tam nie ma co jeść”."),
]
SHORT = [("Czy Kraków leży nad Wisłą?", "Tak."), ("Ile to 2+2?", "Cztery."), ("Stolica Polski?", "Warszawa.")]


def example(spec: str):
    """Import an object from the examples directory, wherever pytest runs from."""
    path, _, name = spec.partition(":")
    return load_object(f"{REPO / path}:{name}", "test")


@pytest.fixture()
def in_repo(monkeypatch):
    """Relative `examples/...` specs resolve against the working directory (the config dict has no file)."""
    monkeypatch.chdir(REPO)


@pytest.fixture()
def hook_data(tmp_path) -> Path:
    rows = alpaca_rows(20)
    rows += [{"instruction": q, "input": "", "output": a} for q, a in QUOTED + SHORT]
    return write_jsonl(tmp_path / "data" / "hooked.jsonl", rows)


def fast_config(tiny_model_dir, data_path, out_dir, **sections) -> dict:
    """make_config_dict with no eval split, no evaluation and no checkpoints: only the steps themselves."""
    cfg = make_config_dict(tiny_model_dir, data_path, out_dir, **sections)
    cfg["data"].update({"eval_fraction": 0.0, **sections.get("data", {})})
    cfg["training"].update({"eval_strategy": "no", "save_strategy": "no", **sections.get("training", {})})
    return cfg


def decoded_texts(tokenizer, dataset) -> list[str]:
    return [tokenizer.decode(ids) for ids in dataset["input_ids"]]


def check_domain_tokens(out_dir: Path) -> list[int]:
    """The saved tokenizer holds every domain token as one token, and the adapter trains their rows."""
    from transformers import AutoTokenizer

    domain_tokens = example(TOKENIZER_HOOK).__globals__["DOMAIN_TOKENS"]
    tok = AutoTokenizer.from_pretrained(out_dir)
    vocab = tok.get_vocab()
    assert all(t in vocab for t in domain_tokens)
    ids = [vocab[t] for t in domain_tokens]
    assert tok.tokenize("<prawo>Art. 415 k.c.</prawo>")[0] == "<prawo>"
    adapter = json.loads((out_dir / "adapter_config.json").read_text())
    assert set(ids) <= set(adapter["trainable_token_indices"]["embed_tokens"])
    return ids


def check_data_hook(tokenizer, dataset, dropped: int) -> None:
    texts = decoded_texts(tokenizer, dataset)
    assert dropped == len(SHORT)
    assert len(texts) == 20 + len(QUOTED)
    joined = "\n".join(texts)
    assert '"Litwo! Ojczyzno moja!"' in joined and '"Mazurek Dąbrowskiego"' in joined
    assert "„" not in joined and "”" not in joined
    assert not any(question in joined for question, _ in SHORT)


# --------------------------------------------------------------------------------------- from the config


@pytest.mark.slow
def test_hooks_from_config_are_applied_by_run(
    tiny_model_dir, hook_data, tmp_path, cache_dir, in_repo, monkeypatch
):
    import datasets

    monkeypatch.setenv("WRONAI_STOP_LOSS", "1e9")  # StopBelowLoss stops after the first logged loss
    out = tmp_path / "run"
    cfg = load_config(
        data=fast_config(
            tiny_model_dir, hook_data, out,
            training={"max_steps": 3},
            extensions={"tokenizer_hook": TOKENIZER_HOOK, "data_hook": DATA_HOOK, "callbacks": [THROUGHPUT, STOP_BELOW]},
        )
    )  # fmt: skip
    resolved = f"{REPO / 'examples' / 'custom_data_processing.py'}:data_hook"
    assert cfg.extensions.data_hook == resolved  # file specs are made absolute when the config is loaded
    result = run(cfg)
    assert result.output_dir == out

    # tokenizer hook: tokens in the saved tokenizer, their embedding rows trained with the adapter
    check_domain_tokens(out)

    # data hook: rows dropped (counted in data_stats.json) and text transformed in the prepared data
    stats = json.loads((out / "data_stats.json").read_text())
    from transformers import AutoTokenizer

    train = datasets.load_from_disk(str(cache_dir / "prepared" / stats["cache_key"] / "train"))
    check_data_hook(AutoTokenizer.from_pretrained(out), train, stats["dropped_by_hook"])

    # callbacks: ThroughputLogger wrote its file; StopBelowLoss stopped the run at step 1 of 3
    records = [json.loads(line) for line in (out / "throughput.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]
    assert records[0]["tokens_per_s"] > 0 and records[0]["estimated"] is True
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and state["max_steps"] == 3
    assert (out / "train_results.json").is_file()


# --------------------------------------------------------------------------------------- from Python


@pytest.mark.slow
def test_hooks_from_python_are_applied_by_wronai_trainer(tiny_model_dir, hook_data, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    add_domain_tokens = example(TOKENIZER_HOOK)
    data_hook = example(DATA_HOOK)
    throughput_logger = example(THROUGHPUT)()

    out = tmp_path / "run"
    trainer = Pipeline(
        load_config(data=fast_config(tiny_model_dir, hook_data, out, training={"max_steps": 2}))
    )
    assert trainer.config.extensions.tokenizer_hook is None and trainer.config.extensions.data_hook is None
    before = len(trainer.load_tokenizer())
    trainer.tokenizer = add_domain_tokens(trainer.tokenizer, trainer.config)
    assert len(trainer.tokenizer) == before + 6
    trainer.load_model()
    prepared = trainer.load_dataset(data_hook=data_hook)
    check_data_hook(trainer.tokenizer, prepared.train, prepared.stats.dropped_by_hook)
    trainer.extra_callbacks.append(throughput_logger)
    trainer.train()
    trainer.save()

    assert throughput_logger.steps == [1, 2]
    assert [r["step"] for r in throughput_logger.records] == [1, 2]
    assert len((out / "throughput.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "data_stats.json").read_text())["dropped_by_hook"] == len(SHORT)
    ids = check_domain_tokens(out)

    # the loading recipe of docs/training.md: stock transformers + peft, embeddings resized to the tokenizer
    tok = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base.resize_token_embeddings(len(tok))
    loaded = PeftModel.from_pretrained(base, out).eval()
    index = torch.tensor([ids])
    with torch.no_grad():
        expected = trainer.trainer.model.get_input_embeddings()(index).float()
        assert torch.allclose(loaded.get_input_embeddings()(index), expected)


@pytest.mark.slow
def test_tokenizer_hook_from_config_on_wronai_trainer_stages(tiny_model_dir, alpaca_file, tmp_path, in_repo):
    cfg = load_config(
        data=fast_config(
            tiny_model_dir, alpaca_file, tmp_path / "o", extensions={"tokenizer_hook": TOKENIZER_HOOK}
        )
    )
    trainer = Pipeline(cfg)
    tokenizer = trainer.load_tokenizer()
    assert "<medycyna>" in tokenizer.get_vocab()
    model = trainer.load_model()
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)


# --------------------------------------------------------------------------------------- the examples' logic


def test_data_hook_normalises_quotes_and_drops_short_answers():
    data_hook = example(DATA_HOOK)
    row = {
        "instruction": "Cytat „w cytacie ‚wewnętrznym’”?",
        "input": "",
        "output": "To jest „dość długa” odpowiedź.",
    }
    assert data_hook(row) == {
        "instruction": "Cytat \"w cytacie 'wewnętrznym'\"?",
        "input": "",
        "output": 'To jest "dość długa" odpowiedź.',
    }
    assert data_hook({"instruction": "x", "output": "   Tak.   "}) is None
    assert data_hook({"prompt": "Pytanie", "completion": "Nie."}) is None
    chat = {
        "messages": [
            {"role": "user", "content": "„Hej”"},
            {"role": "assistant", "content": "Dzień dobry, w czym mogę pomóc?"},
        ]
    }
    assert data_hook(chat)["messages"][0]["content"] == '"Hej"'
    assert (
        data_hook(
            {"messages": [{"role": "user", "content": "Hej"}, {"role": "assistant", "content": "Cześć"}]}
        )
        is None
    )
    assert data_hook({"unknown_layout": 1}) == {"unknown_layout": 1}


def test_tokenizer_hook_is_idempotent(tiny_model_dir):
    from transformers import AutoTokenizer

    add_domain_tokens = example(TOKENIZER_HOOK)
    cfg = load_config(data=make_config_dict(tiny_model_dir, tiny_model_dir / "x.jsonl", tiny_model_dir / "o"))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    size = len(add_domain_tokens(tok, cfg))
    assert len(add_domain_tokens(tok, cfg)) == size


def test_stop_below_loss_sets_should_training_stop(monkeypatch):
    from transformers import TrainerControl, TrainerState

    stop_below = example(STOP_BELOW)
    callback, control, state = stop_below(threshold=0.5), TrainerControl(), TrainerState(global_step=7)
    callback.on_log(None, state, control, logs={"loss": 0.9})
    assert not control.should_training_stop
    callback.on_log(None, state, control, logs={"eval_loss": 0.1})
    assert not control.should_training_stop
    callback.on_log(None, state, control, logs={"loss": 0.4})
    assert control.should_training_stop and callback.stopped_at == 7
    monkeypatch.setenv("WRONAI_STOP_LOSS", "2.5")
    assert stop_below().threshold == 2.5


# --------------------------------------------------------------------------------------- bad specs


@pytest.fixture()
def bad_hooks_dir(tmp_path) -> Path:
    (tmp_path / "not_a_callback.py").write_text(
        "class NotACallback:\n    pass\n\ndef returns_none(tokenizer, config):\n    return None\n"
    )
    (tmp_path / "broken.py").write_text("import no_such_package_wronai\n")
    return tmp_path


BAD_SPECS = [
    ("nonexistent.module:fn", "cannot import module 'nonexistent.module'"),
    ("file_missing.py:fn", "file file_missing.py not found"),
    ("examples/custom_callback.py:NoSuchName", "has no attribute 'NoSuchName'"),
    ("examples/custom_data_processing.py:MIN_OUTPUT_CHARS", "is not callable"),
    ("no_colon_here", "is not an import path"),
    ("{tmp}/broken.py:fn", "importing"),
]


@pytest.mark.parametrize(("spec", "expected"), BAD_SPECS)
@pytest.mark.parametrize("key", ["tokenizer_hook", "data_hook", "callbacks"])
def test_bad_hook_spec_in_config_fails_before_loading_anything(
    key, spec, expected, tiny_model_dir, alpaca_file, tmp_path, bad_hooks_dir, in_repo
):
    spec = spec.format(tmp=bad_hooks_dir)
    value = [spec] if key == "callbacks" else spec
    out = tmp_path / "out"
    cfg = load_config(data=make_config_dict(tiny_model_dir, alpaca_file, out, extensions={key: value}))
    with pytest.raises(WronAIError) as err:
        run(cfg)
    name = "extensions.callbacks[0]" if key == "callbacks" else f"extensions.{key}"
    assert name in str(err.value) and expected in str(err.value)
    assert not (out / "adapter_config.json").exists()


def test_bad_hook_spec_from_python_names_the_key(tiny_model_dir, alpaca_file, tmp_path, in_repo):
    cfg = load_config(data=make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "o"))
    trainer = Pipeline(cfg)
    trainer.config.extensions.data_hook = "examples/custom_data_processing.py:no_such_hook"
    with pytest.raises(WronAIError, match=r"extensions\.data_hook: .* has no attribute 'no_such_hook'"):
        trainer.load_dataset()
    trainer.config.extensions.tokenizer_hook = "nonexistent.module:fn"
    with pytest.raises(WronAIError, match=r"extensions\.tokenizer_hook: cannot import module"):
        trainer.load_tokenizer()


def test_tokenizer_hook_returning_none_is_an_error(tiny_model_dir, alpaca_file, tmp_path, bad_hooks_dir):
    cfg = load_config(
        data=make_config_dict(
            tiny_model_dir,
            alpaca_file,
            tmp_path / "o",
            extensions={"tokenizer_hook": f"{bad_hooks_dir}/not_a_callback.py:returns_none"},
        )
    )
    with pytest.raises(WronAIError, match=r"extensions\.tokenizer_hook returned None"):
        Pipeline(cfg).load_tokenizer()


@pytest.mark.slow
def test_callback_that_is_not_a_trainer_callback(tiny_model_dir, alpaca_file, tmp_path, bad_hooks_dir):
    out = tmp_path / "out"
    spec = f"{bad_hooks_dir}/not_a_callback.py:NotACallback"
    cfg = load_config(
        data=fast_config(
            tiny_model_dir,
            alpaca_file,
            out,
            extensions={"callbacks": [THROUGHPUT.replace("examples", str(REPO / "examples")), spec]},
        )
    )
    with pytest.raises(
        WronAIError, match=r"extensions\.callbacks\[1\]: .*NotACallback.* not a transformers\.TrainerCallback"
    ):
        run(cfg)
    assert not (out / "train_results.json").exists()


def test_callback_needing_arguments_names_the_key(bad_hooks_dir):
    (bad_hooks_dir / "needs_args.py").write_text(
        "from transformers import TrainerCallback\n\nclass NeedsArgs(TrainerCallback):\n    def __init__(self, threshold):\n        self.threshold = threshold\n"
    )
    with pytest.raises(WronAIError, match=r"extensions\.callbacks\[0\]"):
        build_callbacks([f"{bad_hooks_dir}/needs_args.py:NeedsArgs"])


def test_data_cache_sees_a_changed_hook_setting(tiny_tokenizer, alpaca_file):
    from wronai.config.sections.data import DataSection
    from wronai.data.prepare import build_datasets

    def min_chars(n):
        def hook(row):
            return row if len(row["output"]) >= n else None

        return hook

    cfg = DataSection(dataset_name=str(alpaca_file), max_seq_length=128, eval_fraction=0.0)
    assert build_datasets(cfg, tiny_tokenizer, 42, min_chars(1)).stats.dropped_by_hook == 0
    assert build_datasets(cfg, tiny_tokenizer, 42, min_chars(60)).stats.dropped_by_hook > 0
