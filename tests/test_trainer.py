"""The single-device trainer end to end on a tiny corpus: losses fall, metrics are written, a checkpoint
samples, both position modes train, and the launchers (python, torchrun) start it."""

from __future__ import annotations

import pytest
from conftest import losses_by_step, read_jsonl, run_python, tiny_overrides

from dist_gpt.config import load_config
from dist_gpt.errors import UserError
from dist_gpt.train.loop import train


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_tiny_run_learns(tiny_data, tmp_path, position):
    overrides = tiny_overrides(tiny_data, tmp_path, "run", train__max_steps=30, train__lr=1e-2, train__eval_every=15, model__position=position)
    summary = train(load_config("bible-tiny", overrides))
    losses = losses_by_step(tmp_path / "run")
    assert sorted(losses) == list(range(1, 31))
    first, last = losses[1], sum(losses[i] for i in range(26, 31)) / 5
    assert last < first - 2.0, f"loss did not fall clearly: {first:.3f} -> {last:.3f}"
    assert summary["step"] == 30 and summary["val_loss"] < first - 2.0


def test_metrics_jsonl_carries_the_fields(tiny_data, tmp_path):
    train(load_config("bible-tiny", tiny_overrides(tiny_data, tmp_path, "run", train__max_steps=4)))
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 4
    for field in ("step", "tokens", "loss", "lr", "grad_norm", "ms_per_step", "tokens_per_s", "mfu", "mem_rss_mb"):
        assert all(field in r for r in steps), field
    assert steps[-1]["tokens"] == 4 * 4 * 32  # steps x micro-batch x block
    assert all(0 < r["mfu"] <= 1 for r in steps)  # the peak is never below what the run achieves
    assert any("val_loss" in r for r in records)
    assert "summary" in records[-1]


def test_grad_accumulation_keeps_the_global_batch(tiny_data, tmp_path):
    """micro 4 x accum 2 must train exactly like micro 8 x accum 1 (same windows, same mean loss)."""
    a = train(load_config("bible-tiny", tiny_overrides(tiny_data, tmp_path, "a", train__max_steps=3, train__micro_batch_size=8)))
    b = train(load_config("bible-tiny", tiny_overrides(tiny_data, tmp_path, "b", train__max_steps=3, train__micro_batch_size=4, train__global_batch_size=8)))
    assert b["grad_accum_steps"] == 2
    la, lb = losses_by_step(tmp_path / "a"), losses_by_step(tmp_path / "b")
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-5)


def test_missing_data_says_how_to_prepare(tmp_path):
    config = load_config("bible-tiny", tiny_overrides(tmp_path / "nothing", tmp_path))
    with pytest.raises(UserError, match="python -m dist_gpt.prepare"):
        train(config)


def test_block_size_larger_than_the_data_is_refused(tiny_data, tmp_path):
    config = load_config("bible-tiny", tiny_overrides(tiny_data, tmp_path) + ["model.block_size=100000"])
    with pytest.raises(UserError, match="lower model.block_size"):
        train(config)


def test_python_launch_then_sample_from_the_checkpoint(tiny_data, tmp_path):
    run_python(["launch/train.py", "--config", "bible-tiny", *tiny_overrides(tiny_data, tmp_path, "run", train__max_steps=3)])
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()
    proc = run_python(["-m", "dist_gpt.sample", "--ckpt", str(tmp_path / "run"), "--prompt", "En el principio", "--max-new-tokens", "8"])
    assert proc.stdout.startswith("En el principio") and len(proc.stdout.strip()) > len("En el principio")


def test_torchrun_one_process(tiny_data, tmp_path):
    proc = run_python(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "launch/train.py", "--config", "bible-tiny",
         *tiny_overrides(tiny_data, tmp_path, "run", train__max_steps=2)],
    )
    assert "single on 1 x cpu" in proc.stdout
    assert sorted(losses_by_step(tmp_path / "run")) == [1, 2]


def test_plot_writes_a_png(tiny_data, tmp_path):
    train(load_config("bible-tiny", tiny_overrides(tiny_data, tmp_path, "run", train__max_steps=3)))
    run_python(["-m", "dist_gpt.plot", str(tmp_path / "run")])
    png = (tmp_path / "run" / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_fine_tune_from_a_local_hugging_face_gpt2(tiny_data, tmp_path):
    """model.init_from=<HF dir> into the RoPE model: the run starts from those weights (wpe excepted)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from dist_gpt.checkpoint.consolidate import consolidated_state_dict

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257))
    hf.save_pretrained(tmp_path / "hf")
    overrides = tiny_overrides(tiny_data, tmp_path, "ft", train__max_steps=1, train__lr=1e-12, train__min_lr=0.0, train__weight_decay=0.0)
    train(load_config("gpt2-finetune-bible", overrides + [f"model.init_from={tmp_path / 'hf'}", "model.loss_chunk_tokens=64"]))
    _, state = consolidated_state_dict(tmp_path / "ft")
    expected = hf.transformer.h[1].mlp.c_fc.weight.detach().t()  # HF's Conv1D stores (in, out)
    assert torch.allclose(state["h.1.mlp.c_fc.weight"], expected, atol=1e-6)
    assert torch.allclose(state["wte.weight"][:50257], hf.transformer.wte.weight.detach(), atol=1e-6)


def test_init_from_a_model_the_config_does_not_describe(tiny_data, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=2, n_embd=32, n_positions=64)).save_pretrained(tmp_path / "hf")
    config = load_config("bible-tiny", tiny_overrides(tiny_data, tmp_path) + [f"model.init_from={tmp_path / 'hf'}"])
    with pytest.raises(UserError, match="n_layer=3, which the config does not say"):
        train(config)


def test_one_agreement_collective_per_step(tiny_data, tmp_path, monkeypatch):
    """Ranks agree on stop / periodic save / async publish with one all-reduce (a host sync) per step, not one
    each (should_stop and due made 13 all_reduce_max calls in 6 steps). DDP on a world of one has a real process
    group; its gradient buckets go through the C++ reducer, so the Python all_reduce calls are the loop's own.
    Counted as the difference between a 12-step and a 6-step run: what happens once per run cancels out."""
    import torch.distributed as dist

    calls = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *args, **kwargs: calls.append(tensor.numel()) or real(tensor, *args, **kwargs))
    counts = {}
    try:
        for steps in (6, 12):
            calls.clear()
            train(load_config("bible-tiny", tiny_overrides(tiny_data, tmp_path, f"count{steps}", train__max_steps=steps, logging__log_every=100,
                                                           parallel__strategy="ddp", train__dtype="fp32")))
            counts[steps] = len(calls)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert (counts[12] - counts[6]) / 6 == 1, counts
