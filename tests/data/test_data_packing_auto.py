"""``data.packing: auto``: on unless the model brings its own modeling code; explicit values never changed;
decided once by the recipe and printed by `wronai validate`."""

from __future__ import annotations

from conftest import make_config_dict
from wronai.config import load_config
from wronai.data.auto import resolve_packing


def _config(tiny_model_dir, alpaca_file, tmp_path, **model):
    raw = make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "out")
    raw["data"].pop("packing", None)
    raw["model"].update(model)
    return load_config(data=raw)


def test_auto_packs_and_says_why(tiny_model_dir, alpaca_file, tmp_path):
    config = _config(tiny_model_dir, alpaca_file, tmp_path)
    assert config.data.packing == "auto"
    decided, notes = resolve_packing(config)
    assert decided.data.packing is True and config.data.packing == "auto"  # a copy
    assert notes == [notes[0]] and notes[0].startswith("data.packing: auto -> on (")


def test_auto_leaves_custom_modeling_code_unpacked(tiny_model_dir, alpaca_file, tmp_path):
    decided, notes = resolve_packing(_config(tiny_model_dir, alpaca_file, tmp_path, trust_remote_code=True))
    assert decided.data.packing is False and "trust_remote_code" in notes[0]


def test_an_explicit_setting_is_never_changed(tiny_model_dir, alpaca_file, tmp_path):
    for value in (True, False):
        config = _config(tiny_model_dir, alpaca_file, tmp_path).model_copy()
        config = config.model_copy(update={"data": config.data.model_copy(update={"packing": value})})
        decided, notes = resolve_packing(config)
        assert decided is config and notes == []


def test_the_pipeline_trains_on_packed_rows_by_default(tiny_model_dir, alpaca_file, tmp_path):
    from wronai.recipe import Pipeline

    pipeline = Pipeline(_config(tiny_model_dir, alpaca_file, tmp_path))
    data = pipeline.load_dataset()
    assert pipeline.config.data.packing is True and data.packed
    assert any(note.startswith("data.packing: auto -> on") for note in pipeline.plan.notes)


def test_validate_prints_the_choice(tiny_model_dir, alpaca_file, tmp_path, capsys):
    import yaml

    from wronai.cli import main

    raw = make_config_dict(tiny_model_dir, alpaca_file, tmp_path / "out")
    raw["data"].pop("packing", None)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert main(["validate", str(path), "--quiet"]) == 0
    assert "note: data.packing: auto -> on (" in capsys.readouterr().out


def test_an_auto_batch_of_packed_rows_keeps_the_examples_per_step(tiny_model_dir, alpaca_file, tmp_path):
    """Packed rows hold several examples: the auto batch then counts examples, so a step sees about as many
    as the effective batch says (16), not 16 full rows; an explicit batch is left alone."""
    from wronai.recipe import Pipeline

    config = _config(tiny_model_dir, alpaca_file, tmp_path)
    training = config.training.model_copy(
        update={"per_device_train_batch_size": "auto", "gradient_accumulation_steps": "auto"}
    )
    pipeline = Pipeline(config.model_copy(update={"training": training}))
    data = pipeline.load_dataset()
    per_row = data.stats.examples["train"] / data.stats.packed_rows
    t = pipeline.config.training
    assert (
        per_row > 1.5
        and abs(t.per_device_train_batch_size * t.gradient_accumulation_steps * per_row - 16) <= per_row
    )
    explicit = Pipeline(_config(tiny_model_dir, alpaca_file, tmp_path))
    explicit.load_dataset()
    assert explicit.config.training.per_device_train_batch_size == 4  # conftest's, as written
