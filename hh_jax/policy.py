"""What the RL stages share: held-out prompts, sampling and scoring responses with the
train and test PMs, and the evaluation setup a held-out score depends on. PPO
(stages/ppo.py) and best-of-n (stages/bon.py) both use it, so neither stage imports the
other. `Frozen` is the one loader of params exports (policies, PMs, teachers, judges).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from hh_jax import checkpoint, ppo, reward, sampling, sharding, state
from hh_jax.data import hh
from hh_jax.model import ModelConfig, Transformer
from hh_jax.tokenizer import load_tokenizer


def load_prompts(dcfg: ConfigDict, split: str) -> list[str]:
    """Dialogue contexts (ending in "Assistant:") of one side of the split, deduplicated."""
    comps, _ = hh.load_hh_comparisons(dcfg.hh_dir, subsets=list(dcfg.subsets) or None,
                                        skip_invalid=True)
    seen, out = set(), []
    for c in hh.select_split(comps, split):
        if c.context not in seen:
            seen.add(c.context)
            out.append(c.context)
    return out


def encode_prompts(tok, prompts: list[str], q: int):
    """Left-truncated (keep the end: the last turn and "Assistant:"), left-padded to q."""
    return sampling.pad_prompts([tok.encode(p)[-q:] for p in prompts], tok.pad_id, length=q)


class Frozen:
    """A params export loaded once, for use as a frozen jit argument: `meta` (meta.json),
    `cfg` (its ModelConfig with `overrides` applied: compute-only fields such as dtype),
    `model`, `params` and their `shardings`.

    `head`: None for an LM export, "pm" for a PM export ({"backbone", "head"},
    `reward.pm_init`). With a `mesh` the params land sharded by their logical axes;
    without one they load as saved (`shardings` None)."""

    def __init__(self, path: str, mesh, head: str | None, overrides: dict | None = None):
        if head not in (None, "pm"):
            raise ValueError(f"head must be None (an LM export) or 'pm', got {head!r}")
        self.meta = checkpoint.read_meta(path)
        self.cfg = ModelConfig(**self.meta["model"]).replace(**(overrides or {}))
        self.model = Transformer(self.cfg)
        if mesh is None:
            self.params, self.shardings = checkpoint.import_params(path), None
            return
        boxed = state.lm_init(self.model) if head is None else reward.pm_init(self.model)
        abstract, self.shardings = state.param_shardings(boxed, mesh)
        self.params = checkpoint.import_params(
            path, checkpoint.abstract_with_shardings(abstract, self.shardings))


def load_models(cfg: ConfigDict, mesh):
    """(policy, train PM, test PM or None, tokenizer) of a ppo / bon stage config.
    `model_overrides` (compute-only fields: dtype, remat, attention_impl) apply to every
    model; the value model is built from the PM's."""
    over = dict(cfg.get("model_overrides", {}) or {})
    policy, pm = Frozen(cfg.policy_from, mesh, None, over), Frozen(cfg.pm_from, mesh, "pm", over)
    test_pm = Frozen(cfg.test_pm_from, mesh, "pm", over) if cfg.test_pm_from else None
    for m, path in ((pm, cfg.pm_from), (test_pm, cfg.test_pm_from)):
        if m is not None and m.cfg.vocab_size != policy.cfg.vocab_size:
            raise ValueError(f"{path}: PM vocab {m.cfg.vocab_size} != policy vocab "
                             f"{policy.cfg.vocab_size}; policy and PMs must share a tokenizer")
    return policy, pm, test_pm, load_tokenizer(checkpoint.tokenizer_spec(cfg.policy_from))


def stage_stops(cfg: ConfigDict, tok, vocab_size: int, mesh=None) -> sampling.StopTable | None:
    """The sampler's table of a ppo / bon stage's `stop_strings` (None for `()`: EOS only),
    built once on the host and, given `mesh`, placed replicated on it. The stages pass it
    to their jitted sampling as a traced argument: one compiled program for the run."""
    strings = tuple(cfg.get("stop_strings") or ())
    if not strings:
        return None
    table = sampling.stop_table(tok, strings, vocab_size=vocab_size)
    return table if mesh is None else jax.device_put(table, sharding.replicated(mesh))


def sample_and_score(policy_params, ref_params, pm_params, test_pm_params, prompts, masks, rng,
                     stops: sampling.StopTable | None = None, *, policy_model, pm_model,
                     test_pm_model, sample_cfg, tok, temperature):
    """Evaluation: responses to held-out prompts, both PMs' scores and, when `ref_params`
    is given, their KL to that reference (π0). A response ends at EOS or at one of `stops`;
    the PMs score it without its stop string, the KL covers the stop tokens too (as in
    training, `ppo.trained_mask`)."""
    ppo.check_temperature(temperature, "temperature")
    s = sampling.sample(policy_params, prompts, masks, rng, model=policy_model, cfg=sample_cfg,
                        eos_id=tok.eos_id, pad_id=tok.pad_id, stops=stops)
    pm_tokens, pm_mask, pm_len = ppo.with_eoc(s["prompt_BxQ"], s["prompt_mask_BxQ"],
                                              s["tokens_BxR"], s["lengths_B"], s["ended_B"],
                                              tok.eoc_id)
    out = {k: s[k] for k in ("tokens_BxR", "lengths_B", "ended_B", "stopped_B")}
    out["score_B"] = ppo.pm_score(pm_params, pm_tokens, pm_mask, pm_len - 1, model=pm_model)
    if test_pm_params is not None:
        out["test_score_B"] = ppo.pm_score(test_pm_params, pm_tokens, pm_mask, pm_len - 1,
                                           model=test_pm_model)
    if ref_params is not None:
        out.update(response_kl(policy_params, ref_params, s, model=policy_model,
                               temperature=temperature))
    return out


def response_kl(policy_params, ref_params, s: dict, *, model, temperature) -> dict:
    """KL of sampled responses (`sampling.sample`'s output `s`) to a reference policy.

    kl_B: the exact per-token KL summed over the response and its stop tokens (≥ 0, low
    variance); kl_sample_B: the sampled log π − log π_ref (k1, what the reward penalises);
    same expectation."""
    q = s["prompt_BxQ"].shape[1]
    mask_BxR = ppo.trained_mask(s, s["tokens_BxR"].shape[1])
    tokens = jnp.concatenate([s["prompt_BxQ"], s["tokens_BxR"]], 1)
    mask = jnp.concatenate([s["prompt_mask_BxQ"], mask_BxR], 1)
    logp_BxRxV, ref_BxRxV = (ppo.response_log_softmax(p, tokens, mask, q, model=model,
                                                      temperature=temperature)
                             for p in (policy_params, ref_params))
    k1_BxR = (ppo.token_logprobs(logp_BxRxV, s["tokens_BxR"])
              - ppo.token_logprobs(ref_BxRxV, s["tokens_BxR"]))
    return {"kl_B": (ppo.token_kl(logp_BxRxV, ref_BxRxV) * mask_BxR).sum(1),
            "kl_sample_B": (k1_BxR * mask_BxR).sum(1)}


EVAL_SETUP_KEYS = ("policy_from", "pm_from", "test_pm_from", "prompt_len", "response_len",
                   "eval_prompts")


def eval_setup(cfg: ConfigDict, temperature: float) -> dict:
    """What a held-out score depends on besides the policy: π0, both PMs, the prompts and
    the sampling. Best-of-n compares with a PPO run only where these agree (stages/bon.py)."""
    out = {k: cfg.get(k) for k in EVAL_SETUP_KEYS}
    out["prompts"] = {"hh_dir": cfg.data.hh_dir, "subsets": list(cfg.data.subsets or [])}
    out["stop_strings"] = list(cfg.get("stop_strings") or [])
    out["temperature"] = float(temperature)
    return out
