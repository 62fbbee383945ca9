"""Runs side by side (`python -m dist_gpt.plot` / `compare` on real runs) and the untied output layer through
the trainer: it trains, checkpoints, resumes exactly, exports, and starts from GPT-2's weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import losses_by_step, read_jsonl, run_python, tiny_overrides

from dist_gpt.checkpoint.consolidate import consolidated_state_dict
from dist_gpt.config import load_config
from dist_gpt.model import GPT
from dist_gpt.tools.compare import markdown_table
from dist_gpt.tools.runs import read_run
from dist_gpt.train.loop import train

# lr_decay_steps fixed: the 2-step first half of the resumed run must follow the same schedule as the straight run.
COMMON = dict(train__max_steps=4, train__eval_every=2, train__lr=1e-2, train__lr_decay_steps=4)
UNTIED = dict(COMMON, model__position="learned", model__tie_embeddings="false")


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> Path:
    """out/rope: tied, RoPE. out/untied: learned positions, untied, stopped after 2 steps and resumed to 4.
    out/untied-straight: the same 4 steps without a stop."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identical losses need the same thread count in both runs
    train(load_config("bible-tiny", tiny_overrides(tiny_data, root, "rope", **COMMON)))
    train(load_config("bible-tiny", tiny_overrides(tiny_data, root, "untied", **{**UNTIED, "train__max_steps": 2})))
    train(load_config("bible-tiny", tiny_overrides(tiny_data, root, "untied", **UNTIED)))
    train(load_config("bible-tiny", tiny_overrides(tiny_data, root, "untied-straight", **UNTIED)))
    torch.set_num_threads(threads)
    return root


def test_untied_run_checkpoints_and_resumes_exactly(runs):
    resumed, straight = losses_by_step(runs / "untied"), losses_by_step(runs / "untied-straight")
    assert sorted(resumed) == [1, 2, 3, 4]
    assert resumed == straight  # floats compared with ==: the resume is bit-identical
    starts = [r["run_start"] for r in read_jsonl(runs / "untied" / "metrics.jsonl") if "run_start" in r]
    assert [s["step"] for s in starts] == [0, 2]
    config, state = consolidated_state_dict(runs / "untied")
    assert config.model.tie_embeddings is False
    assert not torch.equal(state["lm_head.weight"], state["wte.weight"])  # two matrices, trained apart


def test_untied_run_exports_and_loads(runs, tmp_path):
    from dist_gpt.interop.export_file import load_exported
    from dist_gpt.tools.export import main as export

    export([str(runs / "untied"), "--out", str(tmp_path / "untied.safetensors")])
    model = load_exported(tmp_path / "untied.safetensors")
    _, state = consolidated_state_dict(runs / "untied")
    assert model.lm_head.weight is not model.wte.weight
    assert torch.equal(model.lm_head.weight, state["lm_head.weight"]) and torch.equal(model.wte.weight, state["wte.weight"])


def test_plot_overlays_several_runs(runs, tmp_path):
    out = tmp_path / "side-by-side.png"
    proc = run_python(["-m", "dist_gpt.plot", str(runs / "rope"), str(runs / "untied"), "--out", str(out)])
    assert f"wrote {out}" in proc.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_prints_the_table_and_the_differing_keys(runs):
    proc = run_python(["-m", "dist_gpt.compare", str(runs / "rope"), str(runs / "untied")])
    table, _, differing = proc.stdout.partition("config keys that differ")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"rope", "untied"}
    rope, untied = rows["rope"], rows["untied"]
    final_val = {r["step"]: r["val_loss"] for r in read_jsonl(runs / "rope" / "metrics.jsonl") if "val_loss" in r}[4]
    assert rope[0] == f"{final_val:.4f}"
    assert rope[2:4] == untied[2:4] == ["4", "512"]  # steps; tokens = 4 steps x 4 sequences x 32
    assert rope[4] != "—" and untied[4] != "—"  # wall time (the resumed run: both processes)
    tied_params = GPT(load_config("bible-tiny", tiny_overrides(runs, runs)).model.gpt_config()).num_params(non_embedding=False)
    assert rope[6] == f"{tied_params / 1e6:.2f}M"
    assert float(untied[6].removesuffix("M")) == pytest.approx((tied_params + 32 * 32 + 50304 * 32) / 1e6, abs=0.005)  # + wpe + own head
    keys = {line.split("|")[1].strip(): line for line in differing.splitlines() if line.startswith("| ")}
    assert "model.tie_embeddings" in keys and "False" in keys["model.tie_embeddings"]
    assert "model.position" in keys and "train.run_name" not in keys


def test_runs_read_nulls_nans_and_a_cut_last_line(tmp_path, capsys):
    """Strict JSON writes a non-finite loss as null, older files as NaN; a kill can cut the last line."""
    lines = [
        {"step": 1, "tokens": 10, "loss": 5.0},
        {"step": 2, "tokens": 20, "val_loss": 4.0},
        {"step": 3, "tokens": 30, "loss": None},
        {"step": 4, "tokens": 40, "val_loss": None},
        {"summary": {"wall_s": 12.0, "tokens_per_s": None}},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + '\n{"step": 5, "tokens": 50, "loss": NaN}\n{"step": 6, "lo')
    run = read_run(tmp_path)
    assert [p.value for p in run.train] == [5.0, None, None]
    assert run.final_val is None and (run.best_val.value, run.best_val.step) == (4.0, 2)
    assert (run.steps, run.tokens, run.wall_s, run.tokens_per_s, run.config) == (5, 50, 12.0, None, None)
    assert "skipped 1 unreadable line" in capsys.readouterr().err
    row = markdown_table([run]).splitlines()[2]
    assert row.startswith(f"| {tmp_path.name} | — | 4.0000 (2) | 5 | 50 | 12s | — | — |")


def test_compare_without_metrics_is_one_line_error(tmp_path):
    proc = run_python(["-m", "dist_gpt.compare", str(tmp_path)], check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: no metrics.jsonl in {tmp_path}: give a run directory (train.out_dir/train.run_name)"


def test_untied_fine_tune_starts_from_gpt2s_output_layer(tiny_data, tmp_path):
    """model.init_from=<HF GPT-2 dir> with tie_embeddings=false: lm_head starts as a copy of wte, then the two
    train apart. One AdamW step moves each weight by about lr, so after it they differ, but by little."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)).save_pretrained(tmp_path / "hf")
    lr = 1e-3
    overrides = tiny_overrides(tiny_data, tmp_path, "ft", train__max_steps=1, train__global_batch_size=4, train__lr=lr, train__warmup_steps=0, train__weight_decay=0.0)
    train(load_config("gpt2-finetune-bible", overrides + [f"model.init_from={tmp_path / 'hf'}", "model.tie_embeddings=false", "model.loss_chunk_tokens=64"]))
    _, state = consolidated_state_dict(tmp_path / "ft")
    gap = (state["lm_head.weight"] - state["wte.weight"]).abs().max().item()
    assert 0 < gap < 2.5 * lr
