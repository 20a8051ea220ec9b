"""hh_jax.sampling against full-recompute references and numpy filters."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_helpers import FAST_COMPILE, jit, random_params  # noqa: F401

from hh_jax.model import SIZES, Transformer
from hh_jax.sampling import SamplingConfig, filter_logits, left_align, pad_prompts, sample

CFG = SIZES["test"]
PAD = 0
R = 8  # new tokens
Q = 8  # prompt slots
PROMPTS = [[5, 9, 100], [7, 8, 9, 10, 11, 12, 13], [300, 42, 17, 200, 301]]
_random_params = random_params


class CountingModel:
    """Duck-types the Transformer for `sample`; counts one-token decode calls at run time."""

    def __init__(self, model):
        self.cfg, self._model, self.decode_calls = model.cfg, model, 0

    def _tick(self):
        self.decode_calls += 1

    def apply(self, params, tokens_BxL, **kw):
        out = self._model.apply(params, tokens_BxL, **kw)
        if tokens_BxL.shape[1] == 1:
            jax.debug.callback(self._tick)
        return out


@pytest.fixture(scope="module")
def setup():
    model = Transformer(CFG)
    params = _random_params(CFG, seed=1)
    return model, params, jit(model.apply)


def _full_logits(apply_fn, params, tokens, mask):
    return np.asarray(apply_fn(params, jnp.asarray(tokens), mask_BxL=jnp.asarray(mask))
                      ["logits_BxLxV"])


def _reference_greedy(apply_fn, params, prompts, steps):
    """Argmax decoding by full recompute of every prefix, one row per prompt, no cache.

    The growing sequences sit at the start of a fixed (B, Q+R) buffer, so one compile serves
    every step; the tail after a row's end cannot affect its logits (causality, test_model).
    """
    buf = np.full((len(prompts), Q + R), PAD, np.int32)
    lens = np.array([len(p) for p in prompts])
    for i, p in enumerate(prompts):
        buf[i, :len(p)] = p
    out = np.zeros((len(prompts), steps), np.int32)
    for t in range(steps):
        logits = _full_logits(apply_fn, params, buf, np.ones(buf.shape, bool))
        nxt = logits[np.arange(len(prompts)), lens - 1].argmax(-1)
        out[:, t] = nxt
        buf[np.arange(len(prompts)), lens] = nxt
        lens = lens + 1
    return out


def _layouts(prompts):
    """The same prompts left-padded, right-padded, and padded on both sides (pads in holes)."""
    left = pad_prompts(prompts, PAD, Q, left=True)
    right = pad_prompts(prompts, PAD, Q, left=False)
    tokens, mask = np.full((len(prompts), Q), PAD, np.int32), np.zeros((len(prompts), Q), bool)
    for i, p in enumerate(prompts):
        slots = np.sort(np.random.default_rng(i).choice(Q, len(p), replace=False))
        tokens[i, slots], mask[i, slots] = p, True
    return {"left": left, "right": right, "scattered": (tokens, mask)}


@pytest.fixture(scope="module")
def greedy(setup):
    """One compiled greedy sampler (eos_id traced), its counting model, and ref helpers."""
    model, params, _ = setup
    counting = CountingModel(model)

    @jit
    def run(tokens, mask, eos_id):
        return sample(params, tokens, mask, jax.random.key(0), model=counting,
                      cfg=SamplingConfig(max_new_tokens=R, temperature=0.0), eos_id=eos_id,
                      pad_id=PAD)

    def call(tokens, mask, eos_id):
        counting.decode_calls = 0
        out = jax.tree_util.tree_map(np.asarray, run(jnp.asarray(tokens), jnp.asarray(mask),
                                                     jnp.int32(eos_id)))
        jax.effects_barrier()
        return out, counting.decode_calls

    return call


def test_greedy_cache_decode_equals_full_recompute(setup, greedy):
    _, params, apply_fn = setup
    ref = _reference_greedy(apply_fn, params, PROMPTS, R)
    unused = next(t for t in range(4, CFG.vocab_size) if t not in ref)
    for layout, (tokens, mask) in _layouts(PROMPTS).items():
        out, calls = greedy(tokens, mask, unused)
        np.testing.assert_array_equal(out["tokens_BxR"], ref, err_msg=layout)
        np.testing.assert_array_equal(out["lengths_B"], [R] * len(PROMPTS))
        assert not out["ended_B"].any()
        assert calls == R
        # the returned prompt is left-aligned, order kept
        for i, p in enumerate(PROMPTS):
            np.testing.assert_array_equal(out["prompt_BxQ"][i, Q - len(p):], p)
            assert out["prompt_mask_BxQ"][i].tolist() == [False] * (Q - len(p)) + [True] * len(p)


def test_eos_stops_rows_and_exits_loop_early(setup, greedy):
    _, params, apply_fn = setup
    first = _reference_greedy(apply_fn, params, PROMPTS[:1], R)[0]
    # Rows that continue the same greedy trajectory from different points; each emits the
    # chosen EOS at a different step.
    prompts = [PROMPTS[0] + first[:i].tolist() for i in range(3)]
    ref = _reference_greedy(apply_fn, params, prompts, R)
    common = set(ref[0, :R - 2]) & set(ref[1, :R - 2]) & set(ref[2, :R - 2])
    assert common, f"test setup: no token emitted by every row in {ref.tolist()}"
    eos = max(common, key=lambda t: list(ref[0]).index(t))
    want_len = np.array([list(row).index(eos) + 1 for row in ref])
    assert want_len.max() < R  # otherwise the early exit is not tested
    for layout, (tokens, mask) in _layouts(prompts).items():
        out, calls = greedy(tokens, mask, eos)
        np.testing.assert_array_equal(out["lengths_B"], want_len, err_msg=layout)
        assert out["ended_B"].all()
        for i, n in enumerate(want_len):
            np.testing.assert_array_equal(out["tokens_BxR"][i, :n], ref[i, :n])
            assert (out["tokens_BxR"][i, n:] == PAD).all()
            assert (out["logprobs_BxR"][i, n:] == 0).all()
            assert (out["logprobs_BxR"][i, :n] < 0).all()
        assert calls == want_len.max(), "the while loop should stop once every row ended"


def _sampler(model, cfg):
    return jit(functools.partial(sample, model=model, cfg=cfg, eos_id=2, pad_id=PAD))


def _check_logprobs(apply_fn, params, out, temperature):
    """Sampled logprobs = log_softmax(logits / T) of a full forward over prompt+response."""
    tokens = np.concatenate([out["prompt_BxQ"], out["tokens_BxR"]], axis=1)
    resp_mask = np.arange(R)[None] < out["lengths_B"][:, None]
    mask = np.concatenate([out["prompt_mask_BxQ"], resp_mask], axis=1)
    logits = _full_logits(apply_fn, params, tokens, mask)[:, Q - 1:-1] / temperature
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    ref = np.take_along_axis(logp, out["tokens_BxR"][..., None], -1)[..., 0]
    np.testing.assert_allclose(out["logprobs_BxR"][resp_mask], ref[resp_mask], atol=2e-4,
                               rtol=1e-4)
    assert (out["logprobs_BxR"][~resp_mask] == 0).all()
    return logits


def test_logprobs_match_full_forward_and_keys(setup):
    model, params, apply_fn = setup
    run = _sampler(model, SamplingConfig(max_new_tokens=R, temperature=1.0))
    tokens, mask = _layouts(PROMPTS)["right"]
    out = jax.tree_util.tree_map(np.asarray, run(params, tokens, mask, jax.random.key(3)))
    _check_logprobs(apply_fn, params, out, 1.0)
    again = jax.tree_util.tree_map(np.asarray, run(params, tokens, mask, jax.random.key(3)))
    np.testing.assert_array_equal(again["tokens_BxR"], out["tokens_BxR"])
    np.testing.assert_array_equal(again["logprobs_BxR"], out["logprobs_BxR"])
    other = np.asarray(run(params, tokens, mask, jax.random.key(4))["tokens_BxR"])
    assert (other != out["tokens_BxR"]).any()


def test_split_layer_decode_matches_the_full_forward(setup):
    """The GPU decode step (hh_jax.decode_step: layers' weights and caches apart) on CPU:
    the same draws as the model's scanned step, and logprobs equal to a full forward's."""
    model, params, apply_fn = setup
    tokens, mask = _layouts(PROMPTS)["scattered"]
    out, loops = {}, {}
    for unroll in (False, True):
        run = _sampler(model, SamplingConfig(max_new_tokens=R, temperature=1.0,
                                             split_layers=unroll))
        out[unroll] = jax.tree_util.tree_map(np.asarray,
                                             run(params, tokens, mask, jax.random.key(5)))
        loops[unroll] = run.lower(params, tokens, mask, jax.random.key(5)).as_text().count(
            "stablehlo.while")
    assert loops[True] == loops[False] - 1  # the decode step's layer loop is gone
    _check_logprobs(apply_fn, params, out[True], 1.0)
    np.testing.assert_array_equal(out[True]["tokens_BxR"], out[False]["tokens_BxR"])


def test_split_layer_decode_in_bfloat16_keeps_the_scan_numbers(setup):
    """Mixed precision (float32 params, bf16 compute): the split weights are held in bf16
    (norm scales in float32), and greedy decoding matches the scanned step's tokens, with
    logprobs equal up to bf16 rounding (XLA may round the two programs' bf16 intermediates
    at different places; a sampled draw near a CDF boundary could then differ)."""
    from hh_jax import decode_step

    _, params, _ = setup
    model = Transformer(CFG.replace(dtype="bfloat16"))
    _, layers = decode_step.split_layers(params, model.cfg)
    assert len(layers) == CFG.n_layers
    assert layers[0]["attn"]["q"]["kernel"].dtype == jnp.bfloat16
    assert layers[0]["mlp"]["down"]["kernel"].dtype == jnp.bfloat16
    assert layers[0]["attn_norm"]["scale"].dtype == jnp.float32
    tokens, mask = _layouts(PROMPTS)["left"]
    out = {}
    for split in (False, True):
        run = _sampler(model, SamplingConfig(max_new_tokens=R, temperature=0.0,
                                             split_layers=split))
        out[split] = jax.tree_util.tree_map(np.asarray,
                                            run(params, tokens, mask, jax.random.key(8)))
    np.testing.assert_array_equal(out[True]["tokens_BxR"], out[False]["tokens_BxR"])
    np.testing.assert_allclose(out[True]["logprobs_BxR"], out[False]["logprobs_BxR"],
                               atol=0.05)


def test_split_layer_decode_sharded_2x2x2_equals_single_device(setup):
    """The split decode step with params sharded over data × fsdp × tensor (slicing a
    sharded stacked weight keeps its sharding) draws what the unsharded scan draws."""
    from hh_jax import sharding, state

    model, params, _ = setup
    tokens, mask = pad_prompts(PROMPTS + [[11, 12]], PAD, Q)  # 4 rows: the data axes split
    cfg = SamplingConfig(max_new_tokens=R, temperature=1.0)
    ref = jax.tree_util.tree_map(np.asarray, _sampler(model, cfg)(params, tokens, mask,
                                                                   jax.random.key(6)))
    mesh = sharding.make_mesh((2, 2, 2))
    _, shardings = state.param_shardings(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)), mesh)
    with sharding.activate(mesh):
        sharded = jax.device_put(params, shardings)
        assert any(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
                   for x in jax.tree_util.tree_leaves(sharded))
        run = _sampler(model, SamplingConfig(max_new_tokens=R, temperature=1.0,
                                             split_layers=True))
        out = jax.tree_util.tree_map(np.asarray, run(sharded, *(jax.device_put(
            x, sharding.batch_sharding(mesh)) for x in (tokens, mask)), jax.random.key(6)))
    np.testing.assert_array_equal(out["tokens_BxR"], ref["tokens_BxR"])
    np.testing.assert_allclose(out["logprobs_BxR"], ref["logprobs_BxR"], atol=2e-5)


def test_truncated_sampling_keeps_untruncated_logprobs(setup):
    model, params, apply_fn = setup
    top_k, top_p, temp = 5, 0.8, 0.7
    run = _sampler(model, SamplingConfig(max_new_tokens=R, temperature=temp, top_k=top_k,
                                         top_p=top_p))
    tokens, mask = _layouts(PROMPTS)["left"]
    for seed in range(3):
        out = jax.tree_util.tree_map(np.asarray, run(params, tokens, mask, jax.random.key(seed)))
        logits = _check_logprobs(apply_fn, params, out, temp)
        for b in range(len(PROMPTS)):
            for i in range(out["lengths_B"][b]):
                keep = _np_filter(logits[b, i], top_k, top_p)
                assert keep[out["tokens_BxR"][b, i]], "sampled a token outside top-k/top-p"


# ---------------------------------------------------------------- host-side pieces


def _np_filter(logits_V, top_k, top_p):
    """Kept-token mask: top-k by value, then the smallest nucleus of the renormalised rest
    whose mass reaches top_p (a token is kept if the mass strictly before it is < top_p)."""
    keep = np.ones(logits_V.shape, bool)
    if top_k > 0:
        keep &= logits_V >= np.sort(logits_V)[::-1][top_k - 1]
    if top_p < 1.0:
        x = np.where(keep, logits_V.astype(np.float64), -np.inf)
        p = np.exp(x - x.max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        before = 0.0
        nucleus = np.zeros_like(keep)
        for j in order:
            if before >= top_p:
                break
            nucleus[j] = True
            before += p[j]
        keep &= nucleus
    return keep


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (1, 1.0), (7, 1.0), (0, 0.5), (0, 0.95),
                                         (10, 0.6), (0, 1e-6)])
def test_filter_logits_against_numpy(top_k, top_p):
    rng = np.random.default_rng(top_k * 100 + int(top_p * 100))
    logits = (2.0 * rng.normal(size=(4, 50))).astype(np.float32)
    got = np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p))
    for b in range(4):
        keep = _np_filter(logits[b], top_k, top_p)
        assert keep.sum() >= 1
        np.testing.assert_array_equal(got[b][keep], logits[b][keep])
        assert (got[b][~keep] <= np.finfo(np.float32).min).all()
        if top_p == 1e-6 or top_k == 1:
            assert keep.sum() == 1 and keep[logits[b].argmax()]


def test_left_align_against_loop():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 100, (5, 9))
    mask = rng.random((5, 9)) < 0.5
    got_t, got_m = map(np.asarray, left_align(jnp.asarray(tokens), jnp.asarray(mask)))
    for b in range(5):
        real, pads = tokens[b][mask[b]], tokens[b][~mask[b]]
        np.testing.assert_array_equal(got_t[b], np.r_[pads, real])
        assert got_m[b].tolist() == [False] * len(pads) + [True] * len(real)


def test_pad_prompts():
    tokens, mask = pad_prompts([[1, 2], [3, 4, 5, 6, 7]], pad_id=9, length=4)
    np.testing.assert_array_equal(tokens, [[9, 9, 1, 2], [4, 5, 6, 7]])  # keeps the end
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [1, 1, 1, 1]])
    tokens, mask = pad_prompts([[1, 2], [3]], pad_id=9, left=False)
    np.testing.assert_array_equal(tokens, [[1, 2], [3, 9]])
    np.testing.assert_array_equal(mask, [[1, 1], [1, 0]])
