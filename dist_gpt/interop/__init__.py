"""Models in and out of other formats: OpenAI's GPT-2 (Hugging Face) in, our .safetensors export, and the
`export --hf` directory (GPT2LMHeadModel / GPTNeoXForCausalLM) both ways.

    openai_gpt2.py   OpenAI's GPT-2 weights (the hub or a local HF directory) -> our GPT; our .safetensors file
    hf_dir.py        our GPT <-> a transformers directory

May import: core (model, config, tokenizer, errors), checkpoint/ (to read a run's weights). Never: engine/, train/.
"""

from __future__ import annotations

from pathlib import Path

import torch


def load_model(path: str | Path, device: torch.device | str = "cpu"):
    """A GPT ready for inference from a checkpoint (run dir, checkpoints dir, step dir) or an export (.safetensors)."""
    from dist_gpt.checkpoint.consolidate import consolidated_state_dict
    from dist_gpt.model import GPT

    if str(path).endswith(".safetensors"):
        from dist_gpt.interop.openai_gpt2 import load_exported

        model = load_exported(path)
    else:
        config, state = consolidated_state_dict(path)
        model = GPT(config.model.gpt_config())
        model.load_state_dict(state)
    return model.to(device).eval()
