"""The frozen-trunk PM: trunk + top equals the full model, the cache holds exactly the
trunk's output, the stage learns a planted signal and resumes bitwise."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_helpers import jit, random_params

from hh_jax import checkpoint, pm_cache, pm_top, reward, trunk
from hh_jax.data import hh, loaders
from hh_jax.model import SIZES, ScalarHead, Transformer
from hh_jax.tokenizer import ByteTokenizer

CFG = SIZES["test"].replace(n_layers=3, max_len=256)


def _comps(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [hh.Comparison(
        subset="helpful-base" if i % 2 else "harmless-base",
        context=f"\n\nHuman: question {i} " + "x" * int(rng.integers(0, 50)) + "\n\nAssistant:",
        chosen=" yes " + "y" * int(rng.integers(0, 40)), rejected=" no " + "n" * int(rng.integers(
            0, 40)), first_human=f"q{i}", source="t", line=i, split="train") for i in range(n)]


def _pm_params(seed=0):
    head = ScalarHead(CFG.d_model, use_bias=False).init(jax.random.key(seed),
                                                        jnp.zeros((1, CFG.d_model)))
    return {"backbone": random_params(CFG, seed), "head": jax.tree_util.tree_map(
        lambda x: x.value if hasattr(x, "value") else x, head,
        is_leaf=lambda x: hasattr(x, "value"))}


def test_split_join_roundtrip_is_exact():
    p = _pm_params()
    frozen, top = pm_top.split_params(p, 2)
    assert jax.tree_util.tree_leaves(top["layers"])[0].shape[0] == 1
    back = pm_top.join_params(frozen, top)
    for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("n_frozen", [1, 2])
def test_cached_top_scores_equal_the_full_pm(tmp_path, n_frozen):
    """Scores from cached trunk activations + the top layers equal reward.pair_scores of
    the whole PM on the loader's shared-layout batch (an independent code path)."""
    comps, tok, p = _comps(), ByteTokenizer(), _pm_params()
    pm_cache.build(str(tmp_path / "c"), comps, tok, CFG, p["backbone"], max_len=96,
                   n_frozen=n_frozen, batch_tokens=256)
    cache = pm_cache.load(str(tmp_path / "c"))
    _, top = pm_top.split_params(p, n_frozen)
    rc, rr = pm_top.score_cache(jit(lambda t, b: pm_top.pair_scores(t, b, cfg=CFG)), top, cache,
                                np.arange(len(comps))[::-1], batch_tokens=512)
    batch = next(iter(loaders.pm_dataset(comps, tok, max_len=96, global_batch=len(comps),
                                         seed=0, shuffle=False, layout="shared")))
    batch = {k: v for k, v in batch.items() if v.dtype != object}
    full = jit(lambda q, b: reward.pair_scores(q, b, model=Transformer(CFG)))
    ref_c, ref_r, _, _ = full(p, batch)
    np.testing.assert_allclose(rc, np.asarray(ref_c)[::-1], atol=2e-5)
    np.testing.assert_allclose(rr, np.asarray(ref_r)[::-1], atol=2e-5)


def test_cache_rows_and_reads_match_a_layer_by_layer_forward(tmp_path):
    comps, tok, p = _comps(4, seed=1), ByteTokenizer(), _pm_params(1)["backbone"]
    pm_cache.build(str(tmp_path / "c"), comps, tok, CFG, p, max_len=80, n_frozen=1,
                   batch_tokens=200)
    cache = pm_cache.load(str(tmp_path / "c"))
    for i, c in enumerate(comps):
        ex = loaders.pm_shared_example(c, tok, 80)
        n = len(ex["tokens"])
        assert cache["lengths"][i] == n
        branch = ex["branch"][None].astype(np.int32)
        mask = trunk.mask_for(ex["positions"][None], branch > 0, branch)
        x = trunk.embed(CFG, p, ex["tokens"][None])
        layers = p["params"]["layers"]
        for layer in range(CFG.n_layers):  # one layer at a time, no scan
            x, _ = trunk.run_layers(CFG, trunk.layer_slice(layers, layer, layer + 1), x,
                                    ex["positions"][None], mask)
            if layer == 0:
                s = cache["offsets"][i]
                np.testing.assert_allclose(cache["x_TxD"][s:s + n], x[0], atol=1e-5)
            for side, idx in ((0, ex["chosen_len"] - 1), (1, n - 1)):
                np.testing.assert_allclose(cache["reads_Px2xNxD"][i, side, layer].astype(
                    np.float32), x[0, idx], rtol=2e-3, atol=2e-3)


def test_find_or_build_reuses_a_superset_cache(tmp_path):
    comps, tok, p = _comps(6), ByteTokenizer(), _pm_params()["backbone"]
    c1, rows1 = pm_cache.find_or_build(str(tmp_path), "all", comps, tok, CFG, p, max_len=64,
                                       n_frozen=1)
    sub = [comps[4], comps[1]]
    c2, rows2 = pm_cache.find_or_build(str(tmp_path), "sub", sub, tok, CFG, p, max_len=64,
                                       n_frozen=1)
    assert list(rows2) == [4, 1] and not os.path.exists(tmp_path / "sub")
    # a stage's max_len / dtype overrides do not change the trunk: the cache is reused
    _, rows_o = pm_cache.find_or_build(str(tmp_path), "sub", sub, tok, CFG.replace(
        max_len=64, dtype="bfloat16"), p, max_len=64, n_frozen=1)
    assert list(rows_o) == [4, 1] and not os.path.exists(tmp_path / "sub")
    # a pair the cache lacks: a new cache for exactly these pairs
    mixed = [comps[0], _comps(1, seed=9)[0]]
    _, rows_m = pm_cache.find_or_build(str(tmp_path), "mixed", mixed, tok, CFG, p, max_len=64,
                                       n_frozen=1)
    assert list(rows_m) == [0, 1] and os.path.exists(tmp_path / "mixed" / "meta.json")
    # other weights: not reused
    other = _pm_params(seed=5)["backbone"]
    _, rows3 = pm_cache.find_or_build(str(tmp_path), "other", sub, tok, CFG, other, max_len=64,
                                      n_frozen=1)
    assert list(rows3) == [0, 1] and os.path.exists(tmp_path / "other" / "meta.json")


def test_lm_export_for(tmp_path):
    """Helper check: the export the stage test starts from is an LM export."""
    path = _lm_export(tmp_path)
    assert checkpoint.read_meta(path)["stage"] == "lm"


def _lm_export(tmp_path):
    path = str(tmp_path / "lm" / "params")
    import dataclasses
    checkpoint.export_params(path, random_params(CFG, 3), {
        "stage": "lm", "step": 0, "model": dataclasses.asdict(CFG), "tokenizer": "byte"})
    return path


def _frozen_config(tmp_path, **kw):
    from test_pm import _planted_config, _write_planted

    _write_planted(tmp_path / "data", n=kw.pop("n", 240))
    c = _planted_config(tmp_path / "data")
    c.update(kw)
    c.stage, c.init_from = "pm_frozen", _lm_export(tmp_path)
    c.frozen_layers, c.cache_dir = CFG.n_layers - 1, str(tmp_path / "cache")
    c.model_overrides = {}
    return c


def test_frozen_stage_learns_a_planted_signal_and_exports_a_pm(tmp_path):
    """The top layer + head over a frozen random trunk learn the planted marker; the export
    is a PM whose full-model scores (reward.score_pairs path) equal the stage's report."""
    from hh_jax.stages import pm

    c = _frozen_config(tmp_path, epochs=6)
    summary = pm.train_frozen_and_evaluate(c, str(tmp_path / "pmf"))
    assert summary["heldout_pairs"] > 30 and summary["frozen_layers"] == CFG.n_layers - 1
    assert summary["eval/accuracy"] >= 0.9, summary["report"]["overall"]
    meta = checkpoint.read_meta(tmp_path / "pmf" / "params")
    assert meta["stage"] == "pm"
    from hh_jax import policy, sharding
    from hh_jax.evals import pm_accuracy

    mesh = sharding.make_mesh((-1, 1, 1))
    frozen = policy.Frozen(str(tmp_path / "pmf" / "params"), mesh, "pm")
    held = pm.heldout_pairs(c.eval)
    score_fn = jit(lambda p, b: reward.score_step(p, b, model=frozen.model))
    with sharding.activate(mesh):
        rep = pm_accuracy.evaluate_pairs(score_fn, frozen.params, held, ByteTokenizer(), c, mesh)
    assert rep["overall"]["accuracy"] == summary["report"]["overall"]["accuracy"]
    assert rep["scores"]["mean"] == pytest.approx(summary["report"]["scores"]["mean"], abs=1e-4)


def test_layer_probes_find_the_layer_that_holds_a_planted_preference():
    """Layer 1's reads carry the preference along one direction, layer 0's are noise: the
    held-out probe accuracy is high at layer 1 (reported 1-based: 2) and near ½ at 0."""
    from hh_jax.evals import pm_probe

    rng = np.random.default_rng(0)
    p, d = 600, 16
    reads = rng.normal(size=(p, 2, 2, d)).astype(np.float16)
    reads[:, 0, 1, 3] += 1.5  # chosen responses are higher along dim 3 at layer 1
    out = pm_probe.layer_probes(reads, np.arange(400), reads, np.arange(400, 600), [0, 1])
    acc = {r["layer"]: r for r in out["layers"]}
    assert acc[2]["accuracy"] > 0.8 and acc[2]["n"] == 200
    assert abs(acc[1]["accuracy"] - 0.5) < 0.12
    # the reference: the Bayes rule for this plant is "chosen − rejected along dim 3 > 0"
    bayes = (reads[400:, 0, 1, 3].astype(float) - reads[400:, 1, 1, 3]) > 0
    assert abs(acc[2]["accuracy"] - bayes.mean()) < 0.06


def test_advancing_a_cache_equals_building_it_at_the_higher_cut(tmp_path):
    comps, tok, p = _comps(5, seed=2), ByteTokenizer(), _pm_params(2)["backbone"]
    pm_cache.build(str(tmp_path / "c1"), comps, tok, CFG, p, max_len=80, n_frozen=1,
                   batch_tokens=256)
    pm_cache.build(str(tmp_path / "c2"), comps, tok, CFG, p, max_len=80, n_frozen=2,
                   batch_tokens=256)
    meta = pm_cache.advance(str(tmp_path / "c1"), str(tmp_path / "a2"), CFG, p, 2,
                            batch_tokens=300)
    assert meta["n_frozen"] == 2
    direct, advanced = pm_cache.load(str(tmp_path / "c2")), pm_cache.load(str(tmp_path / "a2"))
    np.testing.assert_allclose(advanced["x_TxD"], direct["x_TxD"], atol=2e-5)
    np.testing.assert_array_equal(advanced["keys"], direct["keys"])
    _, rows = pm_cache.find_or_build(str(tmp_path), "x", comps[:2], tok, CFG, p, max_len=80,
                                     n_frozen=2)
    assert list(rows) == [0, 1] and not os.path.exists(tmp_path / "x")


def test_select_head_picks_the_planted_layer_and_direction():
    """Layer 3's differences carry the preference along a known direction w*, layer 2's are
    noise: cross-validation on the train pairs picks layer 3, the fitted w points along w*,
    and the noise layer's CV accuracy is near ½."""
    from hh_jax.evals import pm_probe

    rng = np.random.default_rng(1)
    n, d = 500, 12
    w_star = rng.normal(size=d)
    signal = rng.normal(size=(n, d))
    signal *= np.where(signal @ w_star + 0.5 * rng.normal(size=n) > 0, 1, -1)[:, None]
    planted = {2: rng.normal(size=(n, d)), 3: signal}
    out = pm_probe.select_head(lambda layer: planted[layer], [2, 3], n, l2_grid=(0.01, 1.0))
    assert out["layer"] == 3 and len(out["cv"]) == 4
    cos = out["w_D"] @ w_star / np.linalg.norm(out["w_D"]) / np.linalg.norm(w_star)
    assert cos > 0.9, cos
    noise = [r["accuracy"] for r in out["cv"] if r["layer"] == 2]
    assert all(abs(a - 0.5) < 0.1 for a in noise), noise
    # the reference for layer 3: the Bayes rule sign(w*·d) on the same pairs
    best = max(r["accuracy"] for r in out["cv"] if r["layer"] == 3)
    assert abs(best - ((signal @ w_star) > 0).mean()) < 0.08


@pytest.mark.parametrize("layer", [2, 3])
def test_head_only_stage_exports_the_pm_it_reports(tmp_path, layer):
    """read_layers: the export is the first `layer` layers + final norm + the fitted head,
    and its full-model scores (reward.score_step on the export, an independent code path
    from the cached float16 reads the head was fitted on) reproduce the stage's report."""
    from hh_jax import policy, sharding
    from hh_jax.evals import pm_accuracy
    from hh_jax.stages import pm

    c = _frozen_config(tmp_path, n=120)
    c.read_layers, c.l2_grid = (layer,), (0.1,)
    summary = pm.train_frozen_and_evaluate(c, str(tmp_path / "pmh"))
    assert summary["head_only"]["layer"] == layer and summary["steps"] == 0
    meta = checkpoint.read_meta(tmp_path / "pmh" / "params")
    assert meta["stage"] == "pm" and meta["model"]["n_layers"] == layer
    mesh = sharding.make_mesh((-1, 1, 1))
    frozen = policy.Frozen(str(tmp_path / "pmh" / "params"), mesh, "pm")
    held = pm.heldout_pairs(c.eval)
    score_fn = jit(lambda p, b: reward.score_step(p, b, model=frozen.model))
    with sharding.activate(mesh):
        rep = pm_accuracy.evaluate_pairs(score_fn, frozen.params, held, ByteTokenizer(), c, mesh)
    n = summary["heldout_pairs"]
    assert abs(rep["overall"]["accuracy"] - summary["report"]["overall"]["accuracy"]) <= 2 / n
    assert summary["eval/accuracy"] >= 0.9  # the planted marker, read by a linear head
    assert rep["scores"]["std"] > 1  # scores that spread: the tolerance below is tight
    for k in ("mean", "std", "mean_margin"):
        assert rep["scores"][k] == pytest.approx(summary["report"]["scores"][k], abs=2e-3)
