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
H200 (GPT-2 124M, bf16, 16k tokens) a step is 1-4% slower and its peak memory 40-50% lower.

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
    """Loss (fp32, 0-dim) and, as asked, grad of the loss w.r.t. hidden (compute dtype) and weight (fp32)."""
    N, V = hidden.size(0), weight.size(0)
    h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
    need_grad = need_grad_hidden or need_grad_weight

    valid = targets != ignore_index
    n_valid = valid.sum()  # stays a tensor: no host sync
    # Per-token factor of dL/dlogits: 1/n_valid for counted tokens, 0 for ignored ones. clamp keeps it 0 (not
    # nan) when nothing is counted, so the gradients are zero like F.cross_entropy's while the loss is 0/0.
    token_scale = valid.float() / n_valid.clamp(min=1)
    safe_targets = targets.masked_fill(~valid, 0).long()  # any in-range id; those rows are masked out

    rows = min(chunk_tokens, N)
    # One fp32 (rows, V) buffer serves every chunk, all updates in place: the chunk x V passes over it are
    # what this loss costs beyond its three matmuls (memory-bound on CPU and GPU alike), so there are as few
    # as stock ops allow: amax, sub, exp, sum (+ the two dtype conversions when computing in bf16).
    z_buf = torch.empty(rows, V, dtype=torch.float32, device=hidden.device)
    # For bf16 compute the matmuls need a low-precision twin of it (logits out of one, dL/dlogits into the next).
    low_buf = torch.empty(rows, V, dtype=compute_dtype, device=hidden.device) if compute_dtype != torch.float32 else None
    row_ids = torch.arange(rows, device=hidden.device)

    # fp16 has 5 exponent bits: dL/dlogits (softmax - onehot) / n_valid, ~1e-9 for rare tokens in a real batch,
    # would underflow in it (the loss scaler's factor only arrives in backward). So in fp16 the low-precision
    # dL/dlogits stays softmax - onehot, in [-1, 1], and the 1/n_valid is applied on the fp32 side of the matmuls.
    unit_grad = compute_dtype == torch.float16

    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = (torch.empty(h.shape, dtype=torch.float32, device=h.device) if unit_grad else torch.empty_like(h)) if need_grad_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad_weight else None

    for start in range(0, N, chunk_tokens):
        end = min(start + chunk_tokens, N)
        n = end - start
        h_c, t_c, valid_c = h[start:end], safe_targets[start:end].unsqueeze(1), valid[start:end]
        z = z_buf[:n]
        if low_buf is None:
            torch.mm(h_c, w.t(), out=z)
        else:
            torch.mm(h_c, w.t(), out=low_buf[:n])
            z.copy_(low_buf[:n])

        # Stable log-sum-exp by hand (torch.logsumexp would allocate a chunk x V temporary and exp twice):
        # z <- exp(z - max), the row sums s, and loss = log s - (z_target - max).
        z.sub_(z.amax(dim=1, keepdim=True))
        target_logit = z.gather(1, t_c).squeeze(1)
        z.exp_()
        sums = z.sum(dim=1, keepdim=True)
        loss_sum += torch.where(valid_c, sums.squeeze(1).log() - target_logit, 0.0).sum()
        if not need_grad:
            continue

        # dL/dlogits = diag(row_scale) G, with G = exp(z - max) - s * onehot (one tiny scatter into z) and
        # row_scale = token_scale / s, one factor per token.
        z[row_ids[:n], t_c.squeeze(1)] -= sums.squeeze(1)
        row_scale = token_scale[start:end].unsqueeze(1) / sums
        if unit_grad:
            _fp16_chunk_grads(z, sums, valid_c, w, h_c, low_buf[:n], grad_hidden[start:end] if need_grad_hidden else None, grad_weight)
            continue
        if low_buf is None:
            # fp32: apply row_scale on the (chunk, C) side of each matmul rather than in another pass over the
            # chunk x V logits: (diag(r) G) W = diag(r) (G W) and (diag(r) G)^T h = G^T (diag(r) h).
            # G's entries lie in [-V, 1], well inside fp32's range.
            dz, side_scale = z, row_scale
        else:
            # bf16: the low-precision copy is a pass anyway; scaling inside it rounds dL/dlogits once, as the
            # plain path's cast does.
            dz, side_scale = torch.mul(z, row_scale, out=low_buf[:n]), None

        if need_grad_hidden:
            torch.mm(dz, w, out=grad_hidden[start:end])
            if side_scale is not None:
                grad_hidden[start:end].mul_(side_scale)
        if need_grad_weight:
            h_side = h_c if side_scale is None else h_c * side_scale
            if low_buf is None:
                grad_weight.addmm_(dz.t(), h_side)  # in place, no (V, C) temporary
            else:
                grad_weight += torch.mm(dz.t(), h_side)  # addmm_ cannot mix dtypes; the running sum stays fp32

    if unit_grad and need_grad:
        for grad in (grad_hidden, grad_weight):
            if grad is not None:
                grad.div_(n_valid.clamp(min=1))
    return loss_sum / n_valid, grad_hidden, grad_weight


def _fp16_chunk_grads(z, sums, valid_c, w, h_c, dz, grad_hidden_c, grad_weight) -> None:
    """One chunk's gradients in fp16, not yet divided by n_valid (the caller does that once, in fp32).

    dz = softmax - onehot of the valid rows, in [-1, 1]; dz @ W is then bounded by 2 max|W|. dz^T @ h sums up
    to `rows` terms of size |h| per entry, so h is scaled down by a power of two (exact) that keeps the sum
    under 64 max|h|, far from fp16's 65504, and the product is scaled back up in fp32."""
    torch.mul(z, valid_c.unsqueeze(1).float() / sums, out=dz)
    if grad_hidden_c is not None:
        grad_hidden_c.copy_(torch.mm(dz, w))
    if grad_weight is not None:
        shrink = 2.0 ** -max(0, math.ceil(math.log2(dz.size(0) / 64)))
        grad_weight.add_(torch.mm(dz.t(), h_c * shrink), alpha=1 / shrink)
