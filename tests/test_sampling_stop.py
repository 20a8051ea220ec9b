"""Stop strings in hh_jax.sampling: the in-loop token matcher against a slow pure-Python
reference, on the sampler's own token streams and on scripted ones; tokenizer tables."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_helpers import jit, random_params

from hh_jax import sampling
from hh_jax.model import SIZES, Transformer
from hh_jax.sampling import SamplingConfig, StopTable, pad_prompts, stop_table_from_ids
from hh_jax.tokenizer import ByteTokenizer, SentencePieceTokenizer, load_tokenizer

CFG = SIZES["test"]
V = CFG.vocab_size
PAD = 0
R = 12  # new tokens
Q = 8  # prompt slots
S, W = 4, 4  # every table's shape: one compiled sampler serves every set of stops
PROMPTS = [[5, 9, 100], [7, 8, 9, 10, 11, 12, 13], [300, 42, 17, 200, 301], [64, 65]]
NO_EOS = -1  # an eos_id no token equals: the stream runs to R tokens


def reference(stream, seqs, firsts, eos):
    """(length, stop tokens, ended, stopped) of one row, by scanning its unstopped stream:
    the row ends at the first token that is EOS or completes a stop sequence (the longest
    of those completing there); a stop's first token is any of `firsts[s]`."""
    stream = [int(t) for t in stream]
    for t, tok in enumerate(stream):
        if tok == eos:
            return t + 1, 0, True, False
        done = [len(q) for q, f in zip(seqs, firsts, strict=True)
                if len(q) <= t + 1 and stream[t + 1 - len(q)] in f
                and stream[t + 2 - len(q):t + 1] == list(q[1:])]
        if done:
            return t + 1 - max(done), max(done), False, True
    return len(stream), 0, False, False


def table(seqs, firsts=None):
    return stop_table_from_ids(seqs, V, first=firsts, slots=S, width=W)


NONE = table([])  # stops off, same shape


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


CONFIGS = {  # the scan decode, the split (GPU) decode step with truncation, greedy
    "scan": SamplingConfig(max_new_tokens=R, temperature=1.0, split_layers=False),
    "split_topk_topp": SamplingConfig(max_new_tokens=R, temperature=0.7, top_k=20, top_p=0.9,
                                      split_layers=True),
    "greedy": SamplingConfig(max_new_tokens=R, temperature=0.0, split_layers=False),
}


@pytest.fixture(scope="module")
def samplers():
    """Per config: a call (tokens, mask, eos, stops) → (numpy dict, decode calls), and its
    trace count (stops and eos_id are traced arguments). The split decode step does not
    go through `model.apply`: its calls are not counted (None)."""
    params = random_params(CFG, seed=1)
    out = {}
    for name, cfg in CONFIGS.items():
        model = CountingModel(Transformer(CFG))
        traces = [0]

        def fn(tokens, mask, eos, stops, model=model, cfg=cfg, traces=traces):
            traces[0] += 1
            return sampling.sample(params, tokens, mask, jax.random.key(7), model=model,
                                   cfg=cfg, eos_id=eos, pad_id=PAD, stops=stops)

        run = jit(fn)

        def call(tokens, mask, eos, stops, run=run, model=model, cfg=cfg):
            model.decode_calls = 0
            res = jax.tree_util.tree_map(np.asarray, run(
                jnp.asarray(tokens), jnp.asarray(mask), jnp.int32(eos), stops))
            jax.effects_barrier()
            return res, None if cfg.split_layers else model.decode_calls

        out[name] = (call, traces, model)
    return out


def _layouts():
    left = pad_prompts(PROMPTS, PAD, Q, left=True)
    right = pad_prompts(PROMPTS, PAD, Q, left=False)
    return {"left": left, "right": right}


def _cases(stream):
    """(name, stop sequences, their first-token sets or None, eos_id) built from the
    unstopped streams (B x R), so that stops do occur."""
    s = [list(map(int, row)) for row in stream]
    used = set(np.unique(stream).tolist())
    unused = [t for t in range(4, V) if t not in used]
    x, y = unused[:2]
    return [
        ("middle", [s[0][4:7]], None, NO_EOS),
        ("very_end", [s[1][R - 3:]], None, NO_EOS),
        ("at_start", [s[3][:2]], None, NO_EOS),  # an empty response
        ("no_stop", [[x, y], [y], [x, s[0][0]]], None, NO_EOS),
        # a prefix of the first stop matches at 3..4, then the stream goes on otherwise;
        # the second stop starts inside that partial match
        ("partial_overlap", [s[2][3:5] + [x], s[2][4:7]], None, NO_EOS),
        ("several", [s[0][2:4], s[1][5:8], s[2][8:9], s[3][6:10]], None, NO_EOS),
        # two stops completing at the same token: the longer one sets the cut
        ("same_end_longest", [s[1][6:8], s[1][4:8]], None, NO_EOS),
        # a first-token class: any of {x, y, stream token} may begin the stop
        ("first_class", [[x] + s[0][6:8], [y] + s[3][4:5]], [[x, y, s[0][5]], [y, s[3][3]]],
         NO_EOS),
        ("eos_before_stop", [s[0][5:8], s[2][9:11]], None, s[0][3]),
        ("stop_before_eos", [s[1][2:4]], None, s[1][9]),
        ("eos_ends_a_stop", [s[2][2:4]], None, s[2][3]),  # EOS, not the stop
    ]


def _check(out, base, stream, seqs, firsts, eos, msg):
    firsts = firsts or [[q[0]] for q in seqs]
    for b in range(len(stream)):
        length, stop_len, ended, stopped = reference(stream[b], seqs, firsts, eos)
        m = f"{msg} row {b}"
        assert out["lengths_B"][b] == length, m
        assert out["stop_lengths_B"][b] == stop_len, m
        assert out["ended_B"][b] == ended and out["stopped_B"][b] == stopped, m
        end = length + stop_len
        # the same draws up to the row's end (the stop tokens stay after the response)
        np.testing.assert_array_equal(out["tokens_BxR"][b, :end], stream[b, :end], err_msg=m)
        np.testing.assert_allclose(out["logprobs_BxR"][b, :end], base["logprobs_BxR"][b, :end],
                                   rtol=1e-6, atol=1e-6, err_msg=m)
        assert (out["tokens_BxR"][b, end:] == PAD).all(), m
        assert (out["logprobs_BxR"][b, end:] == 0).all(), m
        assert (out["entropies_BxR"][b, end:] == 0).all(), m
        # what a PM or a response mask reads: the tokens before the stop string only
        resp_mask = np.arange(R) < out["lengths_B"][b]
        np.testing.assert_array_equal(out["tokens_BxR"][b][resp_mask], stream[b, :length])
        if stopped:
            tail = stream[b, length:end].tolist()
            assert any(tail[1:] == list(q[1:]) and tail[0] in f and len(q) == stop_len
                       for q, f in zip(seqs, firsts, strict=True)), m


@pytest.mark.parametrize("config", list(CONFIGS))
def test_stops_match_reference(samplers, config):
    call, traces, _ = samplers[config]
    tokens, mask = _layouts()["left"]
    base, base_calls = call(tokens, mask, NO_EOS, NONE)
    stream = base["tokens_BxR"]
    assert base_calls in (R, None) and not base["stopped_B"].any() and not base["ended_B"].any()
    assert (base["lengths_B"] == R).all() and (base["stop_lengths_B"] == 0).all()
    seen = set()
    for name, seqs, firsts, eos in _cases(stream):
        out, calls = call(tokens, mask, eos, table(seqs, firsts))
        _check(out, base, stream, seqs, firsts, eos, f"{config}/{name}")
        ends = out["lengths_B"] + out["stop_lengths_B"]
        assert calls in (ends.max(), None), f"{name}: the loop should stop once all ended"
        seen |= {(name, bool(s)) for s in out["stopped_B"]}
    # the cases did what they are named for
    assert ("middle", True) in seen and ("very_end", True) in seen
    assert ("no_stop", True) not in seen and ("partial_overlap", True) in seen
    # one compile for every set of stop strings (and EOS ids) of the table's shape
    assert traces[0] == 1


def test_stops_with_right_padded_prompts(samplers):
    """The prompt layout does not matter (prompts are left-aligned before the loop)."""
    call, _, _ = samplers["scan"]
    left, right = _layouts()["left"], _layouts()["right"]
    base, _ = call(*left, NO_EOS, NONE)
    stream = base["tokens_BxR"]
    for name, seqs, firsts, eos in _cases(stream):
        out, _ = call(*right, eos, table(seqs, firsts))
        _check(out, base, stream, seqs, firsts, eos, f"right/{name}")


def test_stop_at_the_last_token_and_every_row_stopping_early(samplers):
    call, _, _ = samplers["greedy"]
    tokens, mask = _layouts()["left"]
    base, _ = call(tokens, mask, NO_EOS, NONE)
    stream = base["tokens_BxR"]
    last = [stream[1, R - 2:].tolist()]  # completes at the very last step
    out, _ = call(tokens, mask, NO_EOS, table(last))
    _check(out, base, stream, last, None, NO_EOS, "last")
    if reference(stream[1], last, [[last[0][0]]], NO_EOS)[0] == R - 2:
        assert out["stopped_B"][1] and out["lengths_B"][1] == R - 2
    every = [row[1:3].tolist() for row in stream]  # every row stops by its third token
    out, calls = call(tokens, mask, NO_EOS, table(every))
    _check(out, base, stream, every, None, NO_EOS, "every")
    assert out["stopped_B"].all() and calls <= 3


def _scan_matcher(streams_BxT, stops: StopTable):
    """The loop's matcher (push_tail + stop_hits) over scripted streams: per row, the step
    of the first hit and its stop length (T, 0 where none)."""
    b, t = streams_BxT.shape

    def step(c, x):
        tail, hit_at, hit_len = c
        i, tok_B = x
        tail = sampling.push_tail(tail, tok_B)
        h = sampling.stop_hits(tail, stops)
        new = (hit_len == 0) & (h > 0)
        return (tail, jnp.where(new, i, hit_at), jnp.where(new, h, hit_len)), None

    init = (jnp.full((b, stops.ids_SxW.shape[1]), -1, jnp.int32), jnp.full((b,), t, jnp.int32),
            jnp.zeros((b,), jnp.int32))
    (_, hit_at, hit_len), _ = jax.lax.scan(step, init, (jnp.arange(t), streams_BxT.T))
    return hit_at, hit_len


def test_matcher_on_scripted_streams_against_reference():
    """Random streams over 3 tokens: overlapping and self-overlapping stops ("1 1 2" in
    "1 1 1 2", "1 2 1 2" in "1 2 1 2 1 2"), partial matches, first-token classes, stops
    that are suffixes of others; many tables of one shape, one compile."""
    rng = np.random.default_rng(0)
    vocab, b, t = 8, 32, 16
    match = jax.jit(_scan_matcher)
    for trial in range(40):
        streams = rng.integers(1, 4, (b, t)).astype(np.int32)
        n = rng.integers(1, S + 1)
        seqs = [rng.integers(1, 4, rng.integers(1, W + 1)).tolist() for _ in range(n)]
        firsts = [sorted({q[0], *rng.integers(1, 4, rng.integers(0, 2)).tolist()})
                  for q in seqs]
        tab = stop_table_from_ids(seqs, vocab, first=firsts, slots=S, width=W)
        hit_at, hit_len = map(np.asarray, match(jnp.asarray(streams), tab))
        for r in range(b):
            length, stop_len, _, stopped = reference(streams[r], seqs, firsts, NO_EOS)
            want = (length + stop_len - 1, stop_len) if stopped else (t, 0)
            assert (hit_at[r], hit_len[r]) == want, (trial, seqs, firsts, streams[r].tolist())
    assert match._cache_size() == 1


def test_stop_table_from_ids_layout():
    tab = stop_table_from_ids([[5, 6, 7], [9]], 12, first=[[5, 8], [9]], slots=3, width=4)
    np.testing.assert_array_equal(tab.ids_SxW, [[-1, 5, 6, 7], [-1, -1, -1, 9], [-1] * 4])
    np.testing.assert_array_equal(tab.lengths_S, [3, 1, 0])
    assert tab.first_SxV[0].nonzero()[0].tolist() == [5, 8]
    assert tab.first_SxV[1].nonzero()[0].tolist() == [9] and not tab.first_SxV[2].any()
    with pytest.raises(ValueError, match="do not fit"):
        stop_table_from_ids([[1, 2, 3]], 12, slots=1, width=2)
    with pytest.raises(ValueError, match="empty"):
        stop_table_from_ids([[]], 12)


def _find_stop(ids, tab):
    """Pure-Python: (cut, stop tokens) of the first stop in a token list, or None."""
    seqs = [row[len(row) - n:].tolist() for row, n in zip(tab.ids_SxW, tab.lengths_S,
                                                           strict=True) if n]
    firsts = [set(f.nonzero()[0].tolist()) for f, n in zip(tab.first_SxV, tab.lengths_S,
                                                           strict=True) if n]
    length, stop_len, _, stopped = reference(ids, seqs, firsts, NO_EOS)
    return (length, stop_len) if stopped else None


STOP = "\n\nHuman:"
TEXTS = ["Sure, it is 42.", "Is it?", "Yes!", "(see above)", "word", "a list:", "end. ",
         "quoted.”", "3", ""]


def _check_tokenizer(tok, max_lost: int):
    """For text that ends with a stop string's turn, the table finds the stop where the
    tokenizer put it: the response is the text (but up to `max_lost` characters merged into
    the stop's first token), and the response never holds the stop."""
    tab = sampling.stop_table(tok, [STOP])
    lost = {}
    for text in TEXTS:
        ids = tok.encode(text + STOP + " And then?")
        found = _find_stop(ids, tab)
        assert found is not None, (text, [tok.decode([i]) for i in ids])
        cut, n = found
        body = tok.decode(ids[:cut])
        assert text.startswith(body) and len(text) - len(body) <= max_lost, (text, body)
        assert tok.decode(ids[:cut + n]) == text + STOP
        assert _find_stop(tok.encode(text), tab) is None
        lost[text] = text[len(body):]
    return tab, lost


def test_stop_table_byte_tokenizer():
    tok = ByteTokenizer()
    tab, lost = _check_tokenizer(tok, max_lost=0)
    assert tab.lengths_S.tolist() == [len(STOP)]
    assert tab.ids_SxW[0].tolist() == tok.encode(STOP)
    assert tab.first_SxV[0].nonzero()[0].tolist() == tok.encode("\n")
    assert not any(lost.values())


def test_stop_table_sentencepiece_merges(tmp_path):
    """A sentencepiece model trained on HH-like text merges punctuation with the newlines
    (".\\n\\n"): the stop begins with any token ending in "\\n\\n", so the cut loses that
    punctuation but never lets "Human:" through; characters the table never saw before
    the stop ("”", ":") are found as well."""
    corpus = [f"\n\nHuman: What is {i} plus {i + 1}?\n\nAssistant: It is {2 * i + 1}."
              f"\n\nHuman: Really?\n\nAssistant: Yes (I think)!\n\nHuman: “ok”.\n\nHuman: a:"
              f"\n\nAssistant: fine," for i in range(200)]
    tok = SentencePieceTokenizer.train(corpus, str(tmp_path / "sp"), vocab_size=400)
    merged = [t for t in (".", "?", "!", ")") if len(tok.encode(t + "\n\n")) == 1]
    assert merged, "test setup: the tokenizer merged no punctuation with newlines"
    tab, lost = _check_tokenizer(tok, max_lost=2)
    assert any(lost.values())  # the merged punctuation goes with the stop
    # a second set of strings pads to the same shape: the same compiled sampler
    fixed = sampling.stop_table(tok, [STOP, "\n\nAssistant:"], slots=8, width=6)
    assert fixed.ids_SxW.shape == (8, 6) and fixed.first_SxV.shape == (8, tok.vocab_size)
    assert sampling.stop_table(tok, [STOP], slots=8, width=6).ids_SxW.shape == (8, 6)
    with pytest.raises(ValueError, match="empty stop string"):
        sampling.stop_table(tok, [""])


def test_stop_table_pretrained_bpe():
    try:
        tok = load_tokenizer("smollm2-135m")
    except (FileNotFoundError, ValueError, ImportError) as e:
        pytest.skip(f"SmolLM2 tokenizer not installed: {e}")
    # byte-level BPE keeps punctuation apart from "\n"; only a space merges with it (" \n")
    tab, lost = _check_tokenizer(tok, max_lost=1)
    assert all(not x.strip() for x in lost.values()) and lost["end. "] == " "
    assert tab.first_SxV.shape[1] == tok.vocab_size


def test_table_narrower_than_the_model_vocab_is_padded():
    """A tokenizer vocabulary below the model's (padded embeddings): the masks widen."""
    tab = stop_table_from_ids([[7, 8]], 100, slots=S, width=W)
    dev = sampling._device_stops(tab, V)
    assert dev.first_SxV.shape == (S, V) and bool(dev.first_SxV[0, 7])
    with pytest.raises(ValueError, match="model vocabulary"):
        sampling._device_stops(stop_table_from_ids([[7]], V + 1), V)


def test_no_stops_keeps_the_result(samplers):
    """stops=None: no stop logic in the program, the same draws as an unused table."""
    call, _, _ = samplers["scan"]
    tokens, mask = _layouts()["left"]
    with_table, _ = call(tokens, mask, NO_EOS, NONE)
    run = jit(functools.partial(sampling.sample, model=Transformer(CFG), cfg=CONFIGS["scan"],
                                eos_id=NO_EOS, pad_id=PAD))
    out = jax.tree_util.tree_map(np.asarray, run(random_params(CFG, seed=1), tokens, mask,
                                                 jax.random.key(7)))
    for k in ("tokens_BxR", "lengths_B", "ended_B", "stopped_B", "stop_lengths_B"):
        np.testing.assert_array_equal(out[k], with_table[k], err_msg=k)
    np.testing.assert_allclose(out["logprobs_BxR"], with_table["logprobs_BxR"], atol=1e-6)
