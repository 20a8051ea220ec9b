"""Labeling comparisons: the pairs file and the append-only comparisons store (`store`),
and the local labeling web page (`server`, `hh-jax label`)."""
