"""Shared fixtures: a tiny prepared corpus and a tiny-model config that trains in seconds on CPU."""

from __future__ import annotations

import os
import random
import runpy
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from dist_gpt.checkpoint.manifest import LATEST, read_manifest, verify_files

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


def needs_cuda(test):
    """A test that needs a CUDA GPU: skipped without one; `pytest -m cuda` selects these (benchmarks/gpu_check.sh)."""
    import torch

    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


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
        # fp32: the tests compare losses exactly (resume, world sizes, strategies); auto is bf16 on CPUs with it
        "train.dtype=fp32",
        "train.eval_every=0",
        "train.eval_batches=2",
        "logging.log_every=1",
        "checkpoint.every_steps=0",
    ]
    return overrides + [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]


def launch_args(data: Path, out: Path, run: str, **extra) -> list[str]:
    """`launch/train.py` arguments of a tiny run (for run_python, Proc, train_cli)."""
    return ["launch/train.py", "--config", "bible-tiny", *tiny_overrides(data, out, run, **extra)]


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


# ---------------------------------------------------------------------------------------------- checkpoints and launched runs


def ckpt_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_name(run_dir: Path) -> str | None:
    path = ckpt_root(run_dir) / LATEST
    return path.read_text().strip() if path.is_file() else None


def step_dirs(run_dir: Path) -> list[str]:
    """Published checkpoint directories (step_N), oldest first."""
    root = ckpt_root(run_dir)
    return sorted(p.name for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")) if root.is_dir() else []


def tmp_dirs(run_dir: Path) -> list[str]:
    root = ckpt_root(run_dir)
    return sorted(p.name for p in root.glob("*.tmp")) if root.is_dir() else []


def assert_consistent(run_dir: Path) -> None:
    """`latest` names a complete checkpoint, and every published step_N directory is complete and intact."""
    root = ckpt_root(run_dir)
    latest = latest_name(run_dir)
    if latest is None:
        assert not step_dirs(run_dir), f"checkpoints {step_dirs(run_dir)} but no `latest`"
        return
    assert latest in step_dirs(run_dir), f"latest names {latest!r}, not one of {step_dirs(run_dir)}"
    for name in step_dirs(run_dir):
        manifest = read_manifest(root / name)  # raises if the directory has no manifest
        verify_files(root / name, manifest)  # sizes and CRC32 of every file
        assert manifest["step"] == int(name.removeprefix("step_"))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root but the run's lock (each start writes its pid there): (size, CRC32). Equal
    snapshots = nothing of the run written, deleted or renamed."""
    files = (p for p in sorted(root.rglob("*")) if p.is_file() and p.name != "run.lock")
    return {str(p.relative_to(root)): (p.stat().st_size, zlib.crc32(p.read_bytes())) for p in files}


def mount_tmpfs(path: Path, options: str):
    """A real file system at path (tmpfs, e.g. options "size=30m" or "ro,size=1m"); unmounted when the generator
    closes. Skips the test, with the reason, where mounting is refused (it needs root; CI runs as root)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def train_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """`python launch/train.py ARGS` in this process: (exit code, stdout, stderr). An exception other than
    SystemExit (a traceback, for a user) propagates and fails the test."""
    argv = sys.argv
    sys.argv = ["launch/train.py", *args]
    try:
        runpy.run_path(str(REPO / "launch" / "train.py"), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, f"exit code {code}, stderr:\n{err}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not a one-line error:\n{err}"
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


class Proc:
    """A launched training process whose output goes to a file we can poll."""

    def __init__(self, args: list[str], log: Path, new_session: bool = False, **env: str):
        """new_session: the process leads its own process group, as a terminal's foreground job (see ctrl_c).
        env: variables set for it, on top of subprocess_env()."""
        self.log = log
        self.file = open(log, "w")
        self.started = time.time()
        self.popen = subprocess.Popen(
            [sys.executable, *args], cwd=REPO, env=subprocess_env(**env), stdout=self.file, stderr=subprocess.STDOUT, start_new_session=new_session
        )

    def ctrl_c(self) -> None:
        """What a terminal does on Ctrl-C: SIGINT to every process of the foreground job (a launcher and its workers)."""
        os.killpg(self.popen.pid, signal.SIGINT)

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, predicate, timeout: float = 60.0, poll: float = 0.02) -> bool:
        """Poll until predicate() is true (-> True) or the process exits first (-> False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            if self.popen.poll() is not None:
                return bool(predicate())
            time.sleep(poll)
        self.kill()
        raise AssertionError(f"timed out after {timeout:.0f} s waiting; output:\n{self.text()[-3000:]}")

    def wait_for_line(self, fragment: str, timeout: float = 60.0) -> bool:
        return self.wait_for(lambda: fragment in self.text(), timeout)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()  # SIGKILL: no handler, no cleanup, like a rented GPU going away
        self.finish(10)

    def finish(self, timeout: float = 60.0) -> int:
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
            raise AssertionError(f"did not exit within {timeout:.0f} s; output:\n{self.text()[-3000:]}") from None
        finally:
            self.file.close()
        return code


@pytest.fixture
def offline_data(tmp_path_factory, monkeypatch):
    """No network, and no cache shared with other processes (datasets reads these when first imported)."""
    cache = tmp_path_factory.getbasetemp() / "caches"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(cache / "hf"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache / "tiktoken"))


def free_port() -> int:
    """A free TCP port on 127.0.0.1: for launchers that default to a fixed one (deepspeed's 29500) and servers the
    tests start, so that concurrent test runs do not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
