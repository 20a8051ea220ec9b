"""Data: HH-RLHF parsing and splits (hh), the jsonl reader, StackExchange PMP pairs, the
LM and PM input pipelines (loaders), TFDS builders, `hh-jax data check` (check) and the
HHH prompts (prompts/)."""
