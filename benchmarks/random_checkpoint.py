"""Random-init Llama-architecture checkpoints written to disk shard by shard (nothing downloaded).

Used by ``plan_accuracy.py`` and ``memory_qlora.py``. The shapes mirror public models' ``config.json``
fields; weights are N(0, 0.02) (the Hugging Face ``initializer_range``), norms 1, stored as bf16
safetensors — as published checkpoints are. One decoder layer is in memory at a time, so a 7B checkpoint
needs ~0.5 GB of RAM to write (and 13.5 GB of disk).

    from random_checkpoint import SHAPES, llama_config, write_random_checkpoint
    write_random_checkpoint(llama_config(**SHAPES["tinyllama-1.1b"]), "/tmp/tinyllama")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# name: LlamaConfig shape fields of the public model it mirrors (Qwen2.5 uses q/k/v biases, left out here)
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=500),
    "llama-150m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=4, vocab_size=32000),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000),
    "llama3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000),
    "qwen2.5-14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                        num_key_value_heads=8, vocab_size=152064),
    "mistral-small-24b": dict(hidden_size=5120, intermediate_size=32768, num_hidden_layers=40, num_attention_heads=32,
                              num_key_value_heads=8, head_dim=128, vocab_size=131072),
    "llama1-33b": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52,
                       num_key_value_heads=52, vocab_size=32000),
    "qwen2.5-32b": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                        num_key_value_heads=8, vocab_size=152064),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000),
}  # fmt: skip


def llama_config(**fields: Any):
    from transformers import LlamaConfig

    return LlamaConfig(**{"tie_word_embeddings": False, "max_position_embeddings": 4096, **fields})


def write_random_checkpoint(cfg: Any, path: str | Path, seed: int = 0) -> Path:
    """config.json + one bf16 safetensors shard per decoder layer (+ embeddings / head shards) + index."""
    import torch
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(out)
    gen = torch.Generator().manual_seed(seed)
    h, i = cfg.hidden_size, cfg.intermediate_size
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim

    def rand(*shape: int):
        return (torch.randn(*shape, generator=gen) * cfg.initializer_range).to(torch.bfloat16)

    def ones(n: int):
        return torch.ones(n, dtype=torch.bfloat16)

    weight_map: dict[str, str] = {}
    total = 0

    def save(name: str, tensors: dict[str, Any]) -> None:
        nonlocal total
        save_file(tensors, out / f"{name}.safetensors", metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, f"{name}.safetensors"))
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    save("embed", {"model.embed_tokens.weight": rand(cfg.vocab_size, h)})
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        save(f"layer{n:03d}", {
            p + "self_attn.q_proj.weight": rand(q, h), p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, q),
            p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
            p + "mlp.down_proj.weight": rand(h, i),
            p + "input_layernorm.weight": ones(h), p + "post_attention_layernorm.weight": ones(h),
        })  # fmt: skip
    head = {"model.norm.weight": ones(h)}
    if not cfg.tie_word_embeddings:
        head["lm_head.weight"] = rand(cfg.vocab_size, h)
    save("head", head)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    return out
