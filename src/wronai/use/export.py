"""GGUF export (llama.cpp, Ollama, LM Studio) for Llama-architecture runs, written with the `gguf` package.

``gguf`` is llama.cpp's own Python writer (``pip install gguf``). This module does for Llama/Mistral what
llama.cpp's ``convert_hf_to_gguf.py`` does: merge the adapter into the full-precision base, map every tensor
to its GGUF name, permute the q/k projections into llama.cpp's rotary layout, and store the hyperparameters
and the tokenizer (byte-level BPE, SentencePiece or an HF Llama tokenizer) as GGUF metadata. Tensors are
converted and written one at a time. Other architectures: see ``LLAMA_CPP_HINT``.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wronai.errors import WronAIError
from wronai.rundir.files import TOKENIZER_FILE
from wronai.rundir.locate import locate_run

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
LLAMA_CPP_HINT = (
    "wronai merge RUN_DIR merged/ && python llama.cpp/convert_hf_to_gguf.py merged/ --outfile model.gguf --outtype f16 "
    "(llama.cpp: https://github.com/ggml-org/llama.cpp; then llama-quantize model.gguf model-q4_k_m.gguf Q4_K_M)"
)
_LLAMA3_REGEX_PARTS = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)", r"\p{N}{1,3}")

TensorSource = dict[
    str, tuple[tuple[int, ...], Callable[[], Any]]
]  # HF name -> (shape, loader of a torch tensor)


@dataclass
class GgufSummary:
    path: Path
    tensors: int
    outtype: str
    tokenizer: str  # gguf tokenizer model + pre-tokenizer


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise WronAIError(
            f"--format gguf needs the gguf package — pip install gguf (or convert by hand: {LLAMA_CPP_HINT})"
        ) from None
    return gguf


def permute_qk(weights: Any, n_head: int, n_head_kv: int | None = None) -> Any:
    """HF's rotary layout (halves) -> llama.cpp's (interleaved pairs), as in convert_hf_to_gguf.py."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _rope(cfg: Any) -> tuple[float, dict[str, Any]]:
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    scaling = dict(getattr(cfg, "rope_scaling", None) or {})
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    return theta, {**params, "rope_type": kind}


def _llama3_rope_freqs(params: dict[str, Any], theta: float, head_dim: int) -> Any:
    """The per-frequency factors llama.cpp expects for Llama 3.1+ rope scaling (convert_hf_to_gguf.py's formula)."""
    import math

    import numpy as np

    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_ctx = params.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _add_hparams(w: Any, gguf: Any, cfg: Any, name: str, ftype: Any, extra: TensorSource) -> None:
    n_head, n_kv = (
        cfg.num_attention_heads,
        getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
    )
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    theta, rope = _rope(cfg)
    w.add_rope_freq_base(theta)
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rope["rope_type"] == "llama3":
        import torch

        freqs = _llama3_rope_freqs(rope, theta, head_dim)
        extra["rope_freqs.weight"] = (tuple(freqs.shape), lambda: torch.from_numpy(freqs))
    elif rope["rope_type"] != "default":
        raise WronAIError(
            f"rope scaling {rope['rope_type']!r} is not handled by WronAI's GGUF writer — convert with: {LLAMA_CPP_HINT}"
        )
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(ftype)


def _regexes(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["Regex"]] if isinstance(node.get("Regex"), str) else []
        return found + [r for v in node.values() for r in _regexes(v)]
    if isinstance(node, list):
        return [r for v in node for r in _regexes(v)]
    return []


def _bpe_pre(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's pre-tokenizer name for this byte-level BPE tokenizer."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if any(all(part in regex for part in _LLAMA3_REGEX_PARTS) for regex in _regexes(pre)):
        return "llama-bpe"
    logger.warning(
        "unknown pre-tokenizer — llama.cpp will split text its default way; for an exact match use: %s",
        LLAMA_CPP_HINT,
    )
    return "default"


def _add_vocab(w: Any, gguf: Any, tok_dir: Path, n_vocab: int) -> str:
    """Tokens, types (scores), merges and special ids; returns a description of the tokenizer."""
    from transformers import AutoTokenizer

    tj_path = tok_dir / TOKENIZER_FILE
    tj = json.loads(tj_path.read_text(encoding="utf-8")) if tj_path.is_file() else {}
    hf_tok = AutoTokenizer.from_pretrained(str(tok_dir))
    model = tj.get("model", {})
    byte_level = (
        model.get("type") == "BPE"
        and not model.get("byte_fallback")
        and (tj.get("decoder") or {}).get("type") == "ByteLevel"
    )
    if byte_level:
        described = _add_byte_level_vocab(w, gguf, tj, n_vocab)
    else:
        described = _add_sentencepiece_vocab(w, gguf, tok_dir, n_vocab)
    _add_special_tokens(w, gguf, tok_dir, hf_tok, n_vocab, load_merges=byte_level)
    return described


def _add_byte_level_vocab(w: Any, gguf: Any, tj: dict[str, Any], n_vocab: int) -> str:
    """A byte-level BPE vocabulary (tokenizer.json), as llama.cpp's ``gpt2`` tokenizer model."""
    vocab = dict(tj["model"]["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    by_id = {i: tok for tok, i in vocab.items()} | {t["id"]: c for c, t in added.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif tok in added:
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL if added[tok].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.NORMAL)
    pre = _bpe_pre(tj)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    return f"gpt2 (byte-level BPE), pre-tokenizer {pre}"


def _add_sentencepiece_vocab(w: Any, gguf: Any, tok_dir: Path, n_vocab: int) -> str:
    """A SentencePiece (tokenizer.model) or HF Llama vocabulary, as llama.cpp's ``llama`` tokenizer model."""
    vocab_cls = (
        gguf.vocab.SentencePieceVocab if (tok_dir / "tokenizer.model").is_file() else gguf.vocab.LlamaHfVocab
    )
    try:
        spm = vocab_cls(tok_dir)
    except (FileNotFoundError, ValueError, RuntimeError, TypeError) as err:
        raise WronAIError(
            f"{tok_dir}: tokenizer not supported by WronAI's GGUF writer ({err}) — convert with: {LLAMA_CPP_HINT}"
        ) from None
    pieces: list[bytes] = []
    scores: list[float] = []
    piece_types: list[Any] = []
    for text, score, toktype in spm.all_tokens():
        pieces.append(text)
        scores.append(score)
        piece_types.append(toktype)
    for i in range(len(pieces), n_vocab):
        pieces.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        piece_types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(pieces[:n_vocab])
    w.add_token_scores(scores[:n_vocab])
    w.add_token_types(piece_types[:n_vocab])
    return f"llama (SentencePiece, {vocab_cls.__name__})"


def _add_special_tokens(
    w: Any, gguf: Any, tok_dir: Path, hf_tok: Any, n_vocab: int, *, load_merges: bool
) -> None:
    """Special token ids (and the BPE merges), with BOS/EOS added exactly when the HF tokenizer adds them."""
    special = gguf.SpecialVocab(tok_dir, load_merges=load_merges, n_vocab=n_vocab)
    probe = hf_tok("a")["input_ids"]
    special.add_special_token["bos"] = bool(
        hf_tok.bos_token_id is not None and probe[:1] == [hf_tok.bos_token_id]
    )
    special.add_special_token["eos"] = bool(
        hf_tok.eos_token_id is not None and probe[-1:] == [hf_tok.eos_token_id]
    )
    if "pad" not in special.special_token_ids and hf_tok.pad_token_id is not None:
        special.special_token_ids["pad"] = hf_tok.pad_token_id
    special.add_to_gguf(w, quiet=True)


def _qtype(gguf: Any, outtype: str, shape: tuple[int, ...]) -> Any:
    Q = gguf.GGMLQuantizationType
    if len(shape) <= 1:
        return Q.F32  # norms and other vectors stay F32, as llama.cpp expects
    wanted = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]
    if wanted == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16  # rows not a multiple of the block size: the converter falls back the same way
    return wanted


def _convert(gguf: Any, data: Any, qtype: Any) -> Any:
    import numpy as np

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


def write_gguf(
    out_path: Path, hf_config: Any, tensors: TensorSource, tok_dir: Path, outtype: str, name: str
) -> GgufSummary:
    """Write a Llama-architecture GGUF from HF tensors (loaded one at a time) and the tokenizer in ``tok_dir``."""
    import numpy as np

    gguf = _gguf()
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise WronAIError(
            f"architecture {archs or '?'} is not supported by WronAI's GGUF writer (Llama, Mistral) — instead run: {LLAMA_CPP_HINT}"
        )
    if outtype not in OUTTYPES:
        raise WronAIError(
            f"--outtype {outtype}: use one of {', '.join(OUTTYPES)} (k-quants: llama.cpp's llama-quantize on an f16 file)"
        )
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]  # fmt: skip
    n_head = hf_config.num_attention_heads
    n_kv = getattr(hf_config, "num_key_value_heads", None) or n_head
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hf_config.num_hidden_layers)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out_path), "llama")
    extra: TensorSource = {}
    _add_hparams(w, gguf, hf_config, name, ftype, extra)
    described = _add_vocab(w, gguf, tok_dir, hf_config.vocab_size)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    plan: list[tuple[str, tuple[int, ...], Callable[[], Any], Callable[[Any], Any]]] = []
    for hf_name, (shape, load) in {**tensors, **extra}.items():
        if hf_name.endswith(("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")):
            continue
        gguf_name = (
            hf_name
            if hf_name == "rope_freqs.weight"
            else tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        )
        if gguf_name is None:
            raise WronAIError(f"tensor {hf_name} has no GGUF name for llama — convert with: {LLAMA_CPP_HINT}")
        fix: Callable[[Any], Any] = lambda a: a  # noqa: E731
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            fix = lambda a: permute_qk(a, n_head, n_head)  # noqa: E731
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            fix = lambda a: permute_qk(a, n_head, n_kv)  # noqa: E731
        plan.append((gguf_name, shape, load, fix))
    for gguf_name, shape, _, _ in plan:  # all tensor infos precede the data in the file
        qtype = _qtype(gguf, outtype, shape)
        nbytes = int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtype)))
        w.add_tensor_info(gguf_name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, shape, load, fix in plan:  # converted and written one tensor at a time
        data = fix(load().detach().float().cpu().numpy())
        w.write_tensor_data(_convert(gguf, data, _qtype(gguf, outtype, shape)))
    w.close()
    logger.info("wrote %s: %d tensors (%s), tokenizer %s", out_path, len(plan), outtype, described)
    return GgufSummary(out_path, len(plan), outtype, described)


def _safetensors_source(folder: Path) -> TensorSource:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WronAIError(
            f"{folder}: no *.safetensors weights — pass a run directory or a merged model saved by wronai merge"
        )
    source: TensorSource = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                shape = tuple(handle.get_slice(key).get_shape())
                source[key] = (shape, functools.partial(_read_one, file, key))
    return source


def _identity(value: Any) -> Any:
    return value


def _read_one(file: Path, key: str) -> Any:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return handle.get_tensor(key)


def export_gguf(
    target: str | Path,
    out_file: str | Path | None = None,
    *,
    outtype: str = "f16",
    base_model: str | None = None,
) -> GgufSummary:
    """RUN_DIR (adapter: merged in memory first) or a merged/plain Llama model dir -> one .gguf file."""
    import torch
    from transformers import AutoConfig

    _gguf()
    run = locate_run(target)
    out = (
        Path(out_file)
        if out_file
        else run.path / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', run.path.resolve().name)}-{outtype}.gguf"
    )
    if run.is_adapter:
        from wronai.use.merge import load_merged

        model, _ = load_merged(run, torch.float32, base_model)
        state = model.state_dict()
        source: TensorSource = {
            k: (tuple(v.shape), functools.partial(_identity, v)) for k, v in state.items()
        }
        config = model.config
    else:
        source = _safetensors_source(run.path)
        config = AutoConfig.from_pretrained(str(run.path))
    if getattr(config, "tie_word_embeddings", False):
        source.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when there is no output tensor
    return write_gguf(out, config, source, run.tokenizer_dir, outtype, run.path.resolve().name)
