"""hh_jax: Bai et al. 2022 (HH-RLHF) in JAX/Flax: PMP, PMs, PPO with a KL penalty, evals."""

__version__ = "0.1.0"
