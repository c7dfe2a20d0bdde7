"""`wronai merge` (logits equal to base + adapter) and `wronai export --format gguf` (read back, run in numpy)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import alpaca_rows, make_config_dict, write_jsonl
from wronai.cli import main

TEXT = "### Instrukcja:\nNapisz jedno zdanie o mieście Kraków.\n\n### Odpowiedź:\nKraków to piękne polskie miasto."


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("mergerun")
    data = write_jsonl(root / "train.jsonl", alpaca_rows(40))
    raw = make_config_dict(
        tiny_model_dir,
        data,
        root / "out",
        training={"max_steps": 10, "eval_strategy": "no", "save_strategy": "no"},
    )
    raw["data"]["cache_dir"] = str(root / "cache")
    cfg = root / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    assert main(["train", str(cfg)]) == 0
    return root / "out"


@pytest.fixture(scope="module")
def merged_dir(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "model"
    assert main(["merge", str(run_dir), str(out), "--dtype", "fp32"]) == 0
    return out


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


def test_merged_logits_match_base_plus_adapter(run_dir, merged_dir, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    plain = _logits(base, tokenizer)
    adapter = PeftModel.from_pretrained(base, run_dir).eval()  # full precision, adapter not merged
    expected = _logits(adapter, tokenizer)
    got = _logits(merged, tokenizer)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
    assert (expected - plain).abs().max() > 1e-2  # the adapter really changes the model
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_merged_folder_has_weights_tokenizer_config_and_card(merged_dir, run_dir):
    names = {p.name for p in merged_dir.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "wronai_config.yaml",
        "wronai_merge.json",
        "README.md",
    } <= names
    assert "adapter_config.json" not in names and "quantization_config" not in json.loads(
        (merged_dir / "config.json").read_text()
    )
    card = (merged_dir / "README.md").read_text(encoding="utf-8")
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "transformers" and meta["language"] == ["pl"] and meta["base_model"]
    assert str(run_dir.resolve()) in card


@pytest.mark.slow  # a fresh interpreter: imports torch/transformers again
def test_merged_model_card_code_runs_with_stock_transformers(merged_dir):
    """The card's "How to use" block, run as written in a fresh interpreter that never imports wronai."""
    card = (merged_dir / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "wronai" not in code and "peft" not in code
    guard = "import sys\nsys.modules['wronai'] = None  # importing WronAI would fail\n"
    result = subprocess.run([sys.executable, "-c", guard + code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_merge_refuses_to_overwrite_and_explains(run_dir, merged_dir, capsys):
    assert main(["merge", str(run_dir), str(merged_dir)]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--overwrite" in err
    assert main(["merge", str(run_dir), str(run_dir)]) == 2
    assert "is the run directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ GGUF


def _gguf_logits(path, ids: list[int]) -> np.ndarray:
    """A Llama forward pass in numpy from the GGUF tensors, with llama.cpp's conventions (interleaved RoPE)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}

    def w(name: str) -> np.ndarray:
        t = tensors[name]
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            return np.asarray(t.data, dtype=np.float64)
        return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)

    def field(key: str):
        f = reader.fields[key]
        return f.parts[f.data[0]][0]

    n_layers, n_head = int(field("llama.block_count")), int(field("llama.attention.head_count"))
    n_kv, eps = (
        int(field("llama.attention.head_count_kv")),
        float(field("llama.attention.layer_norm_rms_epsilon")),
    )
    theta, n = float(field("llama.rope.freq_base")), len(ids)

    def rms(x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight

    def rope(x):  # rotate adjacent pairs (llama.cpp's "normal" RoPE)
        d = x.shape[-1]
        angle = np.arange(n)[:, None] * theta ** (-np.arange(0, d, 2) / d)[None, :]
        cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
        out = np.empty_like(x)
        out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
        out[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
        return out

    h = w("token_embd.weight")[ids]
    for i in range(n_layers):
        p = f"blk.{i}."
        x = rms(h, w(p + "attn_norm.weight"))
        q = rope((x @ w(p + "attn_q.weight").T).reshape(n, n_head, -1))
        k = np.repeat(rope((x @ w(p + "attn_k.weight").T).reshape(n, n_kv, -1)), n_head // n_kv, axis=1)
        v = np.repeat((x @ w(p + "attn_v.weight").T).reshape(n, n_kv, -1), n_head // n_kv, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(q.shape[-1]) + np.triu(np.full((n, n), -1e30), 1)
        att = np.exp(scores - scores.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        h = h + np.einsum("hts,shd->thd", att, v).reshape(n, -1) @ w(p + "attn_output.weight").T
        x = rms(h, w(p + "ffn_norm.weight"))
        gate = x @ w(p + "ffn_gate.weight").T
        h = h + (gate / (1 + np.exp(-gate)) * (x @ w(p + "ffn_up.weight").T)) @ w(p + "ffn_down.weight").T
    return rms(h, w("output_norm.weight")) @ w("output.weight").T


def test_export_gguf_reads_back_and_computes_the_same_logits(run_dir, merged_dir, tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "model-f32.gguf"
    assert main(["export", str(run_dir), "--format", "gguf", "--outtype", "f32", "--out", str(out)]) == 0
    assert "21 tensors" in capsys.readouterr().out
    reader = gguf.GGUFReader(str(out))
    with safe_open(str(merged_dir / "model.safetensors"), framework="pt") as f:
        hf_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert len(reader.tensors) == len(hf_shapes) == 21
    shapes = {
        t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors
    }  # GGUF lists dims fastest-first
    assert shapes["token_embd.weight"] == hf_shapes["model.embed_tokens.weight"] == (500, 64)
    assert shapes["blk.1.attn_k.weight"] == hf_shapes["model.layers.1.self_attn.k_proj.weight"] == (32, 64)
    assert shapes["blk.0.ffn_down.weight"] == hf_shapes["model.layers.0.mlp.down_proj.weight"] == (64, 128)
    assert sorted(shapes.values()) == sorted(hf_shapes.values())
    field = reader.fields["tokenizer.ggml.tokens"]
    assert len(field.data) == 500
    assert bytes(reader.fields["tokenizer.ggml.model"].parts[-1]) == b"gpt2"
    assert bytes(reader.fields["general.architecture"].parts[-1]) == b"llama"

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = tokenizer(TEXT)["input_ids"]
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    expected = _logits(merged, tokenizer).double().numpy()
    assert np.abs(_gguf_logits(out, ids) - expected).max() < 1e-4  # q/k permuted right, names mapped right

    q8 = tmp_path / "model-q8_0.gguf"
    assert main(["export", str(merged_dir), "--format", "gguf", "--outtype", "q8_0", "--out", str(q8)]) == 0
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(q8)).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    q8_logits = _gguf_logits(q8, ids)
    assert (
        np.abs(q8_logits - expected).max() < 0.1
        and (q8_logits.argmax(-1) == expected.argmax(-1)).mean() > 0.9
    )


def test_export_of_other_architectures_says_what_to_run(merged_dir, tmp_path, capsys):
    import shutil

    pytest.importorskip("gguf")

    other = tmp_path / "qwen"
    shutil.copytree(merged_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["Qwen2ForCausalLM"]
    (other / "config.json").write_text(json.dumps(config))
    assert main(["export", str(other), "--format", "gguf"]) == 2
    err = capsys.readouterr().err
    assert (
        "not supported" in err
        and "convert_hf_to_gguf.py" in err
        and "wronai merge" in err
        and "Traceback" not in err
    )
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "convert_hf_to_gguf.py" in capsys.readouterr().out
