"""Pretrained checkpoints: the model-name registry, the GGUF reader, and the GGUF / HF
safetensors import and export (convert)."""
