"""evals/ood.py: the per-layer residual stream matches the model; per-layer AUROCs behave."""

import gzip
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hh_jax.data import hh
from hh_jax.evals import datasets, ood
from hh_jax.model import SIZES, Transformer, _final_norm
from tests.model_helpers import jit, random_params

CFG = SIZES["test"].replace(n_layers=3, max_len=32, attention_chunk=8)


def test_residual_stream_matches_truncated_models():
    params = random_params(CFG, seed=7)
    rng = np.random.default_rng(0)
    toks = rng.integers(4, 500, (3, 12)).astype(np.int32)
    mask = np.ones((3, 12), bool)
    mask[1, 7:] = False  # padded rows
    mask[2, 3:] = False
    acts = jit(lambda p, t, m: ood.residual_stream(p, t, m, cfg=CFG))(params, toks, mask)
    assert acts["last"].shape == acts["mean"].shape == (3, 3, CFG.d_model)
    last = mask.sum(1) - 1
    norm = _final_norm(CFG)
    for n in range(1, 4):  # a model of the first n layers ends where layer n's stream does
        cfg_n = CFG.replace(n_layers=n)
        p_n = jax.tree_util.tree_map(lambda x: x, params)
        p_n["params"]["layers"] = jax.tree_util.tree_map(lambda x, n=n: x[:n],
                                                         params["params"]["layers"])
        hidden = jit(lambda p, t, m, c=cfg_n: Transformer(c).apply(
            p, t, mask_BxL=m, with_logits=False)["hidden_BxLxD"])(p_n, toks, mask)
        got = norm.apply({"params": params["params"]["final_norm"]}, acts["last"][n - 1])
        np.testing.assert_allclose(got, hidden[np.arange(3), last], rtol=2e-5, atol=2e-5)
    # the pools read the real tokens only: row 2 (3 real tokens, 9 pads) as a 3-token row
    alone = jit(lambda p, t, m: ood.residual_stream(p, t, m, cfg=CFG))(
        params, toks[2:3, :3], mask[2:3, :3])
    for pool in ood.POOLS:
        np.testing.assert_allclose(acts[pool][:, 2], alone[pool][:, 0], rtol=2e-5, atol=2e-5)


def test_layer_aurocs_separate_shifted_and_not_identical():
    rng = np.random.default_rng(1)
    d = 6
    mix = rng.normal(size=(d, d))
    x_in = rng.normal(size=(2, 300, d)) @ mix
    shift = np.zeros(d)
    shift[0] = 5.0  # layer 0: OOD moved along one latent axis; layer 1: same distribution
    x_out = np.stack([(rng.normal(size=(200, d)) + shift) @ mix,
                      rng.normal(size=(200, d)) @ mix])
    res = ood.layer_aurocs(x_in, x_out, n_splits=3, n_shot=10, seed=0)
    for k in ood.SCORES:
        assert res[k].shape == (3, 2)
    assert res["mahalanobis"][:, 0].mean() > 0.9
    assert res["outlier_exposure"][:, 0].mean() > 0.9
    assert abs(res["mahalanobis"][:, 1].mean() - 0.5) < 0.1
    assert abs(res["outlier_exposure"][:, 1].mean() - 0.5) < 0.15


def test_hh_prompts_bad_row_names_line(tmp_path):
    good = {"chosen": "\n\nHuman: hi there\n\nAssistant: hello", "rejected": "x"}
    p = tmp_path / "t.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write(json.dumps(good) + "\n" + json.dumps(good) + "\n" + json.dumps({"x": 1}) + "\n")
    with pytest.raises(datasets.DataError, match=rf"^{p}:3: bad_row"):
        hh.load_hh_prompts(str(p))
    with gzip.open(p, "wt") as f:
        f.write(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    assert hh.load_hh_prompts(str(p)) == ["hi there"]


def test_prompt_activations_pad_invariant():
    """A prompt's activations do not depend on which other prompts share its batch."""
    from hh_jax import chat
    from hh_jax.tokenizer import ByteTokenizer

    model, params, tok = Transformer(CFG), random_params(CFG, seed=2), ByteTokenizer()
    prompts = ["short", "a somewhat longer prompt"]
    both = ood.prompt_activations(model, params, tok, chat.HH, prompts, batch_size=2, max_len=32)
    one = ood.prompt_activations(model, params, tok, chat.HH, prompts[:1], batch_size=2,
                                 max_len=32)
    np.testing.assert_allclose(both["last"][:, 0], one["last"][:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(both["mean"][:, 0], one["mean"][:, 0], rtol=1e-5, atol=1e-5)
    assert jnp.all(jnp.isfinite(both["mean"]))
