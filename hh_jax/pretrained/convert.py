"""Pretrained Llama-family checkpoints in and out of our param tree.

In: a GGUF file (llama.cpp's format; tensors dequantized to float32 by the `gguf` package)
or a Hugging Face checkpoint directory (config.json + *.safetensors, sharded or not).
Out: HF safetensors + config.json (+ tokenizer.json), loadable by `transformers`.

Both importers go through one function, `params_from_hf`, that reads tensors by their HF
names in HF layout (Linear weights are (out, in)); the GGUF reader only renames tensors and
undoes one permutation. llama.cpp's RoPE rotates adjacent pairs (2j, 2j+1) of a head, HF's
(and ours, model.rope) rotates (j, j+K/2); so convert_hf_to_gguf reorders the rows of each
Q/K head as row 2j+h ← HF row h·K/2+j, i.e. reshape (heads, 2, K/2) → swap the middle
axes. `unpermute_qk` applies the inverse. The transformers parity test (tests/test_smollm2.py)
is the proof on real weights.

`load_pretrained("smollm2-135m" | "x.gguf" | "hf_dir")` → (ModelConfig, params, tokenizer).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable

import numpy as np

from hh_jax.model import SIZES, ModelConfig
from hh_jax.pretrained import registry
from hh_jax.pretrained.gguf_file import GGUFFile, read_gguf
from hh_jax.tokenizer import BPETokenizer, Tokenizer, load_hf_tokenizer

_ARCH_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "k",
                "rope_theta", "tie_embeddings", "norm_eps")

# ----------------------------------------------------------------------------- configs


def _f32_clean(x: float) -> float:
    """1e-5 stored as float32 reads 9.99999974e-06: take the shortest float32 repr."""
    return float(str(np.float32(x)))


def config_from_gguf(g: GGUFFile) -> ModelConfig:
    m, where = g.metadata, g.path
    arch = m.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{where}: architecture {arch!r} unsupported (only 'llama')")
    scaling = m.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", "linear") or m.get("llama.rope.scaling.factor", 1.0) != 1.0:
        raise ValueError(f"{where}: RoPE scaling {scaling!r} is not implemented")
    d, h = m["llama.embedding_length"], m["llama.attention.head_count"]
    k = m.get("llama.attention.key_length", d // h)
    if m.get("llama.rope.dimension_count", k) != k:
        raise ValueError(f"{where}: partial rotary embeddings are not implemented")
    vocab = m.get("llama.vocab_size") or g.tensors["token_embd.weight"][1][0]
    return ModelConfig(
        vocab_size=int(vocab), d_model=d, n_layers=m["llama.block_count"], n_heads=h,
        n_kv_heads=m.get("llama.attention.head_count_kv", h),
        d_ff=m["llama.feed_forward_length"], head_dim=None if k == d // h else k,
        rope_theta=_f32_clean(m.get("llama.rope.freq_base", 10_000.0)),
        max_len=m.get("llama.context_length", 2048),
        tie_embeddings="output.weight" not in g.tensors,
        norm_eps=_f32_clean(m["llama.attention.layer_norm_rms_epsilon"]))


def config_from_hf(hf: dict, where: str) -> ModelConfig:
    """ModelConfig from an HF config.json dict (llama / mistral model types)."""
    if hf.get("model_type") not in ("llama", "mistral"):
        raise ValueError(f"{where}: model_type {hf.get('model_type')!r} unsupported "
                         "(llama-family: 'llama', 'mistral')")
    rope = hf.get("rope_parameters") or {}
    problems = {"hidden_act": hf.get("hidden_act", "silu") != "silu",
                "attention_bias": bool(hf.get("attention_bias")),
                "mlp_bias": bool(hf.get("mlp_bias")),
                "rope_scaling": rope.get("rope_type", "default") != "default"
                or bool(hf.get("rope_scaling")),
                "sliding_window": hf.get("sliding_window") is not None}
    bad = [k for k, v in problems.items() if v]
    if bad:
        raise ValueError(f"{where}: unsupported settings {bad} ({ {k: hf.get(k) for k in bad} })")
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    k = hf.get("head_dim") or d // h
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=h,
        n_kv_heads=hf.get("num_key_value_heads") or h, d_ff=hf["intermediate_size"],
        head_dim=None if k == d // h else k,
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
        max_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)))


def check_size(cfg: ModelConfig, size: str | None, where: str) -> ModelConfig:
    """With a SIZES name: the file must match it in every architectural field."""
    if size is None:
        return cfg
    if size not in SIZES:
        raise KeyError(f"unknown size {size!r}; known: {sorted(SIZES)}")
    want = SIZES[size]
    diff = [f"{f}: file {getattr(cfg, f)!r} vs SIZES {getattr(want, f)!r}" for f in _ARCH_FIELDS
            if not np.isclose(float(getattr(cfg, f)), float(getattr(want, f)), rtol=1e-6)]
    if diff:
        raise ValueError(f"{where} does not match SIZES[{size!r}]: " + "; ".join(diff))
    return want


# ----------------------------------------------------------------------------- weights


def unpermute_qk(w_RxD: np.ndarray, n_heads: int) -> np.ndarray:
    """GGUF (llama.cpp interleaved-pair) Q/K rows → HF rotate-half rows, per head."""
    r, d = w_RxD.shape
    return w_RxD.reshape(n_heads, r // n_heads // 2, 2, d).swapaxes(1, 2).reshape(r, d)


# HF layer module (model.layers.{i}.<m>.weight) → (our path under layers/, GGUF blk.{i}.<name>)
_LAYER = {"self_attn.q_proj": ("attn/q/kernel", "attn_q"),
          "self_attn.k_proj": ("attn/k/kernel", "attn_k"),
          "self_attn.v_proj": ("attn/v/kernel", "attn_v"),
          "self_attn.o_proj": ("attn/o/kernel", "attn_output"),
          "mlp.gate_proj": ("mlp/gate/kernel", "ffn_gate"),
          "mlp.up_proj": ("mlp/up/kernel", "ffn_up"),
          "mlp.down_proj": ("mlp/down/kernel", "ffn_down"),
          "input_layernorm": ("attn_norm/scale", "attn_norm"),
          "post_attention_layernorm": ("mlp_norm/scale", "ffn_norm")}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}


def _layer(i: int, module: str) -> str:
    return f"model.layers.{i}.{module}.weight"


def _layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Per-layer shapes in our layout (a Linear's input axis first, heads split out)."""
    d, h, g, k, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.k, cfg.d_ff
    return {"self_attn.q_proj": (d, h, k), "self_attn.k_proj": (d, g, k),
            "self_attn.v_proj": (d, g, k), "self_attn.o_proj": (h, k, d),
            "mlp.gate_proj": (d, f), "mlp.up_proj": (d, f), "mlp.down_proj": (f, d),
            "input_layernorm": (d,), "post_attention_layernorm": (d,)}


def _hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name → HF shape ((out, in) for a Linear) of every tensor the model needs."""
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.d_model),
              "model.norm.weight": (cfg.d_model,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.d_model)
    for m, ours in _layer_shapes(cfg).items():
        hf = ours if len(ours) == 1 else (math.prod(ours[1:]), ours[0])
        if m == "self_attn.o_proj":
            hf = (ours[2], ours[0] * ours[1])
        shapes.update({_layer(i, m): hf for i in range(cfg.n_layers)})
    return shapes


def params_from_hf(cfg: ModelConfig, get: Callable[[str], np.ndarray], dtype="float32"
                   ) -> dict:
    """Our param tree ({"params": ...}, numpy) from HF-named, HF-layout tensors.

    A Linear's (out, in) weight is transposed to our (in, out…) kernel; layers are stacked
    on a leading axis (model.py scans over them).
    """
    import jax.numpy as jnp
    from flax import traverse_util

    dtype = jnp.dtype(dtype)  # "bfloat16" works too (ml_dtypes)
    flat = {}
    for m, shape in _layer_shapes(cfg).items():
        stacked = np.empty((cfg.n_layers, *shape), dtype)
        for i in range(cfg.n_layers):
            stacked[i] = get(_layer(i, m)).T.reshape(shape)
        flat["layers/" + _LAYER[m][0]] = stacked
    flat["embed/embedding"] = get("model.embed_tokens.weight").astype(dtype, copy=False)
    flat["final_norm/scale"] = get("model.norm.weight").astype(dtype, copy=False)
    if not cfg.tie_embeddings:
        flat["lm_head/kernel"] = get("lm_head.weight").T.astype(dtype)
    return {"params": traverse_util.unflatten_dict(flat, sep="/")}


def hf_from_params(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """The inverse of `params_from_hf`: HF name → HF-layout numpy array."""
    import flax.linen as nn
    from flax import traverse_util

    p = nn.unbox(params)
    flat = traverse_util.flatten_dict(p.get("params", p), sep="/")
    out = {}
    for name, shape in _hf_shapes(cfg).items():
        if name in _TOP:
            ours = {"model.embed_tokens.weight": "embed/embedding",
                    "model.norm.weight": "final_norm/scale", "lm_head.weight": "lm_head/kernel"}
            w = np.asarray(flat[ours[name]])
            out[name] = w.T if name == "lm_head.weight" else w
        else:
            _, _, i, m = name.removesuffix(".weight").split(".", 3)
            w = np.asarray(flat["layers/" + _LAYER[m][0]][int(i)])
            out[name] = np.ascontiguousarray(w.reshape(shape[::-1]).T)
    return out


def _gguf_name(hf_name: str) -> str:
    if hf_name in _TOP:
        return _TOP[hf_name]
    _, _, i, module = hf_name.removesuffix(".weight").split(".", 3)
    return f"blk.{i}.{_LAYER[module][1]}.weight"


def _gguf_getter(g: GGUFFile, cfg: ModelConfig) -> Callable[[str], np.ndarray]:
    def get(hf_name: str) -> np.ndarray:
        w = g.tensor(_gguf_name(hf_name))
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            w = unpermute_qk(w, cfg.n_heads if "q_proj" in hf_name else cfg.n_kv_heads)
        return w

    return get


def _checked(get: Callable[[str], np.ndarray], where: str, expected: dict[str, tuple]):
    def checked(name: str) -> np.ndarray:
        w = get(name)
        if tuple(w.shape) != expected[name]:
            raise ValueError(f"{where}: tensor {name} has shape {tuple(w.shape)}, "
                             f"the config needs {expected[name]}")
        return w
    return checked


def _check_names(names, expected: set[str], where: str) -> None:
    """Every needed tensor present, nothing unknown (a bias, a MoE expert, rope_freqs…)."""
    missing, unknown = sorted(expected - set(names)), sorted(set(names) - expected)
    if missing or unknown:
        raise ValueError(f"{where}: not a Llama checkpoint of this config: missing tensors "
                         f"{missing[:5]} ({len(missing)}), unhandled tensors {unknown[:5]} "
                         f"({len(unknown)})")


# ----------------------------------------------------------------------------- public API


def load_gguf(path: str, size: str | None = None, dtype: str = "float32"):
    """(ModelConfig, params, BPETokenizer) from a llama-architecture GGUF file."""
    g = read_gguf(path)
    cfg = check_size(config_from_gguf(g), size, path)
    shapes = _hf_shapes(cfg)
    _check_names(g.tensors, {_gguf_name(n) for n in shapes}, path)
    params = params_from_hf(cfg, _checked(_gguf_getter(g, cfg), path, shapes), dtype)
    return cfg, params, BPETokenizer.from_gguf_metadata(g.metadata, source=path)


def load_hf(path: str, size: str | None = None, dtype: str = "float32"):
    """(ModelConfig, params, tokenizer) from an HF checkpoint dir (config.json, safetensors)."""
    from safetensors import safe_open

    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: not a Hugging Face checkpoint (no config.json)")
    with open(cfg_path) as f:
        hf = json.load(f)
    cfg = check_size(config_from_hf(hf, cfg_path), size, path)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            where = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    else:
        single = os.path.join(path, "model.safetensors")
        if not os.path.exists(single):
            raise FileNotFoundError(f"{path}: no model.safetensors(.index.json)")
        with safe_open(single, framework="numpy") as f:
            where = {k: single for k in f.keys()}
    shapes = _hf_shapes(cfg)
    # rotary inv_freq buffers are recomputed; a tied model may still carry a copy of lm_head
    ignore = ("rotary_emb.inv_freq", "lm_head.weight" if cfg.tie_embeddings else "\0")
    _check_names([n for n in where if not n.endswith(ignore)], set(shapes), path)

    def get(name: str) -> np.ndarray:
        if name not in where:
            raise KeyError(f"{path}: checkpoint has no tensor {name!r}")
        with safe_open(where[name], framework="numpy") as f:
            return f.get_tensor(name).astype(np.float32)

    params = params_from_hf(cfg, _checked(get, path, shapes), dtype)
    return cfg, params, load_hf_tokenizer(path, hf)


def export_hf(path: str, cfg: ModelConfig, params: dict, tokenizer: Tokenizer | None = None,
              max_shard_bytes: int | None = None) -> None:
    """Writes an HF Llama checkpoint: config.json, safetensors (sharded above
    `max_shard_bytes`, with model.safetensors.index.json), tokenizer files if BPE."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    tensors = hf_from_params(cfg, params)
    shards = [{}]
    for name, w in tensors.items():
        if shards[-1] and max_shard_bytes and \
                sum(x.nbytes for x in shards[-1].values()) + w.nbytes > max_shard_bytes:
            shards.append({})
        shards[-1][name] = w
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for fname, shard in zip(names, shards, strict=True):
        save_file(shard, os.path.join(path, fname), {"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(w.nbytes for w in tensors.values())},
                 "weight_map": {n: f for f, sh in zip(names, shards, strict=True) for n in sh}}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=1)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
              "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
              "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.d_ff,
              "head_dim": cfg.k, "rope_theta": cfg.rope_theta, "rope_scaling": None,
              "max_position_embeddings": cfg.max_len, "tie_word_embeddings": cfg.tie_embeddings,
              "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu", "attention_bias": False,
              "mlp_bias": False, "torch_dtype": str(tensors["model.norm.weight"].dtype)}
    if tokenizer is not None:
        config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                      pad_token_id=tokenizer.pad_id)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    if isinstance(tokenizer, BPETokenizer):
        tokenizer.save(path)


def load_pretrained(name_or_path: str, dtype: str = "float32"
                    ) -> tuple[ModelConfig, dict, Tokenizer]:
    """A SIZES/PRETRAINED name ("smollm2-135m"), a .gguf file, or an HF checkpoint dir."""
    if name_or_path in registry.PRETRAINED:
        return load_gguf(registry.pretrained_path(name_or_path), size=name_or_path, dtype=dtype)
    if name_or_path.endswith(".gguf"):
        if not os.path.exists(name_or_path):
            raise FileNotFoundError(f"{name_or_path}: no such GGUF file")
        return load_gguf(name_or_path, dtype=dtype)
    if os.path.isdir(name_or_path):
        return load_hf(name_or_path, dtype=dtype)
    raise ValueError(f"{name_or_path!r}: expected one of {sorted(registry.PRETRAINED)}, a "
                     ".gguf file or a Hugging Face checkpoint directory")
