"""interop.load_model picks the reader of each format: our checkpoints (a run, its checkpoints/, a step_N dir),
our .safetensors export, our `export --hf` directory in both architectures, and OpenAI's GPT-2 in Hugging Face's
format (a directory, or a GPT-2 name with a local directory of that name). Real files: one tiny trained run, its
weights saved each way; each source must come back through its own reader, computing the run's logits."""

import pytest
import torch
from conftest import ckpt_root, tiny_overrides

from dist_gpt.checkpoint.consolidate import consolidated_state_dict
from dist_gpt.config import load_config
from dist_gpt.engine.build import build_model
from dist_gpt.errors import UserError
from dist_gpt.interop import checkpoint_dir, export_file, hf_dir, load_model, openai_gpt2
from dist_gpt.model import GPT, GPTConfig
from dist_gpt.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")

# (module, function) of each reader
READERS = {
    "checkpoint": (checkpoint_dir, "load_checkpoint"),
    "export file": (export_file, "load_exported"),
    "hf dir": (hf_dir, "load_export"),
    "openai gpt2": (openai_gpt2, "load_hf_gpt2"),
}


@pytest.fixture(scope="module")
def saved(tiny_data, tmp_path_factory):
    """A 2-step run with learned positions (its checkpoint), its weights as our export file, as `export --hf`
    directories (learned: GPT2LMHeadModel; a RoPE model: GPTNeoXForCausalLM), and as a plain Hugging Face GPT-2
    directory (the learned export without our side file: what transformers' save_pretrained holds)."""
    root = tmp_path_factory.mktemp("load_model")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train(load_config("bible-tiny", tiny_overrides(tiny_data, root, "run", train__max_steps=2, model__position="learned")))
    torch.set_num_threads(threads)
    config, state = consolidated_state_dict(root / "run")
    trained = GPT(config.model.gpt_config())
    trained.load_state_dict(state)
    torch.manual_seed(0)
    rope = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, position="rope", rope_theta=500.0))
    export_file.save_exported(trained, root / "run.safetensors")
    hf_dir.export_hf(trained, root / "hf-learned")
    hf_dir.export_hf(rope, root / "hf-rope")
    hf_dir.export_hf(trained, root / "gpt2")
    (root / "gpt2" / hf_dir.SIDECAR).unlink()
    return root, trained.eval(), rope.eval()


def real_id_logits(model: GPT) -> torch.Tensor:
    ids = torch.randint(0, model.config.tokenizer_vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(ids)[..., : model.config.tokenizer_vocab_size]


@pytest.mark.parametrize(
    "source, reader, expected, exact",
    [
        ("run", "checkpoint", "trained", True),
        ("run/checkpoints", "checkpoint", "trained", True),
        ("run/checkpoints/step_000002", "checkpoint", "trained", True),
        ("run.safetensors", "export file", "trained", True),
        ("hf-learned", "hf dir", "trained", True),
        ("hf-rope", "hf dir", "rope", True),
        ("gpt2", "openai gpt2", "trained", False),  # with biases (zero) and zero padding rows: the same logits
    ],
)
def test_load_model_picks_the_reader_of_each_format(saved, monkeypatch, source, reader, expected, exact):
    root, trained, rope = saved
    calls = []
    for name, (module, function) in READERS.items():
        real = getattr(module, function)
        monkeypatch.setattr(module, function, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    model = load_model(root / source)
    assert calls == [reader]
    want = {"trained": trained, "rope": rope}[expected]
    if exact:
        assert model.config == want.config
        assert model.state_dict().keys() == want.state_dict().keys()
        assert all(torch.equal(t, want.state_dict()[name]) for name, t in model.state_dict().items())
    torch.testing.assert_close(real_id_logits(model), real_id_logits(want), atol=1e-5, rtol=0)


def test_a_gpt2_name_reads_the_local_directory_of_that_name(saved, monkeypatch):
    root, trained, _ = saved
    monkeypatch.chdir(root)  # ./gpt2 is there: no hub
    model = load_model("gpt2", dropout=0.0)
    assert model.config.position == "learned"  # GPT-2 as OpenAI trained it, unless the caller says otherwise
    torch.testing.assert_close(real_id_logits(model), real_id_logits(trained), atol=1e-5, rtol=0)
    assert load_model("gpt2", defaults=dict(position="rope")).config.position == "rope"


def test_a_run_fine_tunes_from_another_runs_checkpoint(saved, tiny_data, tmp_path):
    root, trained, _ = saved
    overrides = tiny_overrides(tiny_data, tmp_path, model__position="learned")
    model = build_model(load_config("bible-tiny", overrides + [f"model.init_from={ckpt_root(root / 'run')}"]))
    assert all(torch.equal(t, trained.state_dict()[name]) for name, t in model.state_dict().items())
    with pytest.raises(UserError, match="position=learned, which the config does not say"):
        build_model(load_config("bible-tiny", tiny_overrides(tiny_data, tmp_path) + [f"model.init_from={root / 'run'}"]))


def test_a_source_of_no_format_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"nowhere: no such file or directory, and not a GPT-2 name .* give a run directory") as error:
        load_model(tmp_path / "nowhere")
    assert "\n" not in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: neither a checkpoint nor a directory with a config.json, and not a GPT-2 name"):
        load_model(tmp_path / "empty")
    (tmp_path / "empty-run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="no checkpoint at"):  # a run that never saved: the checkpoint's own error
        load_model(tmp_path / "empty-run")
