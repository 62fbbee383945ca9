"""Micro-batch autotuner: the largest micro-batch that fits the device's memory, measured, not guessed.

    python -m dist_gpt.autotune_batch --config bible-seed [--strategy single|ddp|fsdp|deepspeed]
        [--memory-budget-gb 24] [--headroom 0.08] [--objective largest|throughput] [--no-cache] [section.key=value ...]
    torchrun --nproc_per_node=8 -m dist_gpt.autotune_batch --config gpt2-124m-owt --strategy fsdp

and `train.micro_batch_size: auto` in a training config (launch/train.py calls `autotune_for_training` before
the trainer starts: dist_gpt.train.run).

How it decides. The memory model (dist_gpt.autotune.memory) predicts a starting size; from there a search runs *real*
training steps (forward, backward, AdamW step; `TRIAL_STEPS` of them, the real model and strategy on the
real device, random tokens) at candidate sizes, doubling while they fit and then narrowing the bracket
(interpolating on the measured peaks, bisecting when that stalls). A size fits iff no rank ran out of memory
and the highest rank's measured peak is at most budget x (1 - headroom). The peak is
- CUDA: torch.cuda.max_memory_allocated of the trial (reset before it) + the process's fixed overhead (CUDA
  context and other processes on the card: total - free - reserved, measured before the trials); a budget
  below the card is enforced with set_per_process_memory_fraction, so it runs out where a card of that size would;
- CPU: the trial process's peak resident set (VmHWM; the malloc tuning of dist_gpt.runtime.malloc applied, as in
  training). Peaks cannot be reset in a process, so every CPU trial runs in a fresh subprocess. CPU has no
  out-of-memory of its own (the kernel would swap or kill), so the limit alone decides; as safety nets a
  trial whose predicted peak exceeds the RAM left is not run, and a trial's heap is capped (RLIMIT_DATA,
  2 x the budget; DIST_GPT_TRIAL_DATA_LIMIT_MB to set it) so that running past it is an out-of-memory.
A trial does as many micro-batches per optimizer step as training will (2 at most: from the second on the
previous gradients are alive during forward, and nothing changes after that).

Out-of-memory policy: an OOM is retried once, after a full cleanup; a size that runs out twice in a row does
not fit. A single OOM can come from outside the step (memory a previous trial had not yet returned, another
process's transient use, fragmentation) and would otherwise make the tuner settle far below what fits; a
second one is real. Once one has repeated, the card is known to run out below the limit (the caching
allocator's reserve exceeds what is allocated), and later OOMs in the search are taken at their word.
A peak over the limit without OOM is not retried: it repeats to within a few percent (on CPU, see
dist_gpt.autotune.memory on the heap; rare outliers reach +5-15%), which the headroom absorbs.

Several ranks (torchrun): every rank runs every trial, each in its own subprocess joined in a process group
of its own, so a rank that runs out mid-collective can never leave the training process group out of step;
a rank whose trial runs out (or fails) counts it in a store that every rank's tuner watches, and the other
trials, stuck in a collective with a rank that is gone (or failing because of it), are stopped and count as
out of memory too. The ranks then all_reduce(MAX) the outcome (OOM flag, peak, slowest step) so all agree.

The choice keeps the optimization unchanged: grad-accum = global batch / (micro-batch x world), so the
micro-batch must divide global batch / world; the largest fitting one that does is taken (and said so).
`--objective throughput` measures tokens/s at the largest few valid sizes (and with activation
checkpointing, when that lets a larger size fit) and takes the fastest.

The package, a file per job: search.py (the search and the choice, pure), measure.py (one trial's steps, in
this process, through dist_gpt.engine.build and dist_gpt.engine.step), trials.py (running trials: in process or one
subprocess each, trial_process.py being the subprocess's side), budget.py (the budget and the memory model
for this run), cache.py, report.py, tuner.py (the whole tuning), __main__.py (the command line).

Results are cached per (model shape, strategy, world size, device, budget, headroom, dtype, global batch,
objective) in $DIST_GPT_CACHE/autotune/ (default ~/.cache/dist_gpt/autotune/): a second run reads the answer.
"""

from dist_gpt.autotune.budget import RunMemoryModel, default_budget_bytes, memory_strategy, nothing_fits_message
from dist_gpt.autotune.measure import TRIAL_STEPS, run_steps
from dist_gpt.autotune.report import Report
from dist_gpt.autotune.search import NO_GLOBAL_BATCH_CAP, Outcome, Search, TrialResult, Tried, search_largest, tune, valid_sizes, worst_of
from dist_gpt.autotune.trials import TrialRunner, agree_across_ranks
from dist_gpt.autotune.tuner import autotune, autotune_for_training, measure_sizes

__all__ = [
    "NO_GLOBAL_BATCH_CAP", "TRIAL_STEPS", "Outcome", "Report", "RunMemoryModel", "Search", "TrialResult", "TrialRunner", "Tried",
    "agree_across_ranks", "autotune", "autotune_for_training", "default_budget_bytes", "measure_sizes", "memory_strategy",
    "nothing_fits_message", "run_steps", "search_largest", "tune", "valid_sizes", "worst_of",
]  # fmt: skip
