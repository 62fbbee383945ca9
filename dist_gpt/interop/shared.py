"""What the readers and writers of interop/ share, so that no reader imports another: reading a Hugging Face
directory's config.json and weights, checking a state dict against the GPT it should fill, and building that GPT.

A reader turns its files into (our GPTConfig, our state dict without a tied lm_head) and ends in build_checked,
which applies the caller's overrides, checks every tensor's shape and builds the model on the CPU in fp32.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from dist_gpt.errors import UserError, read_json_file
from dist_gpt.model import GPT, SHAPE_FIELDS, GPTConfig, RotaryEmbedding, gpt_config_fields

TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all the tanh approximation our MLP uses
OUR_CONFIG_KEY = "gpt_config"  # the safetensors metadata key under which our files keep our GPTConfig as JSON
# What a checkpoint decides and an override may only repeat: the shapes, and which ids are real tokens.
FIXED_FIELDS = SHAPE_FIELDS + ("tokenizer_vocab_size",)


# ----------------------------------------------------------------------------------------------- HF files


def read_hf_config(directory: Path) -> dict:
    path = directory / "config.json"
    missing = f"{directory}: no config.json: pass a Hugging Face directory (config.json + model.safetensors)"
    config = read_json_file(path, missing=missing, corrupt=f"{path}: not readable JSON")
    if not isinstance(config, dict):
        raise UserError(f"{path}: not a JSON object")
    return config


def read_hf_weights(directory: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    for path in (directory / "model.safetensors", directory / "pytorch_model.bin"):
        if not path.is_file():
            continue
        try:
            if path.suffix == ".safetensors":
                state_dict = load_file(path)
            else:
                state_dict = torch.load(path, map_location="cpu", weights_only=True)  # never run a file's pickled code
        except Exception as e:  # SafetensorError, UnpicklingError, ...: a damaged or foreign file
            raise UserError(f"{path}: cannot read the weights ({first_line(e)})") from None
        if not isinstance(state_dict, dict) or not all(isinstance(t, torch.Tensor) for t in state_dict.values()):
            raise UserError(f"{path}: not a state dict of tensors")
        return path, state_dict
    raise UserError(f"{directory}: no model.safetensors or pytorch_model.bin: the weights are missing")


def readable_by_all(path: Path) -> None:
    """The permissions open() would give (0644 under the usual umask 022): safetensors writes its files 0600,
    but an export is made to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def our_config_json(config: GPTConfig) -> str:
    """GPTConfig's fields only (not a subclass's), as the JSON our files keep beside the weights."""
    return json.dumps({name: getattr(config, name) for name in gpt_config_fields()})


# ----------------------------------------------------------------------------------------------- checks and build


def build_checked(saved: GPTConfig, state_dict: dict[str, torch.Tensor], overrides: dict, source: str | os.PathLike) -> GPT:
    """GPT(saved + overrides) holding state_dict (ours, without a tied lm_head), every tensor's shape checked.
    overrides: GPTConfig fields that do not change shapes (dropout, attn_backend, loss, ...) and block_size:
    any with RoPE, a smaller one with learned positions (the table is cropped)."""
    config = with_overrides(saved, overrides, fixed=FIXED_FIELDS, source=source)
    if config.position == "learned" and "wpe.weight" in state_dict:  # RoPE tables are recomputed for any block_size
        if config.block_size > saved.block_size:
            raise UserError(f"block_size={config.block_size} exceeds the {saved.block_size} positions {source} learned: use block_size <= {saved.block_size}")
        state_dict["wpe.weight"] = state_dict["wpe.weight"][: config.block_size]
    wanted = model_shapes(config)
    if config.tie_embeddings:
        del wanted["lm_head.weight"]
    problems = [f"{name}: missing from the checkpoint" for name in wanted if name not in state_dict]
    problems += [f"{name}: unexpected, the model has no such tensor" for name in state_dict if name not in wanted]
    problems += [
        f"{name}: checkpoint has {tuple(t.shape)}, model expects {wanted[name]}"
        for name, t in state_dict.items()
        if name in wanted and tuple(t.shape) != wanted[name]
    ]
    if problems:
        raise UserError(f"{source}: {misfit('checkpoint', problems, config)}")
    return model_from_state_dict(config, state_dict)


def with_overrides(base: GPTConfig, overrides: dict, fixed: tuple[str, ...], source: str | os.PathLike) -> GPTConfig:
    """base with overrides applied; an override of a `fixed` field may only repeat base's value."""
    unknown = sorted(set(overrides) - set(gpt_config_fields()))
    if unknown:
        raise UserError(f"unknown model setting(s) {', '.join(unknown)}: choose from {', '.join(gpt_config_fields())}")
    for name in fixed:
        if name in overrides and overrides[name] != getattr(base, name):
            raise UserError(f"{name}={overrides[name]!r} conflicts with {source}, which has {name}={getattr(base, name)!r}: drop that setting")
    config = replace(base, **overrides)
    try:
        config.check()
    except ValueError as e:
        raise UserError(str(e)) from None
    return config


def model_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no init
        return {name: tuple(t.shape) for name, t in GPT(config).state_dict().items()}


def model_from_state_dict(config: GPTConfig, state_dict: dict[str, torch.Tensor]) -> GPT:
    """GPT(config) holding state_dict (checked already; a tied lm_head comes from the tie)."""
    # Built on the meta device and then given empty storage: GPT-2's random init, which the checkpoint
    # overwrites anyway, costs seconds of CPU for gpt2-xl.
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight  # to_empty gives each module its own new tensor: tie them again
        state_dict = {**state_dict, "lm_head.weight": state_dict["wte.weight"]}
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_parameters()  # the cos/sin tables are not in checkpoints: compute them for real
    model.load_state_dict(state_dict)
    return model


def misfit(what: str, problems: list[str], config: GPTConfig) -> str:
    """One line: `what` does not fit the model, its first problems and how many more."""
    shown = "; ".join(problems[:3])
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return f"{what} does not fit a GPT with n_layer={config.n_layer}, n_head={config.n_head}, n_embd={config.n_embd}: {shown}{more}"


def first_line(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]
