"""Our GPT as a Hugging Face `transformers` directory, and back: `python -m dist_gpt.export RUN --hf DIR`.

The directory loads with `AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`,
no custom code, into a stock architecture whose computation is ours (checked against transformers 5.24's code):

- learned positions -> GPT2LMHeadModel: the same module tree (our names are its names without `transformer.`).
  Its Conv1D layers store weights (in, out): ours are transposed. GPT-2 always has Linear and LayerNorm
  biases: with bias=false they are written as zeros, which add nothing.
- RoPE -> GPTNeoXForCausalLM with use_parallel_residual=false (x + attn(ln_1 x), then + mlp(ln_2 .), our
  block), rotary on the whole head (partial_rotary_factor 1.0) with our theta, the same "rotate half" pairing
  (i, i + head_dim/2) and cos/sin tables as our RotaryEmbedding, scores scaled by 1/sqrt(head_dim) as SDPA
  does. Its fused query_key_value is laid out per head ([q_h, k_h, v_h] for each head h), ours as [q | k | v]:
  the rows are regrouped. Its MLP and LayerNorms always have biases (zeros when bias=false); attention_bias
  follows ours.
- the GELU is "gelu_pytorch_tanh": transformers' name for F.gelu(approximate="tanh"), the very call our MLP
  makes ("gelu_new" is the same function written out in Python, equal to ours only up to rounding).
- LayerNorm eps 1e-5: nn.LayerNorm's default, which our model uses.

The padded vocabulary: our embedding has 50304 rows (matmul speed, even shards); the tokenizer emits 50257 ids
and our generate() never samples a padded id. The export keeps only the 50257 real rows. The logits of every
real id are unchanged, so greedy and sampled generation are exactly ours, no engine (transformers, vLLM, ...)
can emit a padded id, and the model's vocabulary is its tokenizer's. Only a loss over the full softmax moves:
ours also normalises over the padded logits, which training pushes towards -inf, so the exported model's loss
is lower by -log(1 - their share of the probability): 7e-5 nats after 100 steps of a tiny model (tests check the
identity).
The padded rows are kept beside the model in dist_gpt.safetensors, with our config, so that
`model.init_from=DIR` restores our model bit for bit; transformers never reads that file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dist_gpt import tokenizer
from dist_gpt.errors import UserError
from dist_gpt.interop.shared import (
    OUR_CONFIG_KEY,
    TANH_GELUS,
    build_checked,
    misfit,
    model_shapes,
    our_config_json,
    read_hf_config,
    read_hf_weights,
    readable_by_all,
)
from dist_gpt.model import GPT, GPTConfig, gpt_config_fields

WEIGHTS = "model.safetensors"
SIDECAR = "dist_gpt.safetensors"  # what transformers has no place for: the padding rows and our config
GELU = "gelu_pytorch_tanh"
LAYER_NORM_EPS = 1e-5
GPT2_CONV1D = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
# Our name -> GPT-NeoX's (per block; `h.N.` becomes `gpt_neox.layers.N.`).
NEOX_BLOCK_NAMES = {
    "ln_1": "input_layernorm",
    "ln_2": "post_attention_layernorm",
    "attn.c_attn": "attention.query_key_value",
    "attn.c_proj": "attention.dense",
    "mlp.c_fc": "mlp.dense_h_to_4h",
    "mlp.c_proj": "mlp.dense_4h_to_h",
}
# embed_out: transformers 4.x's name for an untied NeoX output layer; 5.x reads it as lm_head (and writes that)
NEOX_TOP_NAMES = {"wte": "gpt_neox.embed_in", "ln_f": "gpt_neox.final_layer_norm", "lm_head": "embed_out"}


def is_tied(config: GPTConfig) -> bool:
    """Whether the output layer is the token embedding (model.tie_embeddings, true when the field is absent)."""
    return getattr(config, "tie_embeddings", True)


# ------------------------------------------------------------------------------------------ names


def hf_name(name: str, position: str) -> str:
    """Our parameter name -> the Hugging Face model's."""
    if position == "learned":
        return name if name.startswith("lm_head.") else f"transformer.{name}"
    block = re.fullmatch(r"h\.(\d+)\.(.+)\.(weight|bias)", name)
    if block:
        layer, module, kind = block.groups()
        return f"gpt_neox.layers.{layer}.{NEOX_BLOCK_NAMES[module]}.{kind}"
    module, kind = name.rsplit(".", 1)
    return f"{NEOX_TOP_NAMES[module]}.{kind}"


def biased_modules(config: GPTConfig) -> list[str]:
    """Our modules that have a bias in the Hugging Face architecture (present there whatever our config says)."""
    names = ["ln_f"]
    for i in range(config.n_layer):
        names += [f"h.{i}.{m}" for m in ("ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj")]
        if config.position == "learned" or config.bias:  # GPT-NeoX: attention biases only with attention_bias
            names += [f"h.{i}.attn.c_attn", f"h.{i}.attn.c_proj"]
    return names


# ------------------------------------------------------------------------------------------ layouts


def to_hf_layout(name: str, tensor: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    if name in ("wte.weight", "lm_head.weight"):
        return tensor[: config.tokenizer_vocab_size]
    if config.position == "learned":
        return tensor.t() if GPT2_CONV1D.fullmatch(name) else tensor
    if name.endswith("attn.c_attn.weight") or name.endswith("attn.c_attn.bias"):
        # [q | k | v], each n_head x head_dim rows -> per head [q_h, k_h, v_h]
        return tensor.reshape(3, config.n_head, config.head_dim, -1).transpose(0, 1).reshape(tensor.shape)
    return tensor


def from_hf_layout(name: str, tensor: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    """The inverse of to_hf_layout, except the vocabulary rows (the caller puts the padding back)."""
    if config.position == "learned":
        return tensor.t() if GPT2_CONV1D.fullmatch(name) else tensor
    if name.endswith("attn.c_attn.weight") or name.endswith("attn.c_attn.bias"):
        return tensor.reshape(config.n_head, 3, config.head_dim, -1).transpose(0, 1).reshape(tensor.shape)
    return tensor


# ------------------------------------------------------------------------------------------ export


def export_hf(model: GPT, out_dir: str | os.PathLike) -> Path:
    """Write model (unwrapped, full tensors) as a Hugging Face directory: config.json, model.safetensors,
    generation_config.json, the GPT-2 tokenizer files, and dist_gpt.safetensors. Written into a temporary
    sibling and renamed into place, so a crash leaves no half directory; an existing out_dir is replaced."""
    config, out_dir = model.config, Path(out_dir)
    ours = {name: t.detach().to("cpu", torch.float32) for name, t in model.state_dict().items()}
    if is_tied(config):
        del ours["lm_head.weight"]  # it is wte.weight
    weights = {hf_name(name, config.position): to_hf_layout(name, t, config).contiguous() for name, t in ours.items()}
    for module in biased_modules(config):
        if f"{module}.bias" not in ours:  # bias=false: a zero bias adds nothing
            weights.setdefault(hf_name(f"{module}.bias", config.position), torch.zeros(ours[f"{module}.weight"].shape[0]))
    padding = {name: ours[name][config.tokenizer_vocab_size :].contiguous() for name in ("wte.weight", "lm_head.weight") if name in ours}

    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, tmp / WEIGHTS, metadata={"format": "pt"})
    save_file(padding, tmp / SIDECAR, metadata={"format": "pt", OUR_CONFIG_KEY: our_config_json(config)})
    write_json(tmp / "config.json", hf_config(config))
    write_json(tmp / "generation_config.json", generation_config(config))
    write_tokenizer(tmp, config.block_size)
    for path in tmp.iterdir():
        readable_by_all(path)
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def hf_config(config: GPTConfig) -> dict:
    common = dict(
        vocab_size=config.tokenizer_vocab_size,
        tie_word_embeddings=is_tied(config),
        bos_token_id=tokenizer.EOT_ID,
        eos_token_id=tokenizer.EOT_ID,
        initializer_range=0.02,
        use_cache=True,
        dtype="float32",
    )
    if config.position == "learned":
        return dict(
            architectures=["GPT2LMHeadModel"],
            model_type="gpt2",
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_embd=config.n_embd,
            n_positions=config.block_size,
            n_inner=4 * config.n_embd,
            activation_function=GELU,
            layer_norm_epsilon=LAYER_NORM_EPS,
            embd_pdrop=config.dropout,
            attn_pdrop=config.dropout,
            resid_pdrop=config.dropout,
            scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=False,
            reorder_and_upcast_attn=False,
            **common,
        )
    return dict(
        architectures=["GPTNeoXForCausalLM"],
        model_type="gpt_neox",
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        hidden_size=config.n_embd,
        intermediate_size=4 * config.n_embd,
        max_position_embeddings=config.block_size,
        hidden_act=GELU,
        layer_norm_eps=LAYER_NORM_EPS,
        use_parallel_residual=False,
        attention_bias=config.bias,
        attention_dropout=config.dropout,
        hidden_dropout=config.dropout,
        # transformers 5 reads rope_parameters; 4.x reads rotary_pct and rotary_emb_base: both say the same
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta, "partial_rotary_factor": 1.0},
        rotary_pct=1.0,
        rotary_emb_base=config.rope_theta,
        **common,
    )


def generation_config(config: GPTConfig) -> dict:
    """`python -m dist_gpt.sample`'s defaults; generation stops at <|endoftext|>. No max_length: with one here,
    transformers warns on every `generate(max_new_tokens=...)` (the README's call) that both are set. The
    context the model was trained on is config.json's n_positions / max_position_embeddings."""
    return dict(
        bos_token_id=tokenizer.EOT_ID,
        eos_token_id=tokenizer.EOT_ID,
        pad_token_id=tokenizer.EOT_ID,  # GPT-2 has no padding token; batched generation pads with <|endoftext|>
        do_sample=True,
        temperature=0.8,
        top_k=200,
    )


def write_tokenizer(directory: Path, block_size: int) -> None:
    """GPT-2's tokenizer for AutoTokenizer: HF's vocab.json is encoder.json and merges.txt is vocab.bpe (the same
    formats: a token -> id map; a "#version" line, then one merge a line), the very files our tokenizer reads."""
    vocab_bpe, encoder_json = tokenizer.gpt2_files()
    shutil.copyfile(encoder_json, directory / "vocab.json")
    shutil.copyfile(vocab_bpe, directory / "merges.txt")
    eot = tokenizer.EOT_TOKEN
    write_json(directory / "tokenizer_config.json", dict(
        tokenizer_class="GPT2Tokenizer",  # GPT2TokenizerFast under transformers 4.x: GPT-NeoX's own class is another BPE
        model_max_length=block_size,
        bos_token=eot,
        eos_token=eot,
        unk_token=eot,
        add_prefix_space=False,
        add_bos_token=False,
    ))  # fmt: skip
    write_json(directory / "special_tokens_map.json", dict(bos_token=eot, eos_token=eot, unk_token=eot))


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# ------------------------------------------------------------------------------------------ import


def is_export(source: str | os.PathLike) -> bool:
    """A directory export_hf wrote (or any GPT-NeoX one, which only that can be for us)."""
    directory = Path(source).expanduser()
    if (directory / SIDECAR).is_file():
        return True
    return (directory / "config.json").is_file() and read_hf_config(directory).get("model_type") == "gpt_neox"


def load_export(directory: str | os.PathLike, **overrides) -> GPT:
    """The GPT a directory export_hf wrote holds, as exported (its position, theta, biases and padding rows),
    on the CPU in fp32; overrides as for shared.build_checked."""
    config, state_dict = read_export(directory)
    return build_checked(config, state_dict, overrides, source=directory)


def read_export(directory: str | os.PathLike) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(our config, our state dict without a tied lm_head) from a directory export_hf wrote.

    dist_gpt.safetensors gives back our exact config and the padding rows. Without it (a GPT-NeoX model saved
    by transformers elsewhere) the config comes from config.json, with biases, and the padding rows are zero,
    as for OpenAI's GPT-2 weights."""
    directory = Path(directory)
    hf = read_hf_config(directory)
    config, padding = read_sidecar(directory)
    config = config or config_from_neox(hf, directory)
    check_hf_config(hf, config, directory)
    _, weights = read_hf_weights(directory)
    if config.position == "rope" and "lm_head.weight" in weights:
        weights["embed_out.weight"] = weights.pop("lm_head.weight")  # transformers 5's name for NeoX's output layer
    wanted = model_shapes(config)
    if is_tied(config):
        del wanted["lm_head.weight"]
    ours, problems = {}, []
    for name, like in wanted.items():
        tensor = weights.pop(hf_name(name, config.position), None)
        if tensor is None and name.endswith(".bias") and config.position == "rope" and ".attn." in name:
            tensor = torch.zeros(like)  # GPT-NeoX without attention_bias, imported with biases
        if tensor is None:
            problems.append(f"{hf_name(name, config.position)}: missing")
            continue
        tensor = from_hf_layout(name, tensor.float(), config)
        if name in ("wte.weight", "lm_head.weight"):
            rows = padding.get(name, tensor.new_zeros(config.vocab_size - tensor.size(0), tensor.size(1)))
            tensor = torch.cat((tensor, rows))
        if tuple(tensor.shape) != like:
            problems.append(f"{hf_name(name, config.position)}: has {tuple(tensor.shape)}, expected {like}")
        ours[name] = tensor
    for name, tensor in weights.items():  # what is left: the zero biases export_hf added, or a mismatch
        if name in {hf_name(f"{m}.bias", config.position) for m in biased_modules(config)} and not tensor.any():
            continue
        if name.endswith(IGNORED_BUFFERS):
            continue
        fix = f"; delete {SIDECAR} to import it with biases" if name.endswith(".bias") and not config.bias else ""
        problems.append(f"{name}: not in our GPT with bias={config.bias}{fix}" if name.endswith(".bias") else f"{name}: unexpected")
    if problems:
        raise UserError(misfit(str(directory / WEIGHTS), problems, config))
    return config, ours


# Buffers older transformers saved with the weights: causal masks (GPT-2, GPT-NeoX), RoPE frequencies.
IGNORED_BUFFERS = (".attn.bias", ".attn.masked_bias", "attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")


def read_sidecar(directory: Path) -> tuple[GPTConfig | None, dict[str, torch.Tensor]]:
    path = directory / SIDECAR
    if not path.is_file():
        return None, {}
    try:
        with safe_open(path, framework="pt") as f:
            saved = json.loads((f.metadata() or {}).get(OUR_CONFIG_KEY, "null"))
            padding = {name: f.get_tensor(name).float() for name in f.keys()}
        config = GPTConfig(**saved)
    except Exception as e:  # not safetensors, no or bad config: the fix is the same
        raise UserError(f"{path}: not a dist_gpt export's side file ({e}): delete it to import {directory} without it") from None
    return config, padding


def config_from_neox(hf: dict, directory: Path) -> GPTConfig:
    """Our config from a GPT-NeoX config.json alone (then with biases; the padding rows are unknown)."""
    if hf.get("model_type") != "gpt_neox":
        raise UserError(f"{directory}: model_type {hf.get('model_type')!r} and no {SIDECAR}: not written by `python -m dist_gpt.export --hf`")
    try:
        shape = dict(n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"], block_size=hf["max_position_embeddings"])
    except KeyError as e:
        raise UserError(f"{directory / 'config.json'}: no {e.args[0]}: is this a GPT-NeoX config?") from None
    untied = {"tie_embeddings": False} if not hf.get("tie_word_embeddings", False) else {}  # NeoX's default: untied
    if untied and "tie_embeddings" not in gpt_config_fields():
        raise UserError(f"{directory / 'config.json'}: tie_word_embeddings is false: our GPT ties its output layer to the embedding")
    return GPTConfig(**shape, position="rope", rope_theta=float(neox_rope(hf)["rope_theta"]), bias=True, **untied)


def neox_rope(hf: dict) -> dict:
    """GPT-NeoX's RoPE settings as transformers 5 reads them (rope_parameters, else 4.x's keys and defaults)."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hf.get("rotary_emb_base", 10000.0))
    rope.setdefault("partial_rotary_factor", hf.get("rotary_pct", 0.25))
    rope.setdefault("rope_type", rope.get("type", "default"))
    return rope


def tanh_gelu(name: str) -> str:
    return GELU if name in TANH_GELUS else name


def check_hf_config(hf: dict, config: GPTConfig, directory: Path) -> None:
    """config.json must describe our computation for `config`: else a model changed elsewhere would load wrong."""
    C = config.n_embd
    if config.position == "learned":
        checks = [
            ("model_type", hf.get("model_type"), "gpt2"),
            ("n_layer, n_head, n_embd", (hf.get("n_layer"), hf.get("n_head"), hf.get("n_embd")), (config.n_layer, config.n_head, C)),
            ("n_inner", hf.get("n_inner") or 4 * C, 4 * C),
            ("activation_function", tanh_gelu(hf.get("activation_function", "gelu_new")), GELU),
            ("layer_norm_epsilon", hf.get("layer_norm_epsilon", 1e-5), LAYER_NORM_EPS),
            ("scale_attn_weights", hf.get("scale_attn_weights", True), True),
            ("scale_attn_by_inverse_layer_idx", hf.get("scale_attn_by_inverse_layer_idx", False), False),
        ]
    else:
        rope = neox_rope(hf)
        checks = [
            ("model_type", hf.get("model_type"), "gpt_neox"),
            ("layers, heads, hidden_size", (hf.get("num_hidden_layers"), hf.get("num_attention_heads"), hf.get("hidden_size")), (config.n_layer, config.n_head, C)),
            ("intermediate_size", hf.get("intermediate_size"), 4 * C),
            ("hidden_act", tanh_gelu(hf.get("hidden_act", "gelu")), GELU),
            ("layer_norm_eps", hf.get("layer_norm_eps", 1e-5), LAYER_NORM_EPS),
            ("use_parallel_residual", hf.get("use_parallel_residual", True), False),
            ("rope type", rope["rope_type"], "default"),
            ("partial_rotary_factor", rope["partial_rotary_factor"], 1.0),
            ("rope_theta", rope["rope_theta"], config.rope_theta),
        ]
    checks.append(("vocab_size", hf.get("vocab_size"), config.tokenizer_vocab_size))
    checks.append(("tie_word_embeddings", hf.get("tie_word_embeddings", config.position == "learned"), is_tied(config)))
    for key, found, expected in checks:
        if found != expected:
            raise UserError(f"{directory / 'config.json'}: {key} is {found!r} where our GPT has {expected!r}: not a model this GPT can compute")
