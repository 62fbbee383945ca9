"""prepare's tokens/s against the number of worker processes, on a generated corpus (JSONL and Parquet).

The corpus: English-like documents of 200-1,500 words drawn (Zipf-like) from GPT-2's own vocabulary, about
OpenWebText's document length, written once as c.jsonl and c.parquet under --dir. Each prepare runs in a
fresh process (`python -m dist_gpt.prepare --force`); its tokens/s is the one meta.json records (the whole
job: reading, tokenizing, hashing, writing), and its peak memory is the largest sum of PSS (proportional set
size: pages shared by the forked workers counted once in all) over the process and its workers, sampled
every 100 ms. Runs are interleaved round after round, so drifting load on a shared
machine hits every setting alike; the table shows the median.

    python benchmarks/prepare_scaling.py --mb 100 --processes 1 2 --rounds 1
    python benchmarks/prepare_scaling.py --mb 100 --stages       # where it stops scaling: the main process's share
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def write_corpus(directory: Path, megabytes: int) -> dict[str, Path]:
    jsonl, parquet = directory / "c.jsonl", directory / "c.parquet"
    if jsonl.is_file() and parquet.is_file():
        return {"jsonl": jsonl, "parquet": parquet}
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dist_gpt.tokenizer import gpt2_files

    vocab = json.loads(gpt2_files()[1].read_text())
    words = [w[1:] for w in vocab if w.startswith("\u0120") and w[1:].isalpha()]
    weights = [1 / (i + 10) for i in range(len(words))]
    rng = random.Random(0)
    documents, size = [], 0
    while size < megabytes * 1_000_000:
        drawn = rng.choices(words, weights, k=rng.randint(200, 1500))
        sentences = [" ".join(drawn[i : i + 15]).capitalize() + rng.choice(".,?!") for i in range(0, len(drawn), 15)]
        documents.append(" ".join(sentences))
        size += len(documents[-1])
    directory.mkdir(parents=True, exist_ok=True)
    with open(jsonl, "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in documents)
    pq.write_table(pa.table({"text": documents}), parquet, row_group_size=2000)
    return {"jsonl": jsonl, "parquet": parquet}


def run_one(corpus: Path, out: Path, processes: int) -> dict:
    command = [sys.executable, "-m", "dist_gpt.prepare", "--dataset", str(corpus), "--out", str(out), "--num-proc", str(processes), "--force"]
    started = time.perf_counter()
    proc = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_full_info().pss for p in tree))
        except psutil.Error:
            pass
        time.sleep(0.1)
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} exited {proc.returncode}")
    meta = json.loads((out / "meta.json").read_text())
    return {"tokens": meta["train_tokens"] + meta["val_tokens"], "tokens_per_s": meta["tokens_per_s"], "wall_s": time.perf_counter() - started, "peak_pss_mb": peak / 2**20}


def stage_times(corpus: Path) -> dict:
    """One core, one stage at a time, over the whole corpus: what the main process does (read + batch, hand a
    batch to a worker and take its arrays back, split and write) against what the workers do (tokenize, hash,
    build arrays). The main process's share bounds the speed-up: it cannot go faster than its own stages."""
    import pickle

    from dist_gpt.data import prepare as prepare_module
    from dist_gpt.data.encode_pool import encode_documents
    from dist_gpt.data.sources import open_source

    times = dict.fromkeys(("read", "handoff", "work", "write"), 0.0)
    tokens = 0
    with tempfile.TemporaryDirectory() as tmp, prepare_module.SplitWriter(Path(tmp)) as writer:
        progress = prepare_module.tqdm(disable=True)
        clock = time.perf_counter()
        for batch in prepare_module._batches(open_source(str(corpus)).documents()):
            now = time.perf_counter()
            times["read"] += now - clock
            sent = pickle.loads(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))
            times["handoff"] += (clock := time.perf_counter()) - now
            encoded = encode_documents(sent)
            times["work"] += (now := time.perf_counter()) - clock
            encoded = pickle.loads(pickle.dumps(encoded, protocol=pickle.HIGHEST_PROTOCOL))
            times["handoff"] += (clock := time.perf_counter()) - now
            prepare_module._write_batch(writer, encoded, 0.01, progress)
            tokens += len(encoded.ids)
            times["write"] += (now := time.perf_counter()) - clock
            clock = now
    main_process = times["read"] + times["handoff"] + times["write"]
    return {**{k: round(v, 2) for k, v in times.items()}, "tokens": tokens, "max_speedup": round((main_process + times["work"]) / main_process, 1),
            "main_process_ceiling_tokens_per_s": round(tokens / main_process), "work_tokens_per_s_per_core": round(tokens / times["work"])}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=100, help="corpus size in MB of text")
    parser.add_argument("--dir", default="/tmp/prepare_scaling", help="where the corpus and outputs go")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--formats", nargs="+", default=["jsonl", "parquet"])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--stages", action="store_true", help="time the pipeline's stages on one core instead (where scaling stops)")
    args = parser.parse_args()
    directory = Path(args.dir) / f"{args.mb}mb"
    corpora = write_corpus(directory, args.mb)
    if args.stages:
        for fmt in args.formats:
            print(json.dumps({"format": fmt, **stage_times(corpora[fmt]), "load": os.getloadavg()[0]}), flush=True)
        return
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start; corpus {args.mb} MB in {directory}", flush=True)
    results: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.rounds):
        for fmt in args.formats:
            for n in args.processes:
                r = run_one(corpora[fmt], directory / f"out-{fmt}-{n}", n)
                results.setdefault((fmt, n), []).append(r)
                print(json.dumps({"format": fmt, "processes": n, **r, "load": os.getloadavg()[0]}), flush=True)
    print("\n| format | processes | tokens | tokens/s (median) | peak memory (PSS, all processes) |")
    print("| --- | --- | --- | --- | --- |")
    for (fmt, n), rs in results.items():
        print(f"| {fmt} | {n} | {rs[0]['tokens']:,} | {statistics.median(r['tokens_per_s'] for r in rs):,.0f} | {max(r['peak_pss_mb'] for r in rs):,.0f} MB |")
    same = all(
        (directory / f"out-{fmt}-{n}" / f"{s}.bin").read_bytes() == (directory / f"out-{fmt}-{args.processes[0]}" / f"{s}.bin").read_bytes()
        for fmt in args.formats for n in args.processes for s in ("train", "val")
    )  # fmt: skip
    print(f"\ntoken files byte-identical across process counts: {same}")


if __name__ == "__main__":
    main()
