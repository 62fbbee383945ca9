"""Importing Hugging Face GPT-2 checkpoints, and our own export format. No network: the checkpoints are
tiny random GPT-2s written by transformers into temporary directories."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_gpt.errors import UserError
from dist_gpt.interop.export_file import load_exported, save_exported
from dist_gpt.interop.openai_gpt2 import hf_state_dict_to_ours, is_gpt2_name, load_hf_gpt2
from dist_gpt.model import GPT, GPT2_VOCAB_SIZE, PADDED_VOCAB_SIZE, GPTConfig

transformers = pytest.importorskip("transformers")

N_LAYER, N_HEAD, N_EMBD, N_POSITIONS = 2, 2, 32, 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD, n_positions=N_POSITIONS, vocab_size=GPT2_VOCAB_SIZE, activation_function="gelu_new"
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random LayerNorms and biases, so a swapped or dropped one cannot go unnoticed
        for name, param in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                param.normal_(mean=1.0 if name.endswith("ln_1.weight") else 0.0, std=0.1)
    return model


@pytest.fixture(scope="module")
def safetensors_dir(hf_model, tmp_path_factory):
    """What save_pretrained writes today: model.safetensors, keys prefixed with `transformer.`."""
    directory = tmp_path_factory.mktemp("hf_safetensors")
    hf_model.save_pretrained(directory)
    assert (directory / "model.safetensors").is_file()
    return directory


@pytest.fixture(scope="module")
def bin_dir(hf_model, safetensors_dir, tmp_path_factory):
    """The layout of OpenAI's original pytorch_model.bin: no `transformer.` prefix, and the causal-mask
    buffers saved with the weights. Written by hand: transformers 5 no longer writes .bin files."""
    directory = tmp_path_factory.mktemp("hf_bin")
    shutil.copy(safetensors_dir / "config.json", directory / "config.json")
    state_dict = {name.removeprefix("transformer."): t for name, t in hf_model.state_dict().items()}
    for layer in range(N_LAYER):
        state_dict[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(N_POSITIONS, N_POSITIONS, dtype=torch.uint8)).view(1, 1, N_POSITIONS, N_POSITIONS)
        state_dict[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state_dict, directory / "pytorch_model.bin")
    return directory


@pytest.fixture(params=["safetensors", "bin"])
def checkpoint_dir(request):
    return request.getfixturevalue(f"{request.param}_dir")


def token_ids(length: int = 24) -> torch.Tensor:
    return torch.randint(0, GPT2_VOCAB_SIZE, (2, length), generator=torch.Generator().manual_seed(3))


def our_logits(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids)[..., :GPT2_VOCAB_SIZE]  # the real vocabulary, without the padding rows


def hf_logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(ids).logits


# ----------------------------------------------------------------------------------------------- import


def test_learned_positions_reproduce_transformers(hf_model, checkpoint_dir):
    model = load_hf_gpt2(checkpoint_dir, position="learned", loss="plain")
    ids = token_ids()
    assert (our_logits(model, ids) - hf_logits(hf_model, ids)).abs().max().item() < 1e-4


def test_loaded_model_is_tied_and_padded(checkpoint_dir):
    model = load_hf_gpt2(checkpoint_dir, position="learned")
    assert model.lm_head.weight is model.wte.weight
    assert model.wte.weight.shape == (PADDED_VOCAB_SIZE, N_EMBD)
    assert torch.all(model.wte.weight[GPT2_VOCAB_SIZE:] == 0)
    assert model.config.block_size == N_POSITIONS and model.config.position == "learned"


def test_untied_head_starts_as_a_copy_of_wte(hf_model, safetensors_dir):
    """tie_embeddings=false: lm_head is its own matrix, holding GPT-2's output layer (= its wte) at the start."""
    model = load_hf_gpt2(safetensors_dir, position="learned", tie_embeddings=False, loss="plain")
    assert model.lm_head.weight is not model.wte.weight
    assert model.lm_head.weight.data_ptr() != model.wte.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, model.wte.weight)
    ids = token_ids()
    assert (our_logits(model, ids) - hf_logits(hf_model, ids)).abs().max().item() < 1e-4
    with torch.no_grad():
        model.lm_head.weight.mul_(2)  # they train apart from here
    assert not torch.equal(model.lm_head.weight, model.wte.weight)


def test_rope_loads_everything_but_wpe(hf_model, safetensors_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="dist_gpt.interop.openai_gpt2"):
        model = load_hf_gpt2(safetensors_dir, position="rope")
    assert len(caplog.records) == 1 and "relearned" in caplog.records[0].getMessage()
    assert model.wpe is None
    learned = load_hf_gpt2(safetensors_dir, position="learned").state_dict()
    ours = model.state_dict()
    assert set(learned) - set(ours) == {"wpe.weight"}
    for name, tensor in ours.items():
        assert torch.equal(tensor, learned[name]), name
    logits = our_logits(model, token_ids())
    assert torch.isfinite(logits).all()
    # RoPE tables are computed, not left as the empty memory of the meta-device build
    rotary = model.h[0].attn.rotary
    torch.testing.assert_close(rotary.cos[0], torch.ones_like(rotary.cos[0]))


def test_smaller_block_size_crops_wpe(hf_model, safetensors_dir):
    model = load_hf_gpt2(safetensors_dir, position="learned", block_size=32)
    assert model.wpe.weight.shape == (32, N_EMBD)
    ids = token_ids(32)
    assert (our_logits(model, ids) - hf_logits(hf_model, ids)).abs().max().item() < 1e-4


def test_learned_block_size_beyond_the_checkpoint_is_refused(safetensors_dir):
    with pytest.raises(UserError, match="n_positions=64"):
        load_hf_gpt2(safetensors_dir, position="learned", block_size=128)
    assert load_hf_gpt2(safetensors_dir, position="rope", block_size=128).config.block_size == 128  # RoPE extends


def test_overrides_pass_through(safetensors_dir):
    config = load_hf_gpt2(safetensors_dir, dropout=0.1, attn_backend="math", loss="plain").config
    assert (config.dropout, config.attn_backend, config.loss) == (0.1, "math", "plain")


@pytest.mark.parametrize("override, message", [(dict(n_layer=3), "n_layer=3 conflicts"), (dict(n_heads=4), "unknown model setting"), (dict(dropout=2.0), "dropout")])
def test_bad_overrides_are_refused(safetensors_dir, override, message):
    with pytest.raises(UserError, match=message):
        load_hf_gpt2(safetensors_dir, **override)


def test_hf_state_dict_to_ours_transposes_conv1d(hf_model):
    config = GPTConfig(n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD, block_size=N_POSITIONS, position="learned")
    hf = hf_model.state_dict()
    ours = hf_state_dict_to_ours(hf, config)
    assert torch.equal(ours["h.1.attn.c_attn.weight"], hf["transformer.h.1.attn.c_attn.weight"].t())
    assert torch.equal(ours["h.0.ln_1.weight"], hf["transformer.h.0.ln_1.weight"])
    assert "lm_head.weight" not in ours


# ----------------------------------------------------------------------------------------------- hub names


def test_gpt2_names():
    assert all(is_gpt2_name(name) for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"))
    assert not is_gpt2_name("gpt2-small") and not is_gpt2_name("openai-community/gpt2")


def test_a_name_is_fetched_from_the_hub(safetensors_dir, monkeypatch, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    asked = []

    def fake_snapshot_download(repo_id, **kwargs):
        asked.append(repo_id)
        return str(safetensors_dir)

    monkeypatch.chdir(tmp_path)  # so no local directory called gpt2 is found first
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert load_hf_gpt2("gpt2-medium", position="learned").config.n_layer == N_LAYER
    assert asked == ["openai-community/gpt2-medium"]


def test_offline_hub_says_how_to_download(monkeypatch, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(repo_id, **kwargs):
        raise OSError("We have no connection to the Hub")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError, match=r"no connection.*hf download openai-community/gpt2 .*pass its path"):
        load_hf_gpt2("gpt2")


def test_unknown_source_is_refused(tmp_path):
    with pytest.raises(UserError, match="no such directory, and not a GPT-2 name"):
        load_hf_gpt2(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------- wrong checkpoints


def edited_checkpoint(source, destination, edit_weights=None, edit_config=None):
    """A copy of the safetensors checkpoint in source, its weights and config.json passed through the edits."""
    destination.mkdir()
    weights = load_file(source / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    if edit_weights:
        edit_weights(weights)
    if edit_config:
        edit_config(config)
    save_file(weights, destination / "model.safetensors")
    (destination / "config.json").write_text(json.dumps(config))
    return destination


@pytest.mark.parametrize(
    "edit_weights, edit_config, message",
    [
        (lambda w: w.pop("transformer.h.1.mlp.c_fc.bias"), None, r"h\.1\.mlp\.c_fc\.bias: missing from the checkpoint"),
        (
            lambda w: w.update({"transformer.h.1.attn.c_attn.weight": torch.zeros(N_EMBD, 2 * N_EMBD)}),
            None,
            r"transformer\.h\.1\.attn\.c_attn\.weight: checkpoint has \(32, 64\), model expects \(32, 96\)",
        ),
        (lambda w: w.update({"transformer.h.2.ln_1.weight": torch.ones(N_EMBD)}), None, r"transformer\.h\.2\.ln_1\.weight: unexpected"),
        (lambda w: w.update({"transformer.wte.weight": torch.zeros(50000, N_EMBD)}), None, r"wte\.weight: checkpoint has \(50000, 32\), model expects \(50257, 32\)"),
        (None, lambda c: c.update(model_type="llama"), "model_type is 'llama', not 'gpt2'"),
        (None, lambda c: c.update(activation_function="relu"), "activation_function is 'relu'"),
        (None, lambda c: c.update(vocab_size=50000), "vocab_size is 50000"),
        (None, lambda c: c.update(n_embd=64), r"checkpoint has \(32, 96\), model expects \(64, 192\)"),
    ],
    ids=["missing-key", "wrong-shape", "unexpected-key", "wrong-vocab", "not-gpt2", "activation", "config-vocab", "config-disagrees"],
)
def test_wrong_checkpoint_is_one_clear_user_error(safetensors_dir, tmp_path, edit_weights, edit_config, message):
    broken = edited_checkpoint(safetensors_dir, tmp_path / "broken", edit_weights, edit_config)
    with pytest.raises(UserError, match=message) as error:
        load_hf_gpt2(broken, position="learned")
    assert "\n" not in str(error.value)


def test_directory_without_weights_or_config(safetensors_dir, tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_hf_gpt2(tmp_path)
    shutil.copy(safetensors_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(UserError, match="no model.safetensors or pytorch_model.bin"):
        load_hf_gpt2(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read the weights"):
        load_hf_gpt2(tmp_path)


# ----------------------------------------------------------------------------------------------- our export


@pytest.mark.parametrize("position, tied", [("rope", True), ("learned", True), ("rope", False)])
def test_export_round_trip_gives_the_same_logits(tmp_path, position, tied):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, position=position, tie_embeddings=tied, loss="plain"))
    path = tmp_path / "export" / "model.safetensors"
    save_exported(model, path)
    loaded = load_exported(path)
    assert loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.wte.weight) == tied
    if not tied:
        assert torch.equal(loaded.lm_head.weight, model.lm_head.weight) and not torch.equal(loaded.lm_head.weight, loaded.wte.weight)
    ids = token_ids(16)
    torch.testing.assert_close(our_logits(loaded, ids), our_logits(model, ids), atol=0, rtol=0)


def test_export_with_learned_positions_crops_to_a_smaller_block_size(tmp_path):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, position="learned", loss="plain"))
    save_exported(model, tmp_path / "m.safetensors")
    cropped = load_exported(tmp_path / "m.safetensors", block_size=8)
    assert cropped.wpe.weight.shape == (8, 32)
    ids = token_ids(8)
    torch.testing.assert_close(our_logits(cropped, ids), our_logits(model, ids), atol=0, rtol=0)


def test_exported_hf_import_keeps_matching_transformers(hf_model, safetensors_dir, tmp_path):
    save_exported(load_hf_gpt2(safetensors_dir, position="learned"), tmp_path / "gpt2.safetensors")
    loaded = load_exported(tmp_path / "gpt2.safetensors", dropout=0.1)
    assert loaded.config.dropout == 0.1
    ids = token_ids()
    assert (our_logits(loaded, ids) - hf_logits(hf_model, ids)).abs().max().item() < 1e-4


def test_export_refuses_what_it_cannot_load(safetensors_dir, tmp_path):
    with pytest.raises(UserError, match="no 'gpt_config' in its metadata"):
        load_exported(safetensors_dir / "model.safetensors")
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, position="learned"))
    save_exported(model, tmp_path / "m.safetensors")
    with pytest.raises(UserError, match="block_size=32 exceeds the 16 positions"):
        load_exported(tmp_path / "m.safetensors", block_size=32)
    with pytest.raises(UserError, match="n_embd=64 conflicts"):
        load_exported(tmp_path / "m.safetensors", n_embd=64)
    with pytest.raises(UserError, match="no such file"):
        load_exported(tmp_path / "missing.safetensors")
