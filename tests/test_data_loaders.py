"""grain pipelines against slow references: packing, PM pairs, sharding, resume."""

import collections
import json
import random

import grain
import jax
import numpy as np
import pytest

from hh_jax.data import hh, loaders
from hh_jax.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _ref_tokens(text):  # ByteTokenizer by hand: UTF-8 bytes shifted past 4 specials
    return [b + 4 for b in text.encode("utf-8")]


def _texts(n, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdé ") for _ in range(rng.randint(1, 30))) for _ in range(n)]


def _comps(n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ctx = f"\n\nHuman: q{i} {'x' * rng.randint(0, 40)}\n\nAssistant:"
        out.append(hh.Comparison(subset=rng.choice(["a", "b"]), context=ctx,
                                   chosen=f" good {i}" + "g" * rng.randint(0, 9),
                                   rejected=f" bad {i}", first_human=f"q{i}", source="f",
                                   line=i + 1, split="train"))
    return out


def _order(n, seed):  # the shuffle itself is grain's; the tests check what is built on it
    return list(grain.MapDataset.range(n).shuffle(seed))


@pytest.mark.parametrize("pi, pc", [(0, 1), (1, 2)])
def test_lm_packing_matches_reference(pi, pc):
    texts, seq_len, gb, seed = _texts(37), 16, 4, 3
    got = list(loaders.lm_dataset(texts, TOK, seq_len=seq_len, global_batch=gb, seed=seed,
                                  num_epochs=1, process_index=pi, process_count=pc))
    docs = [_ref_tokens(texts[i]) + [TOK.eos_id] for i in _order(len(texts), seed)[pi::pc]]
    stream = [t for d in docs for t in d]
    seg_stream = [j + 1 for j, d in enumerate(docs) for _ in d]
    rows = []
    for start in range(0, len(stream), seq_len):
        toks = stream[start: start + seq_len]
        segs = seg_stream[start: start + seq_len]
        ids = {s: k + 1 for k, s in enumerate(dict.fromkeys(segs))}  # renumber 1, 2, ...
        pos = [segs[: j + 1].count(s) - 1 for j, s in enumerate(segs)]
        pad = seq_len - len(toks)
        rows.append((toks + [0] * pad, [ids[s] for s in segs] + [0] * pad, pos + [0] * pad))
    b = gb // pc
    assert len(got) == len(rows) // b
    for k, batch in enumerate(got):
        want = rows[k * b: (k + 1) * b]
        np.testing.assert_array_equal(batch["tokens_BxL"], [r[0] for r in want])
        np.testing.assert_array_equal(batch["segment_ids_BxL"], [r[1] for r in want])
        np.testing.assert_array_equal(batch["positions_BxL"], [r[2] for r in want])
        np.testing.assert_array_equal(batch["mask_BxL"], np.asarray([r[1] for r in want]) > 0)
        assert batch["tokens_BxL"].dtype == np.int32 and batch["mask_BxL"].dtype == np.float32


def test_pm_batches_match_reference():
    comps, max_len, gb, seed, buckets = _comps(13), 32, 4, 5, (8, 16, 32)
    got = list(loaders.pm_dataset(comps, TOK, max_len=max_len, global_batch=gb, seed=seed,
                                  buckets=buckets, process_index=0, process_count=1))
    order = _order(len(comps), seed)
    assert len(got) == len(comps) // gb  # drop_remainder
    for k, batch in enumerate(got):
        rows = [comps[i] for i in order[k * gb: (k + 1) * gb]]
        longest = 0
        for side in ("chosen", "rejected"):
            full = [_ref_tokens(c.context + getattr(c, side)) + [TOK.eoc_id] for c in rows]
            kept = [f[-max_len:] for f in full]  # left truncation keeps the EOC at the end
            longest = max(longest, *map(len, kept))
            tokens_BxL, len_B = batch[f"{side}_tokens_BxL"], batch[f"{side}_len_B"]
            for i, want in enumerate(kept):
                assert tokens_BxL[i, : len_B[i]].tolist() == want
                assert (tokens_BxL[i, len_B[i]:] == TOK.pad_id).all()
            np.testing.assert_array_equal(batch[f"{side}_truncated_B"],
                                          [len(f) > max_len for f in full])
        assert batch["chosen_tokens_BxL"].shape[1] == min(b for b in buckets if b >= longest)
        assert batch["subset_B"].tolist() == [c.subset for c in rows]
        assert batch["weight_B"].tolist() == [1.0] * gb


def test_truncation_counts_and_buckets():
    comps = _comps(20, seed=1)
    want = collections.Counter()
    for c in comps:
        cut = [len(_ref_tokens(c.context + r)) + 1 > 40 for r in (c.chosen, c.rejected)]
        want.update(chosen=cut[0], rejected=cut[1], pairs=any(cut))
    assert loaders.count_truncations(comps, TOK, 40) == want
    assert loaders.length_buckets(256) == (64, 128, 192, 256)
    assert loaders.length_buckets(100) == (64, 100)
    assert loaders.length_buckets(100, step=32) == (32, 64, 96, 100)


@pytest.mark.parametrize("max_len", [512, 40, 12])
def test_shared_layout_rebuilds_each_response_view(max_len):
    """Each response's view of a shared row (context + its own branch, positions from the
    row) is the separate layout's sequence when nothing is cut; when something is cut both
    responses keep the same context tail and neither sees more than max_len tokens."""
    comps = _comps(30, seed=3)
    for c in comps:
        ex = loaders.pm_shared_example(c, TOK, max_len)
        tokens, pos, branch = ex["tokens"], ex["positions"], ex["branch"]
        ctx_ref = _ref_tokens(c.context)
        n_ctx = int((branch == 1).sum())
        assert (branch[:n_ctx] == 1).all()  # the context comes first: its last n_ctx tokens
        assert tokens[:n_ctx].tolist() == ctx_ref[len(ctx_ref) - n_ctx:]
        views = {}
        for side, br in (("chosen", 2), ("rejected", 3)):
            view = (branch == 1) | (branch == br)
            views[side] = tokens[view].tolist()
            assert pos[view].tolist() == list(range(view.sum()))  # contiguous positions
            assert len(views[side]) <= max_len
            full = _ref_tokens(c.context + getattr(c, side)) + [TOK.eoc_id]
            assert views[side] == full[len(full) - len(views[side]):]  # a suffix of it
            assert ex[f"{side}_len"] == len(views[side])
            assert ex[f"{side}_truncated"] == (len(views[side]) < len(full))
            if len(full) <= max_len and n_ctx == len(ctx_ref):
                assert views[side] == loaders.pm_example(c, TOK, max_len)[side].tolist()
        longer = max(len(_ref_tokens(getattr(c, s))) + 1 for s in ("chosen", "rejected"))
        assert n_ctx == min(len(ctx_ref), max(0, max_len - longer))


def test_shared_layout_batches():
    comps = _comps(12, seed=4)
    batch = next(iter(loaders.pm_dataset(comps, TOK, max_len=48, global_batch=4, seed=0,
                                         shuffle=False, layout="shared")))
    assert batch["pair_tokens_BxL"].shape[1] in loaders.length_buckets(96)
    for i, c in enumerate(comps[:4]):
        ex = loaders.pm_shared_example(c, TOK, 48)
        n = len(ex["tokens"])
        assert batch["pair_tokens_BxL"][i, :n].tolist() == ex["tokens"].tolist()
        assert (batch["pair_branch_BxL"][i, n:] == 0).all()  # padding: branch 0
        assert batch["chosen_index_B"][i] == ex["chosen_len"] - 1
        assert batch["rejected_index_B"][i] == n - 1
        assert batch["pair_tokens_BxL"][i, batch["chosen_index_B"][i]] == TOK.eoc_id
        assert batch["pair_tokens_BxL"][i, n - 1] == TOK.eoc_id
    with pytest.raises(ValueError, match="layout"):
        loaders.pm_dataset(comps, TOK, max_len=48, global_batch=4, seed=0, layout="packed")


@pytest.mark.parametrize("pc", [1, 2])
def test_eval_pads_to_whole_batches_and_sees_each_example_once(pc):
    comps, gb = _comps(10), 4
    seen, steps = collections.Counter(), []
    for pi in range(pc):
        batches = list(loaders.pm_dataset(comps, TOK, max_len=256, global_batch=gb, seed=0,
                                          drop_remainder=False, process_index=pi,
                                          process_count=pc))
        steps.append(len(batches))
        for b in batches:
            assert b["weight_B"].shape == (gb // pc,)
            for row, w in zip(b["chosen_tokens_BxL"], b["weight_B"], strict=True):
                seen[TOK.decode(row)] += w
    assert steps == [3] * pc  # every host runs as many steps
    assert seen == collections.Counter({c.context + c.chosen: 1.0 for c in comps})


def test_host_shards_union_to_the_global_batch():
    comps, gb = _comps(24), 8

    def rows(pi, pc):
        out = []
        for b in loaders.pm_dataset(comps, TOK, max_len=64, global_batch=gb, seed=9,
                                    process_index=pi, process_count=pc):
            out.append(sorted(TOK.decode(r) for r in b["chosen_tokens_BxL"]))
        return out

    single, hosts = rows(0, 1), [rows(pi, 2) for pi in range(2)]
    assert len(single) == 3 and all(len(h) == 3 for h in hosts)
    for k in range(3):
        assert single[k] == sorted(hosts[0][k] + hosts[1][k])
        assert not set(hosts[0][k]) & set(hosts[1][k])


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


@pytest.mark.parametrize("kind", ["lm", "pm"])
def test_resumed_iterator_yields_the_same_batches(kind):
    if kind == "lm":
        ds = loaders.lm_dataset(_texts(50), TOK, seq_len=24, global_batch=4, seed=1,
                                num_epochs=None, process_index=0, process_count=1, num_threads=3)
    else:
        ds = loaders.pm_dataset(_comps(40), TOK, max_len=48, global_batch=4, seed=1,
                                num_epochs=3, process_index=0, process_count=1, num_threads=3)
    it = iter(ds)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # it must survive JSON (orbax stores JSON)
    rest = [next(it) for _ in range(20)]
    resumed = iter(ds)
    resumed.set_state(state)
    assert _same(rest, [next(resumed) for _ in range(20)])
    straight = iter(ds)
    assert _same([next(straight) for _ in range(27)][7:], rest)  # uninterrupted run agrees


def test_resume_at_every_step_of_a_finite_lm_epoch():
    ds = loaders.lm_dataset(_texts(30), TOK, seq_len=16, global_batch=2, seed=4, num_epochs=1,
                            process_index=0, process_count=1)
    full = list(ds)
    it = iter(ds)
    for k in range(len(full) + 1):  # including after the last batch: nothing is left
        resumed = iter(ds)
        resumed.set_state(json.loads(json.dumps(it.get_state())))
        assert _same(list(resumed), full[k:])
        if k < len(full):
            next(it)


def test_orbax_checkpoints_the_iterator(tmp_path):
    import orbax.checkpoint as ocp

    ds = loaders.pm_dataset(_comps(40), TOK, max_len=48, global_batch=4, seed=2, num_epochs=2,
                            process_index=0, process_count=1)
    it = iter(ds)
    for _ in range(5):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        rest = [next(it) for _ in range(6)]
        fresh = iter(ds)
        mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert _same(rest, [next(fresh) for _ in range(6)])


def test_put_batch_shards_the_batch_over_data_axes(eight_devices):
    from jax.sharding import Mesh, PartitionSpec

    from hh_jax import sharding

    mesh = Mesh(np.asarray(eight_devices).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    batch = next(iter(loaders.pm_dataset(_comps(16), TOK, max_len=64, global_batch=8, seed=0,
                                         process_index=0, process_count=1)))
    out = sharding.put_batch({k: v for k, v in batch.items() if v.dtype != object}, mesh)
    arr = out["chosen_tokens_BxL"]
    assert isinstance(arr, jax.Array) and arr.sharding.spec == PartitionSpec(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(arr), batch["chosen_tokens_BxL"])
    assert {s.data.shape[0] for s in arr.addressable_shards} == {2}  # 8 rows over 4 shards
    np.testing.assert_array_equal(sharding.host_local(out["weight_B"], mesh), batch["weight_B"])
    np.testing.assert_array_equal(sharding.host_rows_in_global_order(batch["weight_B"]),
                                  batch["weight_B"])
