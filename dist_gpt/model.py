"""The GPT-2 model: one file, no parallelism.

Positions are either RoPE (the default: rotary embeddings on q and k of every head) or GPT-2's own learned
table (`wpe`). Attention goes through `F.scaled_dot_product_attention`, which picks flash kernels on GPU.
The model knows nothing about DDP, FSDP or DeepSpeed: they wrap it from the outside.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dist_gpt.fused_loss import linear_cross_entropy

GPT2_VOCAB_SIZE = 50257  # what the GPT-2 BPE emits; ids >= this are padding rows of the embedding
PADDED_VOCAB_SIZE = 50304  # 50257 rounded up to a multiple of 64: faster matmuls, shards evenly on 2..64 ranks

ATTENTION_BACKENDS = {
    "auto": None,  # let PyTorch pick (flash > efficient > math on CUDA)
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "math": [SDPBackend.MATH],
}
CUDA_ONLY_BACKENDS = ("efficient", "cudnn")
# The GPTConfig fields that fix the parameters' shapes: a checkpoint or an export decides them, and the model
# it is loaded into must agree (the others, e.g. dropout or block_size with RoPE, may change).
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "bias", "vocab_size", "position", "tie_embeddings")


@dataclass
class GPTConfig:
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block (head size = n_embd / n_head)
    n_embd: int = 768  # width of the residual stream
    block_size: int = 1024  # context length in tokens (the training sequence length)
    vocab_size: int = PADDED_VOCAB_SIZE  # rows of the embedding (padded)
    tokenizer_vocab_size: int = GPT2_VOCAB_SIZE  # ids the tokenizer can emit; generate() never exceeds it
    dropout: float = 0.0  # on embeddings, attention weights and residual branches; 0 = off
    bias: bool = True  # biases in the Linear and LayerNorm layers (GPT-2 has them)
    tie_embeddings: bool = True  # lm_head reuses wte (GPT-2's choice); false: its own V x C matrix (the seed's log)
    position: str = "rope"  # rope | learned
    rope_theta: float = 10000.0  # RoPE base: rotation frequencies run from 1 down to ~1/theta radians per position
    attn_backend: str = "auto"  # auto | flash | efficient | cudnn | math
    loss: str = "chunked"  # chunked (never materialises the full logits) | plain
    loss_chunk_tokens: int = 1024  # tokens per chunk of the chunked loss

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def check(self) -> None:
        """Raise ValueError with one line naming the problem and the fix."""
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: pick n_embd a multiple of n_head")
        if self.position not in ("rope", "learned"):
            raise ValueError(f"position={self.position!r} is unknown: use 'rope' or 'learned'")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head size, got n_embd/n_head={self.head_dim}: change n_embd or n_head")
        if self.attn_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attn_backend={self.attn_backend!r} is unknown: use one of {', '.join(ATTENTION_BACKENDS)}")
        if self.loss not in ("chunked", "plain"):
            raise ValueError(f"loss={self.loss!r} is unknown: use 'chunked' or 'plain'")
        if self.tokenizer_vocab_size > self.vocab_size:
            raise ValueError(f"vocab_size={self.vocab_size} is smaller than the tokenizer's {self.tokenizer_vocab_size} ids: raise vocab_size")
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "loss_chunk_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")


# Named shapes. The GPT-2 family matches OpenAI's releases; `seed` is the seed project's small Bible model.
PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "seed": dict(n_layer=2, n_head=2, n_embd=384, block_size=256),
}


def preset(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}")
    return replace(GPTConfig(**PRESETS[name]), **overrides)


def gpt_config_fields() -> list[str]:
    return [f.name for f in fields(GPTConfig)]


# ----------------------------------------------------------------------------------------------- RoPE


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position < block_size, computed once.

    The tables are non-persistent buffers: they are a pure function of the config, so they stay out of
    checkpoints and out of the GPT-2 weight import."""

    def __init__(self, head_dim: int, block_size: int, theta: float):
        super().__init__()
        self.head_dim, self.block_size, self.theta = head_dim, block_size, theta
        cos, sin = self._tables()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim))
        angles = torch.outer(torch.arange(self.block_size, dtype=torch.float64), inv_freq)  # (T, head_dim/2)
        return angles.cos().float(), angles.sin().float()

    def reset_parameters(self) -> None:
        """Recompute the tables in place (after the model was built on the meta device)."""
        cos, sin = self._tables()
        self.cos = cos.to(self.cos.device)
        self.sin = sin.to(self.sin.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x of shape (B, n_head, T, head_dim); position t uses angle t * inv_freq.

        The "rotate half" pairing (i, i + head_dim/2): any fixed pairing works, since q and k are rotated alike."""
        T = x.size(-2)
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


# ----------------------------------------------------------------------------------------------- blocks


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.rotary = RotaryEmbedding(config.head_dim, config.block_size, config.rope_theta) if config.position == "rope" else None
        self.backends = ATTENTION_BACKENDS[config.attn_backend]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.config.n_head, self.config.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        dropout = self.config.dropout if self.training else 0.0
        if self.backends is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            with sdpa_kernel(self.backends):
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's tanh GELU


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class LMHead(nn.Linear):
    """The output projection, and the loss when targets are given.

    The loss lives inside this module's forward (not in GPT.forward reading `self.weight`) so that wrappers
    that gather parameters around a module's call (DeepSpeed ZeRO-3, FSDP) see the weight being used."""

    def __init__(self, config: GPTConfig):
        super().__init__(config.n_embd, config.vocab_size, bias=False)
        self.loss_impl, self.chunk_tokens = config.loss, config.loss_chunk_tokens

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return F.linear(hidden, self.weight)
        if self.loss_impl == "plain":
            logits = F.linear(hidden, self.weight).float()
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return linear_cross_entropy(hidden.reshape(-1, hidden.size(-1)), self.weight, targets.reshape(-1), chunk_tokens=self.chunk_tokens)


# ----------------------------------------------------------------------------------------------- GPT


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.check()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = LMHead(config)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # weight tying, as GPT-2: the same matrix reads and writes tokens
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2's init: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 n_layer) so the
        residual stream's variance does not grow with depth; biases zero, LayerNorms identity."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, LMHead) and self.config.tie_embeddings:
                continue  # it is wte, initialised there
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith("c_proj") else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
            elif isinstance(module, RotaryEmbedding):
                module.reset_parameters()

    # -------------------------------------------------------------------------------------- forward

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) token ids. Returns the logits (B, T, vocab_size), or with targets the mean
        cross-entropy (targets of -1 are ignored). positions, a (B, T) bool mask: the logits of those
        positions only, (N, vocab_size), sparing the output layer's work elsewhere (scoring a benchmark's
        answers, where most positions are the question)."""
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size={self.config.block_size}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        x = self.drop(x)
        for block in self.h:
            x = block(x)
        hidden = self.ln_f(x)
        return self.lm_head(hidden if positions is None else hidden[positions], targets)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T). The context is cropped to the last
        block_size tokens; padded vocabulary rows are never sampled."""
        for idx in self.generate_steps(idx, max_new_tokens, temperature, top_k):
            pass
        return idx

    @torch.no_grad()
    def generate_steps(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None) -> Iterator[torch.Tensor]:
        """generate() one token at a time, for streaming: yields idx first as given, then after each new token."""
        yield idx
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size :]
            logits = self(context)[:, -1, :].float()
            logits[:, self.config.tokenizer_vocab_size :] = float("-inf")
            if temperature <= 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    k = min(top_k, self.config.tokenizer_vocab_size)
                    kth = torch.topk(logits, k).values[:, [-1]]
                    logits[logits < kth] = float("-inf")
                next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, next_id), dim=1)
            yield idx

    # -------------------------------------------------------------------------------------- accounting

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (a tied wte/lm_head matrix once). non_embedding drops the tables that are only
        looked up, so that 6N counts the matmuls: the position table, and wte when lm_head has its own matrix
        (tied, wte also does the output projection's work and stays counted)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            lookups = [self.wpe] if self.wpe is not None else []
            if not self.config.tie_embeddings:
                lookups.append(self.wte)
            n -= sum(table.weight.numel() for table in lookups)
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B:
        6N for the weight matmuls plus 12 * n_layer * n_embd * T for the attention scores and values."""
        T = seq_len or self.config.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * self.config.n_layer * self.config.n_embd * T

    def attention_backend(self, dtype: torch.dtype | None = None) -> str:
        """Which SDPA kernel really runs for this model's attention on its device, in `dtype` (what training
        computes in; default: bf16 on a GPU that supports it, else the parameters' dtype)."""
        attn = self.h[0].attn
        device = attn.c_attn.weight.device
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else attn.c_attn.weight.dtype
        return sdpa_kernel_that_runs(attn.backends, device, dtype, self.config.n_head, min(64, self.config.block_size), self.config.head_dim, self.config.attn_backend)


def sdpa_kernel_that_runs(backends: list | None, device: torch.device, dtype: torch.dtype, n_head: int, seq_len: int, head_dim: int, label: str = "auto") -> str:
    """Run one causal attention call restricted to `backends` (None: PyTorch's choice) under a dispatch mode
    that records the ATen ops it reaches, and name the kernel that executed (not the one asked for).
    "none: ..." when no allowed kernel can run there."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    q = torch.randn(1, n_head, seq_len, head_dim, device=device, dtype=dtype)
    context = sdpa_kernel(backends) if backends is not None else contextlib.nullcontext()
    try:
        with context, RecordOps() as recorder:
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
    except RuntimeError as e:
        return f"none: {label!r} cannot run on {device.type} ({str(e).splitlines()[0]})"
    for kernel, kernel_label in KERNEL_LABELS:
        if kernel in recorder.ops:
            return kernel_label
    return "math (unfused matmul + softmax)"


# ATen op -> what to tell the user. The math backend is decomposed into plain ops (no fused kernel seen).
KERNEL_LABELS = [
    ("aten._scaled_dot_product_flash_attention_for_cpu", "cpu-flash (PyTorch's CPU kernel, not CUDA flash)"),
    ("aten._scaled_dot_product_flash_attention", "flash"),
    ("aten._scaled_dot_product_cudnn_attention", "cudnn"),
    ("aten._scaled_dot_product_efficient_attention", "efficient"),
    ("aten._scaled_dot_product_attention_math", "math"),
]
