"""The training stages, each `train_and_evaluate(config, stage_dir) -> summary`: lm,
distill (context distillation → π0), pm (the pmp and pm stages), ppo, bon (best-of-n). A
stage never imports another stage or the report; what two stages share lives in the
library (hh_jax.reward, hh_jax.policy, ...)."""
