"""The reader of OpenAI's GPT-2 in Hugging Face's format: `load_hf_gpt2` -> our GPT.

The source (`load_hf_gpt2`): a local directory holding `config.json` and `model.safetensors` (or
`pytorch_model.bin`), or one of the names gpt2, gpt2-medium, gpt2-large, gpt2-xl, fetched from the hub when
there is internet. Our module names are HF's without the `transformer.` prefix; the differences are:
  - HF stores the attention and MLP matrices as Conv1D, shaped (in, out): we transpose them to nn.Linear's (out, in);
  - HF keeps the causal mask as buffers (`attn.bias`, `attn.masked_bias`): SDPA's is_causal replaces them;
  - the embedding is padded from 50257 to 50304 rows; `lm_head` is tied to `wte`, so it is not read (with
    tie_embeddings=false our lm_head gets its own copy of wte: it starts as GPT-2's output layer and then
    trains apart from the input embedding).
With position='rope' everything but the learned position table `wpe` is loaded, and positions are relearned.
No writer here: `export --hf` (hf_dir.py) writes a learned-position model in this very format (GPT2LMHeadModel).
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import torch

from dist_gpt.errors import UserError
from dist_gpt.interop.shared import (
    FIXED_FIELDS,
    TANH_GELUS,
    first_line,
    misfit,
    model_from_state_dict,
    model_shapes,
    read_hf_config,
    read_hf_weights,
    with_overrides,
)
from dist_gpt.model import GPT, GPT2_VOCAB_SIZE, GPTConfig

log = logging.getLogger(__name__)

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HUB_ORG = "openai-community"  # where the hub keeps OpenAI's GPT-2 releases (the bare names redirect there)
HF_MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # the causal-mask buffers, not weights
CONV1D_MODULES = ("c_attn", "c_proj", "c_fc")  # HF GPT-2's Conv1D layers: weight stored (in, out)


def is_gpt2_name(source: str | os.PathLike) -> bool:
    return str(source) in GPT2_NAMES


def load_hf_gpt2(source: str | os.PathLike, position: str = "rope", **overrides) -> GPT:
    """A GPT holding a Hugging Face GPT-2 checkpoint, on the CPU in fp32.

    source: a directory (config.json + weights) or a GPT-2 name. position: 'learned' loads every tensor and
    reproduces the original model; 'rope' loads all but wpe. overrides: other GPTConfig fields (dropout,
    attn_backend, loss, block_size: smaller with learned positions, any with RoPE); the shape fields come
    from the checkpoint."""
    directory = _resolve(source)
    config = _config_from_hf(read_hf_config(directory), position, overrides, directory)
    weights_path, hf_state_dict = read_hf_weights(directory)
    try:
        state_dict = hf_state_dict_to_ours(hf_state_dict, config)
    except UserError as e:
        raise UserError(f"{weights_path}: {e}") from None
    model = model_from_state_dict(config, state_dict)
    if position == "rope":
        log.warning("%s: loaded with RoPE positions; its learned position table (wpe) is dropped, so positions are relearned by fine-tuning", source)
    return model


def hf_state_dict_to_ours(hf_state_dict: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Rename, transpose, pad and crop HF GPT-2 tensors into the state dict of GPT(config): lm_head is left
    out when tied to wte, and is a copy of wte when not. Raises one UserError listing every key that is
    missing, unexpected or of the wrong shape, with shapes as the checkpoint stores them."""
    wanted = model_shapes(config)
    del wanted["lm_head.weight"]
    ours, seen, problems = {}, set(), []
    for hf_key, tensor in hf_state_dict.items():
        name = hf_key.removeprefix("transformer.")
        if name == "lm_head.weight" or HF_MASK_BUFFER.fullmatch(name):
            continue  # the tied output matrix (it is wte) and the causal-mask buffers
        if name == "wpe.weight" and config.position == "rope":
            continue  # RoPE has no position table
        if name not in wanted:
            problems.append(f"{hf_key}: unexpected, the model has no such tensor")
            continue
        seen.add(name)
        converted = _hf_to_our_layout(name, tensor, config)
        if tuple(converted.shape) != wanted[name]:
            problems.append(f"{hf_key}: checkpoint has {tuple(tensor.shape)}, model expects {_hf_layout(name, wanted[name], config)}")
            continue
        ours[name] = converted
    problems += [f"{name}: missing from the checkpoint" for name in wanted if name not in seen]
    if problems:
        raise UserError(misfit("checkpoint", problems, config))
    if not config.tie_embeddings:
        ours["lm_head.weight"] = ours["wte.weight"].clone()  # GPT-2's output layer is its wte: start the untied head there
    return ours


def _hf_to_our_layout(name: str, tensor: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    if name.endswith(".weight") and name.split(".")[-2] in CONV1D_MODULES and tensor.dim() == 2:
        return tensor.t().contiguous()
    if name == "wte.weight" and tensor.size(0) == config.tokenizer_vocab_size:
        # The pad rows are zero, not random: loading stays deterministic (no RNG), and a zero row gives a
        # constant logit of 0 that training pushes down. They are never inputs, and generate() masks them.
        padding = tensor.new_zeros(config.vocab_size - tensor.size(0), tensor.size(1))
        return torch.cat((tensor, padding))
    if name == "wpe.weight":
        return tensor[: config.block_size].contiguous()  # a smaller block_size keeps the first positions
    return tensor


def _hf_layout(name: str, our_shape: tuple[int, ...], config: GPTConfig) -> str:
    """Our expected shape, said in the checkpoint's terms so it compares with what the file holds."""
    if name.endswith(".weight") and name.split(".")[-2] in CONV1D_MODULES:
        return f"{our_shape[::-1]} (Conv1D, stored (in, out))"
    if name == "wte.weight":
        return str((config.tokenizer_vocab_size, config.n_embd))
    if name == "wpe.weight":
        return f"({config.block_size} or more, {config.n_embd})"
    return str(our_shape)


def _config_from_hf(hf: dict, position: str, overrides: dict, directory: Path) -> GPTConfig:
    where = directory / "config.json"
    if hf.get("model_type") != "gpt2":
        raise UserError(f"{where}: model_type is {hf.get('model_type')!r}, not 'gpt2': only GPT-2 checkpoints can be imported")
    shape = {}
    for name in ("n_layer", "n_head", "n_embd", "n_positions"):
        if not isinstance(hf.get(name), int):
            raise UserError(f"{where}: {name} is {hf.get(name)!r}, not an integer: is this a GPT-2 config?")
        shape[name] = hf[name]
    unsupported = _unsupported_setting(hf)
    if unsupported:
        raise UserError(f"{where}: {unsupported}, which our GPT does not implement")
    base = GPTConfig(n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"], block_size=shape["n_positions"], position=position, bias=True)
    # vocab_size may differ: the padding of the embedding is ours to choose, not the checkpoint's; and so may
    # tie_embeddings: an untied head starts as a copy of the tied matrix.
    fixed = tuple(name for name in FIXED_FIELDS if name not in ("vocab_size", "tie_embeddings"))
    config = with_overrides(base, overrides, fixed=fixed, source=where)
    if position == "learned" and config.block_size > shape["n_positions"]:
        raise UserError(f"block_size={config.block_size} exceeds the checkpoint's n_positions={shape['n_positions']}: learned positions stop there; use block_size <= {shape['n_positions']} or position='rope'")
    return config


def _unsupported_setting(hf: dict) -> str | None:
    """The first config.json setting that changes GPT-2's computation away from what our GPT does."""
    n_embd = hf["n_embd"]
    # (field, HF's default when absent, accepted?, what we implement)
    settings = [
        ("vocab_size", GPT2_VOCAB_SIZE, lambda v: v == GPT2_VOCAB_SIZE, f"{GPT2_VOCAB_SIZE}, the GPT-2 tokenizer's"),
        ("activation_function", "gelu_new", lambda v: v in TANH_GELUS, "the tanh GELU (gelu_new)"),
        ("n_inner", None, lambda v: v in (None, 4 * n_embd), f"an MLP of 4 x n_embd = {4 * n_embd}"),
        ("layer_norm_epsilon", 1e-5, lambda v: isinstance(v, (int, float)) and math.isclose(v, 1e-5), "1e-5"),
        ("scale_attn_weights", True, lambda v: v is True, "true"),
        ("scale_attn_by_inverse_layer_idx", False, lambda v: v is False, "false"),
        ("add_cross_attention", False, lambda v: v is False, "false"),
        ("tie_word_embeddings", True, lambda v: v is True, "true (lm_head tied to wte)"),
    ]
    for field, default, accepted, implemented in settings:
        value = hf.get(field, default)
        if not accepted(value):
            return f"{field} is {value!r} (we implement {implemented})"
    return None


def _resolve(source: str | os.PathLike) -> Path:
    """The local directory for source; a GPT-2 name is downloaded unless a directory of that name exists."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if is_gpt2_name(source):
        return _download(str(source))
    if path.exists():
        raise UserError(f"{path} is a file: pass the directory that holds config.json and model.safetensors")
    raise UserError(f"{source}: no such directory, and not a GPT-2 name ({', '.join(GPT2_NAMES)})")


def _download(name: str) -> Path:
    repo = f"{HUB_ORG}/{name}"
    try:
        from huggingface_hub import snapshot_download  # lazy: only this path needs it

        return Path(snapshot_download(repo, allow_patterns=["config.json", "model.safetensors"]))
    except Exception as e:  # no package, no network, offline mode, hub errors: all have the same fix
        raise UserError(
            f"cannot fetch {name!r} from the Hugging Face hub ({first_line(e)}): on a machine with internet run "
            f"`hf download {repo} config.json model.safetensors --local-dir {name}`, copy that directory here and pass its path"
        ) from None
