"""`llm mtp-train`: NextN (MTP) heads for dense GGUF models by self-distillation (see train.py)."""
