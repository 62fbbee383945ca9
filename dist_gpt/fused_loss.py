"""Output projection + cross-entropy without ever holding the full logits.

For a small GPT the output layer dominates everything: 2048 tokens x 50304 vocab of fp32 logits is 412 MB,
and the plain path keeps those logits, their softmax and then their gradient (another 412 MB) alive across
forward and backward. `linear_cross_entropy` instead walks over the tokens in chunks of `chunk_tokens` rows
and, for each chunk, computes the logits, the loss and straight away the gradients they imply:

    dL/dlogits_c = (softmax(logits_c) - onehot(targets_c)) / n_valid
    grad_hidden_c = dL/dlogits_c @ W             (chunk, C)
    grad_weight  += dL/dlogits_c^T @ hidden_c     (V, C), accumulated in fp32

so the peak is one chunk x V fp32 buffer (reused by every chunk) instead of N x V logits plus their N x V
gradient. What survives until backward is grad_hidden (N x C) and grad_weight (V x C fp32, 77 MB for the
seed model against its 412 MB of logits), which the backward would have produced anyway; backward only
scales them by the incoming gradient (1, or 1/accumulation steps). The price is that the gradients are
computed even if backward never runs; when autograd is off (evaluation) or neither input needs a gradient,
only the loss is computed.

The FLOPs are those of the plain path (3 matmuls of N x V x C): nothing is recomputed. Measured (see
benchmarks/fused_loss.py): on CPU a step is as fast as the plain one or faster and peak RSS halves; on an
H200 (GPT-2 124M, bf16, 16k tokens) a step is 1-4% slower and its peak memory 40-50% lower (measured before
the passes over the logits went from 6 to 2-3: benchmarks/fused_loss_bytes.py counts them, docs/benchmarks.md).

Semantics match `F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=...)`:
- the loss is fp32 and the mean over targets != ignore_index; ignored tokens get a zero gradient;
- if no target is valid the loss is nan (0/0) and the gradients are zero, exactly like F.cross_entropy;
- every vocabulary row, padding rows that never appear as targets included, gets its softmax gradient;
- under autocast the matmuls run in the autocast dtype (as F.linear would) while the softmax, the loss and
  the weight-gradient accumulation are fp32; the gradients come back in the dtypes of the inputs;
- in fp16 (5 exponent bits) the low-precision dL/dlogits is softmax - onehot, and 1/n_valid is applied in fp32:
  divided first it would underflow (the loss scaler's factor only reaches the loss in backward).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def plain_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
    """The reference: full (N, V) logits, upcast to fp32, then F.cross_entropy."""
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 1024, ignore_index: int = -1
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, computed `chunk_tokens` rows at a time.

    hidden (N, C), weight (V, C), targets (N,) integer ids or ignore_index. Returns a 0-dim fp32 tensor."""
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError(f"expected hidden (N, C), weight (V, C), targets (N,); got {tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    if hidden.size(0) != targets.size(0) or hidden.size(1) != weight.size(1):
        raise ValueError(f"shapes do not match: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, targets {tuple(targets.shape)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be at least 1")
    device_type = hidden.device.type
    # Decided here, not inside forward: there autograd is always off and needs_input_grad ignores no_grad().
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    grad_enabled = torch.is_grad_enabled()
    with torch.profiler.record_function("linear_cross_entropy"):  # a named range in profiles (benchmarks/loss_share.py)
        return _LinearCrossEntropy.apply(
            hidden, weight, targets, chunk_tokens, ignore_index, compute_dtype, grad_enabled and hidden.requires_grad, grad_enabled and weight.requires_grad
        )


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens, ignore_index, compute_dtype, need_grad_hidden, need_grad_weight):
        # Autocast off: the casts below are explicit, and ops with out= are not autocast-aware.
        with torch.autocast(hidden.device.type, enabled=False):
            loss, grad_hidden, grad_weight = _chunked_forward(
                hidden, weight, targets, chunk_tokens, ignore_index, compute_dtype, need_grad_hidden, need_grad_weight
            )
        ctx.input_dtypes = hidden.dtype, weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.input_dtypes
        # Out of place: the saved gradients must stay intact if backward runs again (retain_graph=True).
        if grad_hidden is not None:
            grad_hidden = (grad_hidden.float() * grad_loss).to(hidden_dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _chunked_forward(hidden, weight, targets, chunk_tokens, ignore_index, compute_dtype, need_grad_hidden, need_grad_weight):
    """Loss (fp32, 0-dim) and, as asked, grad of the loss w.r.t. hidden (compute dtype) and weight (fp32).

    Per chunk, over its chunk x V logits: the logits GEMM, one in-place log_softmax (the loss is -log p of the
    target), one exp into the buffer the gradient GEMMs read (p; the target's p - 1 is written from fp32), and
    those two GEMMs. The per-token factor of dL/dlogits (1/n_valid, 0 for ignored tokens) is applied on the
    (chunk, C) side of each GEMM instead of in another pass over the logits:
    (diag(r) G) W = diag(r) (G W) and (diag(r) G)^T h = G^T (diag(r) h), with G = softmax - onehot in [-1, 1].
    Low precision on CPU adds one pass (the logits GEMM writes bf16, copied to fp32); where the GEMMs take an
    fp32 output (CUDA, `_gemm_writes_fp32`) the logits GEMM writes fp32 and grad_weight accumulates inside the
    GEMM (beta = 1): no per-chunk V x C product."""
    N, V = hidden.size(0), weight.size(0)
    h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
    need_grad = need_grad_hidden or need_grad_weight
    low_precision = compute_dtype != torch.float32
    # fp16 has 5 exponent bits: dL/dlogits (softmax - onehot) / n_valid, ~1e-9 for rare tokens in a real batch,
    # would underflow in it (the loss scaler's factor only arrives in backward), and so would h / n_valid. So in
    # fp16 the per-token factor is the 0/1 mask and 1/n_valid is applied once, in fp32, at the end.
    unit_grad = compute_dtype == torch.float16
    fp32_out = compute_dtype == torch.bfloat16 and _gemm_writes_fp32(hidden.device)

    valid = targets != ignore_index
    n_valid = valid.sum()  # stays a tensor: no host sync
    # Per-token factor of dL/dlogits: 1/n_valid for counted tokens, 0 for ignored ones. clamp keeps it 0 (not
    # nan) when nothing is counted, so the gradients are zero like F.cross_entropy's while the loss is 0/0.
    token_scale = valid.float() if unit_grad else valid.float() / n_valid.clamp(min=1)
    safe_targets = targets.masked_fill(~valid, 0).long()  # any in-range id; those rows are masked out

    rows = min(chunk_tokens, N)
    # One fp32 (rows, V) buffer serves every chunk, all updates in place; in low precision a twin in the compute
    # dtype holds what the GEMMs read or (on CPU) write.
    z_buf = torch.empty(rows, V, dtype=torch.float32, device=hidden.device)
    low_buf = torch.empty(rows, V, dtype=compute_dtype, device=hidden.device) if low_precision else None
    row_ids = torch.arange(rows, device=hidden.device)

    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = (torch.empty(h.shape, dtype=torch.float32, device=h.device) if unit_grad else torch.empty_like(h)) if need_grad_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad_weight else None

    for start in range(0, N, chunk_tokens):
        end = min(start + chunk_tokens, N)
        n = end - start
        h_c, t_c, valid_c = h[start:end], safe_targets[start:end], valid[start:end]
        z = z_buf[:n]
        if not low_precision:
            torch.mm(h_c, w.t(), out=z)
        elif fp32_out:
            torch.mm(h_c, w.t(), out_dtype=torch.float32, out=z)
        else:
            torch.mm(h_c, w.t(), out=low_buf[:n])
            z.copy_(low_buf[:n])

        torch.log_softmax(z, dim=1, out=z)  # in place, stable: z = log p
        target_logp = z[row_ids[:n], t_c]
        loss_sum -= torch.where(valid_c, target_logp, 0.0).sum()
        if not need_grad:
            continue

        # G = p - onehot: exp into the buffer the GEMMs read; the target's p - 1 from fp32 (p near 1 would lose
        # its difference to 1 if subtracted after rounding to 16 bits).
        if low_precision:
            dz = torch.exp(z, out=low_buf[:n])
            dz[row_ids[:n], t_c] = (target_logp.exp() - 1).to(compute_dtype)
        else:
            dz = z.exp_()
            dz[row_ids[:n], t_c] -= 1
        row_scale = token_scale[start:end].unsqueeze(1)

        if need_grad_hidden:
            if fp32_out:
                torch.mul(torch.mm(dz, w, out_dtype=torch.float32), row_scale, out=grad_hidden[start:end])  # one rounding
            else:
                torch.mul(torch.mm(dz, w), row_scale, out=grad_hidden[start:end])
        if need_grad_weight:
            h_side = (h_c * row_scale).to(compute_dtype)
            if not low_precision:
                grad_weight.addmm_(dz.t(), h_side)  # in place, no (V, C) temporary
            elif fp32_out:
                torch.addmm(grad_weight, dz.t(), h_side, out_dtype=torch.float32, out=grad_weight)  # accumulated in the GEMM
            elif unit_grad:
                # dz^T h sums up to `rows` terms of size |h| per entry: h is scaled down by a power of two (exact)
                # that keeps the fp16 sum under 64 max|h|, far from fp16's 65504, and scaled back up in fp32.
                shrink = 2.0 ** -max(0, math.ceil(math.log2(n / 64)))
                grad_weight.add_(torch.mm(dz.t(), h_side * shrink), alpha=1 / shrink)
            else:
                grad_weight += torch.mm(dz.t(), h_side)  # CPU: no mixed-dtype GEMM; the running sum stays fp32

    if unit_grad and need_grad:
        for grad in (grad_hidden, grad_weight):
            if grad is not None:
                grad.div_(n_valid.clamp(min=1))
    return loss_sum / n_valid, grad_hidden, grad_weight


_FP32_OUT_SUPPORT: dict[str, bool] = {}


def _gemm_writes_fp32(device: torch.device) -> bool:
    """Whether bf16 GEMMs on this device write (and accumulate into) an fp32 output directly: torch's
    mm / addmm `out_dtype` (CUDA; not on CPU in torch 2.13). Probed once per device type on a tiny product."""
    key = device.type
    if key not in _FP32_OUT_SUPPORT:
        try:
            a = torch.ones(4, 8, dtype=torch.bfloat16, device=device)
            acc = torch.ones(4, 4, device=device)
            torch.addmm(acc, a, a.t(), out_dtype=torch.float32, out=acc)
            ok = bool((torch.mm(a, a.t(), out_dtype=torch.float32) == 8).all()) and bool((acc == 9).all())
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
        _FP32_OUT_SUPPORT[key] = ok
    return _FP32_OUT_SUPPORT[key]
