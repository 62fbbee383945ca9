"""Shared fixtures: a tiny prepared corpus and a tiny-model config that trains in seconds on CPU."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A tiny model: the output layer (vocab 50304) dominates, everything else is small.
TINY_MODEL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32"]


def _synthetic_text(n_paragraphs: int = 300, seed: int = 0) -> str:
    """Deterministic pseudo-Spanish paragraphs: a small vocabulary, so a tiny model learns it quickly."""
    rng = random.Random(seed)
    words = "el la los de y en que dios tierra cielos principio luz agua dijo fue hizo día noche vio bueno".split()
    paragraphs = []
    for _ in range(n_paragraphs):
        sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 12))).capitalize() + "." for _ in range(rng.randint(2, 5))]
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs) + "\n"


@pytest.fixture
def one_thread():
    """Tensors this small run faster on one thread than on two threads contending for 2 shared cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared dataset (train.bin / val.bin / meta.json) of ~25k tokens, made once per test session."""
    from dist_gpt.data import prepare_dataset

    root = tmp_path_factory.mktemp("tiny_corpus")
    corpus = root / "corpus.txt"
    corpus.write_text(_synthetic_text())
    out = root / "prepared"
    prepare_dataset(str(corpus), out, val_fraction=0.1)
    return out


def tiny_overrides(data_dir: Path, out_dir: Path, run_name: str = "run", **extra) -> list[str]:
    """Overrides that turn any preset into a seconds-long CPU run on the tiny corpus."""
    overrides = TINY_MODEL + [
        f"data.dir={data_dir}",
        f"train.out_dir={out_dir}",
        f"train.run_name={run_name}",
        "train.micro_batch_size=4",
        "train.max_steps=10",
        "train.warmup_steps=2",
        "train.eval_every=0",
        "train.eval_batches=2",
        "logging.log_every=1",
        "checkpoint.every_steps=0",
    ]
    return overrides + [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]


def subprocess_env(**extra: str) -> dict:
    """The environment for a launched training process: no network, no wandb login, CPU only, quiet."""
    env = dict(os.environ)
    env.update(
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    env.update(extra)
    return env


def run_python(args: list[str], timeout: float = 300, check: bool = True, **env) -> subprocess.CompletedProcess:
    """Run `python ARGS...` from the repo root; on failure the output is in the assertion message."""
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=subprocess_env(**env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
    return proc


def read_jsonl(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """Train loss per step from a run's metrics.jsonl; a step re-run after a resume keeps its last value."""
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}


def assert_transformers_computes(model, directory: Path, atol: float = 1e-4):
    """transformers loads DIRECTORY (a `--hf` export) with no custom code and computes MODEL's logits for every
    id the tokenizer emits, within atol (fp32). Returns the transformers model."""
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = torch.randint(0, model.config.tokenizer_vocab_size, (2, model.config.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.eval()(ids)[..., : model.config.tokenizer_vocab_size]
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, atol=atol, rtol=0)
    return hf
