"""`export --hf`: a directory transformers loads with no custom code (GPT2LMHeadModel for learned positions,
GPTNeoXForCausalLM for RoPE) that computes our logits, generates as we do, never emits a padded id, and that
`model.init_from=DIR` reads back bit for bit. The strategies' checkpoints are exported in test_parallel.py and
test_deepspeed_checkpoint.py, on the runs those tests make anyway."""

import json
import os
import stat

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_transformers_computes
from safetensors import safe_open

from dist_gpt import tokenizer
from dist_gpt.config import load_config
from dist_gpt.engine.build import build_model
from dist_gpt.errors import UserError
from dist_gpt.interop.export_file import save_exported
from dist_gpt.interop.hf_dir import SIDECAR, export_hf, load_export, read_export
from dist_gpt.model import GPT, GPTConfig
from dist_gpt.tools.export import main as export_main

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = dict(n_layer=2, n_head=4, n_embd=32, block_size=48)
ARCHITECTURE = {"rope": "GPTNeoXForCausalLM", "learned": "GPT2LMHeadModel"}


def tiny_gpt(position: str, bias: bool = True, seed: int = 0) -> GPT:
    """Random weights everywhere, LayerNorms and biases included: a swapped or dropped tensor cannot hide."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**SHAPE, position=position, bias=bias, rope_theta=500.0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("position", ["rope", "learned"])
@pytest.mark.parametrize("bias", [True, False])
def test_transformers_computes_our_logits_and_generates_as_we_do(tmp_path, position, bias):
    model = tiny_gpt(position, bias)
    hf = assert_transformers_computes(model, export_hf(model, tmp_path / "hf"))
    assert type(hf).__name__ == ARCHITECTURE[position]
    prompt = torch.tensor([tokenizer.encode("En el principio")])
    theirs = hf.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(theirs, model.generate(prompt, 12, temperature=0))


def test_the_loss_transformers_computes_is_ours_over_the_real_ids(tmp_path):
    """The export drops the padded rows, so its softmax runs over the 50257 real ids only (ours also over the
    padded logits): the same cross-entropy once our logits are cut to the real ids."""
    model = tiny_gpt("rope")
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(model, tmp_path / "hf"))
    ids = torch.randint(0, 50257, (2, SHAPE["block_size"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids[:, :-1])[..., :50257]
        expected = F.cross_entropy(ours.reshape(-1, 50257), ids[:, 1:].reshape(-1))
        assert hf(ids, labels=ids).loss.item() == pytest.approx(expected.item(), abs=1e-5)
        assert hf(ids, labels=ids).loss < model(ids[:, :-1], ids[:, 1:])  # renormalised over fewer ids


def test_generation_never_emits_a_padded_id(tmp_path):
    """Padded rows rigged to win every step: our generate masks them; the export has no such rows at all."""
    model = tiny_gpt("rope")
    with torch.no_grad():
        model.ln_f.weight.zero_()
        model.ln_f.bias.fill_(1.0)  # every position's final hidden state is all ones
        model.wte.weight[50257:] = 10.0  # so each padded logit is 320, the real ones ~0
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(model, tmp_path / "hf"))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.config.vocab_size == len(hf_tokenizer) == 50257
    prompt = torch.tensor([tokenizer.encode("Y dijo Dios")])
    for sampled in (hf.generate(prompt, max_new_tokens=20, do_sample=True, top_k=0), model.generate(prompt, 20)):
        assert sampled.max() < 50257


def test_the_tokenizer_is_gpt2s(tmp_path):
    export_hf(tiny_gpt("learned"), tmp_path / "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(hf_tokenizer).__name__ in ("GPT2Tokenizer", "GPT2TokenizerFast")
    text = "EN el principio crió Dios los cielos y la tierra.\n¿Señor, por qué? ¡Ñandú! «Año»  — 1909"
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text)
    assert hf_tokenizer.decode(tokenizer.encode(text)) == text
    assert hf_tokenizer.eos_token_id == tokenizer.EOT_ID
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.EOT_ID and "max_length" not in generation  # issue 20: it made generate(max_new_tokens=...) warn


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_init_from_the_directory_is_bit_exact(tmp_path, position):
    model = tiny_gpt(position, bias=False)
    export_hf(model, tmp_path / "hf")
    shape = [f"model.{k}={v}" for k, v in SHAPE.items()]
    config = load_config("bible-tiny", [*shape, f"model.position={position}", "model.rope_theta=500.0", "model.bias=false", f"model.init_from={tmp_path / 'hf'}"])
    loaded = build_model(config)
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name  # the padded rows too
    export_hf(loaded, tmp_path / "again")  # and the directory it writes holds the same tensors and config
    for name in ("model.safetensors", SIDECAR):
        first, second = (safe_open(tmp_path / d / name, framework="pt") for d in ("hf", "again"))
        assert first.metadata() == second.metadata(), name
        assert first.keys() == second.keys() and all(torch.equal(first.get_tensor(k), second.get_tensor(k)) for k in first.keys()), name


def test_a_neox_directory_without_the_side_file_still_loads(tmp_path):
    """Saved elsewhere (no dist_gpt.safetensors): the config comes from config.json, with biases (zero where we had
    none), the padding rows are zero; every real id's logit is the same."""
    model = tiny_gpt("rope", bias=False)
    export_hf(model, tmp_path / "hf")
    (tmp_path / "hf" / SIDECAR).unlink()
    loaded = load_export(tmp_path / "hf")
    assert loaded.config.bias and loaded.config.rope_theta == 500.0 and not loaded.wte.weight[50257:].any()
    ids = torch.randint(0, 50257, (1, SHAPE["block_size"]), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[..., :50257], model(ids)[..., :50257], atol=1e-5, rtol=0)


def test_the_exported_files_are_readable_by_all(tmp_path):
    umask = os.umask(0o022)
    try:
        save_exported(tiny_gpt("rope"), tmp_path / "ours.safetensors")
        export_main([str(tmp_path / "ours.safetensors"), "--hf", str(tmp_path / "hf")])
    finally:
        os.umask(umask)
    files = [tmp_path / "ours.safetensors", *(tmp_path / "hf").iterdir()]
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o644 for p in files}


def test_an_existing_directory_is_kept_unless_forced(tmp_path, capsys):
    save_exported(tiny_gpt("rope"), tmp_path / "ours.safetensors")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        export_main([str(tmp_path / "ours.safetensors"), "--hf", str(tmp_path / "hf")])
    assert e.value.code == 2 and "--force" in capsys.readouterr().err
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"
    export_main([str(tmp_path / "ours.safetensors"), "--hf", str(tmp_path / "hf"), "--force"])
    assert not (tmp_path / "hf" / "keep.txt").exists() and (tmp_path / "hf" / "config.json").is_file()


@pytest.mark.parametrize(
    "edit, message",
    [
        (dict(use_parallel_residual=True), "use_parallel_residual is True"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.25}), "partial_rotary_factor is 0.25"),
        (dict(hidden_act="relu"), "hidden_act is 'relu'"),
    ],
)
def test_a_config_that_is_not_our_computation_is_refused(tmp_path, edit, message):
    export_hf(tiny_gpt("rope"), tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(UserError, match=message):
        read_export(tmp_path / "hf")


def test_a_bias_learned_in_transformers_is_not_dropped_silently(tmp_path):
    model = tiny_gpt("learned", bias=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(model, tmp_path / "hf"))
    with torch.no_grad():
        hf.transformer.h[0].mlp.c_fc.bias.fill_(0.5)
    hf.save_pretrained(tmp_path / "hf")  # the side file stays: it still says bias=false
    with pytest.raises(UserError, match=f"delete {SIDECAR}"):
        read_export(tmp_path / "hf")


def test_an_untied_output_layer_is_exported_untied(tmp_path):
    """model.tie_embeddings=false (when the config has it): the head goes out as its own matrix."""
    model = tiny_gpt("rope")
    model.lm_head.weight = torch.nn.Parameter(model.wte.weight.detach() + 0.5 * torch.randn_like(model.wte.weight))
    model.config.tie_embeddings = False
    hf = assert_transformers_computes(model, export_hf(model, tmp_path / "hf"))
    assert hf.config.tie_word_embeddings is False
