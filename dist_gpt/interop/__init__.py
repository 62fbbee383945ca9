"""Models in and out of other formats, one reader and one writer per format, and `load_model`, which picks the reader.

    shared.py          what the readers and writers share: HF config.json / weights files, the state-dict checks,
                       building the checked GPT (no reader imports another reader)
    openai_gpt2.py     reader: OpenAI's GPT-2 in Hugging Face's format (a hub name or a local directory)
    export_file.py     reader + writer: our one .safetensors file (`export --out`)
    hf_dir.py          reader + writer: our transformers directory (`export --hf`: GPT2LMHeadModel / GPTNeoXForCausalLM)
    checkpoint_dir.py  reader: our checkpoints (run, checkpoints/ or step_N dir), consolidated in one process

May import: core (model, config, tokenizer, errors), checkpoint/ (to read a run's weights). Never: engine/, train/.
"""

from __future__ import annotations

import os
from pathlib import Path

from dist_gpt.errors import UserError
from dist_gpt.interop import checkpoint_dir, export_file, hf_dir, openai_gpt2
from dist_gpt.model import GPT


def describe_source(source: str | os.PathLike, position: str = "learned") -> str:
    """What load_model(source) reads, in words, for a run's first line (position: the run's, for OpenAI's GPT-2)."""
    if export_file.is_export_file(source):
        return f"our export {source}"
    if checkpoint_dir.is_checkpoint(source):
        return f"the checkpoint {source} (its weights only)"
    if hf_dir.is_export(source):
        return f"our `export --hf` directory {source}"
    kept = "every weight" if position == "learned" else "every weight but the position table (RoPE relearns positions)"
    return f"OpenAI's GPT-2 {source} ({'a local directory' if Path(source).expanduser().is_dir() else 'by name'}; {kept})"


def load_model(source: str | os.PathLike, defaults: dict | None = None, **overrides) -> GPT:
    """The GPT held by source, on the CPU in fp32, read by the reader of its format:

      a .safetensors file                          our export (export_file)
      a run, checkpoints/ or step_N directory      our checkpoint (checkpoint_dir)
      a directory `export --hf` wrote              our transformers directory, either architecture (hf_dir)
      gpt2 ... gpt2-xl, or another HF directory    OpenAI's GPT-2 (openai_gpt2)

    defaults: GPTConfig fields the source does not record, used only then: OpenAI's GPT-2 says nothing of
    position (default 'learned': GPT-2 as OpenAI trained it; fine-tuning may choose 'rope'), rope_theta or
    tie_embeddings; our formats record them all. overrides: fields
    that replace the source's and do not change its shapes (dropout, attn_backend, loss, block_size, ...)."""
    if export_file.is_export_file(source):
        return export_file.load_exported(source, **overrides)
    if checkpoint_dir.is_checkpoint(source):
        return checkpoint_dir.load_checkpoint(source, **overrides)
    if hf_dir.is_export(source):
        return hf_dir.load_export(source, **overrides)
    path = Path(source).expanduser()
    if openai_gpt2.is_gpt2_name(source) or (path / "config.json").is_file():
        return openai_gpt2.load_hf_gpt2(source, **{"position": "learned", **(defaults or {}), **overrides})
    found = "neither a checkpoint nor a directory with a config.json" if path.exists() else "no such file or directory"
    raise UserError(
        f"{source}: {found}, and not a GPT-2 name ({', '.join(openai_gpt2.GPT2_NAMES)}): give a run directory "
        "(or its checkpoints/ or a step_* directory), an exported .safetensors file, an `export --hf` directory or a Hugging Face GPT-2 directory"
    )
