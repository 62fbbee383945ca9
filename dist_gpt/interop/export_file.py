"""Our export, one .safetensors file: `python -m dist_gpt.export RUN --out FILE` writes it (save_exported), and
`model.init_from=FILE` / `sample --ckpt FILE` read it (load_exported).

The file holds our state dict (a tied lm_head.weight left out: it is wte.weight, and safetensors refuses tensors
that share memory) and the GPTConfig as JSON in its metadata under "gpt_config", so the file alone rebuilds the model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from dist_gpt.errors import UserError
from dist_gpt.interop.shared import OUR_CONFIG_KEY, build_checked, first_line, our_config_json, readable_by_all
from dist_gpt.model import GPT, GPTConfig


def is_export_file(source: str | os.PathLike) -> bool:
    return str(source).endswith(".safetensors")


def save_exported(model: GPT, path: str | os.PathLike) -> None:
    """Write an unwrapped GPT (full tensors, not DDP/FSDP/DeepSpeed shards) to one .safetensors file."""
    tied = model.config.tie_embeddings
    state_dict = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items() if not (tied and name == "lm_head.weight")}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, path, metadata={"format": "pt", OUR_CONFIG_KEY: our_config_json(model.config)})
    readable_by_all(path)


def load_exported(path: str | os.PathLike, **overrides) -> GPT:
    """The GPT saved by save_exported, on the CPU in fp32; overrides as for shared.build_checked."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file: pass a .safetensors file written by the export")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            state_dict = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # SafetensorError on anything that is not a safetensors file
        raise UserError(f"{path}: not a readable safetensors file ({first_line(e)})") from None
    if OUR_CONFIG_KEY not in metadata:
        raise UserError(f"{path}: no {OUR_CONFIG_KEY!r} in its metadata, so not a dist_gpt export (a Hugging Face GPT-2? pass its directory)")
    try:
        saved = GPTConfig(**json.loads(metadata[OUR_CONFIG_KEY]))
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: its {OUR_CONFIG_KEY!r} metadata is not a GPTConfig ({e})") from None
    return build_checked(saved, state_dict, overrides, source=path)
