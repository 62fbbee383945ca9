"""How many bytes a training step of a GPT needs on one device, before running it.

A training step's memory peaks in one of three places, and `predict` takes the largest:

- the loss layer's forward: every block's saved activations are alive, plus the output layer's buffers;
- backward: the activations are still there while the output layer's gradients are formed, and at its end
  every parameter's gradient exists while the embedding's gradient is being summed;
- the optimizer step: parameters, gradients and AdamW's two moments (plus the foreach temporaries on CPU).

Each term below is counted from the code of dist_gpt.model and dist_gpt.fused_loss: which tensors autograd
saves (verified byte for byte with `torch.autograd.graph.saved_tensors_hooks` in tests/test_autotune.py) and
which buffers live only inside a call. Notation: N tokens per micro-batch per rank (micro_batch x T),
C = n_embd, V = vocab_size (padded), L = n_layer, H = n_head, P = parameter count (the tied wte/lm_head
matrix once), W = world size; `a` = bytes of the compute dtype (4 fp32, 2 bf16), `r` = bytes of the
residual stream between blocks (4 under autocast, whose parameters stay fp32; 2 when the strategy casts
the parameters themselves: FSDP mixed precision, DeepSpeed bf16).

The parallel strategy decides where parameters, gradients and optimizer states live (`sharding_for`): every
rank keeps all of it (single, ddp), or 1/W of some of it (ZeRO-1/2/3, FSDP), or none of it on the device
(CPU offload). Activations are never sharded: each rank runs its own micro-batch.

On top of what tensors hold, each process pays a fixed overhead that no tensor accounts for: on CUDA the
context (kernels, cuBLAS workspaces; ~500 MB, not in torch.cuda.max_memory_allocated), on CPU the resident
set of an idle python + torch process (measured once, see `idle_process_bytes`). And on CPU the heap keeps
what it once held (dist_gpt.runtime.keep_freed_memory turns trimming off so buffers are reused, not
re-faulted), so the resident peak exceeds the live-tensor peak by the holes freed buffers leave: see
CPU_HEAP_SLACK_FRACTION.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from dataclasses import dataclass, fields

from dist_gpt.model import GPTConfig
from dist_gpt.runtime.metrics import peak_resident_bytes

MB = 2**20
GB = 2**30
CUDA_CONTEXT_BYTES = 500 * MB  # CUDA context + library handles: outside the caching allocator's count

# The CPU resident peak over the idle process and the live-tensor peak: slack = fixed + fraction x live.
# With trimming off the heap only grows, and a buffer freed in one phase and needed again in the next (the
# loss layer's chunk buffer, a block's activations) is placed above whatever was allocated into its hole
# meanwhile (AdamW's moments, created lazily in the first optimizer step, are the usual culprits): that
# part scales with the live peak. The fixed part is what the first step adds to an idle process besides
# tensors (thread pools' malloc arenas, BLAS/oneDNN buffers). Fitted to 11 measurements (4 shapes, RoPE and
# learned, chunked and plain loss; benchmarks/memory_model.py): the fit leaves the predicted resident peak
# within 8% of every measurement. The autotuner measures; this only starts its search.
CPU_HEAP_SLACK_FRACTION = 0.35
CPU_RUNTIME_BYTES = 50 * MB

STRATEGIES = ("single", "ddp", "zero0", "zero1", "zero2", "zero3", "fsdp", "fsdp-no-reshard")


# ------------------------------------------------------------------------------------------ counting


def block_params(c: GPTConfig) -> int:
    """One transformer block: c_attn 3C^2 (+3C), attn c_proj C^2 (+C), c_fc 4C^2 (+4C), mlp c_proj 4C^2 (+C),
    two LayerNorms 2C (+2C biases)."""
    C = c.n_embd
    return 12 * C * C + (13 * C if c.bias else 2 * C)


def root_params(c: GPTConfig) -> int:
    """What no block owns: wte (= lm_head when tied, else lm_head's own V x C too), the learned position table, ln_f."""
    C = c.n_embd
    return c.vocab_size * C * (1 if c.tie_embeddings else 2) + (c.block_size * C if c.position == "learned" else 0) + (2 * C if c.bias else C)


def param_count(c: GPTConfig) -> int:
    return root_params(c) + c.n_layer * block_params(c)


def resolve_attention(c: GPTConfig, device: str) -> str:
    """'math' keeps the T x T attention probabilities; every other kernel (CUDA flash/efficient/cudnn,
    PyTorch's CPU flash) keeps only O(T) per head: q, k, v, the output and the log-sum-exp. On CPU,
    attention dropout sends SDPA to the math kernel whatever was asked (the CPU flash kernel has none)."""
    if c.attn_backend == "math" or (device == "cpu" and c.dropout > 0):
        return "math"
    return "flash"


def dropout_mask_bytes(device: str, input_bytes: int) -> int:
    """Bytes per element of the mask dropout saves: CUDA's fused kernel keeps a bool mask; the CPU path
    multiplies by a noise tensor of the input's dtype and keeps that."""
    return 1 if device == "cuda" else input_bytes


def block_activation_bytes(c: GPTConfig, tokens: int, a: int, r: int, device: str, autocast: bool) -> int:
    """Bytes autograd saves for one Block's backward (what its forward leaves alive).

    Per token, reading Block.forward top to bottom:
      ln_1, ln_2        each saves its input (the residual stream, r bytes x C) and mean + rstd (2 x fp32)
      c_attn            saves its input, ln_1's output (C, in the compute dtype)
      q, k, v           the qkv output (3C) stays alive: v (and q, k without RoPE) are views of it, saved by SDPA
      RoPE              rotated q and k are new tensors (2C) that SDPA saves; the rotation itself saves only
                        the cos/sin tables
      SDPA (flash-like) saves its output (C) and the log-sum-exp (H x fp32); `y.transpose.contiguous()` is a
                        copy (another C) when the output is head-major, i.e. when q was (RoPE makes it so),
                        and the same storage otherwise. Dropout inside the kernel keeps only an RNG state.
      SDPA (math)       saves scaled copies of q, k, v (3C) instead, and the H x T attention probabilities per
                        token, in fp32 on CPU (autocast upcasts the math kernel there) and the compute dtype on
                        CUDA; with dropout also the mask and the dropped probabilities (2 more H x T)
      attn c_proj       saves its input y (C)
      c_fc              saves ln_2's output (C)
      GELU              saves its input, c_fc's output (4C)
      mlp c_proj        saves GELU's output (4C)
      dropout (p > 0)   a mask after each c_proj (2C; see dropout_mask_bytes)
    so flash + RoPE: 2r C + 17a C + 16 + 4H bytes per token (learned positions: 15a C; fp32: 19 x 4 = 76 C).
    Under autocast the bf16 copies of the four weight matrices (12 C^2 x 2 bytes) are cached for the whole
    forward and saved by the linears, and RoPE's cos/sin tables are cast for q and for k: they count here too."""
    C, H, T = c.n_embd, c.n_head, c.block_size
    rope = c.position == "rope"
    per_token = 2 * r * C + 2 * 2 * 4  # ln_1/ln_2 inputs, mean + rstd
    per_token += a * C * (1 + 1 + 1 + 4 + 4)  # inputs of c_attn, attn c_proj, c_fc, mlp c_proj; GELU input
    if resolve_attention(c, device) == "math":
        math_bytes = 4 if device == "cpu" else a  # CPU autocast runs the math kernel in fp32 throughout
        per_token += math_bytes * 3 * C + math_bytes * H * T
        if c.dropout > 0:
            per_token += (math_bytes + dropout_mask_bytes(device, math_bytes)) * H * T
    else:
        per_token += a * C * (3 + (2 if rope else 0) + (1 if rope else 0)) + 4 * H
    if c.dropout > 0:
        per_token += 2 * C * dropout_mask_bytes(device, a)
    weight_copies = 2 * 12 * C * C if autocast else 0
    if autocast and rope:
        weight_copies += 4 * T * (c.head_dim // 2) * a  # cos and sin cast to bf16, once for q and once for k
    return tokens * per_token + weight_copies


# ------------------------------------------------------------------------------------------ sharding


@dataclass(frozen=True)
class Sharding:
    """Bytes per parameter each rank keeps, before dividing by the world size where `sharded`.

    Mixed precision comes in three shapes: autocast (fp32 parameters, gradients and moments; bf16 copies of
    the weights made during forward), FSDP's policy (fp32 shards, bf16 gathered units), DeepSpeed bf16 (bf16
    parameters and gradients on the model, fp32 master weights + moments + gradient partition in the
    optimizer, as in DeepSpeed's estimate_zero2_model_states_mem_needs)."""

    param_bytes: int  # the model's parameters as stored
    grad_bytes: int  # their gradients
    optim_bytes: int  # AdamW exp_avg + exp_avg_sq, fp32
    master_bytes: int  # fp32 master weights (+ DeepSpeed's fp32 gradient partition) kept by the optimizer
    params_sharded: bool
    grads_sharded: bool
    optim_sharded: bool
    params_offloaded: bool = False
    optim_offloaded: bool = False  # optimizer states (and master weights) live in CPU memory
    gathers_units: bool = False  # ZeRO-3 / FSDP: a unit's parameters are gathered around its use
    keeps_gathered: bool = False  # FSDP reshard_after_forward=False: gathered from forward to backward
    compute_casts_params: bool = False  # the residual stream is bf16 (no autocast)


def sharding_for(strategy: str, bf16: bool, offload: bool) -> Sharding:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is unknown to the memory model: use one of {', '.join(STRATEGIES)}")
    if strategy in ("single", "ddp"):  # DDP's gradient buckets are the .grad tensors (gradient_as_bucket_view)
        return Sharding(4, 4, 8, 0, False, False, False)
    if strategy.startswith("zero"):
        stage = int(strategy[-1])
        low = 2 if bf16 else 4
        master = 8 if bf16 else 0  # fp32 master weights + fp32 gradient partition (bf16 only)
        return Sharding(
            low, low, 8, master,
            params_sharded=stage >= 3, grads_sharded=stage >= 2, optim_sharded=stage >= 1,
            params_offloaded=offload and stage >= 3, optim_offloaded=offload and stage >= 1,
            gathers_units=stage >= 3, compute_casts_params=bf16,
        )
    # FSDP2: fp32 shards of parameters, gradients (reduce_dtype fp32) and moments; CPUOffloadPolicy moves all three
    return Sharding(
        4, 4, 8, 0, True, True, True,
        params_offloaded=offload, optim_offloaded=offload,
        gathers_units=True, keeps_gathered=strategy == "fsdp-no-reshard", compute_casts_params=bf16,
    )


# ------------------------------------------------------------------------------------------ the prediction


@dataclass
class Breakdown:
    """Predicted peak bytes on one device, split by what holds them, at the phase where the step peaks."""

    micro_batch: int
    phase: str  # forward | backward | backward end | optimizer step
    params: int
    gradients: int
    optimizer_states: int  # AdamW moments (+ fp32 master weights where the strategy keeps them)
    activations: int  # saved for backward, all blocks (+ the recomputed block with checkpointing)
    output_layer: int  # the loss layer's buffers (and gathered FSDP/ZeRO-3 units) at that phase
    allocator_slack: int  # CPU: heap holes and runtime buffers (see CPU_HEAP_SLACK_FRACTION); CUDA: 0 (headroom's job)
    overhead: int  # CUDA context, or the idle process's resident set on CPU

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self) if f.name not in ("micro_batch", "phase"))

    @property
    def tensors(self) -> int:
        """What torch.cuda.max_memory_allocated counts: the total less overhead and slack."""
        return self.total - self.overhead - self.allocator_slack

    def table(self) -> str:
        rows = [(f.name.replace("_", " "), getattr(self, f.name)) for f in fields(self) if f.name not in ("micro_batch", "phase")]
        width = max(len(name) for name, _ in rows)
        lines = [f"micro-batch {self.micro_batch}: peak in {self.phase}"]
        lines += [f"  {name:<{width}}  {value / MB:>10,.1f} MB" for name, value in rows]
        lines.append(f"  {'total':<{width}}  {self.total / MB:>10,.1f} MB")
        return "\n".join(lines)


def predict(
    gpt_config: GPTConfig,
    micro_batch: int,
    strategy: str = "single",
    world_size: int = 1,
    dtype: str = "fp32",
    activation_checkpointing: bool = False,
    offload: bool = False,
    *,
    device: str = "cuda",
    grad_accum: int = 1,
    overhead_bytes: int | None = None,
) -> Breakdown:
    """Peak bytes of one training step (forward, backward, AdamW step) on one rank.

    strategy: one of STRATEGIES; dtype 'fp32', 'bf16' or 'fp16'; offload: the strategy's CPU offload (optimizer
    states for ZeRO-1/2, + parameters for ZeRO-3 and FSDP); device 'cuda' or 'cpu' (attention kernel,
    overhead, optimizer temporaries); grad_accum > 1 keeps the gradients alive through later micro-batches'
    forward. overhead_bytes defaults to CUDA_CONTEXT_BYTES on CUDA and `idle_process_bytes()` on CPU."""
    c = gpt_config
    bf16 = dtype in ("bf16", "bfloat16", "fp16", "float16")  # 2-byte compute: fp16 lays memory out as bf16 does
    s = sharding_for(strategy, bf16, offload)
    W = max(1, world_size) if strategy not in ("single", "zero0") else 1
    autocast = bf16 and not s.compute_casts_params and not s.gathers_units
    a = 2 if bf16 else 4
    r = 2 if bf16 and not autocast else 4
    N = micro_batch * c.block_size
    C, V, L = c.n_embd, c.vocab_size, c.n_layer
    P, P_block, P_root = param_count(c), block_params(c), root_params(c)

    def share(total: float, sharded: bool, offloaded: bool = False) -> int:
        return 0 if offloaded else int(total / W if sharded else total)

    # ---- model states (what lives from step to step)
    params = share(P * s.param_bytes, s.params_sharded, s.params_offloaded)
    optimizer_states = share(P * (s.optim_bytes + s.master_bytes), s.optim_sharded, s.optim_offloaded)
    grads_all = share(P * s.grad_bytes, s.grads_sharded, s.params_offloaded)
    # ZeRO-3/FSDP gather each unit's parameters around its use (in the compute dtype). The root unit (wte,
    # tied to lm_head; ln_f) stays gathered from the embedding to the loss; FSDP2 prefetches the next block.
    if not s.gathers_units:
        gathered = 0
    elif s.keeps_gathered:
        gathered = P * a
    else:
        gathered = (P_root + 2 * P_block) * a
    # A unit's full gradient exists until it is reduce-scattered; the largest unit is the root (V x C).
    unsharded_grad = (P_root * (a + s.grad_bytes)) if s.gathers_units else 0

    # ---- activations saved for backward
    per_block = block_activation_bytes(c, N, a, r, device, autocast)
    if activation_checkpointing:
        # checkpoint() keeps each block's input only; backward recomputes one block at a time
        blocks = L * N * C * r + per_block
    else:
        blocks = L * per_block
    # token ids and targets (int64), ln_f's input + stats, the embedding dropout's mask
    non_block = N * 16 + N * (C * r + 8) + (N * C * dropout_mask_bytes(device, r) if c.dropout > 0 else 0)
    activations = blocks + non_block

    # ---- the loss layer (LMHead), forward and start of backward
    weight_dtype = 2 if bf16 and not autocast else 4  # lm_head's weight as the loss sees it
    if c.loss == "plain":
        # F.linear -> logits (N x V, a), .float() (a second N x V unless already fp32), log_softmax keeps its
        # output (N x V fp32); autocast caches and saves a bf16 copy of the weight.
        saved = N * V * 4 + (V * C * 2 if autocast else 0) + N * C * a
        forward = saved + N * V * a + (N * V * 4 if a != 4 else 0)
        # backward: nll's gradient and log_softmax's input gradient (N x V fp32 each) while its output is alive
        backward = saved + 2 * N * V * 4 + (N * V * a if a != 4 else 0)
    else:
        # fused_loss: saves grad_hidden (N x C, a) and grad_weight (V x C fp32), both computed in forward.
        # Inside forward: one fp32 chunk x V buffer reused by every chunk, its low-precision twin for bf16
        # matmuls, the bf16 V x C product each chunk adds into grad_weight, and copies of hidden (when the
        # residual stream is fp32 and the compute bf16) and of the weight (under autocast).
        rows = min(c.loss_chunk_tokens, N)
        saved = N * C * a + V * C * 4
        low_precision = V * C * a + rows * V * a if a != 4 else 0
        forward = saved + rows * V * 4 + low_precision + (N * C * a if r != a else 0) + (V * C * a if weight_dtype != a else 0)
        # backward scales both saved gradients out of place (fp32), then casts to the inputs' dtypes
        backward = saved + V * C * 4 + N * C * 4 + (V * C * weight_dtype if weight_dtype != 4 else 0)
    # with gradient accumulation the previous micro-batches' gradients are alive during this one's forward
    carried_grads = grads_all if grad_accum > 1 else 0

    # ---- the phases
    states = params + optimizer_states
    # End of backward: every gradient exists (and the embedding's dense V x C gradient is being summed into
    # the tied weight's, fp32) while activations are gone.
    embedding_grad = 0 if s.params_offloaded else V * C * 4
    # AdamW step: foreach on CPU allocates one temporary the size of the parameters it steps (sqrt of
    # exp_avg_sq); fused CUDA kernels and DeepSpeed's optimizers step in place.
    step_temp = share(P * 4, s.optim_sharded, s.optim_offloaded) if device == "cpu" and not strategy.startswith("zero") else 0
    phases = {
        "forward": (states, carried_grads, activations, forward + gathered),
        "backward": (states, carried_grads, activations, backward + gathered + unsharded_grad),
        "backward end": (states, grads_all, 0, embedding_grad + gathered + unsharded_grad),
        "optimizer step": (states, grads_all, 0, step_temp),
    }
    phase = max(phases, key=lambda name: sum(phases[name]))
    _, gradients, acts, output_layer = phases[phase]
    live = params + optimizer_states + gradients + acts + output_layer
    if overhead_bytes is None:
        overhead_bytes = CUDA_CONTEXT_BYTES if device == "cuda" else idle_process_bytes()
    return Breakdown(
        micro_batch=micro_batch,
        phase=phase,
        params=params,
        gradients=gradients,
        optimizer_states=optimizer_states,
        activations=acts,
        output_layer=output_layer,
        allocator_slack=int(CPU_RUNTIME_BYTES + CPU_HEAP_SLACK_FRACTION * live) if device == "cpu" else 0,
        overhead=overhead_bytes,
    )


def largest_fitting(budget_bytes: float, gpt_config: GPTConfig, *args, limit: int = 1 << 20, **kwargs) -> int:
    """The largest micro-batch whose predicted peak is at most budget_bytes (0 if not even 1 fits).
    Same arguments as `predict` after the micro-batch. The peak grows with the micro-batch, so: bisection."""
    def fits(micro_batch: int) -> bool:
        return predict(gpt_config, micro_batch, *args, **kwargs).total <= budget_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # lo fits, hi does not (or is past the limit)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


@functools.lru_cache(maxsize=None)
def idle_process_bytes() -> int:
    """Resident set of a fresh python that has imported torch and dist_gpt's training modules: what every
    CPU process pays before its first tensor. Measured once per process, in a child (our own resident set
    already holds whatever this process did)."""
    code = "import dist_gpt.train.loop, dist_gpt.runtime.metrics as m; print(m.peak_resident_bytes())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def table(breakdowns: list[Breakdown]) -> str:
    """Several predictions side by side, like DeepSpeed's estimate_zero*_model_states_mem_needs, with activations."""
    names = [f.name for f in fields(Breakdown) if f.name not in ("micro_batch", "phase")]
    head = f"{'micro-batch':>11} {'peak in':<14}" + "".join(f"{n.replace('_', ' ')[:12]:>13}" for n in names) + f"{'total':>13}"
    lines = [head + "   (MB)"]
    for b in breakdowns:
        lines.append(f"{b.micro_batch:>11} {b.phase:<14}" + "".join(f"{getattr(b, n) / MB:>13,.1f}" for n in names) + f"{b.total / MB:>13,.1f}")
    return "\n".join(lines)
