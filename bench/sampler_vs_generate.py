"""Our KV-cache sampler against `transformers` `generate()` on SmolLM2-135M, same GPU, same run.

    python bench/sampler_vs_generate.py [--batches 64,1,256] [--prompt 64] [--new 128]
                                        [--repeats 3] [--variants auto,scan]
                                        [--hf-cache static] [--hf-batches B,..] [--skip-hf]
                                        [--dump-hlo FILE] [--attention-impl cudnn]

Both sides: SmolLM2-135M's shape (30 layers, d 576, 9 heads / 3 KV heads, vocab 49,152,
tied head) with random weights (DESIGN.md §8: speed does not depend on them), bf16 weights
and compute, greedy, the same random prompts of `--prompt` tokens, exactly `--new` new
tokens (EOS disabled on both sides, so no row stops early). JAX runs
`hh_jax.sampling.sample` jitted first (holding half the GPU's memory), then transformers
(`cache_implementation="static"`, which also lets `generate()` compile its forward with
torch.compile, as it does by default on CUDA). For each batch: first-call time (compile
included), the median of `--repeats` timed calls, new tokens/s and the ratio ours /
theirs. The issue-6 target is ≥ 10× at batch 64; DESIGN.md §8 records generate() at 357 /
16,736 / 45,113 new tokens/s at batch 1 / 64 / 256 on an H200. `--variants` are values of
`SamplingConfig.split_layers` (auto: the default, split off CPU; scan: the model's stacked
layer scan; split: hh_jax.decode_step), each timed in the same process; `--dump-hlo`
writes the first variant's optimised HLO at the first batch, for reading offline;
`--attention-impl cudnn` runs the decode's attention as jax.nn.dot_product_attention's cuDNN
kernel (one kernel per layer instead of XLA's several; not yet measured).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")  # room for torch beside it

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hh_jax.model import SIZES  # noqa: E402

CFG = SIZES["smollm2-135m"]


def _timed(fn, repeats: int) -> tuple[float, float]:
    """(first call's seconds, median of `repeats` further calls)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def bench_transformers(prompts: dict[int, np.ndarray], new: int, repeats: int,
                       cache: str) -> dict[int, tuple[float, float]]:
    import torch
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=CFG.vocab_size, hidden_size=CFG.d_model, intermediate_size=CFG.d_ff,
        num_hidden_layers=CFG.n_layers, num_attention_heads=CFG.n_heads,
        num_key_value_heads=CFG.n_kv_heads, rms_norm_eps=CFG.norm_eps,
        rope_theta=CFG.rope_theta, max_position_embeddings=CFG.max_len,
        tie_word_embeddings=CFG.tie_embeddings, bos_token_id=1, eos_token_id=None,
        pad_token_id=0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg).to(device=device, dtype=torch.bfloat16)
    model.eval()
    out = {}
    for b, ids in prompts.items():
        input_ids = torch.as_tensor(ids, device=device)
        kw = dict(attention_mask=torch.ones_like(input_ids), max_new_tokens=new,
                  min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
        if cache != "dynamic":
            kw["cache_implementation"] = cache

        def run(input_ids=input_ids, kw=kw):
            with torch.inference_mode():
                seq = model.generate(input_ids, **kw)
            if device == "cuda":
                torch.cuda.synchronize()
            assert seq.shape == (input_ids.shape[0], input_ids.shape[1] + new), seq.shape

        out[b] = _timed(run, repeats)
        print(f"  transformers {transformers.__version__} batch {b}: first {out[b][0]:.2f} s, "
              f"{b * new / out[b][1]:,.0f} new tokens/s", flush=True)
    return out


VARIANTS = {"auto": None, "scan": False, "split": True}


def bench_ours(prompts: dict[int, np.ndarray], new: int, repeats: int, variant: str,
               dump_hlo: str | None, attention_impl: str = "chunked"
               ) -> dict[int, tuple[float, float]]:
    import jax
    import jax.numpy as jnp

    from hh_jax import sampling
    from hh_jax.model import Transformer

    cfg = CFG.replace(dtype="bfloat16", param_dtype="bfloat16", attention_impl=attention_impl)
    model = Transformer(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    sample = jax.jit(functools.partial(
        sampling.sample, model=model, cfg=sampling.SamplingConfig(
            max_new_tokens=new, temperature=0.0, split_layers=VARIANTS[variant]),
        eos_id=-1, pad_id=0))
    out = {}
    for b, ids in prompts.items():
        tokens = jnp.asarray(ids)
        mask = jnp.ones_like(tokens, bool)
        call = sample
        if dump_hlo:  # compiled ahead of time (its first call then has no compile in it)
            call = sample.lower(params, tokens, mask, jax.random.key(1)).compile()
            with open(dump_hlo, "w") as f:
                f.write(call.as_text())
            dump_hlo = None

        def run(tokens=tokens, mask=mask, call=call):
            res = jax.block_until_ready(call(params, tokens, mask, jax.random.key(1)))
            assert int(res["lengths_B"].min()) == new, "a row stopped early"

        out[b] = _timed(run, repeats)
        print(f"  hh_jax {variant}, attention {attention_impl} (jax {jax.__version__}, "
              f"{jax.devices()[0].device_kind}) "
              f"batch {b}: "
              f"first {out[b][0]:.2f} s, {b * new / out[b][1]:,.0f} new tokens/s", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="64,1,256")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="auto,scan", help="of " + ",".join(VARIANTS))
    ap.add_argument("--hf-cache", default="static", help="static | dynamic")
    ap.add_argument("--hf-batches", default=None, help="generate() at these only (default all)")
    ap.add_argument("--dump-hlo", default=None)
    ap.add_argument("--skip-hf", action="store_true", help="our sampler only")
    ap.add_argument("--attention-impl", default="chunked",
                    help="ModelConfig.attention_impl: chunked (decode then runs XLA's "
                         "dot_product_attention) or cudnn (its cuDNN kernel)")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    prompts = {int(b): rng.integers(4, CFG.vocab_size, (int(b), a.prompt)).astype(np.int32)
               for b in a.batches.split(",")}
    print(f"SmolLM2-135M shape, random bf16 weights, greedy, {a.prompt}-token prompts, "
          f"{a.new} new tokens, median of {a.repeats}", flush=True)
    variants = a.variants.split(",")
    ours = {v: bench_ours(prompts, a.new, a.repeats, v, a.dump_hlo if i == 0 else None,
                          a.attention_impl) for i, v in enumerate(variants)}
    hf_prompts = (prompts if a.hf_batches is None else
                  {int(b): prompts[int(b)] for b in a.hf_batches.split(",")})
    theirs = {} if a.skip_hf else bench_transformers(hf_prompts, a.new, a.repeats, a.hf_cache)
    print(f"\n| batch | generate() ({a.hf_cache} cache) tok/s | "
          + " | ".join(f"hh_jax {v} tok/s | ratio" for v in variants) + " |")
    print("|---" * (2 + 2 * len(variants)) + "|")
    for b in prompts:
        tok = b * a.new
        hf = tok / theirs[b][1] if b in theirs else None
        cells = [f"{hf:,.0f}" if hf else "–"]
        for v in variants:
            mine = tok / ours[v][b][1]
            cells += [f"{mine:,.0f}", f"{mine / hf:.1f}x" if hf else "–"]
        print(f"| {b} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
