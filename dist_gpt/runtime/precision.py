"""Numerics of a run: which dtype it computes in, the fp16 loss scaler, TF32.

- `choose_dtype`: `train.dtype` (auto | fp32 | bf16 | fp16) and the device's facts -> the compute dtype. A pure
  function of its inputs, so every GPU generation is testable on a CPU.
- `LossScaler`: dynamic loss scaling for fp16 (torch.amp.GradScaler), checkpointed as a JSON part of the run,
  counting the steps it skipped on overflow without reading anything back from the GPU per step.
- `enable_tf32`: fp32 matmuls on CUDA through TF32 tensor cores (10-bit mantissa inputs, fp32 accumulation).

The precision policy, the same for every strategy in bf16 or fp16 ("mixed precision"):
- the matmuls (attention, MLP, the output layer) run in the 16-bit dtype;
- the master weights, AdamW's moments and the optimizer step are fp32;
- gradients are reduced over ranks and summed over micro-batches in fp32 (DDP's fp32 .grad, FSDP's
  reduce_dtype, DeepSpeed ZeRO-1/2/3's data_types.grad_accum_dtype; ZeRO-0 keeps the model's dtype);
- softmax, the loss and the fused loss's weight-gradient sum are fp32.
What differs is the activations between the matmuls: autocast (single, DDP) keeps the residual stream, the
LayerNorm outputs and the loss's input fp32; FSDP's MixedPrecisionPolicy and DeepSpeed's bf16 cast the
parameters and run the whole forward in the 16-bit dtype. So the strategies compute the same losses to fp32's
1e-4 in fp32 (tests/test_parallel.py) and to bf16's noise in bf16: 2e-3 relative, one bf16 rounding is 3.9e-3
(tests/test_precision_policy.py, measured 3e-4 FSDP vs single on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_gpt.config import DTYPES as DTYPE_NAMES
from dist_gpt.errors import UserError

# The compute dtypes by the names configs and files use (train.dtype, the autotuner's trial spec, its cache).
DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16)))
HALF_DTYPES = (torch.bfloat16, torch.float16)
BF16_NATIVE_CAPABILITY = (8, 0)  # Ampere: the first generation with bf16 tensor cores
# fp16 gradients that still overflow at this loss scale (or below: the scaler halves it on every overflow, from
# 2^16) are not an overflow the scale can fix but divergence (DeepSpeed's min_loss_scale is the same 1).
MIN_LOSS_SCALE = 1.0


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bf16': the inverse of DTYPES."""
    return next(name for name, d in DTYPES.items() if d == dtype)


@dataclass(frozen=True)
class DeviceFacts:
    """What the dtype decision needs to know about a device."""

    type: str  # cuda | cpu | mps
    name: str = ""
    capability: tuple[int, int] | None = None  # CUDA compute capability
    bf16_reported: bool = False  # CUDA: torch.cuda.is_bf16_supported(including_emulation=False); CPU: cpu_has_native_bf16()

    @property
    def native_bf16(self) -> bool:
        """bf16 in hardware. is_bf16_supported() alone answers True on a T4 or V100 too (emulated: slow)."""
        if self.type == "cpu":
            return self.bf16_reported
        return self.type == "cuda" and self.capability is not None and self.capability >= BF16_NATIVE_CAPABILITY and self.bf16_reported

    @classmethod
    def of(cls, device: torch.device) -> DeviceFacts:
        if device.type == "cpu":
            return cls("cpu", bf16_reported=cpu_has_native_bf16())
        if device.type != "cuda":
            return cls(device.type)
        return cls(
            "cuda",
            torch.cuda.get_device_name(device),
            torch.cuda.get_device_capability(device),
            torch.cuda.is_bf16_supported(including_emulation=False),
        )


# /proc/cpuinfo flags of bf16 matmul instructions: AVX512-BF16 (AMD Zen 4+, Intel Cooper Lake+) and AMX (Intel
# Sapphire Rapids+). oneDNN runs bf16 matmuls on them at ~2x the fp32 rate; without them bf16 is converted, slower.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has bf16 matmul instructions (Linux: /proc/cpuinfo; elsewhere: no, so fp32)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def choose_dtype(requested: str, facts: DeviceFacts) -> torch.dtype:
    """auto: bf16 where the device has it natively (GPUs from Ampere on; CPUs with AVX512-BF16 or AMX, as bf16
    autocast), else fp16 on CUDA (loss-scaled), fp32 elsewhere."""
    if requested == "auto":
        if facts.type == "cuda":
            return torch.bfloat16 if facts.native_bf16 else torch.float16
        return torch.bfloat16 if facts.type == "cpu" and facts.native_bf16 else torch.float32
    if requested not in DTYPES:
        raise UserError(f"train.dtype={requested!r} is not one of auto, {', '.join(DTYPES)}")
    if requested == "bf16" and facts.type == "cuda" and not facts.native_bf16:
        major, minor = facts.capability or (0, 0)
        raise UserError(
            f"train.dtype=bf16, but the {facts.name or 'GPU'} (compute capability {major}.{minor}) has no native bf16 "
            f"(it would be emulated, several times slower): use train.dtype=fp16 (or auto)"
        )
    return DTYPES[requested]


def dtype_notice(dtype: torch.dtype, device_type: str) -> str | None:
    """One line for a choice that works but is slow."""
    if dtype == torch.float16 and device_type == "cpu":
        return "train.dtype=fp16 on cpu: it runs (fp16 autocast + loss scaling) but slowly, CPUs have no fast fp16 matmuls; bf16 (where the CPU has it) or fp32 is the fast choice here"
    return None


def dtype_description(requested: str, dtype: torch.dtype, device_type: str) -> str:
    """The start line's precision: what runs, and why when `auto` chose it."""
    text = dtype_name(dtype) + (" + loss scaling" if dtype == torch.float16 else "")
    if requested == "auto" and device_type == "cpu":
        text += " autocast (auto: this CPU has native bf16)" if dtype == torch.bfloat16 else " (auto: this CPU has no native bf16)"
    return text


def enable_tf32() -> None:
    """fp32 matmuls on CUDA through TF32 (what train.dtype=fp32, and the fp32 parts of mixed precision, get on
    Ampere and later; no effect before).

    Through set_float32_matmul_precision("high"), not the per-backend `torch.backends.cuda.matmul.fp32_precision
    = "tf32"` of torch >= 2.9: after the per-backend setter, any code that reads the older getters
    (get_float32_matmul_precision(), matmul.allow_tf32 - parts of inductor's autotuning, other libraries)
    raises "mix of the legacy and new APIs" in torch 2.13; after this call both kinds of getter answer (tf32,
    high) and torch 2.13 warns about nothing."""
    torch.set_float32_matmul_precision("high")


class LossScaler:
    """Dynamic loss scaling for fp16: the loss is multiplied by a scale S before backward so that small
    gradients survive fp16; the gradients are divided by S before clipping and the optimizer step; a step whose
    gradients overflowed (inf/nan) is skipped and S halved; after `growth_interval` clean steps S doubles.

    Disabled (every method a pass-through) for fp32 and bf16, and for strategies that scale by themselves
    (DeepSpeed's fp16 section). Skips are expected while S finds its level; they are not divergence.

    Host synchronisation: with an optimizer that takes the overflow flag itself (fused AdamW on CUDA) nothing is
    read back per step; with any other (CPU) GradScaler reads the flag to decide whether to call step().
    FSDP2's gradients are DTensor shards; GradScaler's overflow check on DTensors all-reduces the flag over the
    mesh (torch's DTensor handler for _amp_foreach_non_finite_check_and_unscale_), so every rank skips alike."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.grad_scaler = torch.amp.GradScaler(device.type, enabled=enabled)
        # Skipped steps, counted on the device: reading them is a log-step business. The count of a resumed run
        # continues from the checkpoint's (`skips_before`).
        self._skips = torch.zeros((), dtype=torch.int64, device=device)
        self.skips_before = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.grad_scaler.scale(loss) if self.enabled else loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by S (and find overflows) before anything reads them: clipping, the norm."""
        if self.enabled:
            self.grad_scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """optimizer.step() unless the gradients overflowed; then update S."""
        if not self.enabled:
            optimizer.step()
            return
        before = self._scale().clone()
        self.grad_scaler.step(optimizer)
        self.grad_scaler.update()
        self._skips += self._scale() < before  # S only falls on an overflow (backoff 0.5), i.e. a skipped step

    def _scale(self) -> torch.Tensor:
        return self.grad_scaler._get_scale_async()  # the device tensor; get_scale() would synchronise

    def current_scale(self) -> float:
        """The loss scale now (reads it from the device)."""
        return self.grad_scaler.get_scale()

    def stats(self) -> dict[str, float]:
        """For the log line (reads from the device: call on log steps)."""
        if not self.enabled:
            return {}
        return {"loss_scale": float(self._scale()), "overflow_skips": self.skips_before + int(self._skips)}

    # ------------------------------------------------------------------ a stateful part of the checkpoint

    def state_dict(self) -> dict:
        """JSON-able: the scale (a power of two, exact in JSON), the clean steps since the last change, skips."""
        if not self.enabled:
            return {}
        state = self.grad_scaler.state_dict()
        return {"scale": state["scale"], "growth_tracker": state["_growth_tracker"], "overflow_skips": self.skips_before + int(self._skips)}

    def load_state_dict(self, state: dict) -> None:
        """A run that saved without fp16 (or before the scaler existed) left {}: the scaler starts fresh."""
        if not self.enabled or not state:
            return
        full = self.grad_scaler.state_dict()
        full.update(scale=float(state["scale"]), _growth_tracker=int(state["growth_tracker"]))
        self.grad_scaler.load_state_dict(full)
        self.skips_before = int(state["overflow_skips"])
        self._skips.zero_()
