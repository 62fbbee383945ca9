"""dist_gpt: train GPT-2-style models on one device or many (DDP, FSDP2, DeepSpeed ZeRO)."""

__version__ = "0.1.0"
